"""Algorithm section of the config tree: estimator, loss and SKPO-specific knobs.

Names (``advantage``, ``policy_loss``, ``loss_agg_mode``, ``kl.estimator``, ...) are looked up in the
registries of ``megatron_skpo.algo``; validation here checks them against those registries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_skpo.config.base import check, doc

AGG_HELP = "loss aggregation mode (AGG_MODES in megatron_skpo/algo/aggregation.py; docs/algorithm.md)"



@dataclass
class ClipConfig:
    """Importance-ratio clipping (clip-higher: eps_high > eps_low)."""

    eps_low: float = doc(0.2, "lower clip: ratio >= 1 - eps_low")
    eps_high: float = doc(0.28, "upper clip: ratio <= 1 + eps_high (DAPO clip-higher)")
    dual_clip_c: Optional[float] = doc(None, "dual-clip bound c (> 1) for negative advantages; null = off")

    def __post_init__(self):
        check(0 <= self.eps_low < 1, "eps_low", "must be in [0, 1)")
        check(self.eps_high >= 0, "eps_high", "must be >= 0")
        check(self.dual_clip_c is None or self.dual_clip_c > 1, "dual_clip_c", "must be > 1 or null")


@dataclass
class KLConfig:
    """KL penalty to a reference policy (beta = 0 in the paper)."""

    coef: float = doc(0.0, "beta; 0 = off (no reference forward pass)")
    estimator: str = doc("k3", "KL_ESTIMATORS name: Schulman's k1, k2 or k3")

    def __post_init__(self):
        check(self.coef >= 0, "coef", "must be >= 0")


@dataclass
class TISConfig:
    """Truncated importance sampling for sampler-vs-trainer log-prob mismatch."""

    enabled: bool = doc(False, "weight the loss by min(pi_old_trainer / pi_sampler, cap)")
    cap: float = doc(2.0, "truncation C")

    def __post_init__(self):
        check(self.cap > 0, "cap", "must be > 0")


@dataclass
class TrackerConfig:
    """SPO's KL-adaptive value tracker (also drives SKPO's length tracker); docs/algorithm.md §4."""

    rho_min: float = doc(0.875, "lower clip of the forgetting factor rho")
    rho_max: float = doc(0.96, "upper clip of the forgetting factor rho")
    d_half: float = doc(0.06, "drift half-life: rho = clip(2^(-D/d_half), rho_min, rho_max)")
    drift: Literal["per_prompt", "batch_kl"] = doc(
        "per_prompt", "D: per_prompt = token-mean |log pi_then - log pi_now| over the prompt's previous response "
        "(SPO's); batch_kl = the previous step's token-mean k3 KL(old || updated), the same for every prompt")
    prior: Literal["beta", "first_observation"] = doc(
        "beta", "beta = Beta(0.5, 0.5) prior (V = 0, N = 1; the SPO recipe); first_observation = N = 0")
    priority_floor: float = doc(0.05, "prioritised sampling weight = sqrt(v(1-v)) + floor")

    def __post_init__(self):
        check(0 < self.rho_min <= self.rho_max <= 1, "rho_min/rho_max", "need 0 < rho_min <= rho_max <= 1")
        check(self.d_half > 0, "d_half", "must be > 0")
        check(self.priority_floor >= 0, "priority_floor", "must be >= 0")


@dataclass
class SKPOConfig:
    """SKPO: upstream segment, Monte Carlo score, skip-connected downstream group."""

    split_min_frac: float = doc(1 / 6, "t_q ~ U[min_frac * L_q, max_frac * L_q]")
    split_max_frac: float = doc(1 / 2, "see split_min_frac")
    split_mode: Literal["uniform", "fixed_alternating"] = doc(
        "uniform", "uniform = the paper; fixed_alternating = ablation alternating min/max fraction")
    init_length: Optional[float] = doc(
        None, "initial running response length L_q (the paper's 1024); null = min(1024, rollout.max_response_tokens)")
    unseen_length: Literal["fixed", "dataset_mean"] = doc(
        "fixed", "L_q of a prompt not seen yet: fixed = init_length (the paper's); dataset_mean = (ours) the mean "
        "length observed so far over all prompts (init_length until the first observation)")
    length_source: Literal["segment_plus_downstream", "downstream"] = doc(
        "segment_plus_downstream", "(ours) what the length tracker observes")
    selection: str = doc("median", "segment chosen by mean NLL (SEGMENT_SELECTORS in skpo/segment.py): median = "
                         "the paper's; min, max, random, minmax_alternating are ablations")
    skip_mode: Literal["skip", "hard_prefix"] = doc(
        "skip", "skip = [segment, problem] prompt; hard_prefix = the 'w/o skip' ablation")
    skip_template: Optional[str] = doc(
        None, "(ours) the skip content put in the prompt's problem slot, with {segment} and {problem}; null = "
              "the prompt template's own (data/prompts.py: a chat turn's 'Partial reasoning: ... Problem: ...', "
              "the few-shot block's '(draft: ...)' then the question)")
    upstream_reward: Literal["mc", "own_completion"] = doc(
        "mc", "mc = mean downstream reward; own_completion = 'w/o MC' ablation")
    upstream_loss: str = doc("ppo_clip", "policy loss of the upstream phase (registry name)")
    downstream_loss: str = doc("cispo", "policy loss of the downstream phase (registry name)")
    w_up: float = doc(0.5, "weight of the upstream loss J_I")
    w_down: float = doc(0.5, "weight of the downstream loss J_II")
    phase_weighting: Literal["fixed", "token_pool"] = doc(
        "fixed", "fixed = w_up J_I + w_down J_II, each phase normalised by its own counts (the paper's); token_pool = "
        "(ours) one token mean over both phases' tokens, so a segment token weighs what a downstream token does "
        "(w_up, w_down still multiply; both *_agg_mode must be token-mean)")
    upstream_agg_mode: str = doc("seq-mean-token-mean", "J_I averages over each segment's tokens")
    downstream_agg_mode: str = doc("token-mean", "J_II averages over all downstream tokens")

    def __post_init__(self):
        check(0 < self.split_min_frac <= self.split_max_frac <= 1, "split_min_frac/split_max_frac",
              "need 0 < min <= max <= 1")
        check(self.init_length is None or self.init_length >= 1, "init_length", "must be >= 1 or null")
        for key in ("{segment}", "{problem}"):
            check(self.skip_template is None or self.skip_template.count(key) == 1, "skip_template",
                  f"must contain {key} exactly once")
        check(self.w_up >= 0 and self.w_down >= 0, "w_up/w_down", "must be >= 0")
        check(self.phase_weighting == "fixed" or self.upstream_agg_mode == self.downstream_agg_mode == "token-mean",
              "phase_weighting", "token_pool pools the phases' token counts: set algo.skpo.upstream_agg_mode="
              "token-mean and algo.skpo.downstream_agg_mode=token-mean")


@dataclass
class DenseMCConfig:
    """Token-level Monte Carlo values (VinePPO-style; the baseline the paper shows failing)."""

    num_rollouts: int = doc(8, "K continuations per position")
    num_positions: int = doc(8, "evenly spaced positions per response")
    mode: Literal["group_norm", "vine"] = doc(
        "group_norm", "group_norm = normalise MC values within the group per position (the paper's); "
        "vine = VinePPO's V(t+1) - V(t)")

    def __post_init__(self):
        check(self.num_rollouts >= 1, "num_rollouts", "must be >= 1")
        check(self.num_positions >= 1, "num_positions", "must be >= 1")


@dataclass
class PrimeConfig:
    """PRIME: implicit process rewards from a second, trainable model (the PRM); docs/algorithm.md §6."""

    beta: float = doc(0.05, "implicit PRM's beta: r_t = beta (log pi_prm - log pi_ref); also the CE's logit scale")
    process_coef: float = doc(5.0, "weight of the process rewards' leave-one-out returns in the advantage")
    outcome_coef: float = doc(5.0, "weight of the outcome reward's leave-one-out advantage")
    process_norm: Literal["batch_norm", "none"] = doc(
        "batch_norm", "batch_norm = r_t / max over the batch of |return-to-go| (PRIME's default); none = raw r_t")
    update: Literal["after", "before", "none"] = doc(
        "after", "PRM update each step by cross-entropy: after = rewards from the PRM before its update (PRIME's "
        "single forward), before = update first, then score with the updated PRM; none = a frozen PRM")
    accuracy_lower: float = doc(0.2, "accuracy filter: train on prompts whose group accuracy is in [lower, upper]")
    accuracy_upper: float = doc(0.8, "see accuracy_lower")
    lr_scale: float = doc(2.0, "the PRM's learning rate = lr_scale x optim.lr (PRIME's recipe: 1e-6 beside the "
                          "policy's 5e-7); its schedule is the policy's")

    def __post_init__(self):
        check(self.beta > 0, "beta", "must be > 0")
        check(self.process_coef >= 0 and self.outcome_coef >= 0, "process_coef/outcome_coef", "must be >= 0")
        check(0 <= self.accuracy_lower <= self.accuracy_upper <= 1, "accuracy_lower/accuracy_upper",
              "need 0 <= lower <= upper <= 1")
        check(self.lr_scale > 0, "lr_scale", "must be > 0")


@dataclass
class CritiqueConfig:
    """Critique-GRPO: each initial response is critiqued and refined by the policy; docs/algorithm.md §6."""

    critique: Literal["simple", "simple_gt"] = doc(
        "simple", "the critique of a response: simple = whether it is correct; simple_gt = also the gold answer "
        "when it is not")
    template: Optional[str] = doc(
        None, "(ours) the refinement request put in the prompt's problem slot, with {problem}, {response} and "
              "{critique}; null = the prompt template's own (data/prompts.py)")
    shaping_gamma: float = doc(0.1, "refinement tokens train on -A p / (p + gamma), p = pi_theta(token)")

    def __post_init__(self):
        for key in ("{problem}", "{response}", "{critique}"):
            check(self.template is None or self.template.count(key) == 1, "template",
                  f"must contain {key} exactly once")
        check(self.shaping_gamma > 0, "shaping_gamma", "must be > 0")


@dataclass
class AlgoConfig:
    """The RL algorithm. ``name`` selects the sampler family; the rest are the maths' knobs."""

    name: str = doc("skpo", "the algorithm (config/algorithms.py): skpo, grpo, dr_grpo, dapo, cispo, gspo, sapo, spo, rloo, "
                    "reinforce_pp, dense_mc, prime, critique_grpo; the name sets its own defaults (docs/algorithm.md)")
    group_size: int = doc(8, "G: responses per prompt (downstream group for SKPO)")
    advantage: str = doc("grpo", "advantage estimator (registry name); SKPO's downstream uses it too")
    policy_loss: str = doc("cispo", "policy loss (registry name) for non-SKPO algorithms")
    loss_agg_mode: str = doc("token-mean", AGG_HELP)
    norm_length: int = doc(3072, "constant denominator of seq-mean-token-sum-norm (Dr.GRPO)")
    adv_eps: float = doc(1e-6, "epsilon in (R - mean) / (std + eps)")
    std_unbiased: bool = doc(True, "group std with Bessel's correction (torch.std default, as verl/TRL)")
    batch_norm_advantages: bool = doc(False, "also normalise advantages over the batch (paper appendix C)")
    batch_norm_level: Literal["token", "sequence"] = doc(
        "token", "batch statistics over every valid token, or over sequences (each response counts once)")
    dynamic_sampling: bool = doc(False, "drop groups whose rewards are all equal (DAPO)")
    overlong_filter: bool = doc(False, "mask truncated responses out of the loss (DAPO)")
    entropy_coef: float = doc(0.0, "entropy bonus coefficient")
    clip: ClipConfig = doc(factory=ClipConfig, help="ratio clipping")
    gspo_eps_low: float = doc(3e-4, "GSPO's sequence-ratio clip (much tighter than token PPO)")
    gspo_eps_high: float = doc(4e-4, "GSPO's sequence-ratio upper clip")
    sapo_tau_pos: float = doc(1.0, "SAPO's soft-gate temperature for A > 0: loss -(4/tau) sigmoid(tau (r - 1)) A")
    sapo_tau_neg: float = doc(1.05, "SAPO's soft-gate temperature for A <= 0 (the paper's: a little steeper)")
    kl: KLConfig = doc(factory=KLConfig, help="KL penalty")
    tis: TISConfig = doc(factory=TISConfig, help="truncated importance sampling")
    off_policy: Literal["decoupled", "behaviour"] = doc(
        "decoupled", "correction for stale rows (rollout.max_staleness > 0): decoupled = ratio to the recomputed "
        "proximal policy times min(pi_prox / mu, off_policy_cap); behaviour = ratio to the sampler's mu")
    off_policy_cap: float = doc(5.0, "decoupled: cap of the behaviour importance weight pi_prox / mu on stale rows")
    tracker: TrackerConfig = doc(factory=TrackerConfig, help="SPO value tracker")
    skpo: SKPOConfig = doc(factory=SKPOConfig, help="SKPO")
    dense_mc: DenseMCConfig = doc(factory=DenseMCConfig, help="dense Monte Carlo baseline")
    prime: PrimeConfig = doc(factory=PrimeConfig, help="PRIME's implicit process reward model")
    critique: CritiqueConfig = doc(factory=CritiqueConfig, help="Critique-GRPO's critiques and refinements")

    def __post_init__(self):
        check(self.group_size >= 1, "algo.group_size", "must be >= 1")
        check(self.norm_length > 0, "algo.norm_length", "must be > 0")
        check(self.adv_eps >= 0, "algo.adv_eps", "must be >= 0")
        check(self.off_policy_cap > 0, "algo.off_policy_cap", "must be > 0")
        check(self.sapo_tau_pos > 0, "algo.sapo_tau_pos", "must be > 0")
        check(self.sapo_tau_neg > 0, "algo.sapo_tau_neg", "must be > 0")
