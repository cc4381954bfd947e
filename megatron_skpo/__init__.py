"""megatron-skpo: RLVR on Megatron-core, and the reference implementation of SKPO."""

__version__ = "0.1.0"
