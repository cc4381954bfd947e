"""Named data formats: readers for benchmark files as they are published on the Hugging Face hub.

A format maps one record to the problem text, the gold answer and ``Problem.meta`` (tests,
``fn_name``, choices, extra; the contract is :class:`megatron_skpo.rewards.reference.Reference`),
and names the reward kind and prompt template its problems fit. ``data.*.format`` picks one
(``fields``, the default, is the ``*_field`` mapping of :func:`fields_reader`). Each reader's
docstring is its field mapping; docs/data.md has them all in one table.

A record a format cannot use raises :class:`BadRow` with a reason (``bad_tests``, ``multi_answer``,
...) and the loader's invalid-row policy applies: skipped and counted by file and row, or an error.

LiveCodeBench's private tests may be stored as base64 of zlib of a pickled JSON string. We read
that pickle with :class:`NoGlobalsUnpickler`, which refuses every global (so no constructor or
function can run), never with ``pickle.loads``: a JSON string needs none.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import string
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from megatron_skpo.data.loaders import BadRow, FieldMissing, RawProblem, Reader, field_reader, get_field
from megatron_skpo.registry import Registry
from megatron_skpo.rewards.extract import last_boxed

LETTERS = string.ascii_uppercase
MMLU_PRO_OPTIONS = 10


@dataclass(frozen=True)
class Format:
    """A registered reader and the reward kind and prompt template that fit its problems."""

    name: str
    read: Reader
    fields: str  # the field mapping in one line (docs/data.md)
    kind: str  # reward kind: math, multiple_choice, code
    template: str  # prompt template: qwen_math, multiple_choice, code


FORMATS: Registry[Format] = Registry("data format")


def register_format(name: str, fields: str, kind: str = "math", template: str = "qwen_math") -> Callable:
    """Register ``read(record) -> RawProblem`` as format ``name``."""
    def deco(read: Reader) -> Reader:
        FORMATS.register(name)(Format(name, read, fields, kind, template))
        return read

    return deco


# ----- shared pieces ---------------------------------------------------------------------------
def first_field(rec: dict, names: Sequence[str]) -> Any:
    """The value of the first of ``names`` present (and not null) in ``rec``."""
    for name in names:
        if rec.get(name) is not None:
            return rec[name]
    raise FieldMissing(f"missing field: none of {', '.join(names)}")


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n".join(value)  # stdin given as a list of lines (APPS/TACO)
    raise BadRow("bad_tests", f"{what} must be text, got {type(value).__name__} {value!r:.60}")


def _json(value: Any, what: str, reason: str = "bad_tests") -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise BadRow(reason, f"{what}: invalid JSON: {e.msg} at column {e.colno}") from None


def _unwrap(value: Any) -> Any:
    """APPS/TACO store a function's return value wrapped in a one-element list."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def taco_tests(io_spec: dict) -> tuple[list[dict], Optional[str]]:
    """TACO/APPS ``{"inputs": [...], "outputs": [...], "fn_name"?}`` -> ({input, output} tests, fn_name).

    With ``fn_name`` each input is the list of the call's arguments (one JSON value per line in our
    tests) and each output the return value, unwrapped from its one-element list as APPS compares it.
    """
    inputs, outputs, fn = io_spec.get("inputs"), io_spec.get("outputs"), io_spec.get("fn_name")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise BadRow("bad_tests", "tests: need lists 'inputs' and 'outputs' of the same length")
    if fn:
        args = [a if isinstance(a, list) else [a] for a in inputs]
        tests = [{"input": "\n".join(json.dumps(a) for a in call), "output": json.dumps(_unwrap(out))}
                 for call, out in zip(args, outputs)]
        return tests, str(fn)
    return [{"input": _text(i, "test input"), "output": _text(o, "test output")} for i, o in zip(inputs, outputs)], None


def parse_tests(value: Any) -> tuple[list[dict], Optional[str]]:
    """Tests as a list of ``{input, output}`` (or a JSON string of one, or TACO's dict) -> (tests, fn_name)."""
    value = _json(value, "tests")
    if isinstance(value, dict):
        tests, fn = taco_tests(value)
    elif isinstance(value, list) and all(isinstance(t, dict) for t in value):
        try:
            tests = [{"input": _text(t["input"], "test input"), "output": _text(t["output"], "test output")}
                     for t in value]
        except KeyError as e:
            raise BadRow("bad_tests", f"tests: a test has no {e.args[0]!r}") from None
        fn = None
    else:
        raise BadRow("bad_tests", f"tests: expected a list of {{input, output}}, got {type(value).__name__}")
    if not tests:
        raise BadRow("bad_tests", "tests: no test cases")
    return tests, fn


