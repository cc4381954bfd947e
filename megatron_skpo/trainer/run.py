"""Everything one training run holds, built once from the config (:func:`build_run`), and its
checkpoint parts. The loop (``trainer.loop``) and the stages (``trainer.stages``) read it.

Order matters: the process group first, then the vLLM engine (it joins the job's world), then
Megatron's parallel state and the policy, then the data (the engine's tokenizer renders prompts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_skpo.algo.advantages import AdvantageParams
from megatron_skpo.algo.tracker import ValueTracker
from megatron_skpo.config import Config
from megatron_skpo.data import EpochSampler
from megatron_skpo.rollout.samplers import build_sampler, sampler_for
from megatron_skpo.trainer import runtime
from megatron_skpo.trainer.guard import NonFiniteGuard
from megatron_skpo.trainer.objective import LossSettings
from megatron_skpo.trainer.parts import TrainProgress, training_parts


@dataclass
class Run:
    cfg: Config
    rank: int
    world: int
    engine: Any  # VLLMEngine
    tokenizer: Any
    policy: Any  # model.train_step.Policy
    reference: Optional[Any]  # frozen Policy when algo.kl.coef > 0
    hf_config: dict
    problems: runtime.Problems
    sampler: Any  # rollout sampler of the algorithm's family
    family: str  # sampler family: group | single_stream | skpo | dense_mc
    epochs: EpochSampler
    tracker: ValueTracker
    guard: NonFiniteGuard
    progress: TrainProgress
    loss: LossSettings
    adv_params: AdvantageParams
    pool: Any = None  # RewardPool, opened by the loop

    @property
    def length_tracker(self):
        return getattr(self.sampler, "lengths", None)

    @property
    def updates_per_step(self) -> int:
        return self.cfg.train.prompts_per_step // self.cfg.train.mini_batch_prompts

    def parts(self) -> dict:
        """Checkpoint parts: model/optimizer/schedule, RNG of every rank, data order, trackers, counters."""
        from megatron.core import tensor_parallel

        parts = training_parts(self.rank, self.progress, self.epochs, self.tracker, self.length_tracker,
                               self.guard, tensor_parallel.get_cuda_rng_tracker())
        parts["model"] = runtime.ModelPart(self.policy, self.rank)
        return parts


def build_run(cfg: Config, engine: Optional[Any] = None) -> Run:
    """Build the run; ``engine`` reuses a started vLLM engine of the same model (tests run several
    recipes on one engine: a start costs 15-40 s on CPU) with this config's sampling settings."""
    from megatron_skpo.model.builder import initialize_parallel

    rank, world = runtime.init_distributed()
    if engine is None:
        engine = runtime.build_engine(cfg, world, runtime.template_stop(cfg))
    else:
        engine.settings = runtime.sampling_settings(cfg, runtime.template_stop(cfg))
    initialize_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed, ep=cfg.parallel.ep)
    hf_config, weights = runtime.hf_state(cfg.model.hf_path)
    updates = cfg.train.steps * (cfg.train.prompts_per_step // cfg.train.mini_batch_prompts)
    policy = runtime.build_policy_from(cfg, hf_config, weights, updates)
    reference = runtime.build_reference(cfg, hf_config, weights) if cfg.algo.kl.coef > 0 else None
    del weights
    tok = engine.tokenizer
    problems = runtime.load_problems(cfg, tok)
    if cfg.train.prompts_per_step > len(problems.items):
        raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} exceeds the "
                         f"{len(problems.items)} usable training problems")
    a, t = cfg.algo, cfg.algo.tracker
    return Run(cfg, rank, world, engine, tok, policy, reference, hf_config, problems, build_sampler(cfg, tok),
               sampler_for(a.name), runtime.epoch_sampler(cfg, len(problems.items)),
               ValueTracker(t.rho_min, t.rho_max, t.tau_half, t.priority_floor), NonFiniteGuard(), TrainProgress(),
               LossSettings.from_config(a),
               AdvantageParams(a.adv_eps, a.std_unbiased, a.batch_norm_advantages, a.batch_norm_level, a.dense_mc.mode))
