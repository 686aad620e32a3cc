"""Training any member of a family: the MDLM objective, the Lightning module, learning curves."""