def options_text(question: str, options: Sequence[str]) -> str:
    """The question with its lettered options: ``...\\n\\nOptions:\\nA. ...\\nB. ...``."""
    return question.rstrip() + "\n\nOptions:\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def check_choices(options: Any, limit: int = len(LETTERS)) -> list[str]:
    if not isinstance(options, (list, tuple)) or not options or not all(isinstance(o, str) for o in options):
        raise BadRow("bad_choices", f"choices must be a non-empty list of strings, got {options!r:.60}")
    if len(options) > limit:
        raise BadRow("bad_choices", f"{len(options)} options, at most {limit} allowed")
    return list(options)


def check_letter(answer: Any, n_options: int) -> str:
    letter = str(answer).strip().upper()
    if len(letter) != 1 or letter not in LETTERS[:n_options]:
        raise BadRow("bad_answer", f"answer: {answer!r:.20} is not an option letter A..{LETTERS[n_options - 1]}")
    return letter


# ----- the "fields" mapping ----------------------------------------------------------------------
def fields_reader(cfg: Any) -> Reader:
    """The ``*_field`` mapping of a dataset section (dotted paths into nested records):
    ``prompt_field`` -> text, ``answer_field`` -> gold answer (null: "" and the problem needs tests),
    ``tests_field`` -> ``meta["tests"]`` (+ ``fn_name`` from TACO's dict or ``fn_name_field``),
    ``choices_field`` -> ``meta["choices"]`` (options rendered into the text; the answer a letter),
    ``extra_fields`` -> ``meta["extra"]``."""
    answer_field = cfg.answer_field

    def answer_of(rec: dict) -> Any:
        return "" if answer_field is None else get_field(rec, answer_field)

    def meta_of(rec: dict) -> dict:
        meta: dict = {}
        if cfg.tests_field:
            meta["tests"], fn = parse_tests(get_field(rec, cfg.tests_field))
            fn = get_field(rec, cfg.fn_name_field) if cfg.fn_name_field else fn
            if fn:
                meta["fn_name"] = str(fn)
        if cfg.choices_field:
            meta["choices"] = check_choices(get_field(rec, cfg.choices_field))
        if cfg.extra_fields:
            meta["extra"] = {name: get_field(rec, name) for name in cfg.extra_fields}
        return meta

    plain = field_reader(lambda r: get_field(r, cfg.prompt_field), answer_of, meta_of)
    if not cfg.choices_field:
        return plain

    def with_options(rec: dict) -> RawProblem:
        raw = plain(rec)
        if not isinstance(raw.prompt, str):
            raise BadRow("bad_prompt", "prompt: options can only be added to a text prompt")
        choices = raw.meta["choices"]
        return RawProblem(options_text(raw.prompt, choices), check_letter(raw.answer, len(choices)), raw.meta)

    return with_options


# ----- named formats -----------------------------------------------------------------------------
MATH_FIELDS = "problem | Problem | question; answer | Answer, else the last \\boxed{} of solution | Solution"


@register_format("math", MATH_FIELDS)
@register_format("aime", MATH_FIELDS)
def read_aime(rec: dict) -> RawProblem:
    """AIME 2024/2025 as published (HuggingFaceH4/aime_2024, Maxwell-Jia/AIME_2024, math-ai/aime25,
    opencompass/AIME2025, ...), and as ``math`` any maths file in the same shape (MATH-500,
    Minerva): the problem from ``problem``, ``Problem`` or ``question``; the gold answer from
    ``answer`` or ``Answer`` (integers become text), else the last ``\\boxed{}`` of ``solution`` /
    ``Solution``."""
    prompt = first_field(rec, ("problem", "Problem", "question"))
    try:
        answer = first_field(rec, ("answer", "Answer"))
    except FieldMissing:
        boxed = last_boxed(str(first_field(rec, ("solution", "Solution"))))
        if boxed is None:
            raise BadRow("bad_answer", "answer: no answer field and no \\boxed{} in the solution") from None
        answer = boxed
    return RawProblem(prompt, answer)


