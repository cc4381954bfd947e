"""The one typed signature every method family implements, and its registry.

Per step the trainer calls ``method.sampler.sample(...)`` for the rollouts, then
``method.credit(CreditInput)`` for per-row token advantages, and trains ``method.phases``
(:class:`~megatron_skpo.algo.objective.PhaseLoss`: which rows, which loss, which aggregation).
``method.state`` holds the family's own checkpointed objects (SKPO: the length tracker);
``method.drift_phase`` names the rows whose responses the per-prompt policy-drift store keeps for
the value tracker (SPO: the response; SKPO: the selected segment). ``method.prm`` (PRIME only) asks
the trainer for a second trainable model whose per-token process rewards reach credit through
``CreditInput.process_rewards``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

from megatron_skpo.algo.objective import PhaseLoss
from megatron_skpo.algo.tracker import ValueTracker
from megatron_skpo.registry import Registry
from megatron_skpo.rollout.samplers.base import Sampler
from megatron_skpo.rollout.types import RolloutBatch


@dataclass
class CreditInput:
    """One step's graded rollouts and the state credit reads (settings are bound at build time)."""

    batch: RolloutBatch
    rewards: Tensor  # [N] float64 graded rewards (0 for rows that are not graded: upstream)
    tracker: ValueTracker  # per-prompt value (observed by every family: prioritised sampling)
    drift: Mapping[Any, float]  # prompt key -> D, the policy drift since it was last sampled (0 if unseen)
    correct: Optional[Tensor] = None  # [N] bool: the grader's verdict of each graded row (False elsewhere)
    process_rewards: Mapping[int, Tensor] = field(default_factory=dict)  # row -> [R_i] r_t (PRIME's PRM)

    def drift_of(self, keys) -> Tensor:
        """[K] float64 D of each key (0 for keys without a measurement)."""
        import torch

        return torch.tensor([float(self.drift.get(k, 0.0)) for k in keys], dtype=torch.float64)


@dataclass
class Credit:
    advantages: dict[int, Tensor]  # row -> [R_i] token advantages (trained rows only)
    rewards: Tensor  # [N] float64, upstream rows filled with R_I
    dropped_rows: set[int] = field(default_factory=set)  # dynamic sampling
    metrics: dict[str, float] = field(default_factory=dict)


CreditFn = Callable[[CreditInput], Credit]


@dataclass
class Method:
    """What the trainer needs from a family, built once per run."""

    sampler: Sampler
    credit: CreditFn
    phases: tuple[PhaseLoss, ...]
    drift_phase: str  # rows whose (prompt, response, log-probs) the drift store keeps per prompt
    state: dict[str, Any] = field(default_factory=dict)  # name -> state_dict()/load_state_dict() object
    graded_phases: tuple[str, ...] = ("single",)  # rows the reward pool grades
    scored_phases: Optional[tuple[str, ...]] = None  # rows whose rewards make "reward"/"accuracy" (default: graded)
    prm: Any = None  # PRIME: the implicit PRM's settings (methods.prime.PRMSettings); the trainer runs it


MethodBuilder = Callable[..., Method]  # (cfg: Config, tokenizer) -> Method
METHODS: Registry[MethodBuilder] = Registry("method family")
