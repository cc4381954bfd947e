"""``model.fp8`` is not a silent key: it reaches the ``TransformerConfig`` Megatron builds the
model from (FP8 hybrid format with the chosen scaling recipe), and without Transformer Engine the
run stops before anything heavy starts, naming the key. The FP8 kernels themselves need TE on a
GPU (scripts/gpu_check.sh)."""
from __future__ import annotations

import pytest

from mp_helpers import spawn


def _config(rank, world, fp8, te):
    from megatron_skpo.model import builder
    from megatron_skpo.model.builder import initialize_parallel, make_transformer_config
    from tiny import hf_model

    initialize_parallel(1, 1)
    builder.te_available = lambda: te  # what Megatron receives when TE is importable (not on this machine)
    try:
        config = make_transformer_config(hf_model("llama")[1], dtype="bf16", fp8=fp8)
    except ValueError as e:
        return str(e)
    return config.fp8, config.fp8_recipe, config.bf16


@pytest.mark.distributed
def test_fp8_reaches_the_transformer_config():
    assert spawn(_config, 1, "delayed", True)[0] == ("hybrid", "delayed", True)
    assert spawn(_config, 1, "current", True)[0] == ("hybrid", "tensorwise", True)
    assert spawn(_config, 1, None, True)[0][0] is None


@pytest.mark.distributed
def test_fp8_without_transformer_engine_is_an_error_not_ignored():
    (message,) = spawn(_config, 1, "delayed", False)
    assert "model.fp8: 'delayed' needs Transformer Engine" in message


def test_preflight_names_fp8_when_transformer_engine_is_missing(tmp_path, monkeypatch):
    from megatron_skpo.config import load_config
    from megatron_skpo.model import builder
    from megatron_skpo.trainer.preflight import _fp8

    monkeypatch.setattr(builder, "te_available", lambda: False)
    cfg = load_config(None, ["model.fp8=delayed"])
    (line,) = _fp8(cfg)
    assert line.startswith("model.fp8 = 'delayed' needs Transformer Engine") and "model.fp8=null" in line
    monkeypatch.setattr(builder, "te_available", lambda: True)
    assert _fp8(cfg) == [] and _fp8(load_config(None, [])) == []
