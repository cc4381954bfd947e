"""CPU compatibility layer for megatron-core: the same Megatron code paths, run over gloo on CPU.

megatron-core (0.16.1 and 0.19.x alike) places a few tensors on CUDA unconditionally. This module
is the ONE place where we bend it, and it does so only when CUDA is unavailable (``apply()`` is a
no-op on a GPU machine, so GPUs always run megatron-core unpatched). Each patch point below has
its own test in ``tests/model/test_cpu_compat.py``, so a megatron-core upgrade that moves one
fails loudly.

How: a module whose only CUDA dependency is *where* it allocates gets a module-scoped ``torch``
proxy (:class:`_CpuTorch`): the same torch, except that ``device="cuda"`` / ``cuda.current_device()``
mean the CPU, ``cuda.synchronize()`` is a no-op and the CUDA RNG calls use the CPU generator. It
only changes calls that would raise on a CPU-only host, so it cannot alter anything that worked. The
type-string checks (``param.type() == 'torch.cuda.FloatTensor'``) are satisfied by wrapping the
three functions that make them in :func:`_cuda_type_names`, which is active only during those calls.

Patch points:
  1/7. config: ``use_cpu_initialization``; fusions, ``persist_layer_norm``, ``sequence_parallel``
       off (:func:`config_overrides`; the builder applies them);
  2.   RNG tracker: ``tensor_parallel.random`` seeds/forks the CPU generator, so per-rank dropout
       seeds and activation recompute stay correct;
  3.   ``GlobalMemoryBuffer.get_tensor`` allocates on the CPU (the ``megatron.core.utils`` proxy,
       which also serves the apex-free ``local_multi_tensor_l2_norm`` used by grad clipping);
  4.   rotary embeddings keep ``inv_freq`` on the CPU;
  5.   pipeline schedules and p2p buffers on the CPU (plus ``batch_p2p_comm=False``, no sync);
  6.   DDP buffers, grad clipping, the mixed-precision and distributed optimizers on the CPU;
  8.   the local spec's default causal mask (``transformer.utils.get_default_causal_mask``) is
       built on the CPU;
  9.   tied embeddings with PP > 1: the last stage's copy of the embedding is synchronised with ``weight.data.cuda()`` (``LanguageModule.
       setup_embeddings_and_output_layer``); during that call ``Tensor.cuda`` is the identity;
  10.  ``tensor_parallel.mappings``' gathers (vocab-parallel logits -> full logits,
       sequence-parallel gathers) allocate their outputs on the CPU.
  11.  ``dist_checkpointing`` save: its strategies call ``torch.cuda.synchronize()`` and allocate status flags on ``torch.cuda.current_device()``
       (``filesystem_async``, ``state_dict_saver``, ``async_utils``).
  12.  MoE router: ``TopKRouter.gating`` moves a CPU router weight to
       ``torch.cuda.current_device()`` before every forward (here: to the CPU, a no-op).
  13.  MoE all-to-all token dispatcher (the one that accepts variable sequence lengths): it
       creates a ``torch.cuda.Stream()`` when built and copies the split sizes to the host on it
       (``_maybe_dtoh_and_synchronize``); here streams are inert stand-ins
       (:class:`_CpuStream`). Its host copy (``maybe_move_tensor_to_cpu``) turns only *CUDA*
       tensors into the numpy arrays ``all_to_all_single`` takes as split sizes, and passes CPU
       tensors through, which the collective rejects: CPU tensors asked for as numpy become numpy.
  14.  MoE utilities (``transformer.moe.moe_utils``), a Transformer Engine dependency rather than
       a CUDA one: without TE the module leaves the TE kernels it tests for undefined
       (``te_general_gemm is not None`` in the router's gating GEMM, the fused permute/aux-loss
       kernels), so the router's non-TE path raises NameError. They are defined as ``None``,
       which selects megatron-core's own torch implementations (only where TE is missing).
  15.  Distributed optimizer, ``fully_reshardable`` checkpoint load (another Apex/TE dependency):
       without Apex or TE the inner optimizer is torch's Adam, which keeps a per-parameter ``step``
       in its state; ``load_parameter_state_from_fully_reshardable`` hands
       ``_set_main_param_and_optimizer_states`` the master weight and the moments but not ``step``,
       and that copies every state key (``KeyError: 'step'``). The wrapper passes the step the
       optimizer already holds (``load_state_dict`` set it from the checkpoint just before), so
       the copy is a no-op for it; only where neither Apex nor TE is installed.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Callable, Iterator

import torch

_APPLIED: list[str] = []
_CPU = torch.device("cpu")


def _cpu_device(device: Any) -> Any:
    """Map any CUDA device spec (``"cuda"``, ``"cuda:0"``, an int, a cuda ``torch.device``) to CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA context
        return fn(*args, **kwargs)

    return wrapped


