"""The registries of the algorithm core. Implementations register themselves on import.

Import ``megatron_skpo.algo`` (not this module alone) to get every registry populated.
"""
from megatron_skpo.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")
POLICY_LOSSES: Registry = Registry("policy loss")
KL_ESTIMATORS: Registry = Registry("KL estimator")
OFF_POLICY_CORRECTIONS: Registry = Registry("off-policy correction")  # algo/off_policy.py
