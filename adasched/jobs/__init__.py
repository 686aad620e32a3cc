"""Jobs behind the Hydra entry points, as plain functions of a composed config."""
