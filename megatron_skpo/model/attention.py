"""Sliding-window attention for megatron-core's local layer spec that keeps the caller's mask.

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

from typing import Optional

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


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
