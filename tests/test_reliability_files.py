"""Hostile files end in one line naming the file (and line or tensor), or are handled cleanly.

Issue 21: recipes (alias bombs, repeated keys), converter inputs (safetensors headers, config.json
against the tensors, truncated GGUF), dataset lines (deep nesting, no newline, --dry-run sampling),
a 100,000-digit answer and a resumed evaluation. Every file is tiny and written in ``tmp_path``.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fake_weights import header_only_weights

from checkpoint_convert import checks, hf_io
from checkpoint_convert.staging import ConvertError
from megatron_skpo.config import ConfigError, load_config


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---- YAML recipes and overrides -------------------------------------------------------------------

def _bomb(levels: int = 9) -> str:
    lines, prev = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'], "a"
    for name in "bcdefghij"[: levels - 1]:
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
        prev = name
    return "\n".join(lines + [f"optim: {{lr: *{prev}}}"]) + "\n"


def test_billion_laughs_recipe_is_refused_fast(tmp_path):
    (tmp_path / "bomb.yaml").write_text(_bomb())
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"bomb.yaml: line \d+: aliases expand this document") as e:
        load_config(tmp_path / "bomb.yaml")
    assert time.monotonic() - t0 < 10 and _one_line(e)


def test_billion_laughs_override_is_refused():
    value = _bomb(6).replace("\n", ", ").rstrip(", ")
    with pytest.raises(ConfigError, match="override 'optim="):
        load_config(None, [f"optim={{{value}}}"])


@pytest.mark.parametrize("text, needle", [
    ("optim:\n  lr: 1.0e-5\n\noptim:\n  lr: 5.0e-1\n", "line 4: duplicate key 'optim' (first at line 1)"),
    ("optim:\n  lr: 1.0e-5\n  warmup_steps: 0\n  lr: 5.0e-1\n", "line 4: duplicate key 'lr' (first at line 2)"),
    ("optim: {lr: 1.0e-5, lr: 5.0e-1}\n", "line 1: duplicate key 'lr' (first at line 1)"),
], ids=["section", "field", "flow"])
def test_duplicate_keys_name_both_lines(tmp_path, text, needle):
    (tmp_path / "x.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "x.yaml")
    assert _one_line(e) == f"{tmp_path / 'x.yaml'}: {needle}"


def test_small_anchors_and_merges_still_load():
    """A merge may override the keys it brings in; a few aliases are fine."""
    from megatron_skpo.config.yaml_load import load_yaml

    data = load_yaml("d: &d {lr: 1.0e-5, weight_decay: 0.1}\noptim:\n  <<: *d\n  lr: 2.0e-5\n", "m.yaml")
    assert data["optim"] == {"lr": 2.0e-5, "weight_decay": 0.1}


def test_every_shipped_recipe_still_loads():
    from megatron_skpo.config import read_recipe

    recipes = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
    assert recipes and all(isinstance(read_recipe(p), dict) for p in recipes)


# ---- safetensors headers, config.json, GGUF ---------------------------------------------------------

def _safetensors(path: Path, header: dict | bytes, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, data, needle", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "tensor b: data_offsets .* overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, bytes(16), "tensor b: .* leaves a gap of 4"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), r"tensor a: F32 \[3\] needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "truncated safetensors file"),
    ({"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 8]}}, bytes(8), "tensor a: corrupt header entry"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "nested deeper than"),
], ids=["overlap", "gap", "dtype-shape", "past-end", "bad-entry", "deep"])
def test_hostile_safetensors_headers(tmp_path, header, data, needle):
    path = _safetensors(tmp_path / "model.safetensors", header, data)
    with pytest.raises(ConvertError, match=needle) as e:
        hf_io.read_header(path)
    assert _one_line(e).startswith(str(path))


def test_oversized_header_length_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ConvertError, match="over the .* byte bound"):
        hf_io.read_header(path)


def _tiny_hf(root: Path, **config) -> Path:
    root.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(16, 8), "model.layers.0.mlp.down_proj.weight": torch.zeros(8, 4),
               "model.layers.1.mlp.down_proj.weight": torch.zeros(8, 4)}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8,
                                                  "vocab_size": 16, **config}))
    return root


@pytest.mark.parametrize("config, needle", [
    ({"num_hidden_layers": 1_000_000_000}, r"num_hidden_layers=1000000000 but the safetensors files hold layers 0..1"),
    ({"vocab_size": 32}, r"vocab_size=32, hidden_size=8 but tensor model.embed_tokens.weight is \[16, 8\]"),
    ({"hidden_size": -1}, "hidden_size must be a positive integer"),
], ids=["layers", "vocab", "negative"])
def test_config_json_is_checked_against_the_tensors(tmp_path, config, needle):
    src = hf_io.open_hf(_tiny_hf(tmp_path / "hf", **config))
    with pytest.raises(ConvertError, match=needle) as e:
        checks.check_config_fits(src.config, {n: t.shape for n, t in src.tensors.items()}, str(src.root))
    assert _one_line(e).startswith(f"{src.root}/config.json")


def test_a_billion_layer_config_never_reaches_megatron(tmp_path):
    from checkpoint_convert.convert import hf_to_mcore

    src = _tiny_hf(tmp_path / "hf", num_hidden_layers=1_000_000_000, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=4, rms_norm_eps=1e-5, max_position_embeddings=64)
    with pytest.raises(ConvertError, match="num_hidden_layers=1000000000"):
        hf_to_mcore(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_billion_layer_config_is_a_preflight_line_for_the_trainer(tmp_path):
    """skpo-train (and --dry-run) checks model.hf_path's headers and sizes before Megatron builds."""
    from megatron_skpo.trainer.preflight import preflight

    src = _tiny_hf(tmp_path / "hf", num_hidden_layers=1_000_000_000)
    cfg = load_config(None, [f"model.hf_path={src}", f"logging.dir={tmp_path / 'run'}"])
    found = [p for p in preflight(cfg, world_size=1) if p.startswith("model.hf_path")]
    assert found == [f"model.hf_path: {src}/config.json: num_hidden_layers=1000000000 but the safetensors files "
                     "hold layers 0..1 (2 distinct)"]
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{[")  # a header cut short
    found = [p for p in preflight(cfg, world_size=1) if p.startswith("model.hf_path")]
    assert len(found) == 1 and "model.safetensors: corrupt safetensors header" in found[0], found


def test_config_json_that_is_not_json(tmp_path):
    src = _tiny_hf(tmp_path / "hf")
    (src / "config.json").write_text("[" * 100_000)
    with pytest.raises(ConvertError, match="config.json: not valid JSON"):
        hf_io.open_hf(src)


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "tiny.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_checks(gguf_file, tmp_path):
    from checkpoint_convert.gguf_check import check_gguf

    assert check_gguf(gguf_file) == {"token_embd.weight": (8, 16), "output_norm.weight": (8,)}
    data = gguf_file.read_bytes()
    for cut, needle in ((30, "truncated GGUF header"), (len(data) - 16, "tensor output_norm.weight: bytes .* past the "
                                                                         "end of the file")):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ConvertError, match=needle) as e:
            check_gguf(tmp_path / "cut.gguf")
        assert _one_line(e).startswith(str(tmp_path / "cut.gguf"))


def test_gguf_to_hf_checks_before_transformers_reads(tmp_path, gguf_file):
    from checkpoint_convert.gguf import gguf_to_hf

    (tmp_path / "cut.gguf").write_bytes(gguf_file.read_bytes()[:-16])
    with pytest.raises(ConvertError, match="the file is truncated"):
        gguf_to_hf(tmp_path / "cut.gguf", tmp_path / "out")


# ---- dataset lines ------------------------------------------------------------------------------

def _rows(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(lines))
    return path


GOOD = b'{"problem": "1+1?", "answer": "2"}\n'


def test_deep_line_and_long_line_are_bad_rows_under_skip(tmp_path):
    from megatron_skpo.data import load_file
    from megatron_skpo.data.loaders import read_rows

    path = _rows(tmp_path / "d.jsonl", GOOD, b"[" * 200_000 + b"\n", b'{"problem": "' + b"x" * 5000 + b'"}\n',
                 GOOD.replace(b"1+1", b"2+2"))
    problems, report = load_file(path, "problem", "answer", policy="skip")
    assert [p.row for p in problems] == [1, 4] and report.skipped["invalid_json"] == 1
    rows = list(read_rows(path, max_line_bytes=1000))
    assert [r for r, _ in rows] == [1, 2, 3, 4] and rows[1][1].kind == "line_too_long"
    assert str(rows[2][1]) == f"{path}: row 3: line longer than 1000 bytes"
    assert rows[3][1] == {"problem": "2+2?", "answer": "2"}  # read on after skipping the long line


def test_a_file_without_newline_is_one_bad_row_not_all_memory(tmp_path):
    from megatron_skpo.data.loaders import read_rows

    path = _rows(tmp_path / "big.jsonl", b"x" * 3_000_000)
    [(row, err)] = list(read_rows(path, max_line_bytes=100_000))
    assert row == 1 and err.kind == "line_too_long"


def test_deep_line_under_error_policy_names_file_and_line(tmp_path):
    from megatron_skpo.data import DataError, load_file

    path = _rows(tmp_path / "d.jsonl", GOOD, b"{\"a\": " * 100_000 + b"\n")
    with pytest.raises(DataError, match=r"d.jsonl: row 2: invalid JSON: nested too deeply"):
        load_file(path, "problem", "answer")


def test_unreadable_parquet_names_the_file(tmp_path):
    from megatron_skpo.data import DataError, load_file

    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"x.parquet: row 0: cannot read Parquet"):
        load_file(tmp_path / "x.parquet", "problem", "answer")


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_hidden_layers": 2}))
    header_only_weights(d, 2)
    return d


