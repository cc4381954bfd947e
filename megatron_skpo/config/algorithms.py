"""The algorithm names ``algo.name`` accepts: which method family each is, the defaults its name
sets, and which settings it cannot be trained with.

A name is a configuration of one of six method families (``megatron_skpo.methods``): ``group``
(G responses per prompt, group-relative advantages), ``single_stream`` (SPO: one response per
prompt, a tracked value baseline), ``skpo`` (upstream segment + skip-connected downstream group),
``dense_mc`` (Monte Carlo token values), ``prime`` (G responses scored by a trained implicit
process reward model) and ``critique`` (G - 1 responses and one refinement written from a critique). Loading a recipe applies, in order: the dataclass
defaults, the name's ``defaults`` (for every key the recipe and the overrides leave unset), the
recipe (and its ``base``), the command-line overrides. Then :func:`check_algorithm` rejects what
contradicts the name (``fixed``) and what the chosen family would silently ignore (``READ_WHEN``).

This module is data plus two small checks; it imports nothing heavy, so ``--dry-run`` stays fast.
See docs/algorithm.md for the maths of each name.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from megatron_skpo.config.base import ConfigError

Family = Literal["group", "single_stream", "skpo", "dense_mc", "prime", "critique"]
FAMILIES: tuple[str, ...] = ("group", "single_stream", "skpo", "dense_mc", "prime", "critique")
# Critique-GRPO: tokens a refinement prompt adds beyond the problem's prompt and the response (the
# request's words, the critique, a gold answer)
REFINE_MARGIN = 128
# Group-relative estimators (they need G >= 2 responses of one prompt and nothing else).
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


@dataclass(frozen=True)
class AlgorithmDef:
    """One ``algo.name``.

    ``defaults``: dotted config keys the name sets unless the recipe or an override sets them.
    ``fixed``: dotted key -> the values this algorithm can be trained with (anything else is
    another algorithm; the error says which name to use instead).
    """

    family: Family
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, tuple] = field(default_factory=dict)


_CLIP_SYMMETRIC = {"algo.clip.eps_low": 0.2, "algo.clip.eps_high": 0.2}
_CLIP_HIGHER = {"algo.clip.eps_low": 0.2, "algo.clip.eps_high": 0.28}
_PPO = {"algo.policy_loss": "ppo_clip", "algo.loss_agg_mode": "token-mean"}

ALGORITHMS: dict[str, AlgorithmDef] = {
    "skpo": AlgorithmDef(
        "skpo", "upstream segment scored by Monte Carlo over a skip-connected downstream group",
        {"algo.advantage": "grpo", **_CLIP_HIGHER},
        {"algo.advantage": GROUP_ESTIMATORS}),
    "grpo": AlgorithmDef(
        "group", "group mean/std advantage, PPO-clip", {"algo.advantage": "grpo", **_PPO, **_CLIP_SYMMETRIC},
        {"algo.advantage": ("grpo",)}),
    "dr_grpo": AlgorithmDef(
        "group", "Dr.GRPO: no std division, constant length normaliser",
        {"algo.advantage": "dr_grpo", "algo.policy_loss": "ppo_clip",
         "algo.loss_agg_mode": "seq-mean-token-sum-norm", **_CLIP_SYMMETRIC},
        {"algo.advantage": ("dr_grpo",), "algo.loss_agg_mode": ("seq-mean-token-sum-norm",)}),
    "dapo": AlgorithmDef(
        "group", "DAPO: clip-higher, dynamic sampling, overlong filter, token-mean",
        {"algo.advantage": "grpo", **_PPO, **_CLIP_HIGHER, "algo.dynamic_sampling": True,
         "algo.overlong_filter": True},
        {"algo.advantage": ("grpo",), "algo.dynamic_sampling": (True,)}),
    "cispo": AlgorithmDef(
        "group", "CISPO: clipped stop-gradient IS weight x log-prob",
        {"algo.advantage": "grpo", "algo.policy_loss": "cispo", "algo.loss_agg_mode": "token-mean", **_CLIP_HIGHER},
        {"algo.policy_loss": ("cispo",)}),
    "gspo": AlgorithmDef(
        "group", "GSPO: sequence-level ratio, tight clipping",
        {"algo.advantage": "grpo", "algo.policy_loss": "gspo", "algo.loss_agg_mode": "seq-mean-token-mean"},
        {"algo.policy_loss": ("gspo",)}),
    "sapo": AlgorithmDef(
        "group", "SAPO: a soft sigmoid gate on the token ratio in place of the clip",
        {"algo.advantage": "grpo", "algo.policy_loss": "sapo", "algo.loss_agg_mode": "seq-mean-token-mean"},
        {"algo.policy_loss": ("sapo",)}),
    "rloo": AlgorithmDef(
        "group", "RLOO: leave-one-out baseline", {"algo.advantage": "rloo", **_PPO, **_CLIP_SYMMETRIC},
        {"algo.advantage": ("rloo",)}),
    "reinforce_pp": AlgorithmDef(
        "group", "REINFORCE++: batch-whitened reward",
        {"algo.advantage": "reinforce_pp", **_PPO, **_CLIP_SYMMETRIC},
        {"algo.advantage": ("reinforce_pp", "reinforce_pp_baseline")}),
    "spo": AlgorithmDef(
        "single_stream", "SPO: one response per prompt, KL-adaptive value tracker, prioritised prompts",
        {"algo.group_size": 1, "algo.advantage": "spo", **_PPO, **_CLIP_HIGHER,
         "train.prompt_sampling": "prioritized"},
        {"algo.group_size": (1,), "algo.advantage": ("spo",)}),
    "dense_mc": AlgorithmDef(
        "dense_mc", "dense token-level Monte Carlo values (the baseline SKPO shows failing)",
        {"algo.advantage": "dense_mc", **_PPO, **_CLIP_SYMMETRIC},
        {"algo.advantage": ("dense_mc",)}),
    "prime": AlgorithmDef(
        "prime", "PRIME: implicit process rewards from an online-trained PRM, leave-one-out returns, PPO-clip",
        {"algo.advantage": "prime", **_PPO, **_CLIP_SYMMETRIC},
        {"algo.advantage": ("prime",)}),
    "critique_grpo": AlgorithmDef(
        "critique", "Critique-GRPO: G - 1 responses and one refinement from a critique, A = R - mean(R), "
        "shaped refinement tokens",
        {"algo.advantage": "dr_grpo", "algo.policy_loss": "unclipped", "algo.loss_agg_mode": "token-mean"},
        {"algo.advantage": ("dr_grpo",), "algo.loss_agg_mode": ("token-mean",)}),
}


def algorithm(name: str) -> AlgorithmDef:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"algo.name: got {name!r}; allowed values: {', '.join(map(repr, ALGORITHMS))}") from None


def _losses(cfg) -> tuple[str, ...]:
    """The policy losses this configuration trains with."""
    a = cfg.algo
    if family(cfg) == "critique":  # refinements train on the shaped probability
        return a.policy_loss, "shaped_prob"
    return (a.skpo.upstream_loss, a.skpo.downstream_loss) if family(cfg) == "skpo" else (a.policy_loss,)


def _uses_agg(cfg, mode: str) -> bool:
    a = cfg.algo
    modes = (a.skpo.upstream_agg_mode, a.skpo.downstream_agg_mode) if family(cfg) == "skpo" else (a.loss_agg_mode,)
    return mode in modes


def family(cfg) -> str:
    return algorithm(cfg.algo.name).family


# Dotted key prefixes that only some configurations read: (predicate, who reads it). An explicit
# value under such a prefix is an error when the predicate is false (the longest prefix wins). The
# settings of the policy losses and advantage estimators (algo.clip.*, algo.gspo_eps_*, algo.adv_eps,
# ...) get their rules from what each registered loss and estimator declares it reads
# (:func:`settings_read`); tests/config/test_read_rules.py checks every key against every method.
READ_WHEN: dict[str, tuple[Callable[[Any], bool], str]] = {
    "algo.skpo": (lambda c: family(c) == "skpo", "read only by SKPO (algo.name: skpo)"),
    "rollout.downstream_budget": (lambda c: family(c) == "skpo", "read only by SKPO (algo.name: skpo)"),
    "algo.dense_mc": (lambda c: family(c) == "dense_mc", "read only by dense Monte Carlo (algo.name: dense_mc)"),
    "algo.prime": (lambda c: family(c) == "prime", "read only by PRIME (algo.name: prime)"),
    "algo.critique": (lambda c: family(c) == "critique", "read only by Critique-GRPO (algo.name: critique_grpo)"),
    "algo.policy_loss": (lambda c: family(c) != "skpo",
                         "not read by SKPO, whose phases use algo.skpo.upstream_loss / downstream_loss"),
    "algo.loss_agg_mode": (lambda c: family(c) != "skpo",
                           "not read by SKPO, whose phases use algo.skpo.upstream_agg_mode / downstream_agg_mode"),
    "algo.dynamic_sampling": (lambda c: family(c) != "single_stream",
                              "not read by SPO (one response per prompt: there are no constant groups to drop)"),
    "algo.norm_length": (lambda c: _uses_agg(c, "seq-mean-token-sum-norm"),
                         "read only by the seq-mean-token-sum-norm aggregation (Dr.GRPO)"),
    "algo.tracker": (lambda c: family(c) in ("single_stream", "skpo") or c.train.prompt_sampling == "prioritized",
                     "read only by SPO, SKPO's upstream phase and train.prompt_sampling: prioritized"),
    "algo.tracker.priority_floor": (lambda c: c.train.prompt_sampling == "prioritized",
                                    "read only by train.prompt_sampling: prioritized"),
    "algo.kl.estimator": (lambda c: c.algo.kl.coef > 0, "read only when algo.kl.coef > 0"),
    "algo.tis.cap": (lambda c: c.algo.tis.enabled, "read only when algo.tis.enabled is true"),
    "algo.off_policy": (lambda c: c.rollout.max_staleness > 0, "read only when rollout.max_staleness > 0"),
    "algo.off_policy_cap": (lambda c: c.rollout.max_staleness > 0 and c.algo.off_policy == "decoupled",
                            "read only with rollout.max_staleness > 0 and algo.off_policy: decoupled"),
    "rollout.workers": (lambda c: c.rollout.placement == "disaggregated", "read only with placement: disaggregated"),
    "rollout.worker_launch": (lambda c: c.rollout.placement == "disaggregated",
                              "read only with placement: disaggregated"),
    "rollout.worker_cpus": (lambda c: c.rollout.placement == "disaggregated", "read only with placement: disaggregated"),
    "rollout.trainer_cpus": (lambda c: c.rollout.placement == "disaggregated",
                             "read only with placement: disaggregated"),
    "rollout.worker_devices": (lambda c: c.rollout.placement == "disaggregated",
                               "read only with placement: disaggregated"),
    "rollout.bridge_host": (lambda c: c.rollout.placement == "disaggregated", "read only with placement: disaggregated"),
    "rollout.bridge_port": (lambda c: c.rollout.placement == "disaggregated", "read only with placement: disaggregated"),
    "rollout.transport_timeout_s": (lambda c: c.rollout.placement == "disaggregated",
                                    "read only with placement: disaggregated"),
    "validation": (lambda c: c.data.eval is not None, "read only when data.eval names a held-out set"),
    "checkpoint.save_interval": (lambda c: c.checkpoint.enabled, "read only when checkpoint.enabled is true"),
    "checkpoint.keep_last": (lambda c: c.checkpoint.enabled, "read only when checkpoint.enabled is true"),
    "checkpoint.resume": (lambda c: c.checkpoint.enabled, "read only when checkpoint.enabled is true"),
}




def settings_read(cfg) -> set[str]:
    """The ``algo.*`` keys of loss and estimator settings this configuration reads: the fields its
    policy losses and its advantage estimator declare (``reads`` in their registries), plus what
    batch normalisation and SKPO's upstream step (which always whitens) read."""
    import megatron_skpo.algo  # noqa: F401  (late: populates the registries; the maths does not import config)
    from megatron_skpo.algo.advantages import BATCH_NORM_READS, AdvantageParams
    from megatron_skpo.algo.losses import PolicyLossParams
    from megatron_skpo.algo.registries import ADVANTAGES, POLICY_LOSSES
    from megatron_skpo.settings import config_keys

    a = cfg.algo
    loss = {f for name in _losses(cfg) for f in POLICY_LOSSES.meta(name)["reads"]}
    adv = {*ADVANTAGES.meta(a.advantage)["reads"], "batch_norm"}
    adv |= set(BATCH_NORM_READS) if a.batch_norm_advantages else set()
    adv |= {"eps", "std_unbiased"} if family(cfg) == "skpo" else set()
    loss_keys, adv_keys = config_keys(PolicyLossParams), config_keys(AdvantageParams)
    return {f"algo.{loss_keys[f]}" for f in loss} | {f"algo.{adv_keys[f]}" for f in adv}


