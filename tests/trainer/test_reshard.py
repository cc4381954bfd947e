"""Reshardable model/optimizer checkpoints (``trainer/model_state.py``) on gloo ranks, tiny models.

Three spawns share the work (each spawn costs a process start and megatron's import):

1. one rank: a DP=1 run (2 bf16 steps) saved with the distributed optimizer and with the plain one;
   the tiny Llama saved as HF and converted with ``skpo-convert hf-to-mcore`` (fp32, as saved);
2. two ranks: those DP=1 checkpoints loaded at DP=2; runs saved at TP=2 (Llama) and PP=2 (Qwen2,
   tied embeddings: the last stage holds a copy), both optimizers; a TP=2 checkpoint through the
   checkpoint manager, and a copy with a shard file corrupted that only rank 1 reads (both ranks
   must refuse); a save, continue and reload at the same layout against an uninterrupted run; NaN
   weights on one rank; the policy started from ``model.mcore_path`` against the HF start at TP=2;
3. one rank: the TP=2 and PP=2 checkpoints loaded at TP=1/PP=1; the manager's restore of the TP=2
   checkpoint, intact and with a corrupted shard.

Every tensor of the checkpoint (weights, fp32 master weights, both Adam moments) is compared as a
global tensor (:func:`full_state`): after a reshard they must be equal to the saved ones exactly.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from mp_helpers import spawn  # noqa: E402
from tiny import hf_model, hf_weights, policy_gradient_loss, rollout  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 2
OPTIMIZERS = {"distributed": True, "plain": False}


def _optim():
    from megatron_skpo.config.train import OptimConfig

    return OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1, adam_eps=1e-3, grad_clip=0.5)


def _policy(tp: int, pp: int, dist_opt: bool, arch: str = "llama", dtype: str = "bf16", **kw):
    from megatron_skpo.model.builder import initialize_parallel
    from megatron_skpo.model.train_step import build_policy

    initialize_parallel(tp, pp, seed=1)
    model, hf_config = hf_model(arch)
    weights = None if "init_weights" in kw else hf_weights(model)
    return build_policy(hf_config, _optim(), total_steps=10, distributed_optimizer=dist_opt, dtype=dtype,
                        hf_weights=weights, logprob_chunk=7, **kw)


def _train(policy, steps: int, first: int = 0) -> list[float]:
    """``steps`` optimizer steps, each on its own rollout split over the data-parallel ranks."""
    from megatron.core import parallel_state as ps

    from megatron_skpo.model.packing import pack_sequences
    from megatron_skpo.model.train_step import train_step

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    losses = []
    for step in range(first, first + steps):
        tokens, masks, adv = rollout(seed=10 + step)
        mine = [i for i in range(len(tokens)) if i % dp == dp_rank]
        mbs = pack_sequences([tokens[i] for i in mine], [masks[i] for i in mine], budget=24,
                             token_values={"adv": [adv[i] for i in mine]})
        metrics = train_step(policy, mbs, policy_gradient_loss)
        assert metrics["update_ok"] == 1.0
        losses.append(metrics["loss"])
    return losses


def full_state(policy) -> dict:
    """Every tensor of the policy's model/optimizer checkpoint as a global tensor (on every rank),
    plus the schedule's step count; replicas held by several ranks must be equal."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_skpo.trainer.model_state import ModelPart, _sharded_tensors

    mine = [(st.key, tuple(st.global_shape), tuple(st.global_offset), st.prepend_axis_num, tuple(st.local_shape),
             st.data.detach().float().clone()) for st in _sharded_tensors(ModelPart(policy).sharded_state_dict())
            if isinstance(st, ShardedTensor)]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    full: dict = {}
    seen: dict = {}
    for pieces in everyone:
        for key, shape, offset, prepend, local, data in pieces:
            box = tuple(slice(o, o + n) for o, n in zip(offset, (1,) * prepend + local))
            region = (key, offset, local)
            data = data.reshape((1,) * prepend + local)
            if region in seen:
                assert torch.equal(seen[region], data), f"replicas of {key} at {offset} differ"
                continue
            seen[region] = data
            full.setdefault(key, torch.zeros(shape))[box] = data
    full["scheduler.num_steps"] = torch.tensor(float(policy.scheduler.num_steps))
    full["lr"] = torch.tensor(policy.optimizer.param_groups[0]["lr"])
    return full


