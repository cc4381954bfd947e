"""Algorithm core: pure functions on tensors, registered by name (see ``registries``).

Importing this package imports every implementation module so the registries are complete.
SKPO's own pieces (segment selectors, split, upstream credit) live in ``megatron_skpo.skpo``,
which builds on this package and never the other way round.
"""
from megatron_skpo.algo import registries  # noqa: F401
from megatron_skpo.algo import (advantages, aggregation, kl, losses, metrics, objective, off_policy,  # noqa: F401
                               tis, tracker)
