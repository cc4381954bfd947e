"""Tiny configs of every registered model family and rollout-like batches shared by the model tests."""
from __future__ import annotations

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=200, max_position_embeddings=256,
              attn_implementation="eager")


# 8 experts: EP=2 and EP=4 both leave several experts per rank (megatron's multi-expert path)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
WINDOW = 8  # Mistral's sliding window: shorter than the test sequences, so it is really applied


# Per family, what its tiny config sets beyond COMMON (a family not listed here is tested with COMMON).
FAMILY_CONFIG = {
    "llama": dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(tie_word_embeddings=True, head_dim=16),
    "mistral": dict(tie_word_embeddings=False, sliding_window=WINDOW),
    "qwen3_moe": dict(**MOE, tie_word_embeddings=False, head_dim=16),
}


def hf_model(arch: str, seed: int = 0, **overrides):
    """A random-weight HF model of a registered family (``megatron_skpo.model.families``): Llama
    (untied, Llama-3.2-style rope scaling), Qwen2 (tied, qkv bias), Qwen3 (tied, q/k norms), Mistral
    (untied, sliding window of :data:`WINDOW`), Qwen3-MoE (untied, :data:`MOE`); ``overrides`` go
    into the config."""
    import transformers as tf

    from megatron_skpo.model.families import FAMILIES

    spec = FAMILIES[arch]
    cfg = tf.AutoConfig.for_model(arch, **{**COMMON, **FAMILY_CONFIG.get(arch, {}), **overrides})
    cls = getattr(tf, spec.architecture)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # norms and biases away from their 1/0 initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, cfg.to_dict()


def per_expert(named: dict) -> dict:
    """transformers 5 keeps MoE experts fused in memory (``mlp.experts.gate_up_proj [E, 2I, H]`` =
    gate rows then up rows, ``down_proj [E, H, I]``) but saves them per expert, the format on the
    Hub and the one our mappings read: split them the same way (``test_mappings`` checks this
    against ``save_pretrained``, which cannot run here: it writes nothing on ranks other than 0
    of a distributed job)."""
    out = {}
    for k, v in named.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            for e, (gate, up) in enumerate(zip(*torch.chunk(v, 2, dim=1))):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate.clone(), up.clone()
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            out.update({f"{base}{e}.down_proj.weight": d.clone() for e, d in enumerate(v)})
        else:
            out[k] = v
    return out


def hf_weights(model) -> dict:
    """The model's tensors as an HF checkpoint holds them (:func:`per_expert`)."""
    return per_expert({k: v.detach().clone() for k, v in model.state_dict().items()})


def hf_grads(model) -> dict:
    """The parameters' ``.grad`` under checkpoint names (zeros where there is none)."""
    return per_expert({k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                       for k, p in model.named_parameters()})


def rollout(num: int = 6, vocab: int = 200, seed: int = 1):
    """``num`` sequences of 6..20 tokens: prompt (no loss) + response, and per-token advantages."""
    g = torch.Generator().manual_seed(seed)
    tokens, masks, adv = [], [], []
    for _ in range(num):
        length = int(torch.randint(6, 21, (1,), generator=g))
        prompt = int(torch.randint(2, 5, (1,), generator=g))
        tokens.append(torch.randint(0, vocab, (length,), generator=g))
        masks.append(torch.cat([torch.zeros(prompt), torch.ones(length - prompt)]))
        adv.append(torch.randn(length, generator=g))
    return tokens, masks, adv


def policy_gradient_loss(logp, entropy, batch):
    """sum_t mask * (-A_t log pi_t) - 0.01 * sum_t mask * H_t (touches both fused outputs)."""
    mask, adv = batch.loss_mask, batch.token_values["adv"]
    local = (-(adv * logp) * mask).sum() - 0.01 * (entropy * mask).sum()
    return local, {"tokens": mask.sum()}


def hf_policy_loss(model, batch=None) -> float:
    """:func:`policy_gradient_loss`, token-normalised over ``batch`` (default :func:`rollout`), from
    transformers' own forward (fp64 log-softmax of its logits)."""
    tokens, masks, adv = batch if batch is not None else rollout()
    total, count = 0.0, 0.0
    for t, m, a in zip(tokens, masks, adv):
        with torch.no_grad():
            logits = model(t[None]).logits[0, :-1].double()
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(1, t[1:, None])[:, 0]
        ent = -(logp_all.exp() * logp_all).sum(-1)
        total += float((-(a[1:] * logp) * m[1:]).sum() - 0.01 * (ent * m[1:]).sum())
        count += float(m[1:].sum())
    return total / count
