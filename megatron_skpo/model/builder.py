"""Build the policy: a Megatron-core ``GPTModel`` from a Hugging Face config.

Layer spec: Transformer Engine (``get_gpt_layer_with_transformer_engine_spec``) when
``transformer_engine`` imports *and* CUDA is available, megatron-core's local spec otherwise
(``impl="auto"``). Without CUDA the CPU compatibility layer (:mod:`.cpu_compat`) is applied and
its config overrides (CPU weight allocation, fusions off) are merged in; on a GPU nothing is
patched. Model parallel state must be initialised first (:func:`initialize_parallel`).

The spec follows the config: per-head q/k RMSNorm (Qwen3), routed experts (Qwen3-MoE:
``MoELayer`` over ``SequentialMLP`` experts, no grouped GEMM, the all-to-all token dispatcher,
the only one megatron-core accepts with variable sequence lengths) and, on the local spec, a
sliding window that composes with the packing mask (:mod:`.attention`).
"""
from __future__ import annotations

import importlib.util
from typing import Any, Literal, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from megatron_skpo.model import cpu_compat
from megatron_skpo.model.attention import SDPAttention, WindowedDotProductAttention
from megatron_skpo.model.hf_config import gpt_model_kwargs, head_dim, megatron_aux_loss_coeff, moe_spec
from megatron_skpo.model.hf_config import rope_inv_freq, rope_spec, transformer_config_kwargs
from megatron_skpo.model.mappings.sharding import padded_vocab_size

Impl = Literal["auto", "transformer_engine", "local"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# our switch name -> TransformerConfig.fp8_recipe ("current" scaling is Megatron's "tensorwise")
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}


