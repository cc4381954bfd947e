"""The policy's training step on Megatron-core: DDP (+ distributed optimizer), pipeline schedules,
fused log-probs, token-normalised loss, clipped AdamW with warm-up.

One step = zero the grad buffers, ``get_forward_backward_func()`` over the packed micro-batches
(1F1B across pipeline stages when PP > 1), then ``optimizer.step()`` (gradient clipping inside).

Loss normalisation: the user loss returns a *local sum* over its micro-batch; the step divides
by ``normalizer`` (default: the number of loss tokens summed over all micro-batches and all
data-parallel ranks) and Megatron only *sums* gradients: ``calculate_per_token_loss=True`` turns
off its per-micro-batch and per-DP-rank averaging, and our ``finalize_model_grads_func`` passes no
token count, so nothing is rescaled behind our back. The result is independent of TP, PP and of how
the batch is split over DP ranks and micro-batches.

Schedule: Megatron's ``OptimizerParamScheduler`` with linear warm-up from 0, advanced *before*
each optimizer step, so step k (1-based) uses ``lr * min(1, k / warmup_steps)`` (Megatron-LM
advances after the step, which spends the first step at lr 0).

Mixture of experts: Megatron's load-balancing loss (``moe_aux_loss_coeff`` > 0) is added as a
token-weighted mean over the step's micro-batches (:func:`.router_stats.aux_loss_scale`), and
:func:`moe_metrics` reports the routing statistics of the training forwards since its last call
(``train_step`` includes them). The fused log-prob is the same for dense and MoE models.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_skpo.model.builder import build_gpt_model
from megatron_skpo.model.logprob import fused_logprob_entropy
from megatron_skpo.model.attention import SDPAttention
from megatron_skpo.model.packing import AttentionBlocks, PackedBatch, padding_batch
from megatron_skpo.model.router_stats import RouterStats, aux_loss_scale, router_metrics
from megatron_skpo.model.single_rank import skip_single_rank_collectives
from megatron_skpo.model.weights import load_hf

if TYPE_CHECKING:  # the model layer takes the optimizer section duck-typed; config sits above it
    from megatron_skpo.config.train import OptimConfig

# (logp [S], entropy [S], micro-batch) -> (local loss sum, metrics to sum over micro-batches/DP)
LossFn = Callable[[torch.Tensor, torch.Tensor, PackedBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Policy:
    """The trainable policy of one rank: its model shard, optimizer and schedule."""

    model: DistributedDataParallel
    optimizer: object  # MegatronOptimizer (mixed precision or distributed)
    scheduler: OptimizerParamScheduler
    hf_config: dict
    temperature: float = 1.0  # the sampler's: log-probs are of softmax(logits / temperature)
    logprob_chunk: int = 1024
    router_stats: Optional[RouterStats] = None  # MoE models: per-expert token counts

    @property
    def gpt(self):
        return self.model.module


def build_policy(hf_config: dict, optim: "OptimConfig", *, total_steps: int, dtype: str = "fp32",
                 distributed_optimizer: bool = True, hf_weights: Optional[dict] = None,
                 init_weights: Optional[Callable[[torch.nn.Module], None]] = None,
                 temperature: float = 1.0, logprob_chunk: int = 1024, **model_kwargs) -> Policy:
    """GPTModel (+ HF weights) -> Megatron DDP -> Megatron optimizer (fp32 master weights for
    bf16/fp16 params) -> warm-up schedule. Parallel state must be initialised.

    ``init_weights(gpt)``: loads the starting weights into the bare GPTModel instead of ``hf_weights``
    (e.g. from a Megatron distributed checkpoint), before the optimizer copies them into its masters.

    ``model_kwargs`` go to :func:`~megatron_skpo.model.builder.build_gpt_model` (``impl``,
    ``recompute``, ``sequence_parallel``, ``moe_aux_loss_coef``, ...)."""
    gpt = build_gpt_model(hf_config, dtype=dtype, calculate_per_token_loss=True, **model_kwargs)
    if gpt.config.num_moe_experts and gpt.config.tensor_model_parallel_size > 1 and not gpt.config.sequence_parallel:
        # megatron-core refuses to train an MoE layer at TP > 1 without sequence parallelism
        # (and the CPU path turns sequence parallelism off)
        raise ValueError("parallel.tp > 1 with a mixture-of-experts model needs parallel.sequence_parallel=true "
                         "(GPU only); on CPU train MoE models at parallel.tp=1 and split experts with parallel.ep")
    if hf_weights is not None:
        load_hf(gpt, hf_weights, hf_config)
    if init_weights is not None:
        init_weights(gpt)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed_optimizer)
    model = DistributedDataParallel(config=gpt.config, ddp_config=ddp_config, module=gpt)
    skip_single_rank_collectives(model)
    gpt.config.no_sync_func = model.no_sync
    gpt.config.finalize_model_grads_func = _finalize_without_token_scaling
    opt_config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1, adam_beta2=optim.beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.grad_clip, bf16=dtype == "bf16", fp16=dtype == "fp16",
        params_dtype=gpt.config.params_dtype, use_distributed_optimizer=distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, [model])
    _fuse_cpu_adam(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.schedule, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant")
    stats = RouterStats(gpt) if gpt.config.num_moe_experts else None
    return Policy(model, optimizer, scheduler, hf_config, temperature, logprob_chunk, stats)


def _fuse_cpu_adam(optimizer) -> None:
    """Use torch's fused AdamW kernel for the fp32 master weights of a CPU run.

    Without Apex or Transformer Engine (CPU), megatron-core falls back to ``torch.optim.AdamW``
    with its defaults, which on CPU is the per-parameter loop: several passes over every tensor
    per step (a third of the optimizer step of a 135M model). The fused kernel computes the same
    update in one pass; megatron-core itself turns it on for its CPU-offloaded optimizer."""
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    for opt in inner:
        if type(opt) is not torch.optim.AdamW:
            continue
        params = [p for g in opt.param_groups for p in g["params"]]
        if params and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
            for group in opt.param_groups:
                group.update(fused=True, foreach=False)


def _finalize_without_token_scaling(model, num_tokens=None, **kwargs):
    finalize_model_grads(model, None, **kwargs)  # our losses are already divided by the global count


@contextlib.contextmanager
def hidden_state_output(gpt) -> Iterator[None]:
    """While active, the GPTModel's output layer passes the final hidden states through (the
    fused log-prob consumes them with the output weight instead of materialising logits).
    Stages without an output layer (PP, not last) are left alone."""
    if not gpt.post_process:
        yield
        return
    gpt.output_layer.forward = lambda hidden, weight=None, runtime_gather_output=None: (hidden, None)
    try:
        yield
    finally:
        del gpt.output_layer.forward


def output_weight(gpt) -> torch.Tensor:
    """This TP rank's ``[V/TP, H]`` output weight (the embedding shard when tied)."""
    return gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights \
        else gpt.output_layer.weight