def max_diff(a: dict, b: dict) -> dict:
    """Largest |a - b| per kind of tensor (weights, fp32 masters, each moment)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    out: dict = {}
    for k in a:
        kind = "weights" if k.startswith(("decoder.", "embedding.", "output_layer.")) else \
            k.split(".")[2] if k.startswith("optimizer.state.") else k
        out[kind] = max(out.get(kind, 0.0), (a[k] - b[k]).abs().max().item())
    return out


def _save_part(policy, directory: Path) -> float:
    import torch.distributed as dist

    from megatron_skpo.trainer.model_state import ModelPart

    if dist.get_rank() == 0:
        directory.mkdir(parents=True)
    dist.barrier()
    t = time.perf_counter()
    ModelPart(policy, dist.get_rank()).save(directory)
    return time.perf_counter() - t


def _load_part(policy, directory: Path) -> float:
    import torch.distributed as dist

    from megatron_skpo.trainer.model_state import ModelPart

    part = ModelPart(policy, dist.get_rank())
    t = time.perf_counter()
    part.files(directory)
    part.load(directory)
    return time.perf_counter() - t


def _saved_run(root: Path, name: str, tp: int, pp: int, dist_opt: bool, arch: str = "llama") -> dict:
    policy = _policy(tp, pp, dist_opt, arch)
    _train(policy, STEPS)
    seconds = _save_part(policy, root / name)
    return {"state": full_state(policy), "save_s": seconds}


def _loaded(root: Path, name: str, tp: int, pp: int, dist_opt: bool, arch: str = "llama") -> dict:
    policy = _policy(tp, pp, dist_opt, arch)
    seconds = _load_part(policy, root / name)
    state = full_state(policy)
    _train(policy, 1, first=STEPS)  # the loaded state trains on at its new layout
    return {"state": state, "load_s": seconds}


# ---------------------------------------------------------------- phase 1: one rank
def _phase_one(rank, world, root: Path) -> dict:
    from checkpoint_convert.convert import hf_to_mcore

    out = {}
    model, _ = hf_model("llama")
    model.save_pretrained(root / "hf")
    hf_to_mcore(root / "hf", root / "mcore", tp=1)  # fp32 as saved: the bf16 model rounds it as load_hf does
    for kind, dist_opt in OPTIMIZERS.items():
        out[f"dp1/{kind}"] = _saved_run(root, f"dp1_{kind}", 1, 1, dist_opt)
    return out


# ---------------------------------------------------------------- phase 2: two ranks
def _corrupt(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _manager_checks(rank: int, root: Path) -> dict:
    """A TP=2 checkpoint through the manager; a copy with a shard only rank 1 reads corrupted."""
    import torch.distributed as dist

    from megatron_skpo.trainer.checkpoint import CheckpointError, CheckpointManager
    from megatron_skpo.trainer.model_state import ModelPart

    policy = _policy(2, 1, True)
    _train(policy, STEPS)
    CheckpointManager(root / "managed", 1, 1, rank=rank).save(STEPS, {"model": ModelPart(policy, rank)})
    saved = full_state(policy)
    part_dir = root / "managed" / f"step_{STEPS:08d}" / "model"
    fresh = ModelPart(_policy(2, 1, True), rank)
    mine = sorted(p.name for p in fresh.files(part_dir))
    everyone: list = [None] * 2
    dist.all_gather_object(everyone, mine)
    only_rank1 = sorted(set(everyone[1]) - set(everyone[0]))
    all_files = sorted(p.name for p in part_dir.iterdir())
    if rank == 0:
        shutil.copytree(root / "managed", root / "managed_bad")
        _corrupt(root / "managed_bad" / part_dir.parent.name / "model" / only_rank1[0])
    dist.barrier()
    try:
        CheckpointManager(root / "managed_bad", 1, 1, rank=rank).restore({"model": fresh})
        error = None
    except CheckpointError as e:
        error = str(e)
    return {"files": everyone, "all_files": all_files, "corrupted": only_rank1[0], "error": error, "state": saved}


def _exact_resume(rank: int, root: Path) -> dict:
    """Train 2 steps, save, train 2 more; a fresh policy loads the save and trains the same 2."""
    policy = _policy(1, 1, True)
    _train(policy, STEPS)
    _save_part(policy, root / "resume")
    reference = _train(policy, 2, first=STEPS)
    ref_state = full_state(policy)
    again = _policy(1, 1, True)
    _load_part(again, root / "resume")
    resumed = _train(again, 2, first=STEPS)
    return {"reference": reference, "resumed": resumed, "diff": max_diff(ref_state, full_state(again))}


def _non_finite(rank: int, root: Path) -> dict:
    policy = _policy(1, 1, True)
    if rank == 1:
        with torch.no_grad():
            policy.gpt.decoder.final_layernorm.weight[0] = float("nan")
    try:
        _save_part(policy, root / "nan")
        return {"error": None}
    except ValueError as e:
        return {"error": str(e), "written": sorted(p.name for p in (root / "nan").iterdir())}


def _mcore_start(rank: int, root: Path) -> dict:
    """The policy from the converted checkpoint (the trainer's wiring: config, start_state, build)
    against the policy from the HF weights, at TP=2 (the conversion was written for TP=1)."""
    from megatron_skpo.config import load_config
    from megatron_skpo.model.builder import initialize_parallel
    from megatron_skpo.trainer import build

    out = {}
    for source in ("hf", "mcore"):
        extra = [f"model.mcore_path={root / 'mcore'}"] if source == "mcore" else []
        hf_dir = root / "mcore" / "hf" if source == "mcore" else root / "hf"
        cfg = load_config(None, [f"model.hf_path={hf_dir}", "model.dtype=bf16", "parallel.tp=2",
                                 "parallel.distributed_optimizer=true", *extra])
        initialize_parallel(2, 1, seed=1)
        hf_config, weights = build.start_state(cfg)
        policy = build.build_policy_from(cfg, hf_config, weights, 10)
        reference = build.build_reference(cfg, hf_config, weights)
        out[source] = {"weights_none": weights is None, "state": full_state(policy),
                       "reference": {k: v.detach().float().clone() for k, v in reference.gpt.state_dict().items()
                                     if torch.is_tensor(v)}}
    return out


def _phase_two(rank, world, root: Path) -> dict:
    out = {}
    for kind, dist_opt in OPTIMIZERS.items():
        out[f"dp1/{kind}"] = _loaded(root, f"dp1_{kind}", 1, 1, dist_opt)  # DP=2 now
        out[f"tp2/{kind}"] = _saved_run(root, f"tp2_{kind}", 2, 1, dist_opt)
        out[f"pp2/{kind}"] = _saved_run(root, f"pp2_{kind}", 1, 2, dist_opt, arch="qwen2")
    out["manager"] = _manager_checks(rank, root)
    out["resume"] = _exact_resume(rank, root)
    out["nan"] = _non_finite(rank, root)
    out["mcore"] = _mcore_start(rank, root)
    return out


# ---------------------------------------------------------------- phase 3: one rank
def _phase_three(rank, world, root: Path) -> dict:
    from megatron_skpo.trainer.checkpoint import CheckpointError, CheckpointManager
    from megatron_skpo.trainer.model_state import ModelPart

    out = {}
    for kind, dist_opt in OPTIMIZERS.items():
        out[f"tp2/{kind}"] = _loaded(root, f"tp2_{kind}", 1, 1, dist_opt)
        out[f"pp2/{kind}"] = _loaded(root, f"pp2_{kind}", 1, 1, dist_opt, arch="qwen2")
    policy = _policy(1, 1, True)
    ck = CheckpointManager(root / "managed", 1, 1).restore({"model": ModelPart(policy)})
    out["managed"] = {"step": ck.step, "state": full_state(policy)}
    bad = root / "managed_one_rank_bad"
    shutil.copytree(root / "managed", bad)
    step_dir = bad / f"step_{STEPS:08d}" / "model"
    victim = sorted(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)[-1]
    _corrupt(victim)
    try:
        CheckpointManager(bad, 1, 1).restore({"model": ModelPart(_policy(1, 1, True))})
        out["corrupt_error"] = None
    except CheckpointError as e:
        out["corrupt_error"] = str(e)
    out["victim"] = victim.name
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reshard")
    t0 = time.perf_counter()
    one = spawn(_phase_one, 1, root)[0]
    two = spawn(_phase_two, 2, root, timeout=600)
    three = spawn(_phase_three, 1, root)[0]
    return {"one": one, "two": two, "three": three, "seconds": time.perf_counter() - t0}


def _report(name: str, diff: dict) -> None:
    print(f"\n{name}: max |saved - loaded| " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(diff.items())))


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_dp1_to_dp2(runs, kind):
    saved, loaded = runs["one"][f"dp1/{kind}"], runs["two"][0][f"dp1/{kind}"]
    diff = max_diff(saved["state"], loaded["state"])
    _report(f"DP=1 -> DP=2 ({kind} optimizer)", diff)
    assert all(v == 0.0 for v in diff.values()), diff
    assert loaded["state"]["scheduler.num_steps"].item() == STEPS


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_tp2_and_pp2_to_one_rank(runs, layout, kind):
    saved, loaded = runs["two"][0][f"{layout}/{kind}"], runs["three"][f"{layout}/{kind}"]
    assert runs["two"][1][f"{layout}/{kind}"]["state"].keys() == saved["state"].keys()
    diff = max_diff(saved["state"], loaded["state"])
    name = f"{layout.upper()[:2]}=2 -> {layout.upper()[:2]}=1 ({kind} optimizer)"
    _report(name, diff)
    size = max_diff(saved["state"], {k: torch.zeros_like(v) for k, v in saved["state"].items()})
    print(f"{name}: max |saved| " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(size.items())))
    assert {"weights", "exp_avg", "exp_avg_sq"} <= set(diff)
    moments = [v for k, v in saved["state"].items() if k.startswith("optimizer.state.exp_avg")]
    assert all(bool(v.abs().max() > 0) for v in moments)  # trained: the comparison is not of zeros
    # master weights: the distributed optimizer's of every parameter ("param"), the plain one's of the
    # bf16 weights only ("fp32_param")
    assert ("param" if kind == "distributed" else "fp32_param") in diff
    assert all(v == 0.0 for v in diff.values()), diff


def test_plain_optimizer_saves_masters_of_bf16_weights_only(runs):
    state = runs["one"]["dp1/plain"]["state"]
    of = lambda prefix: {k.removeprefix(prefix) for k in state if k.startswith(prefix)}  # noqa: E731
    masters = of("optimizer.state.fp32_param.")
    assert masters and not any("layernorm" in k or "layer_norm" in k for k in masters)  # norms stay fp32 params
    assert of("optimizer.state.exp_avg.") == {k for k in state if k.startswith(("decoder.", "embedding.", "output_layer."))}


def test_same_layout_resume_continues_exactly(runs):
    for r in runs["two"]:
        res = r["resume"]
        assert res["resumed"] == res["reference"]
        _report("save, reload, 2 more steps vs uninterrupted (DP=2, distributed optimizer)", res["diff"])
        assert all(v == 0.0 for v in res["diff"].values()), res["diff"]


def test_non_finite_weights_refused_on_every_rank(runs):
    r0, r1 = (r["nan"] for r in runs["two"])
    assert r1["error"].startswith("refusing to save non-finite weights: decoder.final_layernorm.weight has NaN")
    assert "decoder.final_layernorm.weight on rank 1 has NaN" in r0["error"]
    assert r0["written"] == [] and r1["written"] == []


def test_each_rank_verifies_the_files_it_reads_and_all_refuse_a_corrupt_one(runs):
    m0, m1 = (r["manager"] for r in runs["two"])
    files0, files1 = m0["files"]
    print(f"\nTP=2: rank 0 verifies {len(files0)} of {len(m0['all_files'])} files, rank 1 {len(files1)}")
    assert set(files0) | set(files1) == set(m0["all_files"])
    assert set(files0) != set(files1) and {".metadata", "common.pt", "metadata.json"} <= set(files0) & set(files1)
    assert f"model/{m0['corrupted']} is corrupt" in m1["error"]
    assert m0["error"].startswith("rank 1 of the job: ") and f"{m0['corrupted']} is corrupt" in m0["error"]


def test_manager_restores_at_another_layout_and_catches_a_corrupt_shard(runs):
    three, saved = runs["three"], runs["two"][0]["manager"]["state"]
    assert three["managed"]["step"] == STEPS
    diff = max_diff(saved, three["managed"]["state"])
    assert all(v == 0.0 for v in diff.values()), diff
    assert f"model/{three['victim']} is corrupt" in three["corrupt_error"]


def test_mcore_path_start_equals_hf_start(runs):
    for r in runs["two"]:
        hf, mc = r["mcore"]["hf"], r["mcore"]["mcore"]
        assert mc["weights_none"] and not hf["weights_none"]
        diff = max_diff(hf["state"], mc["state"])
        assert all(v == 0.0 for v in diff.values()), diff
        assert hf["reference"].keys() == mc["reference"].keys()
        assert all(torch.equal(hf["reference"][k], mc["reference"][k]) for k in hf["reference"])


def test_timing(runs):
    rows = [(k, v.get("save_s"), runs["three"].get(k, {}).get("load_s")) for k, v in runs["two"][0].items()
            if isinstance(v, dict) and "save_s" in v]
    print("\n" + "\n".join(f"{k}: save {s:.2f} s, load at one rank {ld:.2f} s" for k, s, ld in rows))
    print(f"all phases: {runs['seconds']:.0f} s")
