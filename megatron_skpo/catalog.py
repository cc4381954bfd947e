"""Every built-in method family, registered by importing its module here (and only here).

``methods/`` never imports ``skpo/`` (SKPO builds on the shared method types, not the other way
round), so the registry is completed at this top level, which the trainer imports.
"""
from __future__ import annotations

from megatron_skpo.config import ALGORITHMS, Config
from megatron_skpo.methods import METHODS, Method
from megatron_skpo.methods import critique, dense_mc, group, prime, single_stream  # noqa: F401  (register)
from megatron_skpo.skpo import method as _skpo_method  # noqa: F401  (registers "skpo")


def build_method(cfg: Config, tokenizer) -> Method:
    """The method of ``cfg.algo.name``'s family (``config/algorithms.py``), built for this run."""
    return METHODS.get(ALGORITHMS[cfg.algo.name].family)(cfg, tokenizer)
