"""Rollout samplers, one per algorithm family, all returning :class:`RolloutBatch`.

``ROLLOUT_SAMPLERS`` maps a family name to ``build(cfg: Config, tokenizer) -> Sampler`` (driver
code; the samplers themselves take plain values). ``sampler_for(algo_name)`` is the family an
``algo.name`` uses.
"""
from __future__ import annotations

from megatron_skpo.registry import Registry
from megatron_skpo.rollout.samplers.base import PromptItem, Sampler
from megatron_skpo.rollout.samplers.dense_mc import DenseMCSampler
from megatron_skpo.rollout.samplers.group import GroupSampler
from megatron_skpo.rollout.samplers.skpo import SKPOSampler

ROLLOUT_SAMPLERS: Registry = Registry("rollout sampler")
_FAMILY = {"skpo": "skpo", "dense_mc": "dense_mc", "spo": "single_stream"}

__all__ = ["ROLLOUT_SAMPLERS", "PromptItem", "Sampler", "GroupSampler", "SKPOSampler", "DenseMCSampler",
           "sampler_for", "build_sampler"]


def sampler_for(algo_name: str) -> str:
    """The sampler family of an ``algo.name`` (every group-relative algorithm uses ``group``)."""
    return _FAMILY.get(algo_name, "group")


@ROLLOUT_SAMPLERS.register("group")
def _build_group(cfg, tokenizer) -> GroupSampler:
    return GroupSampler(cfg.algo.group_size, cfg.rollout.max_response_tokens, cfg.rollout.timeout_s)


@ROLLOUT_SAMPLERS.register("single_stream")
def _build_single_stream(cfg, tokenizer) -> GroupSampler:
    """SPO: one response per prompt, whatever ``algo.group_size`` says."""
    return GroupSampler(1, cfg.rollout.max_response_tokens, cfg.rollout.timeout_s)


@ROLLOUT_SAMPLERS.register("skpo")
def _build_skpo(cfg, tokenizer) -> SKPOSampler:
    from megatron_skpo.skpo.split import LengthTracker

    k, t = cfg.algo.skpo, cfg.algo.tracker
    tracker = LengthTracker(k.init_length, t.rho_min, t.rho_max, t.tau_half)
    return SKPOSampler(tokenizer, cfg.algo.group_size, cfg.rollout.max_response_tokens, selector=k.selection,
                       skip_mode=k.skip_mode, template=k.skip_template,
                       downstream_budget=cfg.rollout.downstream_budget, split_min_frac=k.split_min_frac,
                       split_max_frac=k.split_max_frac, split_mode=k.split_mode, length_tracker=tracker,
                       own_completion=k.upstream_reward == "own_completion", seed=cfg.rollout.seed, timeout_s=cfg.rollout.timeout_s)


@ROLLOUT_SAMPLERS.register("dense_mc")
def _build_dense_mc(cfg, tokenizer) -> DenseMCSampler:
    d = cfg.algo.dense_mc
    return DenseMCSampler(cfg.algo.group_size, cfg.rollout.max_response_tokens, d.num_rollouts, d.num_positions,
                          cfg.rollout.timeout_s)


def build_sampler(cfg, tokenizer) -> Sampler:
    """The sampler for ``cfg.algo.name`` (through the registry)."""
    return ROLLOUT_SAMPLERS.get(sampler_for(cfg.algo.name))(cfg, tokenizer)