@functools.cache
def _settings_rules() -> dict[str, tuple[Callable[[Any], bool], str]]:
    """READ_WHEN rules of the loss and estimator settings, derived from what the registered losses and
    estimators declare they read (a new loss setting needs no rule written by hand)."""
    import megatron_skpo.algo  # noqa: F401
    from megatron_skpo.algo.advantages import BATCH_NORM_READS, AdvantageParams
    from megatron_skpo.algo.losses import PolicyLossParams
    from megatron_skpo.algo.registries import ADVANTAGES, POLICY_LOSSES
    from megatron_skpo.settings import config_keys

    rules = {}
    for reg, params, what in ((POLICY_LOSSES, PolicyLossParams, ("policy loss", "policy losses")),
                              (ADVANTAGES, AdvantageParams, ("advantage estimator", "advantage estimators"))):
        adv = params is AdvantageParams
        for f, key in config_keys(params).items():
            if adv and f == "batch_norm":
                continue  # read whatever the estimator (compute_advantages)
            readers = [n for n in reg.names() if f in reg.meta(n)["reads"]]
            who = [f"the {' / '.join(readers)} {what[len(readers) > 1]}"] if readers else []
            who += ["batch normalisation (algo.batch_norm_advantages: true)"] if adv and f in BATCH_NORM_READS else []
            who += ["SKPO's upstream step"] if adv and f in ("eps", "std_unbiased") else []
            rules[f"algo.{key}"] = (lambda c, k=f"algo.{key}": k in settings_read(c), f"read only by {', '.join(who)}")
    return rules


