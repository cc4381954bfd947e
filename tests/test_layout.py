"""Repository layout rules that only a whole-suite run would otherwise reveal."""
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_test_module_basenames_are_unique():
    # tests/ has no __init__.py files: pytest imports each test module by its basename, so two
    # test_x.py in different folders cannot both be collected in one run.
    names = Counter(p.name for p in TESTS.rglob("*.py") if p.name != "conftest.py")
    assert [n for n, c in names.items() if c > 1] == []
