"""Sampling with a model schedule: the Policy interface, the exact samplers, their costs, generation at scale."""
