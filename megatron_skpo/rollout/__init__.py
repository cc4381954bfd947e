"""Rollouts: the vLLM engine, Megatron -> vLLM weight sync, the samplers and the log-prob parity check."""
