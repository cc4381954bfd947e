"""Everything one training run holds, built once from the config (:func:`build_run`), and its
checkpoint parts. The loop (``trainer.loop``) and the stages (``trainer.stages``) read it.

Order matters: the process group first, then the vLLM engine (it joins the job's world; with
``rollout.placement: disaggregated`` rank 0 starts the rollout workers instead), then
Megatron's parallel state and the policy, then the data (the engine's tokenizer renders prompts),
then the method of ``algo.name``'s family (``megatron_skpo.catalog``). PRIME adds a second trainable
model, the implicit PRM (``trainer/prm.py``), saved as the checkpoint part ``prm``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch

from megatron_skpo.algo.objective import ObjectiveSettings
from megatron_skpo.algo.tracker import ValueTracker
from megatron_skpo.config import Config, family
from megatron_skpo.data import EpochSampler
from megatron_skpo.methods import Method
from megatron_skpo.model.train_step import Policy
from megatron_skpo.rewards import RewardPool
from megatron_skpo.rollout.engine import VLLMEngine
from megatron_skpo.trainer import build
from megatron_skpo.trainer.build import Parallel, Problems
from megatron_skpo.trainer.drift import DriftStore
from megatron_skpo.trainer.guard import NonFiniteGuard
from megatron_skpo.trainer.model_state import ModelPart
from megatron_skpo.trainer.objective import objective_settings
from megatron_skpo.trainer.parts import (JsonPart, Layout, RankStateDictPart, StateDictPart, TrainProgress,
                                        training_parts)
from megatron_skpo.trainer.prm import build_prm
from megatron_skpo.trainer.remote import RolloutWorkers
from megatron_skpo.trainer.resume import ConfigRecord
from megatron_skpo.trainer.rollout_queue import RolloutQueue
from megatron_skpo.trainer.validation import load_validation


@dataclass
class Run:
    cfg: Config
    par: Parallel
    engine: Optional[VLLMEngine]  # colocated: this rank's engine; disaggregated: None (``workers``)
    tokenizer: object  # the engine's HF tokenizer (PreTrainedTokenizerBase)
    policy: Policy
    reference: Optional[Policy]  # frozen starting weights, when algo.kl.coef > 0 or for PRIME's implicit PRM
    hf_config: dict
    problems: Problems
    validation: Optional[Problems]  # data.eval, validated inside the loop
    method: Method  # sampler, credit, phases of algo.name's family
    objective: ObjectiveSettings
    epochs: EpochSampler
    tracker: ValueTracker
    drift: DriftStore  # each prompt's previous response, for the trackers' per-prompt D
    guard: NonFiniteGuard
    progress: TrainProgress
    record: ConfigRecord  # the config, saved with every checkpoint and compared on resume
    queue: RolloutQueue = field(default_factory=lambda: RolloutQueue(0))  # requested/finished rollouts, versions
    workers: Optional[RolloutWorkers] = None  # disaggregated, rank 0: the rollout workers
    pool: Optional[RewardPool] = None  # opened by the loop
    prm: Optional[Policy] = None  # PRIME: the implicit process reward model, trained online (trainer/prm.py)

    @property
    def rank(self) -> int:
        return self.par.rank

    @property
    def updates_per_step(self) -> int:
        return self.cfg.train.prompts_per_step // self.cfg.train.mini_batch_prompts

    def parts(self) -> dict:
        """Checkpoint parts: model/optimizer/schedule (reshardable), RNG of every rank, data order,
        trackers, counters, every rank's drift store."""
        from megatron.core import tensor_parallel

        parts = {"config": JsonPart(self.record)}  # first: a refused resume loads nothing else
        layout = Layout.current()  # per-rank parts record it: a resume at another one reseeds / merges
        parts.update(training_parts(self.rank, self.progress, self.epochs, self.tracker, self.guard,
                                    tensor_parallel.get_cuda_rng_tracker(), layout, self.cfg.train.seed))
        parts.update({name: StateDictPart(obj) for name, obj in self.method.state.items()})
        # at another layout each rank keeps the saved entries of the prompts homed at its DP rank
        merge = partial(DriftStore.merge_states, dp_rank=self.par.dp_rank, dp_size=self.par.dp_size)
        parts["drift"] = RankStateDictPart(self.drift, self.rank, layout, merge)
        parts["model"] = ModelPart(self.policy, self.rank)
        if self.prm is not None:
            parts["prm"] = ModelPart(self.prm, self.rank)
        parts["rollout_queue"] = StateDictPart(self.queue, optional=True)  # absent before the queue existed
        return parts


