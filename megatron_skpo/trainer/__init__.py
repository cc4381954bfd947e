"""Trainer infrastructure: atomic checkpoints with exact resume, metrics sinks, the non-finite guard.

The RL loop itself lands with the model and rollout integration.
"""
