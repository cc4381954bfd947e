"""Tiny Llama / Qwen2 configs and rollout-like batches shared by the model tests."""
from __future__ import annotations

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=200, max_position_embeddings=256,
              attn_implementation="eager")


def hf_model(arch: str, seed: int = 0):
    """A random-weight HF model: Llama (untied, Llama-3.2-style rope scaling) or Qwen2 (tied, qkv bias)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch == "llama":
        cfg = LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
        cls = LlamaForCausalLM
    else:
        cfg = Qwen2Config(**COMMON, tie_word_embeddings=True)
        cls = Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # norms and biases away from their 1/0 initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, cfg.to_dict()


def hf_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
