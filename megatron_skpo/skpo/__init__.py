"""SKPO's pieces: split position, segment selection, skip prompt, upstream advantages, objective.

Importing this package registers the segment selectors (``SEGMENT_SELECTORS``).
"""
from megatron_skpo.skpo import segment  # noqa: F401
