"""Scheduling policies: which denoiser of a family runs at each sampling step.

Importing this package registers every policy here with the core registry
(``adasched.sampling.policy``); ``policies.make_policy(name, **kwargs)`` builds one by name, which is what
the Hydra policy configs call.
"""

from adasched.sampling.policy import make_policy, registered_policies
from policies import entropy, kl_router, learned, mask_fraction, oracle, static  # noqa: F401  (registers them)

__all__ = ["make_policy", "registered_policies"]