@register_format("amc", "question | problem; answer (27.0 -> 27)")
def read_amc(rec: dict) -> RawProblem:
    """AMC 2023 (math-ai/amc23, AI-MO/aimo-validation-amc): the problem from ``question`` or
    ``problem``; the gold answer from ``answer`` (published as floats: 27.0 becomes "27")."""
    return RawProblem(first_field(rec, ("question", "problem")), get_field(rec, "answer"))


@register_format("olympiadbench", "[context +] question; final_answer[0] without $...$; skips multi_answer, "
                 "not_text_only")
def read_olympiadbench(rec: dict) -> RawProblem:
    """OlympiadBench (Hothan/OlympiadBench, the 675 text-only English maths problems
    ``OE_TO_maths_en_COMP`` that Qwen2.5-Math's evaluation uses): the problem from ``question``
    (after ``context`` when a row has one); the gold answer is the one string of ``final_answer``
    with its ``$...$`` removed (a multi-part answer such as ``$3, 5$`` is one string there and is
    kept). Rows outside that set are skipped with a reason: ``multi_answer`` when ``final_answer``
    holds more than one string (one gold answer cannot grade them), ``not_text_only`` when
    ``modality`` is not "Text-only" or an ``image_N`` field is set."""
    finals = get_field(rec, "final_answer")
    finals = [finals] if isinstance(finals, str) else finals
    if not isinstance(finals, list) or not finals or not all(isinstance(f, str) for f in finals):
        raise BadRow("bad_answer", f"answer: final_answer must be a list of strings, got {finals!r:.60}")
    if len(finals) > 1:
        raise BadRow("multi_answer", f"final_answer has {len(finals)} answers; one gold answer is graded")
    modality = rec.get("modality")
    images = [k for k, v in rec.items() if k.startswith("image_") and v]
    if (modality is not None and str(modality).lower() != "text-only") or images:
        raise BadRow("not_text_only", f"not text-only (modality {modality!r}, images {images})")
    question = get_field(rec, "question")
    context = rec.get("context")
    prompt = f"{context.strip()}\n\n{question}" if isinstance(context, str) and context.strip() else question
    return RawProblem(prompt, finals[0].strip().strip("$").strip())


@register_format("mmlu_pro", "question + lettered options (A. ..); answer letter, checked against answer_index",
                 kind="multiple_choice", template="multiple_choice")
def read_mmlu_pro(rec: dict) -> RawProblem:
    """MMLU-Pro (TIGER-Lab/MMLU-Pro): the problem is ``question`` followed by its ``options`` (up
    to 10; "N/A" padding dropped as the official evaluation does), lettered A.. in
    ``Options:\\nA. ...`` form; the gold answer is the letter ``answer``, which must agree with
    ``answer_index`` when present (else ``bad_answer``). ``meta["choices"]`` holds the options,
    ``meta["extra"]`` the ``category``."""
    options = get_field(rec, "options")
    raw = check_choices(options, len(LETTERS))
    letter = check_letter(get_field(rec, "answer"), len(raw))
    index = rec.get("answer_index")
    if index is not None and index != LETTERS.index(letter):
        raise BadRow("bad_answer", f"answer {letter!r} disagrees with answer_index {index}")
    kept = [o for o in raw if o.strip() != "N/A"]
    if raw[LETTERS.index(letter)].strip() == "N/A":
        raise BadRow("bad_answer", f"answer {letter!r} is an N/A option")
    kept = check_choices(kept, MMLU_PRO_OPTIONS)
    letter = LETTERS[[i for i, o in enumerate(raw) if o.strip() != "N/A"].index(LETTERS.index(letter))]
    extra = {"category": rec["category"]} if rec.get("category") is not None else {}
    return RawProblem(options_text(get_field(rec, "question"), kept), letter, {"choices": kept, "extra": extra})


class NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any global (class, function, ``os.system``) is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused global {module}.{name}: only plain data is accepted")


def decode_private_tests(value: Any) -> list:
    """LiveCodeBench ``private_test_cases``: a JSON list, or base64(zlib(pickle(JSON string)))."""
    if value is None or value == "":
        return []
    if not isinstance(value, str):
        raise BadRow("bad_tests", f"private_test_cases: expected text, got {type(value).__name__}")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        packed = zlib.decompress(base64.b64decode(value.encode("ascii"), validate=True))
        text = NoGlobalsUnpickler(io.BytesIO(packed)).load()
    except (binascii.Error, zlib.error, UnicodeEncodeError, pickle.UnpicklingError, EOFError, ValueError,
            TypeError, IndexError, KeyError) as e:
        raise BadRow("bad_tests", f"private_test_cases: neither JSON nor compressed JSON ({type(e).__name__}: "
                     f"{e})"[:300]) from None
    if not isinstance(text, str):
        raise BadRow("bad_tests", f"private_test_cases: decoded a {type(text).__name__}, expected a JSON string")
    return _json(text, "private_test_cases")


