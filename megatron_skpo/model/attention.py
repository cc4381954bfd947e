"""Core attention for megatron-core's local (non-Transformer-Engine) layer spec on torch's
``scaled_dot_product_attention``.

megatron-core's own ``DotProductAttention`` materialises the ``[b, heads, s, s]`` scores, scales,
masks and soft-maxes them in separate passes and multiplies by the values: on CPU the
element-wise passes over ``heads * s^2`` elements dominate a training step at sequence lengths
of a few hundred tokens. ``torch.nn.functional.scaled_dot_product_attention`` does the same maths
in fused kernels (flash attention on CPU for causal masks; a fused masked kernel for the
block-diagonal and shared-prefix masks of packed micro-batches, see ``model/packing.py``), with
the same results to rounding. We keep megatron-core's module (its constructor, TP head split,
``softmax_scale`` and dropout RNG tracker) and replace only the forward.

Not supported by it (the constructor refuses): sliding-window attention and non-vanilla softmax
variants. GPUs use Transformer Engine's attention (``model.transformer_impl: auto``).

Sliding-window models use :class:`WindowedDotProductAttention` instead. Sliding-window attention for megatron-core's local layer spec that keeps the caller's mask.

megatron-core 0.16.1's ``DotProductAttention`` hands ``window_size`` to ``FusedScaleMaskSoftmax``,
whose torch path then *replaces* the attention mask it was given by a plain sliding-window causal
mask (``get_sliding_window_causal_mask``). A packed micro-batch's block-diagonal mask would be
dropped and tokens would attend across sequence boundaries. :class:`WindowedDotProductAttention`
takes the window out of the softmax and applies it itself, OR-ed with the given mask (alone when
none is given, as megatron-core does), so the local spec computes exactly what HF's sliding-window
attention computes, packed or not. The Transformer Engine spec needs none of this: its attention
takes ``window_size`` together with the packed sequence boundaries.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_skpo.model.packing import AttentionBlocks


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` whose forward is ``scaled_dot_product_attention``.

    ``attention_mask``: ``[b or 1, 1, sq, sk]`` bool, True where attention is NOT allowed (megatron's
    convention); None for a plain causal mask; or :class:`AttentionBlocks` (packed micro-batches:
    one SDPA call per block, none across blocks).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.window_size is not None or self.softmax_offset is not None:
            raise ValueError("SDPAttention supports full causal attention with the vanilla softmax only "
                             "(no window_size, no softmax offset)")
        if self.config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention: apply_query_key_layer_scaling is an fp16 trick of the unfused path")

    def forward(self, query, key, value, attention_mask: Union[None, torch.Tensor, AttentionBlocks],
                attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        """query ``[sq, b, heads, d]``, key/value ``[sk, b, groups, d]`` -> context ``[sq, b, heads * d]``."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes a boolean attention_mask (no bias, no packed_seq_params)")
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        p = self.attention_dropout.p if self.training else 0.0
        # dropout draws from the model-parallel RNG stream, as megatron-core's attention does
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with rng:
            if isinstance(attention_mask, AttentionBlocks):  # independent blocks: never compute across them
                out = torch.cat([self._sdpa(q[:, :, s:e], *_keys(k, v, s, e, keys), m, p)
                                 for s, e, keys, m in attention_mask.blocks], dim=2)
            else:
                out = self._sdpa(q, k, v, attention_mask, p)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _sdpa(self, q, k, v, masked: Optional[torch.Tensor], p: float) -> torch.Tensor:
        """Causal attention when ``masked`` is None, else where ``masked`` is False."""
        # GQA: each key/value head serves `groups` consecutive query heads (megatron's layout), which is
        # what enable_gqa computes without copying the keys and values `groups` times
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if masked is None else ~masked, dropout_p=p,
                                              is_causal=masked is None, scale=self.softmax_scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


def _keys(k: torch.Tensor, v: torch.Tensor, start: int, end: int, keys: Optional[torch.Tensor]):
    """The block's keys and values ``[b, heads, n_k, d]``: its own range, or the given positions."""
    if keys is None:
        return k[:, :, start:end], v[:, :, start:end]
    return k.index_select(2, keys), v.index_select(2, keys)


def window_mask(sq: int, sk: int, window: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``[sq, sk]`` bool, True where key j is *outside* query i's window: keys ``i-left..i+right``
    are kept, query positions aligned to the end of the keys (Megatron's convention)."""
    q = torch.arange(sq, device=device)[:, None] + (sk - sq)
    k = torch.arange(sk, device=device)[None, :]
    left, right = window
    return (k < q - left) | (k > q + right)


class WindowedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` whose sliding window (``config.window_size`` on this layer)
    composes with the attention mask instead of replacing it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.window: Optional[tuple[int, int]] = self.scale_mask_softmax.window_size
        self.scale_mask_softmax.window_size = None  # the softmax would discard our mask

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self.window is not None:
            # with right = 0 (every causal model) the window mask is causal by itself
            mask = window_mask(query.size(0), key.size(0), self.window, query.device)
            attention_mask = mask if attention_mask is None else attention_mask | mask
        return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                               attention_bias=attention_bias, packed_seq_params=packed_seq_params)
