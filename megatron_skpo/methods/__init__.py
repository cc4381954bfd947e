"""Method families: how an algorithm samples, assigns credit and which phases it trains.

A family (``group``, ``single_stream``, ``dense_mc``, ``prime`` here; ``skpo`` in :mod:`megatron_skpo.skpo.method`)
is one :data:`~megatron_skpo.methods.base.METHODS` entry with one typed signature,
``build(cfg, tokenizer) -> Method``. The trainer looks the family of ``algo.name`` up once
(:func:`megatron_skpo.catalog.build_method`) and never branches on an algorithm name.
"""
from megatron_skpo.methods.base import METHODS, Credit, CreditInput, Method, MethodBuilder

__all__ = ["METHODS", "Credit", "CreditInput", "Method", "MethodBuilder"]
