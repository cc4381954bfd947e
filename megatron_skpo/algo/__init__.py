"""Algorithm core: pure functions on tensors, registered by name (see ``registries``).

Importing this package imports every implementation module so the registries are complete.
"""
from megatron_skpo.algo import registries  # noqa: F401
from megatron_skpo.algo import advantages, aggregation, kl, losses, metrics, tis, tracker  # noqa: F401
# SKPO's segment selectors live with the rest of SKPO but register in this package's registries.
import megatron_skpo.skpo  # noqa: F401,E402