def te_available() -> bool:
    """Transformer Engine is usable: it is installed and CUDA is present (it breaks without)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_impl(impl: Impl) -> Literal["transformer_engine", "local"]:
    if impl == "auto":
        return "transformer_engine" if te_available() else "local"
    if impl == "transformer_engine" and not te_available():
        raise ValueError("model.transformer_impl: transformer_engine needs CUDA and transformer_engine")
    if impl not in ("transformer_engine", "local"):
        raise ValueError(f"model.transformer_impl: unknown value {impl!r}")
    return impl


def check_expert_parallel(ep: int, *, data_parallel: Optional[int] = None, num_experts: Optional[int] = None,
                          dense: bool = False) -> None:
    """``parallel.ep`` must divide the data-parallel size (experts are split over data-parallel
    ranks; each expert keeps the TP split) and the number of routed experts; a dense model
    (``dense=True``) has no experts to split."""
    if ep < 1:
        raise ValueError(f"parallel.ep={ep} must be >= 1")
    if data_parallel is not None and data_parallel % ep:
        raise ValueError(f"parallel.ep={ep} must divide the data-parallel size {data_parallel} "
                         "(world size / (tp * pp)); change parallel.ep or the number of ranks")
    if dense and ep > 1:
        raise ValueError(f"parallel.ep={ep} needs a mixture-of-experts model; this one is dense (use 1)")
    if num_experts is not None and num_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide the model's num_experts={num_experts}")


def initialize_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, ep: int = 1) -> None:
    """Model-parallel groups over the already-initialised default process group, and RNG seeds.

    ``ep``: expert-parallel size (routed experts split over ``ep`` data-parallel ranks; expert
    tensor parallelism stays equal to ``tp``). Call after ``torch.distributed.init_process_group``
    (gloo on CPU, nccl on GPU).
    """
    world = torch.distributed.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by parallel.tp * parallel.pp = {tp * pp}")
    check_expert_parallel(ep, data_parallel=world // (tp * pp))
    cpu_compat.apply()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(seed)


def _recompute_kwargs(recompute: str) -> dict[str, Any]:
    if recompute == "none":
        return {}
    if recompute == "selective":
        return dict(recompute_granularity="selective")
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    raise ValueError(f"model.recompute: unknown value {recompute!r} (none, selective, full)")


def make_transformer_config(hf_config: dict, *, dtype: str = "fp32", impl: Impl = "auto",
                            fp8: Optional[str] = None, recompute: str = "none",
                            sequence_parallel: bool = False, moe_aux_loss_coef: Optional[float] = None,
                            **overrides: Any) -> TransformerConfig:
    """``TransformerConfig`` for ``hf_config`` at the current TP/PP/EP sizes.

    Args:
        dtype: ``fp32`` / ``bf16`` / ``fp16`` compute and parameter dtype (the optimizer keeps
            fp32 master weights for bf16/fp16).
        fp8: ``None``, ``"delayed"`` or ``"current"`` scaling (Transformer Engine only).
        moe_aux_loss_coef: MoE load-balancing coefficient in HF's terms (``router_aux_loss_coef``);
            ``None``: what the HF config applies (:func:`.hf_config.moe_spec`).
        overrides: any further ``TransformerConfig`` field.
    """
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: unknown value {dtype!r} ({', '.join(DTYPES)})")
    resolved = resolve_impl(impl)
    kwargs = transformer_config_kwargs(hf_config)
    moe = moe_spec(hf_config)
    ep = parallel_state.get_expert_model_parallel_world_size()
    check_expert_parallel(ep, num_experts=moe.num_experts if moe else None, dense=moe is None)
    if moe_aux_loss_coef is not None:
        if moe_aux_loss_coef < 0:
            raise ValueError(f"model.moe_aux_loss_coef={moe_aux_loss_coef} must be >= 0")
        if moe is not None:
            kwargs["moe_aux_loss_coeff"] = megatron_aux_loss_coeff(moe_aux_loss_coef, moe.topk,
                                                                   kwargs["num_layers"])
    kwargs.update(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ep,
        params_dtype=DTYPES[dtype], bf16=dtype == "bf16", fp16=dtype == "fp16",
        pipeline_dtype=DTYPES[dtype], sequence_parallel=sequence_parallel,
        # packed micro-batches differ in length: PP stages exchange shapes first. (0.16 rejects
        # that with the default MoE dispatcher even for dense models, hence "alltoall".)
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=resolved == "transformer_engine",
        bias_activation_fusion=resolved == "transformer_engine",
        **_recompute_kwargs(recompute))
    if fp8 is not None:
        if resolved != "transformer_engine" or fp8 not in FP8_RECIPES:
            raise ValueError(f"model.fp8: {fp8!r} needs Transformer Engine and one of {list(FP8_RECIPES)}")
        kwargs.update(fp8="hybrid", fp8_recipe=FP8_RECIPES[fp8])
    if cpu_compat.needed():
        kwargs.update(cpu_compat.config_overrides())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(impl: Impl = "auto", config: Optional[TransformerConfig] = None, sdpa: bool = True):
    """The transformer layer ``ModuleSpec`` for ``config`` (q/k norms, routed experts, sliding
    window; ``None``: a plain dense layer): Transformer Engine's, or megatron-core's local one. The
    local spec's core attention runs on torch's fused ``scaled_dot_product_attention`` (``sdpa``,
    ``model/attention.py``), except with a sliding window, which keeps megatron-core's own attention
    with the window composed into the mask."""
    experts = config.num_moe_experts if config is not None else None
    qk_norm = bool(config is not None and config.qk_layernorm)
    if resolve_impl(impl) == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=False,
                                                          qk_layernorm=qk_norm)
    spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, qk_layernorm=qk_norm,
                                    normalization="RMSNorm")
    if experts:
        # The local spec checkpoints its pre-MLP norm as TE's fused "mlp.linear_fc1.layer_norm_*",
        # but TE's MoE spec keeps that norm separate ("pre_mlp_layernorm.*"): keep the TE key so
        # MoE checkpoints move between CPU (local) and GPU (TE) runs as dense ones do.
        spec.submodules.sharded_state_dict_keys_map.pop("pre_mlp_layernorm.")
    if config is not None and config.window_size is not None:
        spec.submodules.self_attention.submodules.core_attention = WindowedDotProductAttention
    elif sdpa:
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_gpt_model(hf_config: dict, *, dtype: str = "fp32", impl: Impl = "auto",
                    fp8: Optional[str] = None, recompute: str = "none",
                    sequence_parallel: bool = False, vocab_divisible_by: int = 128, sdpa: bool = True,
                    **overrides: Any) -> GPTModel:
    """This rank's ``GPTModel`` (its TP shard and PP stage) for ``hf_config``, randomly initialised.

    Load weights afterwards with :mod:`megatron_skpo.model.mappings` (``from_hf`` + ``shard``).
    ``parallel_output=True``: the output layer returns vocab-parallel logits ``[s, b, V/TP]``,
    which is what the fused log-prob consumes (``model.output_layer.weight`` is the shard).
    The vocabulary is padded to a multiple of ``vocab_divisible_by * TP`` (Megatron-LM's rule);
    the padded rows are zero after loading and masked out by the fused log-prob.
    """
    config = make_transformer_config(hf_config, dtype=dtype, impl=impl, fp8=fp8, recompute=recompute,
                                     sequence_parallel=sequence_parallel, **overrides)
    vocab = padded_vocab_size(int(hf_config["vocab_size"]), config.tensor_model_parallel_size,
                              vocab_divisible_by)
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec(impl, config, sdpa=sdpa),
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        parallel_output=True, **{**gpt_model_kwargs(hf_config), "vocab_size": vocab})
    # Megatron hard-codes Llama-3 low/high frequency factors; install the exact HF frequencies.
    inv_freq = rope_inv_freq(head_dim(hf_config), rope_spec(hf_config))
    model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
    return model