def read_rules() -> dict[str, tuple[Callable[[Any], bool], str]]:
    """``READ_WHEN`` and the rules derived from the loss and estimator registries."""
    return {**READ_WHEN, **_settings_rules()}


def _read_rule(key: str):
    parts, rules = key.split("."), read_rules()
    for n in range(len(parts), 0, -1):
        rule = rules.get(".".join(parts[:n]))
        if rule is not None:
            return rule
    return None


def check_algorithm(cfg, explicit: set[str]) -> None:
    """Errors for values that contradict ``algo.name`` or that the configuration would ignore.

    Args:
        cfg: the built :class:`~megatron_skpo.config.Config`.
        explicit: dotted keys set by the recipe (with its base) or an override.
    """
    spec = algorithm(cfg.algo.name)
    for key, allowed in spec.fixed.items():
        value = _get(cfg, key)
        if value not in allowed:
            hint = _other_name(key, value)
            raise ConfigError(f"{key}: {value!r} contradicts algo.name={cfg.algo.name!r}, which trains with "
                              f"{' or '.join(map(repr, allowed))}{hint}")
    if cfg.algo.advantage == "prime" and spec.family != "prime":
        raise ConfigError(f"algo.advantage: 'prime' needs the implicit PRM's process rewards, which only "
                          f"algo.name=prime trains; {cfg.algo.name} has none")
    if spec.family == "critique" and cfg.algo.tis.enabled:
        raise ConfigError("algo.tis.enabled: Critique-GRPO's refinements are sampled from the critique's prompt and "
                          "trained on the problem's, so pi_old / pi_sampler compares two contexts; set it to false")
    if spec.family == "critique" and cfg.rollout.max_staleness > 0:
        raise ConfigError("rollout.max_staleness: Critique-GRPO's refinements are sampled from the critique's prompt "
                          "and trained on the problem's, so a stale refinement has no behaviour log-probs to correct "
                          "by; use 0 (rollout workers still generate, synchronously)")
    r = cfg.rollout
    need = r.max_prompt_tokens + 2 * r.max_response_tokens + REFINE_MARGIN
    if spec.family == "critique" and r.max_model_len is not None and r.max_model_len < need:
        raise ConfigError(f"rollout.max_model_len: {r.max_model_len} is too short for Critique-GRPO's refinement "
                          f"prompts (the problem's prompt, a response and its critique, then a refinement): use at "
                          f"least max_prompt_tokens + 2 * max_response_tokens + {REFINE_MARGIN} = {need}, or null")
    g = cfg.algo.group_size
    if spec.family in ("group", "skpo", "dense_mc", "prime", "critique") and g < 2:
        raise ConfigError(f"algo.group_size: {g}; {cfg.algo.name} normalises within a group of G >= 2 responses "
                          "(G = 1 gives every advantage 0); use algo.name=spo for one response per prompt")
    for key in sorted(explicit):
        rule = _read_rule(key)
        if rule is not None and not rule[0](cfg):
            raise ConfigError(f"{key}: set, but {rule[1]}; this configuration (algo.name={cfg.algo.name}) "
                              "would ignore it. Remove it or choose the algorithm that reads it")


def _other_name(key: str, value: Any) -> str:
    """' (that is algo.name=X)' when another name is defined by this value."""
    for name, spec in ALGORITHMS.items():
        if spec.fixed.get(key) == (value,):
            return f" (for {key}={value!r} use algo.name={name})"
    return ""


def _get(cfg, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
