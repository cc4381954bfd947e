"""The local spec's sliding window (megatron_skpo/model/attention.py): megatron-core still drops a
given mask when a window is set (why the subclass exists), and the window mask by hand."""
from __future__ import annotations

import pytest
import torch

from megatron_skpo.model.attention import window_mask
from mp_helpers import spawn


def test_megatron_softmax_still_replaces_a_given_mask_by_the_window():
    """If this fails, megatron-core now composes the two masks itself: revisit attention.py."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    from megatron_skpo.model import cpu_compat

    cpu_compat.apply()  # the window mask is allocated on "cuda" (patch point 8 makes it the CPU)
    softmax = FusedScaleMaskSoftmax(False, False, AttnMaskType.causal, False, attention_mask_func, True, None,
                                    window_size=(1, 0))
    scores = torch.zeros(1, 1, 4, 4)
    only_first = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    only_first[..., 0] = False  # the caller allows key 0 only
    probs = softmax(scores, only_first)
    assert probs[0, 0, 3, 0] == 0 and probs[0, 0, 3, 2] == 0.5, "the given mask was not replaced"


def test_window_mask_by_hand():
    # window (2, 0): query i sees keys i-2..i
    m = window_mask(4, 4, (2, 0), torch.device("cpu"))
    assert (~m).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
    # queries aligned to the end of the keys (decoding the last 2 of 4 positions)
    assert (~window_mask(2, 4, (1, 0), torch.device("cpu"))).int().tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]


def _packed_attention(rank, world):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_skpo.model.attention import WindowedDotProductAttention
    from megatron_skpo.model.builder import initialize_parallel, make_transformer_config
    from tiny import hf_model

    initialize_parallel(1, 1)
    config = make_transformer_config(hf_model("mistral")[1])
    attn = WindowedDotProductAttention(config, 1, AttnMaskType.causal, "self")
    s, heads, groups, d = 12, config.num_attention_heads, config.num_query_groups, config.kv_channels
    q, k = torch.zeros(s, 1, heads, d), torch.zeros(s, 1, groups, d)
    v = torch.arange(s, dtype=torch.float32)[:, None, None, None].expand(s, 1, groups, d).contiguous()
    packed = torch.ones(s, s, dtype=torch.bool).triu(1)
    packed[2:, :2] = True  # sequences 0-1 and 2-11: block-diagonal causal
    out = attn(q, k, v, packed[None, None]).reshape(s, heads, d)[:, 0, 0]
    return attn.window, attn.scale_mask_softmax.window_size, out


@pytest.mark.distributed
def test_windowed_attention_keeps_the_packing_mask():
    """Two sequences packed into one row, window 8 (Megatron's (7, 0)), uniform scores: each query
    averages the values (= positions) of the keys it may see. Token 2 starts the second sequence
    and sees itself only; token 11 sees 4..11 (the window), not the first sequence."""
    window, softmax_window, out = spawn(_packed_attention, 1)[0]
    assert window == (7, 0) and softmax_window is None
    expected = [0.0, 0.5] + [sum(range(max(2, i - 7), i + 1)) / (i + 1 - max(2, i - 7)) for i in range(2, 12)]
    assert out.tolist() == pytest.approx(expected)
    assert out[11].item() == pytest.approx(7.5)
