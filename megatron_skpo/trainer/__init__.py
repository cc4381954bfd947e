"""The trainer: the RL loop (``train``), atomic checkpoints with exact resume, metrics sinks, the
non-finite guard. ``train`` is imported lazily so that the light modules (checkpoint, logging,
guard) do not pull in Megatron and vLLM.
"""
from __future__ import annotations


def train(cfg, export_hf: str | None = None) -> int:
    """Run the RL loop of ``cfg`` (see :mod:`megatron_skpo.trainer.loop`)."""
    from megatron_skpo.trainer.loop import train as _train

    return _train(cfg, export_hf)


__all__ = ["train"]
