"""Write a small local code RL set: short stdin/stdout programming problems with their tests.

Usage: ``python scripts/make_code_problems.py OUT.jsonl``. Each row is ``{"question": str,
"tests": [{"input": str, "output": str}, ...]}``, the generic code format (``data.train.tests_field:
tests``). The tasks are one-liners a small model can sometimes write, so a CPU run of a few steps
(configs/code_cpu.yaml) has mixed groups to learn from; the first 24 train, the last 8 are held out.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# (statement, function of the input text -> expected output, inputs)
TASKS = [
    ("Read two integers a and b on one line and print a + b.", lambda s: sum(map(int, s.split())), ["1 2", "10 -4", "0 0"]),
    ("Read two integers a and b on one line and print a * b.", lambda s: int(s.split()[0]) * int(s.split()[1]), ["3 4", "-2 5", "7 0"]),
    ("Read two integers a and b on one line and print the larger one.", lambda s: max(map(int, s.split())), ["3 9", "-1 -7", "5 5"]),
    ("Read two integers a and b on one line and print the smaller one.", lambda s: min(map(int, s.split())), ["3 9", "-1 -7", "4 4"]),
    ("Read two integers a and b on one line and print a - b.", lambda s: int(s.split()[0]) - int(s.split()[1]), ["9 3", "2 8", "0 0"]),
    ("Read an integer n and print n squared.", lambda s: int(s) ** 2, ["3", "-4", "0"]),
    ("Read an integer n and print 2 * n.", lambda s: 2 * int(s), ["3", "-4", "0"]),
    ("Read an integer n and print n + 1.", lambda s: int(s) + 1, ["3", "-4", "99"]),
    ("Read an integer n and print its absolute value.", lambda s: abs(int(s)), ["3", "-4", "0"]),
    ("Read an integer n and print YES if it is even, otherwise NO.", lambda s: "YES" if int(s) % 2 == 0 else "NO", ["4", "7", "0"]),
    ("Read an integer n and print the sum 1 + 2 + ... + n.", lambda s: int(s) * (int(s) + 1) // 2, ["3", "10", "1"]),
    ("Read an integer n and print n factorial.", lambda s: __import__("math").factorial(int(s)), ["3", "5", "0"]),
    ("Read a word and print it reversed.", lambda s: s.strip()[::-1], ["abc", "hello", "x"]),
    ("Read a word and print it in upper case.", lambda s: s.strip().upper(), ["abc", "Hello", "x"]),
    ("Read a word and print its length.", lambda s: len(s.strip()), ["abc", "hello", "x"]),
    ("Read a word and print its first letter.", lambda s: s.strip()[0], ["abc", "hello", "x"]),
    ("Read a line of integers separated by spaces and print their sum.", lambda s: sum(map(int, s.split())), ["1 2 3", "5", "-1 1 -1 1"]),
    ("Read a line of integers separated by spaces and print the largest.", lambda s: max(map(int, s.split())), ["1 7 3", "5", "-3 -1 -2"]),
    ("Read a line of integers separated by spaces and print how many there are.", lambda s: len(s.split()), ["1 7 3", "5", "4 4 4 4"]),
    ("Read a word and print YES if it reads the same backwards, otherwise NO.", lambda s: "YES" if s.strip() == s.strip()[::-1] else "NO", ["abba", "abc", "x"]),
    ("Read an integer n and print the numbers 1 to n on one line, separated by spaces.", lambda s: " ".join(map(str, range(1, int(s) + 1))), ["3", "1", "5"]),
    ("Read an integer n and print its last digit.", lambda s: abs(int(s)) % 10, ["123", "7", "-45"]),
    ("Read two words on one line and print them joined by a hyphen.", lambda s: "-".join(s.split()), ["a b", "hello world", "x y"]),
    ("Read a word and print how many vowels (a, e, i, o, u) it has.", lambda s: sum(c in "aeiou" for c in s.strip()), ["hello", "sky", "aeiou"]),
    ("Read an integer n and print n cubed.", lambda s: int(s) ** 3, ["2", "-3", "0"]),
    ("Read an integer n and print n - 1.", lambda s: int(s) - 1, ["3", "-4", "100"]),
    ("Read two integers a and b on one line and print YES if a equals b, otherwise NO.", lambda s: "YES" if len(set(s.split())) == 1 else "NO", ["3 3", "1 2", "0 0"]),
    ("Read a word and print it twice, with no space between.", lambda s: s.strip() * 2, ["ab", "x", "hey"]),
    ("Read an integer n and print the number of digits it has.", lambda s: len(str(abs(int(s)))), ["123", "7", "-4500"]),
    ("Read a word and print it in lower case.", lambda s: s.strip().lower(), ["ABC", "Hello", "x"]),
    ("Read a line of integers separated by spaces and print the smallest.", lambda s: min(map(int, s.split())), ["1 7 3", "5", "-3 -1 -2"]),
    ("Read an integer n and print YES if it is positive, otherwise NO.", lambda s: "YES" if int(s) > 0 else "NO", ["4", "-7", "0"]),
]


def rows() -> list[dict]:
    return [{"question": q, "tests": [{"input": x + "\n", "output": f"{f(x)}\n"} for x in inputs]}
            for q, f, inputs in TASKS]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    print(f"wrote {len(TASKS)} problems to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
