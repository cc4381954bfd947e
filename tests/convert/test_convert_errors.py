"""Bad inputs: a clear error naming the culprit, and nothing left on disk."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from convert_fixtures import save_tiny
from safetensors.torch import load_file, save_file

from checkpoint_convert.cli import main as cli
from checkpoint_convert.convert import hf_to_mcore, mcore_to_hf
from checkpoint_convert.staging import ConvertError


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("errors")
    save_tiny("llama", root / "hf", max_shard_size="100MB")  # one file: model.safetensors
    return root / "hf"


def _edited(hf: Path, tmp: Path, edit) -> Path:
    """A copy of ``hf`` whose single weight file went through ``edit(tensors)``."""
    out = tmp / "edited"
    shutil.copytree(hf, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _fails(tmp: Path, match: str, src: Path, **kw) -> None:
    with pytest.raises(ConvertError, match=match):
        hf_to_mcore(src, tmp / "out", **kw)
    assert not (tmp / "out").exists()
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".out")] == []  # no staging left


def test_unknown_architecture(hf, tmp_path):
    src = tmp_path / "gpt2"
    shutil.copytree(hf, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    _fails(tmp_path, "unknown or unsupported architecture.*'gpt2'", src)


def test_missing_and_extra_tensors_are_named(hf, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.extra.weight"] = t["model.norm.weight"].clone()

    _fails(tmp_path, r"missing tensors \['model.layers.1.mlp.up_proj.weight'\].*"
           r"unexpected tensors \['model.layers.0.self_attn.extra.weight'\]", _edited(hf, tmp_path, edit))


def test_shape_mismatch_is_named(hf, tmp_path):
    def edit(t):
        t["model.layers.3.self_attn.o_proj.weight"] = t["model.layers.3.self_attn.o_proj.weight"][:, :128].clone()

    _fails(tmp_path, r"model.layers.3.self_attn.o_proj.weight: expected \[256, 256\], found \[256, 128\]",
           _edited(hf, tmp_path, edit))


@pytest.mark.parametrize("tp, pp, kw, match", [
    (3, 1, {}, r"TP=3 does not divide num_attention_heads=4, num_key_value_heads=2, intermediate_size=512"),
    (2, 1, {"vocab_divisible_by": 0}, None),  # vocab 300 is even: unpadded TP=2 is fine
    (1, 3, {}, r"PP=3 does not divide num_hidden_layers=4"),
], ids=["heads", "vocab-ok", "layers"])
def test_parallel_sizes_must_divide(hf, tmp_path, tp, pp, kw, match):
    if match is None:
        hf_to_mcore(hf, tmp_path / "out", tp=tp, pp=pp, **kw)
        assert json.loads((tmp_path / "out" / "skpo_convert.json").read_text())["padded_vocab_size"] == 300
    else:
        _fails(tmp_path, match, hf, tp=tp, pp=pp, **kw)


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe_errors")
    save_tiny("qwen3_moe", root / "hf", max_shard_size="100MB")
    return root / "hf"


@pytest.mark.parametrize("kw, match", [
    ({"ep": 3}, r"EP=3 does not divide num_experts=4"),
    ({"tp": 3}, r"TP=3 does not divide num_attention_heads=4, num_key_value_heads=2, .*moe_intermediate_size=128"),
    ({"ep": 0}, r"--tp 1 --pp 1 --ep 0: all must be >= 1"),
], ids=["experts", "expert-ffn", "ep-zero"])
def test_moe_parallel_sizes_must_divide(moe, tmp_path, kw, match):
    _fails(tmp_path, match, moe, **kw)


def test_expert_parallel_needs_an_moe_model(hf, tmp_path):
    _fails(tmp_path, r"EP=2: expert parallelism needs a mixture-of-experts model \(model_type 'llama' is dense",
           hf, ep=2)


def test_moe_missing_expert_is_named(moe, tmp_path):
    def edit(t):
        del t["model.layers.2.mlp.experts.3.up_proj.weight"]

    _fails(tmp_path, r"missing tensors \['model.layers.2.mlp.experts.3.up_proj.weight'\]", _edited(moe, tmp_path, edit))


def test_tp_must_divide_unpadded_vocab(hf, tmp_path):
    src = tmp_path / "v301"
    shutil.copytree(hf, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "vocab_size": 301}))
    _fails(tmp_path, r"TP=2 does not divide vocab_size \(padded\)=301$", src, tp=2, vocab_divisible_by=0)


def test_truncated_safetensors(hf, tmp_path):
    src = tmp_path / "trunc"
    shutil.copytree(hf, src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    _fails(tmp_path, r"model.safetensors: truncated safetensors file \(header promises \d+ bytes", src)


def test_non_empty_output_needs_force(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConvertError, match="not empty .*--force"):
        hf_to_mcore(hf, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    hf_to_mcore(hf, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "release" / "metadata.json").is_file()
    with pytest.raises(ConvertError, match="is the input --mcore"):  # refused before "not empty"
        mcore_to_hf(out, out)


def test_mcore_checkpoint_against_wrong_config(hf, tmp_path):
    hf_to_mcore(hf, tmp_path / "mc")
    like = tmp_path / "like"
    shutil.copytree(hf, like)
    cfg = json.loads((like / "config.json").read_text())
    (like / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 384}))
    with pytest.raises(ConvertError, match=r"shape mismatch: decoder.layers.mlp.linear_fc2.weight: "
                                           r"expected \[4, 256, 384\], found \[4, 256, 512\]"):
        mcore_to_hf(tmp_path / "mc", tmp_path / "hf_out", like=like)
    assert not (tmp_path / "hf_out").exists()


def test_cli_reports_errors_as_json_with_exit_2(hf, tmp_path, capsys):
    code = cli(["hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "o"), "--tp", "3"])
    out = json.loads(capsys.readouterr().out.strip())
    assert code == 2 and out["ok"] is False and "TP=3 does not divide" in out["error"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("size, match", [("5XB", "'5XB' is not a size"), ("0", "must be positive")])
def test_bad_max_shard_size_fails_before_the_checkpoint_is_read(tmp_path, size, match):
    # the --mcore directory does not exist: the size error must come first
    with pytest.raises(ConvertError, match=f"--max-shard-size: .*{match}"):
        mcore_to_hf(tmp_path / "no_checkpoint", tmp_path / "hf_out", max_shard_size=size)
