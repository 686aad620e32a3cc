"""Scheduling policies: which denoiser of a family runs at each sampling step.

Importing this package registers every policy; ``make_policy(name, **kwargs)`` builds one by name.
"""

from policies import static  # noqa: F401  (registers the static schedules)
from policies import learned  # noqa: F401  (registers the PPO-trained router)
from policies import entropy, mask_fraction  # noqa: F401  (registers the per-row dynamic routers)
from policies import kl_router  # noqa: F401  (registers the supervised KL router)
from policies.base import DenoiseState, Policy, StepOutput, check_policy, make_policy, register_policy, registered_policies

__all__ = ["DenoiseState", "Policy", "StepOutput", "check_policy", "make_policy", "register_policy", "registered_policies"]
