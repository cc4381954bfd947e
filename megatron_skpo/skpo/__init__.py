"""SKPO's pieces: split position, segment selection, skip prompt, upstream credit, objective, and the
method (sampler + credit + phases) the trainer looks up by family name ``skpo``.

Importing this package registers the segment selectors (``segment.SEGMENT_SELECTORS``).
"""
from megatron_skpo.skpo import segment  # noqa: F401