def token_logprobs(policy: Policy, hidden: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Last stage: final hidden ``[1, S, H]`` -> (logp ``[S]``, entropy ``[S]``) of the targets."""
    gpt = policy.gpt
    weight = output_weight(gpt)
    hidden = hidden[0]
    reduce_grad = True
    if gpt.config.sequence_parallel:  # the gather's backward reduce-scatters (sums) over TP
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden, reduce_grad = gather_from_sequence_parallel_region(hidden[:, None])[:, 0], False
    tp_rank = ps.get_tensor_model_parallel_rank()
    return fused_logprob_entropy(
        hidden, weight, batch.targets, group=ps.get_tensor_model_parallel_group(),
        vocab_start=tp_rank * weight.shape[0], vocab_size=int(policy.hf_config["vocab_size"]),
        temperature=policy.temperature, chunk=policy.logprob_chunk, reduce_grad_hidden=reduce_grad)


def shares_prompts(gpt) -> bool:
    """Micro-batches may share prompt prefixes (``model/packing.py``): the attention takes block masks
    (:class:`SDPAttention`), not Transformer Engine's varlen attention or a sliding window's."""
    return any(isinstance(m, SDPAttention) for m in gpt.modules())


def uses_te(gpt) -> bool:
    return any(n.endswith("layer_norm_weight") for n, _ in gpt.named_parameters())  # TE-fused norms


def _model_inputs(gpt, batch: PackedBatch) -> dict:
    """TE spec: varlen attention over ``cu_seqlens``. Local spec: the micro-batch's mask, as one block
    per tree for :class:`SDPAttention`, else as one ``[1, 1, S, S]`` mask."""
    if uses_te(gpt):
        return dict(attention_mask=None, packed_seq_params=batch.packed_seq_params())
    if any(isinstance(m, SDPAttention) for m in gpt.modules()):
        dev = batch.tokens.device
        return dict(attention_mask=AttentionBlocks([(s, e, None if k is None else k.to(dev), None if m is None else m.to(dev))
                                                    for s, e, k, m in batch.attention_blocks().blocks]))
    return dict(attention_mask=batch.attention_mask().to(batch.tokens.device))


@contextlib.contextmanager
def rotary_at(gpt, position_ids: torch.Tensor) -> Iterator[None]:
    """While active, the GPTModel's rotary embeddings are taken at ``position_ids [1, S]`` (each token's
    position in its own row) instead of at 0..S-1 of the packed row; shared-prompt trees need it.
    Transformer Engine's varlen path computes per-sequence positions itself and is left alone."""
    rope = getattr(gpt, "rotary_pos_emb", None)
    if rope is None or uses_te(gpt):
        yield
        return
    table = type(rope).forward(rope, int(position_ids.max()) + 1)  # [max_pos + 1, 1, 1, D]
    emb = table[position_ids[0].to(table.device)]
    rope.forward = lambda *args, **kwargs: emb
    try:
        yield
    finally:
        del rope.forward


