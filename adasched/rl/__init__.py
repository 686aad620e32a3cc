"""Reinforcement learning of routers: the gymnasium environments over the real sampler."""