def value_tracker(t) -> ValueTracker:
    """The value tracker every method shares (prioritised sampling; SPO's and SKPO's baseline), from
    ``cfg.algo.tracker``."""
    return ValueTracker(t.rho_min, t.rho_max, t.d_half, t.priority_floor, t.prior)


def build_run(cfg: Config, engine: Optional[VLLMEngine] = None) -> Run:
    """Build the run; ``engine`` reuses a started vLLM engine of the same model (tests run several
    recipes on one engine: a start costs 15-40 s on CPU) with this config's sampling settings."""
    rank, world = build.init_distributed()
    workers, colocated = None, cfg.rollout.placement == "colocated"
    if not colocated:  # the engines live in the rollout workers; the trainer only needs the tokenizer
        engine, tokenizer = None, build.load_tokenizer(cfg)
        build.pin_trainer(cfg.rollout.trainer_cpus)
        workers = RolloutWorkers(cfg, "nccl" if torch.cuda.is_available() else "gloo") if rank == 0 else None
    elif engine is None:
        engine = build.build_engine(cfg, build.template_stop(cfg))
    else:
        engine.settings = build.sampling_settings(cfg, build.template_stop(cfg))
    tokenizer = engine.tokenizer if colocated else tokenizer
    try:
        return _build(cfg, engine, tokenizer, workers, world)
    except BaseException:
        if workers is not None:  # started first: stop them, or they wait for a trainer that is gone
            workers.close()
        raise


def _build(cfg: Config, engine: Optional[VLLMEngine], tokenizer, workers: Optional[RolloutWorkers],
           world: int) -> Run:
    from megatron_skpo.catalog import build_method
    from megatron_skpo.model.builder import initialize_parallel

    colocated = engine is not None
    initialize_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed, ep=cfg.parallel.ep)
    hf_config, weights = build.start_state(cfg)  # no HF weights with model.mcore_path
    policy = build.build_policy_from(cfg, hf_config, weights, cfg.train.steps * (
        cfg.train.prompts_per_step // cfg.train.mini_batch_prompts))
    prime = family(cfg) == "prime"
    reference = build.build_reference(cfg, hf_config, weights) if cfg.algo.kl.coef > 0 or prime else None
    prm = build_prm(cfg, hf_config, weights, cfg.train.steps * (
        cfg.train.prompts_per_step // cfg.train.mini_batch_prompts)) if prime else None
    del weights
    problems = build.load_problems(cfg, tokenizer)
    held_out = load_validation(cfg, tokenizer)
    if cfg.train.prompts_per_step > len(problems.items):
        raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} exceeds the "
                         f"{len(problems.items)} usable training problems")
    # the rollout workers are one engine for the trainer's sharding: every rank gets the whole batch
    par = Parallel.current(cfg.rollout.tp if colocated else world)
    return Run(cfg=cfg, par=par, engine=engine, tokenizer=tokenizer, policy=policy,
               reference=reference, hf_config=hf_config, problems=problems, validation=held_out,
               method=build_method(cfg, tokenizer), objective=objective_settings(cfg.algo),
               epochs=build.epoch_sampler(cfg, len(problems.items)),
               tracker=value_tracker(cfg.algo.tracker),
               drift=DriftStore(), guard=NonFiniteGuard(), progress=TrainProgress(), record=ConfigRecord(cfg),
               queue=RolloutQueue(cfg.rollout.max_staleness), workers=workers, prm=prm)