def _is_filler(batch: PackedBatch) -> bool:
    return all(i < 0 for i in batch.seq_index)


def padding_micro_batches(micro_batches: list[PackedBatch]) -> list[PackedBatch]:
    """``micro_batches``, or one padding micro-batch for a rank without rows in a mini-batch that other
    data-parallel ranks train (filtered or dropped groups): it still runs the collectives of the
    forward, the backward and the gradient reduction, and adds nothing."""
    return micro_batches if micro_batches else [_filler()]


def _filler() -> PackedBatch:
    """A micro-batch of padding only (``seq_index`` ``[-1]``, no loss tokens, never given to a loss
    function), as many tokens as the TP size (sequence parallelism splits them over TP ranks)."""
    return padding_batch(ps.get_tensor_model_parallel_world_size())


def pad_for_expert_parallel(micro_batches: list[PackedBatch]) -> list[PackedBatch]:
    """With expert parallelism every forward and backward of an MoE layer is a collective over the
    expert-parallel group (the token all-to-all), whose ranks are data-parallel ranks with their
    own micro-batches: all must run as many. Ranks with fewer get filler micro-batches
    (:func:`_filler`) at the end, which add nothing to losses, gradients, metrics, log-probs,
    the load-balancing loss or the router statistics (see :func:`_forward_step`)."""
    if ps.get_expert_model_parallel_world_size() == 1:
        return micro_batches
    count = torch.tensor([len(micro_batches)], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    return micro_batches + [_filler() for _ in range(int(count) - len(micro_batches))]


@contextlib.contextmanager
def _filler_forward(policy: Policy) -> Iterator[None]:
    """A filler's forward: no load-balancing loss (coefficient 0), no router statistics."""
    config = policy.gpt.config
    coeff = config.moe_aux_loss_coeff
    config.moe_aux_loss_coeff = 0.0
    paused = policy.router_stats.pause() if policy.router_stats is not None else contextlib.nullcontext()
    try:
        with paused:
            yield
    finally:
        config.moe_aux_loss_coeff = coeff


def _forward_step(policy: Policy, loss_fn: Optional[LossFn], normalizer: float, data_iterator, model):
    batch: PackedBatch = next(data_iterator)
    filler = _filler_forward(policy) if _is_filler(batch) else contextlib.nullcontext()
    with hidden_state_output(policy.gpt), rotary_at(policy.gpt, batch.position_ids), filler:
        out = model(batch.tokens, batch.position_ids, **_model_inputs(policy.gpt, batch))
    return out, partial(_loss, policy, loss_fn, normalizer, batch)


def _loss(policy: Policy, loss_fn: Optional[LossFn], normalizer: float, batch: PackedBatch, hidden):
    logp, entropy = token_logprobs(policy, hidden, batch)
    if loss_fn is not None and _is_filler(batch):  # a zero loss whose backward runs the collectives
        return logp.sum() * 0, torch.tensor(0, dtype=torch.int), {}
    if loss_fn is None:  # forward-only: collect the log-probs
        return logp.sum() * 0, torch.tensor(0, dtype=torch.int), {"logp": logp.detach(),
                                                                   "entropy": entropy.detach()}
    local_sum, metrics = loss_fn(logp, entropy, batch)
    tokens = torch.tensor(int(batch.loss_mask.sum().item()), dtype=torch.int)
    return local_sum / normalizer, tokens, {"loss": local_sum.detach() / normalizer,
                                            **{k: v.detach() for k, v in metrics.items()}}


def global_loss_tokens(micro_batches: list[PackedBatch]) -> float:
    """Loss tokens of this DP replica's micro-batches, summed over the data-parallel group."""
    count = torch.tensor([sum(float(mb.loss_mask.sum()) for mb in micro_batches)], dtype=torch.float64)
    dist.all_reduce(count, group=ps.get_data_parallel_group())
    return float(count.item())


def reduce_metrics(stores: list[dict]) -> dict[str, float]:
    """Sum metrics over micro-batches and DP ranks; every PP stage gets the last stage's values. A rank
    that trained only padding (no rows of this mini-batch: :func:`padding_micro_batches`) has no
    metrics; the names are united over the data-parallel group so the all-reduce lines up."""
    names = sorted({k for d in stores for k in d})
    names = _broadcast_from_last_stage_obj(names)
    group = ps.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, names, group=group)
        names = sorted({k for n in every for k in n})
    values = torch.tensor([sum(float(d[k]) for d in stores if k in d) for k in names], dtype=torch.float64)
    dist.all_reduce(values, group=ps.get_data_parallel_group())
    values = _broadcast_from_last_stage(values)
    return dict(zip(names, values.tolist()))


