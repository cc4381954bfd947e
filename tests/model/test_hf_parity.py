"""Our Megatron GPTModel vs transformers (tiny Llama, Qwen2, Qwen3, Mistral with a sliding window,
Qwen3-MoE with and without top-k renormalisation; random weights, fp32), at TP=1 and TP=2; weights
read back through the mapping; packed micro-batches vs unpacked forwards (for Mistral: the window
composes with the packing mask)."""
from __future__ import annotations

import pytest
import torch

from megatron_skpo.model.families import FAMILIES
from mp_helpers import spawn
from tiny import WINDOW, hf_model, hf_weights, rollout

# name -> (architecture, config overrides): every registered family, and each MoE one without top-k renormalisation
VARIANTS = {**{a: (a, {}) for a in FAMILIES},
            **{f"{a}-unnormalised": (a, {"norm_topk_prob": False}) for a, f in FAMILIES.items() if f.moe}}
ARCHS = list(VARIANTS)


def _hf(name):
    arch, overrides = VARIANTS[name]
    return hf_model(arch, **overrides)


def _logits(model, tokens, mask=None):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(tokens, pos, mask))


def _worker(rank, world):
    from megatron_skpo.model.builder import build_gpt_model, initialize_parallel
    from megatron_skpo.model.packing import pack_sequences
    from megatron_skpo.model.weights import gather_hf, load_hf

    out = {}
    for tp in (1, 2):
        initialize_parallel(tp, 1, seed=3)
        for arch in ARCHS:
            hf, cfg = _hf(arch)
            model = build_gpt_model(cfg)
            load_hf(model, hf_weights(hf), cfg)
            model.eval()
            tokens = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
            seqs, masks, _ = rollout(5)
            packed = pack_sequences(seqs, masks, budget=64)[0]
            out[(tp, arch)] = dict(
                logits=_logits(model, tokens), weights=gather_hf(model, cfg),
                packed=_logits(model, packed.tokens, packed.attention_mask())[0],
                single=[_logits(model, s[None])[0] for s in seqs], seq_index=packed.seq_index)
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def results():
    return spawn(_worker, 2)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(results, arch, tp):
    hf, cfg = _hf(arch)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    got = results[(tp, arch)]["logits"]
    assert got.shape[-1] >= cfg["vocab_size"]  # padded vocab
    assert (got[..., : cfg["vocab_size"]] - ref).abs().max().item() <= 1e-4


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_weights_read_back_unchanged(results, arch, tp):
    hf, cfg = _hf(arch)
    back, sd = results[(tp, arch)]["weights"], hf_weights(hf)
    assert set(back) == set(sd) - ({"lm_head.weight"} if cfg["tie_word_embeddings"] else set())
    for k in back:
        assert torch.equal(back[k], sd[k]), k


@pytest.mark.distributed
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_forward_equals_unpacked(results, arch):
    r = results[(2, arch)]
    parts = torch.split(r["packed"], [len(r["single"][i]) for i in r["seq_index"]])
    for i, part in zip(r["seq_index"], parts):
        torch.testing.assert_close(part, r["single"][i], atol=1e-5, rtol=0)


def test_mistral_window_changes_the_logits():
    """The sliding window is really in play at these lengths (so the parity above checks it)."""
    hf, cfg = hf_model("mistral")
    full, _ = hf_model("mistral", sliding_window=None)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windowed, unwindowed = hf(tokens).logits, full(tokens).logits
    assert torch.equal(windowed[:, :WINDOW], unwindowed[:, :WINDOW])  # the first W tokens see everything
    assert (windowed[:, WINDOW:] - unwindowed[:, WINDOW:]).abs().max() > 1e-2