def _with_starter(text: str, starter: Any) -> str:
    if isinstance(starter, str) and starter.strip():
        return f"{text.rstrip()}\n\nStarter code:\n```python\n{starter.rstrip()}\n```"
    return text


@register_format("livecodebench", "question_content + starter code; public_test_cases + private_test_cases "
                 "(JSON or compressed) -> tests; metadata.func_name -> fn_name", kind="code", template="code")
def read_livecodebench(rec: dict) -> RawProblem:
    """LiveCodeBench code generation (livecodebench/code_generation_lite): the problem is
    ``question_content`` with ``starter_code`` appended (as ``Starter code:`` and a python block)
    when it has one; the tests are ``public_test_cases`` (a JSON string of ``{input, output,
    testtype}``) followed by ``private_test_cases`` (the same as JSON, or base64 of zlib of a
    pickled JSON string, read with :class:`NoGlobalsUnpickler`). ``testtype`` "functional" tests
    call ``metadata``'s ``func_name`` (``meta["fn_name"]``); mixing test types is ``bad_tests``.
    No gold answer; ``meta["extra"]`` keeps ``question_id``, ``platform``, ``difficulty`` and
    ``contest_date``."""
    cases = _list(_json(get_field(rec, "public_test_cases"), "public_test_cases") or [], "public_test_cases")
    cases += _list(decode_private_tests(rec.get("private_test_cases")), "private_test_cases")
    if not cases or not all(isinstance(c, dict) for c in cases):
        raise BadRow("bad_tests", "tests: no test cases" if not cases else "tests: a test case is not an object")
    types = {c.get("testtype", "stdin") for c in cases}
    if len(types) > 1 or not types <= {"stdin", "functional"}:
        raise BadRow("bad_tests", f"tests: test types {sorted(map(str, types))}; expected all stdin or all functional")
    tests, _ = parse_tests([{"input": c.get("input"), "output": c.get("output")} for c in cases])
    meta: dict = {"tests": tests}
    if types == {"functional"}:
        metadata = _json(rec.get("metadata") or "{}", "metadata")
        fn = metadata.get("func_name") if isinstance(metadata, dict) else None
        if not fn:
            raise BadRow("bad_tests", "functional tests but metadata has no func_name")
        meta["fn_name"] = str(fn)
    meta["extra"] = {k: str(rec[k]) for k in ("question_id", "platform", "difficulty", "contest_date")
                     if rec.get(k) is not None}
    return RawProblem(_with_starter(get_field(rec, "question_content"), rec.get("starter_code")), "", meta)


@register_format("taco", "question + starter_code; input_output JSON {inputs, outputs, fn_name?} -> tests",
                 kind="code", template="code")
def read_taco(rec: dict) -> RawProblem:
    """TACO / APPS (BAAI/TACO, codeparrot/apps): the problem is ``question`` (with ``starter_code``
    appended when set); the tests come from ``input_output``, a JSON string ``{"inputs": [...],
    "outputs": [...], "fn_name"?}``: stdin/stdout text (lists of lines are joined), or with
    ``fn_name`` call arguments and return values (:func:`taco_tests`). No gold answer."""
    tests, fn = taco_tests(_dict(_json(get_field(rec, "input_output"), "input_output")))
    if not tests:
        raise BadRow("bad_tests", "tests: no test cases")
    meta = {"tests": tests, **({"fn_name": fn} if fn else {})}
    return RawProblem(_with_starter(get_field(rec, "question"), rec.get("starter_code")), "", meta)


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise BadRow("bad_tests", f"{what}: expected a list of test cases, got {type(value).__name__}")
    return value


def _dict(value: Any) -> dict:
    if not isinstance(value, dict):
        raise BadRow("bad_tests", f"input_output: expected an object, got {type(value).__name__}")
    return value


def reader_of(cfg: Any) -> Reader:
    """The reader of a dataset section: ``fields`` (the *_field mapping) or a registered format."""
    return fields_reader(cfg) if cfg.format == "fields" else FORMATS.get(cfg.format).read