def _broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return t


def _broadcast_from_last_stage_obj(obj):
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]


def share_from_last_stage(micro_batches: list[PackedBatch], key: str) -> None:
    """Copy ``token_values[key]`` (``[S]``, computed by the loss on the last pipeline stage) to every
    stage; a no-op without pipeline parallelism."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    for mb in micro_batches:
        t = mb.token_values[key].float().contiguous() if last else torch.empty(mb.num_tokens, device=mb.tokens.device)
        mb.token_values[key] = _broadcast_from_last_stage(t)


def global_tokens(micro_batches: list[PackedBatch]) -> float:
    """All tokens (prompt and response) of this DP replica's micro-batches, summed over the
    data-parallel group: the tokens the MoE routers see in a step."""
    count = torch.tensor([float(sum(mb.num_tokens for mb in micro_batches))], dtype=torch.float64)
    dist.all_reduce(count, group=ps.get_data_parallel_group())
    return float(count.item())


def forward_backward(policy: Policy, micro_batches: list[PackedBatch], loss_fn: Optional[LossFn],
                     normalizer: Optional[float] = None, forward_only: bool = False) -> list[dict]:
    """Run the (pipeline) schedule; returns the last stage's per-micro-batch metric dicts (those
    of ``micro_batches``: the fillers of :func:`pad_for_expert_parallel` are dropped)."""
    config = policy.gpt.config
    scale = contextlib.nullcontext()
    if not forward_only:
        normalizer = normalizer if normalizer is not None else max(global_loss_tokens(micro_batches), 1.0)
        if config.num_moe_experts and config.moe_aux_loss_coeff:
            scale = aux_loss_scale(config, global_tokens(micro_batches))
    padded = pad_for_expert_parallel(micro_batches)
    fb = get_forward_backward_func()
    with scale:
        stores = fb(forward_step_func=partial(_forward_step, policy, loss_fn, normalizer or 1.0),
                    data_iterator=iter(padded), model=[policy.model],
                    num_microbatches=len(padded), seq_length=max(mb.num_tokens for mb in padded),
                    micro_batch_size=1, forward_only=forward_only) or []
    return stores[: len(micro_batches)]


def moe_metrics(policy: Policy, per_expert: bool = False) -> dict[str, float]:
    """Routing statistics of the training forwards since the last call (collective over the job;
    ``{}`` for dense models): see :func:`.router_stats.router_metrics`."""
    return router_metrics(policy.router_stats, policy.gpt.config.sequence_parallel, per_expert)


def train_step(policy: Policy, micro_batches: list[PackedBatch], loss_fn: LossFn,
               normalizer: Optional[float] = None) -> dict[str, float]:
    """One optimizer step over this DP replica's micro-batches; metrics summed over the global batch
    (``loss`` is the normalised loss) plus ``grad_norm`` (before clipping), ``lr``, ``update_ok``
    and, for MoE models, the routing statistics of this step (:func:`moe_metrics`)."""
    zero_grads(policy)
    stores = forward_backward(policy, micro_batches, loss_fn, normalizer)
    return {**reduce_metrics(stores), **moe_metrics(policy), **optimizer_step(policy)}


def zero_grads(policy: Policy) -> None:
    policy.gpt.train()
    policy.model.zero_grad_buffer()
    policy.optimizer.zero_grad()


def optimizer_step(policy: Policy) -> dict[str, float]:
    """Advance the schedule, then clip and apply the gradients in the DDP buffers."""
    policy.scheduler.step(increment=1)
    lr = policy.optimizer.param_groups[0]["lr"]
    update_ok, grad_norm, _ = policy.optimizer.step()
    return {"grad_norm": float(grad_norm or 0.0), "lr": lr, "update_ok": float(bool(update_ok))}


@torch.no_grad()
def forward_logprobs(policy: Policy, micro_batches: list[PackedBatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Old-policy / reference log-probs and entropies ``[S]`` per micro-batch, with the same fused
    kernel; computed on the last stage and broadcast to every pipeline stage."""
    policy.gpt.eval()
    stores = forward_backward(policy, micro_batches, None, forward_only=True)
    out = []
    for i, mb in enumerate(micro_batches):
        both = torch.stack([stores[i]["logp"], stores[i]["entropy"]]) if stores \
            else torch.empty(2, mb.num_tokens)
        both = _broadcast_from_last_stage(both.float().contiguous())
        out.append((both[0], both[1]))
    return out
