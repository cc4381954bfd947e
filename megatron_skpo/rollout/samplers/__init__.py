"""Rollout samplers the method families share, all returning :class:`RolloutBatch`.

``GroupSampler`` (G responses per prompt; SPO uses G = 1) and ``DenseMCSampler`` (G responses, then
K continuations from M prefixes of each). SKPO's two-phase sampler is SKPO-specific and lives in
:mod:`megatron_skpo.skpo.sampler`. Which family uses which sampler is decided by the method
families (:mod:`megatron_skpo.methods`).
"""
from __future__ import annotations

from megatron_skpo.rollout.samplers.base import PromptItem, Sampler
from megatron_skpo.rollout.samplers.dense_mc import DenseMCSampler
from megatron_skpo.rollout.samplers.group import GroupSampler

__all__ = ["PromptItem", "Sampler", "GroupSampler", "DenseMCSampler"]
