"""One test per CPU patch point of megatron-core (see megatron_skpo/model/cpu_compat.py).

Each check (a) confirms megatron-core still has the CUDA dependency we patch (so an upgrade that
moves or removes it fails here, loudly, instead of leaving a stale patch), and (b) exercises the
real megatron-core code path on CPU over gloo. The checks run in one pair of spawned ranks
(shared fixture); each test reports its own check.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from mp_helpers import spawn
from tiny import hf_model, hf_weights, policy_gradient_loss, rollout


def _needs_cuda(obj, needle: str = "cuda") -> None:
    assert needle in inspect.getsource(obj), f"{obj} no longer mentions {needle!r}: revisit cpu_compat"


def check_config(rank):
    from megatron_skpo.model import builder

    model = builder.build_gpt_model(hf_model("llama")[1])
    cfg = model.config
    assert cfg.use_cpu_initialization and not cfg.gradient_accumulation_fusion
    assert not (cfg.persist_layer_norm or cfg.sequence_parallel or cfg.batch_p2p_comm)
    assert all(p.device.type == "cpu" for p in model.parameters())


def check_rng(rank):
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    _needs_cuda(mrandom.CudaRNGStatesTracker.add, "torch.cuda.get_rng_state")
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    outside = torch.rand(4)
    with tracker.fork():
        inside = torch.rand(4)
    with tracker.fork():
        inside_again = torch.rand(4)
    assert not torch.equal(inside, inside_again), "fork must advance the tracked state"
    # activation recompute replays the forked RNG: checkpointed == direct dropout gradient
    x = torch.ones(64, requires_grad=True)

    def dropped(t):
        with tracker.fork():
            return torch.nn.functional.dropout(t, 0.5, training=True)

    states = tracker.get_states()
    saved = {k: v.clone() for k, v in states.items()}
    tensor_parallel.checkpoint(dropped, False, x).sum().backward()
    tracker.set_states(saved)
    y = x.detach().clone().requires_grad_()
    dropped(y).sum().backward()
    assert torch.equal(x.grad, y.grad)
    return {"outside": outside, "inside": inside}


def check_global_memory_buffer(rank):
    from megatron.core import utils

    _needs_cuda(utils.GlobalMemoryBuffer.get_tensor)
    _needs_cuda(utils.local_multi_tensor_l2_norm)
    assert utils.GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "t").device.type == "cpu"
    norm, _ = utils.local_multi_tensor_l2_norm(1, None, [[torch.ones(4)]], False)
    assert norm.item() == 2.0


def check_rotary(rank):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    _needs_cuda(RotaryEmbedding.get_emb)
    emb = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)(8)
    assert emb.device.type == "cpu" and emb.shape[0] == 8


def check_p2p(rank):
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel import p2p_communication

    _needs_cuda(p2p_communication.P2PCommunicator._communicate_shapes)
    config = ModelParallelConfig(pipeline_dtype=torch.float32, variable_seq_lengths=True,
                                 batch_p2p_comm=False, pipeline_model_parallel_size=2)
    comm = p2p_communication.P2PCommunicator(ps.get_pipeline_model_parallel_group(), config)
    if rank == 0:
        comm.send_forward(torch.arange(6.0).reshape(3, 1, 2), is_last_stage=False)
        return None
    return comm.recv_forward((3, 1, 2), is_first_stage=False)


def check_schedules_ddp_optimizers(rank):
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.pipeline_parallel import schedules

    from megatron_skpo.config.train import OptimConfig
    from megatron_skpo.model.packing import pack_sequences
    from megatron_skpo.model.train_step import build_policy, train_step

    _needs_cuda(schedules.forward_backward_pipelining_without_interleaving, 'device="cuda"')
    _needs_cuda(param_and_grad_buffer._ParamAndGradBuffer)
    _needs_cuda(clip_grads.clip_grad_by_total_norm_fp32, "torch.cuda.FloatTensor")
    _needs_cuda(distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups,
                "torch.cuda.FloatTensor")
    model, hf_config = hf_model("qwen2")  # tied: PP=2 also syncs the last stage's embedding copy
    tokens, masks, adv = rollout(4)
    policy = build_policy(hf_config, OptimConfig(lr=1e-3, warmup_steps=2, grad_clip=0.01),
                          total_steps=4, hf_weights=hf_weights(model), distributed_optimizer=True)
    mbs = pack_sequences(tokens, masks, 32, {"adv": adv})
    from megatron_skpo.model.packing import unpack
    from megatron_skpo.model.train_step import forward_logprobs

    old = [None] * len(tokens)  # forward-only path (old-policy log-probs), on both PP stages
    for mb, (logp, _) in zip(mbs, forward_logprobs(policy, mbs)):
        old = [o if o is not None else u for o, u in zip(old, unpack(logp, mb, len(tokens)))]
    return [train_step(policy, mbs, policy_gradient_loss) for _ in range(2)], old


def check_causal_mask(rank):
    from megatron.core.transformer import utils

    _needs_cuda(utils.get_default_causal_mask)
    assert utils.get_default_causal_mask(4).device.type == "cpu"


def check_tp_mappings(rank):
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import mappings

    _needs_cuda(mappings._gather_along_last_dim)
    mine = torch.full((2, 3), float(rank))
    return tensor_parallel.gather_from_tensor_model_parallel_region(mine)


def check_dist_checkpointing(rank):
    """Save a TP=2 model with dist_checkpointing and load it back into a perturbed copy."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import async_utils, filesystem_async, state_dict_saver

    from megatron_skpo.model import builder

    _needs_cuda(filesystem_async, "torch.cuda.synchronize")
    _needs_cuda(state_dict_saver, "torch.cuda.current_device")
    _needs_cuda(async_utils, "torch.cuda.current_device")
    path = Path(tempfile.gettempdir()) / f"skpo_cpu_compat_ckpt_{os.environ['MASTER_PORT']}"
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
    dist.barrier()
    model = builder.build_gpt_model(hf_model("llama")[1])
    dist_checkpointing.save(model.sharded_state_dict(), str(path))
    saved = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path)))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    return all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)


