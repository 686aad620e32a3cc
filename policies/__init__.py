"""Scheduling policies: which denoiser of a family runs at each sampling step."""