class _CpuEvent:
    """A recorded point on a :class:`_CpuStream`: CPU work is already complete when recorded."""

    def synchronize(self) -> None:
        return None

    def wait(self, *args: Any, **kwargs: Any) -> None:
        return None

    def query(self) -> bool:
        return True


class _CpuStream:
    """A CUDA stream stand-in: CPU ops run in program order, so waiting is a no-op."""

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, *args: Any, **kwargs: Any) -> _CpuEvent:
        return _CpuEvent()


_STREAM = _CpuStream()


class _CpuCuda:
    """``torch.cuda`` as megatron-core's allocation and RNG calls see it on a CPU-only host."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    current_device = staticmethod(lambda: _CPU)
    # one stream object: "am I on a side stream?" checks (``current_stream() != stream``) say no
    Stream = staticmethod(lambda *a, **k: _STREAM)
    current_stream = staticmethod(lambda *a, **k: _STREAM)
    stream = staticmethod(lambda *a, **k: contextlib.nullcontext())
    synchronize = staticmethod(lambda *a, **k: None)
    empty_cache = staticmethod(lambda: None)
    get_rng_state = staticmethod(lambda *a, **k: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *a, **k: torch.set_rng_state(state))
    manual_seed = staticmethod(lambda seed: torch.manual_seed(seed))


class _CpuTorch(types.ModuleType):
    """A module-scoped stand-in for ``torch`` that allocates CUDA requests on the CPU."""

    _FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand", "empty_like",
                  "zeros_like", "ones_like")

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in self._FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_TORCH = _CpuTorch()


def _proxy_torch(module_name: str) -> None:
    module = importlib.import_module(module_name)
    if not isinstance(getattr(module, "torch", None), types.ModuleType):
        raise RuntimeError(f"cpu_compat: {module_name} no longer imports torch as a module")
    module.torch = _TORCH


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """While active, ``t.type()`` of a CPU tensor reads as the CUDA type of the same dtype."""
    original = torch.Tensor.__dict__.get("type")
    base = torch._C.TensorBase.type

    def type_(self, *args, **kwargs):
        name = base(self, *args, **kwargs)
        if args or kwargs or not isinstance(name, str) or ".cuda." in name:
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        if original is None:
            del torch.Tensor.type
        else:
            torch.Tensor.type = original


@contextlib.contextmanager
def _cuda_is_identity() -> Iterator[None]:
    """While active, ``t.cuda()`` of a CPU tensor returns it unchanged."""
    original = torch.Tensor.__dict__.get("cuda")
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        if original is None:
            del torch.Tensor.cuda
        else:
            torch.Tensor.cuda = original


def _scoped(fn: Callable, context: Callable) -> Callable:
    """``fn`` running inside ``context()``: the tensor-method patches live only during the call."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)

    wrapped.__skpo_cpu_compat__ = True  # type: ignore[attr-defined]
    return wrapped


def _patch_rng() -> None:
    """Point 2: CUDA RNG get/set/seed -> the CPU generator, inside ``tensor_parallel.random``."""
    from megatron.core.tensor_parallel import random as mrandom

    _proxy_torch(mrandom.__name__)
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_optimizers() -> None:
    """Point 6 (type checks): wrap the three callers of ``tensor.type() == 'torch.cuda...'``."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    clip = _scoped(clip_grads.clip_grad_by_total_norm_fp32, _cuda_type_names)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip  # imported by name there
    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _scoped(cls.__init__, _cuda_type_names)


def _patch_tied_embeddings() -> None:
    """Point 9: PP > 1 with tied embeddings moves the shared weight with ``weight.data.cuda()``."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _scoped(
        LanguageModule.setup_embeddings_and_output_layer, _cuda_is_identity)