@pytest.mark.parametrize("policy, lines, needle", [
    ("error", [GOOD, b"{oops\n"], "data.train: d.jsonl: skipped 1 invalid_json (rows 2"),
    ("skip", [b"{oops\n"] * 3, "none of the first 3 rows is usable"),
    ("skip", [GOOD, b"{oops\n"], None),
], ids=["error-policy", "all-bad", "skip-some"])
def test_dry_run_samples_the_first_rows(tmp_path, model, policy, lines, needle):
    from megatron_skpo.trainer.preflight import preflight

    data = _rows(tmp_path / "d.jsonl", *lines)
    cfg = load_config(None, [f"model.hf_path={model}", "data.train.name=null", f"data.train.path={data}",
                             "data.train.prompt_field=problem", "data.train.answer_field=answer",
                             f"data.invalid_policy={policy}", f"logging.dir={tmp_path / 'run'}"])
    found = [p for p in preflight(cfg, world_size=1) if p.startswith("data.")]
    assert (found == []) if needle is None else (len(found) == 1 and needle in found[0].replace(str(tmp_path) + "/", ""))


# ---- a 100,000-digit answer; a resumed evaluation ------------------------------------------------

def test_a_correct_100000_digit_answer_grades_correct():
    from megatron_skpo.rewards.grader import grade_math

    gold = "7" * 100_000
    assert grade_math(f"so \\boxed{{{gold}}}", gold).status == "correct"
    assert grade_math(f"The answer is {gold}", gold).status == "correct"
    assert grade_math(f"\\boxed{{{gold}8}}", gold).status == "incorrect"
    assert grade_math(f"\\boxed{{{gold[:-1]}6}}", gold).status == "incorrect"