def check_moe_router(rank):
    """Point 12: the router's gating runs (forward and backward) with its weight left on the CPU."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_skpo.model import builder

    _needs_cuda(TopKRouter.gating, "torch.cuda.current_device")
    model = builder.build_gpt_model(hf_model("qwen3_moe")[1])
    router = model.decoder.layers[0].mlp.router
    x = torch.randn(5, 1, router.weight.shape[1], requires_grad=True)
    logits = router.gating(x)
    logits.sum().backward()
    return router.weight.device.type, tuple(logits.shape), x.grad is not None


def check_moe_token_dispatcher(rank):
    """Point 13: a Qwen3-MoE forward at EP=2 (experts 0-3 on rank 0, 4-7 on rank 1): the tokens
    travel by all-to-all over gloo; each rank returns its logits of the same input."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    from megatron_skpo.model import builder
    from megatron_skpo.model.weights import load_hf

    _needs_cuda(token_dispatcher.MoEAlltoAllTokenDispatcher.__init__, "torch.cuda.Stream")
    _needs_cuda(moe_utils.maybe_move_tensor_to_cpu, "tensor.is_cuda")
    hf, cfg = hf_model("qwen3_moe")
    model = builder.build_gpt_model(cfg)
    load_hf(model, hf_weights(hf), cfg)
    model.eval()
    tokens = torch.randint(0, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(tokens, torch.arange(16)[None], None)[0, :, : cfg["vocab_size"]]


def check_moe_utils(rank):
    """Point 14: a training forward and backward with the load-balancing loss through the router's
    non-TE gating GEMM (megatron-core still names the TE kernel without defining it off TE)."""
    from megatron.core.transformer.moe import moe_utils

    from megatron_skpo.model import builder

    _needs_cuda(moe_utils.RouterGatingLinearFunction.forward, "te_general_gemm is not None")
    assert "te_general_gemm = None" not in inspect.getsource(moe_utils), "revisit cpu_compat point 14"
    assert moe_utils.HAVE_TE or moe_utils.te_general_gemm is None
    cfg = hf_model("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.5)[1]
    model = builder.build_gpt_model(cfg)
    model.train()
    tokens = torch.randint(0, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(3))
    model(tokens, torch.arange(16)[None], None).sum().backward()
    tracked = moe_utils.get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].clone()
    moe_utils.clear_aux_losses_tracker()  # zeroes the tracker's tensors in place
    return tracked.device.type, tracked.tolist()


def check_distrib_optimizer_step(rank):
    """Point 15: the distributed optimizer's parameter-space load (``fully_reshardable``) into torch
    Adam, which keeps a ``step`` per parameter: the master weight and moments are set, the step kept."""
    from megatron.core.optimizer import distrib_optimizer

    from megatron_skpo.config.train import OptimConfig
    from megatron_skpo.model.train_step import build_policy
    from megatron_skpo.trainer.model_state import ensure_optimizer_state, inner_optimizers

    _needs_cuda(distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states,
                "dst_tensors[key].copy_(tensors[key])")  # copies every state key: "step" too
    model, hf_config = hf_model("llama")
    chained = build_policy(hf_config, OptimConfig(lr=1e-3), total_steps=4, hf_weights=hf_weights(model),
                           distributed_optimizer=True).optimizer
    ensure_optimizer_state(chained)
    opt = inner_optimizers(chained)[0]
    model_param = next(iter(opt.model_param_group_index_map))
    group, order = opt.model_param_group_index_map[model_param]
    main = opt.optimizer.param_groups[group]["params"][order]
    opt.optimizer.state[main]["step"] = torch.tensor(4.0)
    loaded = {"param": torch.full_like(main, 0.5), "exp_avg": torch.full_like(main, 0.25),
              "exp_avg_sq": torch.full_like(main, 0.125)}
    with torch.no_grad():  # as megatron-core's load calls it
        opt._set_main_param_and_optimizer_states(model_param, loaded)
    state = opt.optimizer.state[main]
    return [float(main.unique()), float(state["exp_avg"].unique()), float(state["exp_avg_sq"].unique()),
            float(state["step"])]


CHECKS = {  # patch point -> (parallel layout (tp, pp[, ep]), check)
    "config": ((1, 1), check_config),
    "rng": ((2, 1), check_rng),
    "global_memory_buffer": ((1, 1), check_global_memory_buffer),
    "rotary": ((1, 1), check_rotary),
    "p2p": ((1, 2), check_p2p),
    "schedules": ((1, 2), check_schedules_ddp_optimizers),
    "causal_mask": ((1, 1), check_causal_mask),
    "tp_mappings": ((2, 1), check_tp_mappings),
    "dist_checkpointing": ((2, 1), check_dist_checkpointing),
    "moe_router": ((1, 1), check_moe_router),
    "moe_token_dispatcher": ((1, 1, 2), check_moe_token_dispatcher),
    "moe_utils": ((1, 1), check_moe_utils),
    "distrib_optimizer_step": ((1, 1), check_distrib_optimizer_step),
}


def _run_checks(rank, world):
    import traceback

    from megatron_skpo.model.builder import initialize_parallel

    out = {}
    for name, (layout, check) in CHECKS.items():
        tp, pp, ep = (*layout, 1)[:3]
        initialize_parallel(tp, pp, seed=5, ep=ep)
        try:
            out[name] = ("ok", check(rank))
        except Exception:  # noqa: BLE001 - reported per test below
            out[name] = ("error", traceback.format_exc())
    return out


@pytest.fixture(scope="module")
def checks():
    return spawn(_run_checks, 2)


def _result(checks, name):
    for rank, results in enumerate(checks):
        status, value = results[name]
        assert status == "ok", f"rank {rank}: {value}"
    return [r[name][1] for r in checks]


def test_every_patch_point_is_listed():
    from megatron_skpo.model import cpu_compat

    covered = set(CHECKS)
    # ddp / optimizer_devices / optimizer_type_checks / tied_embeddings run inside "schedules"
    assert set(cpu_compat.PATCH_POINTS) - covered == {"ddp", "optimizer_devices",
                                                      "optimizer_type_checks", "tied_embeddings"}


@pytest.mark.distributed
def test_config_overrides(checks):
    _result(checks, "config")


@pytest.mark.distributed
def test_rng_tracker_per_tp_rank_and_recompute(checks):
    r0, r1 = _result(checks, "rng")
    assert torch.equal(r0["outside"], r1["outside"]), "the data-parallel stream is shared by TP ranks"
    assert not torch.equal(r0["inside"], r1["inside"]), "the model-parallel stream differs per TP rank"


@pytest.mark.distributed
def test_global_memory_buffer_and_l2norm(checks):
    _result(checks, "global_memory_buffer")


@pytest.mark.distributed
def test_rotary_embedding(checks):
    _result(checks, "rotary")


@pytest.mark.distributed
def test_p2p_communication(checks):
    _, received = _result(checks, "p2p")
    assert torch.equal(received, torch.arange(6.0).reshape(3, 1, 2))


@pytest.mark.distributed
def test_schedules_ddp_distributed_optimizer_clipping_tied_pp(checks):
    (first, second), _ = _result(checks, "schedules")[0]
    assert first["update_ok"] == 1.0 and first["grad_norm"] > 0.01  # clipped
    assert first["lr"] == pytest.approx(5e-4) and second["lr"] == pytest.approx(1e-3)  # warm-up
    assert second["loss"] != first["loss"]


@pytest.mark.distributed
def test_forward_only_logprobs_match_transformers_on_every_stage(checks):
    model, _ = hf_model("qwen2")
    tokens, _, _ = rollout(4)
    for _, old in _result(checks, "schedules"):  # rank 0 = first stage, rank 1 = last stage
        for seq, logp in zip(tokens, old):
            with torch.no_grad():
                ref = torch.log_softmax(model(seq[None]).logits[0, :-1].double(), -1)
            ref = ref.gather(1, seq[1:, None])[:, 0]
            assert logp[0] == 0
            torch.testing.assert_close(logp[1:].double(), ref, atol=1e-5, rtol=0)


@pytest.mark.distributed
def test_default_causal_mask(checks):
    _result(checks, "causal_mask")


@pytest.mark.distributed
def test_tensor_parallel_gather(checks):
    for gathered in _result(checks, "tp_mappings"):
        assert torch.equal(gathered, torch.cat([torch.zeros(2, 3), torch.ones(2, 3)], dim=1))


@pytest.mark.distributed
def test_dist_checkpointing_save_and_load(checks):
    assert all(_result(checks, "dist_checkpointing"))


@pytest.mark.distributed
def test_moe_router_gating_on_cpu(checks):
    for device, shape, has_grad in _result(checks, "moe_router"):
        assert device == "cpu" and shape == (5, 1, 8) and has_grad


@pytest.mark.distributed
def test_moe_all_to_all_dispatch_at_ep2_matches_transformers(checks):
    hf, cfg = hf_model("qwen3_moe")
    tokens = torch.randint(0, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(tokens).logits[0]
    for logits in _result(checks, "moe_token_dispatcher"):
        assert (logits - ref).abs().max().item() <= 1e-4


@pytest.mark.distributed
def test_moe_load_balancing_loss_without_te(checks):
    for device, values in _result(checks, "moe_utils"):
        # one value per layer: Megatron's E / topk * sum_e f_e P_e (f, P: distributions over the
        # E = 8 experts, topk = 2), so in (0, E / topk]
        assert device == "cpu" and len(values) == 2 and all(0 < v <= 4 for v in values), values


@pytest.mark.distributed
def test_distributed_optimizer_parameter_space_load_keeps_adams_step(checks):
    for values in _result(checks, "distrib_optimizer_step"):
        assert values == [0.5, 0.25, 0.125, 4.0]