# Transformer Engine kernels moe_utils names unconditionally but imports only with TE (point 14).
_MOE_TE_NAMES = ("te_general_gemm", "fused_topk_with_score_function", "fused_compute_score_for_moe_aux_loss",
                 "fused_moe_aux_loss", "fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
                 "fused_sort_chunks_by_index_with_probs", "fused_unpermute")


def _patch_moe_utils() -> None:
    """Point 14: moe_utils' TE-only kernel names exist (as ``None``) when TE is not installed."""
    from megatron.core.transformer.moe import moe_utils

    if not moe_utils.HAVE_TE:
        for name in _MOE_TE_NAMES:
            if not hasattr(moe_utils, name):
                setattr(moe_utils, name, None)


def _patch_moe_token_dispatcher() -> None:
    """Point 13: inert streams in the dispatcher; its split sizes reach the all-to-all as numpy."""
    from megatron.core.transformer.moe import token_dispatcher

    _proxy_torch(token_dispatcher.__name__)
    to_host = token_dispatcher.maybe_move_tensor_to_cpu

    @functools.wraps(to_host)
    def host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return to_host(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = host_copy


def _patch_distrib_optimizer_step() -> None:
    """Point 15: the fully-reshardable load of the distributed optimizer keeps torch Adam's ``step``."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "__skpo_cpu_compat__", False):
        return

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    set_states.__skpo_cpu_compat__ = True  # type: ignore[attr-defined]
    cls._set_main_param_and_optimizer_states = set_states


PATCH_POINTS: dict[str, Callable[[], None]] = {
    "rng": _patch_rng,
    # also covers local_multi_tensor_l2_norm/scale (grad clipping without apex/TE) in the same module
    "global_memory_buffer": lambda: _proxy_torch("megatron.core.utils"),
    "rotary": lambda: _proxy_torch("megatron.core.models.common.embeddings.rotary_pos_embedding"),
    "schedules": lambda: _proxy_torch("megatron.core.pipeline_parallel.schedules"),
    "p2p": lambda: _proxy_torch("megatron.core.pipeline_parallel.p2p_communication"),
    "ddp": lambda: [_proxy_torch(f"megatron.core.distributed.{m}")
                    for m in ("param_and_grad_buffer", "distributed_data_parallel")],
    "optimizer_devices": lambda: [_proxy_torch(f"megatron.core.optimizer.{m}")
                                  for m in ("clip_grads", "optimizer", "distrib_optimizer")],
    "optimizer_type_checks": _patch_optimizers,
    "causal_mask": lambda: _proxy_torch("megatron.core.transformer.utils"),
    "tied_embeddings": _patch_tied_embeddings,
    "tp_mappings": lambda: _proxy_torch("megatron.core.tensor_parallel.mappings"),
    "dist_checkpointing": lambda: [_proxy_torch(f"megatron.core.dist_checkpointing.strategies.{m}")
                                   for m in ("filesystem_async", "state_dict_saver", "async_utils")],
    "moe_router": lambda: _proxy_torch("megatron.core.transformer.moe.router"),
    "moe_token_dispatcher": _patch_moe_token_dispatcher,
    "moe_utils": _patch_moe_utils,
    "distrib_optimizer_step": _patch_distrib_optimizer_step,
}


def config_overrides() -> dict[str, Any]:
    """Points 1 and 7: TransformerConfig fields that must take these values on CPU."""
    return dict(use_cpu_initialization=True, gradient_accumulation_fusion=False,
                persist_layer_norm=False, sequence_parallel=False, batch_p2p_comm=False,
                masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
                apply_rope_fusion=False)


def needed() -> bool:
    return not torch.cuda.is_available()


def apply(force: bool = False) -> list[str]:
    """Apply every patch point once (only without CUDA unless ``force``); returns those applied."""
    if not (needed() or force):
        return []
    for name, patch in PATCH_POINTS.items():
        if name not in _APPLIED:
            patch()
            _APPLIED.append(name)
    return list(_APPLIED)