class _SeededGenerator:
    """Each completion depends on the chunk's seed, its prompt and its place in the batch, as a
    real engine's sampling does."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = [], fail_after

    def generate(self, prompts, n, max_tokens, temperature, top_p, stop=(), seed=None):
        from megatron_skpo.eval.engine import Completion

        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(list(prompts))
        return [[Completion(f"\\boxed{{{(seed + j + i * 7) % 3}}}", 3, False) for i in range(n)]
                for j, _ in enumerate(prompts)]


def test_a_resumed_eval_matches_an_uninterrupted_one(tmp_path):
    from megatron_skpo.data import Problem
    from megatron_skpo.eval import runner
    from megatron_skpo.rewards import RewardPool

    problems = [Problem(f"q{i}", str(i % 3), "p.jsonl", i + 1) for i in range(10)]
    task = runner.Task("t", runner.EvalSettings(model="m", k=2, prompt_template="raw", use_chat_template=False))
    load = lambda self, limit=None: (problems, runner.LoadReport("p.jsonl"))  # noqa: E731
    pool = RewardPool(workers=1, timeout_s=10.0, extractors=("boxed",))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(runner.Task, "load", load)
            mp.setattr(runner, "render_all", lambda ps, *a, **k: (ps, [p.prompt for p in ps], None))
            (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
            whole = runner.evaluate_benchmark(task, _SeededGenerator(), None, pool, tmp_path / "a", chunk=4,
                                              progress=False)
            with pytest.raises(KeyboardInterrupt):
                runner.evaluate_benchmark(task, _SeededGenerator(fail_after=2), None, pool, tmp_path / "b", chunk=4,
                                          progress=False)
            path = tmp_path / "b" / "t.jsonl"
            lines = path.read_text().splitlines(keepends=True)  # 8 records; a kill mid-chunk leaves 6
            path.write_text("".join(lines[:6]))
            gen = _SeededGenerator()
            resumed = runner.evaluate_benchmark(task, gen, None, pool, tmp_path / "b", chunk=4, progress=False)
    finally:
        pool.close()
    assert gen.calls == [["q4", "q5", "q6", "q7"], ["q8", "q9"]]  # whole chunks, fixed by problem index
    assert resumed == whole
    assert runner.read_records(tmp_path / "a" / "t.jsonl") == runner.read_records(path)
