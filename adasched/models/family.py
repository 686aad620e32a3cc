"""Load the denoisers of a family and check that they can stand in for one another."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from adasched.errors import ConfigError, DataUnavailableError, first_line
from adasched.models.dit import DenoiserConfig, MDLMDenoiser
from adasched.models.mdlm_checkpoint import load_mdlm_hub, load_mdlm_lightning
from adasched.compute import compute_dtype

SHARED_FIELDS = ("vocab_size", "mask_token_id", "seq_len")
HUB_PREFIX, LIGHTNING_PREFIX = "hf:", "mdlm:"  # member names that load an MDLM checkpoint, not family.dir/name


def member_path_or_source(path: str | Path, name: str) -> str | Path:
    """Where member ``name`` loads from: ``name`` itself when it names an MDLM source, else ``path``.

    Callers join every member name to the family folder; a source name keeps its own location instead.
    """
    return name if name.startswith((HUB_PREFIX, LIGHTNING_PREFIX)) else path


def denoiser_names(family_dir: Path) -> list[str]:
    """Sub-folders of the family that hold a saved denoiser (the evaluator and tokenizer folders do not)."""
    configs = sorted(family_dir.glob("*/config.json")) if family_dir.is_dir() else []
    return [path.parent.name for path in configs if "n_blocks" in json.loads(path.read_text(encoding="utf-8"))]


def load_denoiser(path: str | Path) -> MDLMDenoiser:
    """A member in float32 and eval mode: a ``save_pretrained`` folder, or ``hf:<hub id or folder>`` / ``mdlm:<.ckpt>``."""
    source = str(path)
    if source.startswith(HUB_PREFIX):
        return load_mdlm_hub(source.removeprefix(HUB_PREFIX))
    if source.startswith(LIGHTNING_PREFIX):
        return load_mdlm_lightning(source.removeprefix(LIGHTNING_PREFIX))
    if not (Path(path) / "config.json").is_file():
        raise DataUnavailableError(f"no denoiser at {path}: expected config.json and model.safetensors there")
    try:  # not PyTorchModelHubMixin.from_pretrained: it prints per model and loads non-strictly
        model = MDLMDenoiser(DenoiserConfig(**json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))))
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")), strict=True)
        return model.float().eval()
    except ConfigError:
        raise
    except Exception as error:  # safetensors, json and torch each raise their own kind for a damaged file
        raise DataUnavailableError(f"{Path(path) / 'model.safetensors'} (or its config.json) is unreadable: {first_line(error)}; re-export or re-copy the model") from error


def check_family(members: dict[str, MDLMDenoiser]) -> None:
    """Refuse members whose vocabulary, mask id or sequence length differ: their outputs could not be swapped."""
    if not members:
        raise ConfigError("a model family needs at least one member")
    (first_name, first), *rest = members.items()
    for name, model in rest:
        for field in SHARED_FIELDS:
            mine, theirs = getattr(model.config, field), getattr(first.config, field)
            if mine != theirs:
                raise ConfigError(
                    f"family member {name!r} has {field}={mine} but {first_name!r} has {field}={theirs}; "
                    "all members must share vocabulary, mask id and sequence length"
                )


def load_family(paths: dict[str, str | Path], precision: str = "float32") -> dict[str, MDLMDenoiser]:
    """Load every member (name -> folder, or an ``hf:``/``mdlm:`` name -> anything) and check they form a family.

    ``precision`` (a key of ``PRECISIONS``, ``auto`` already resolved) sets how every member computes.
    """
    dtype = compute_dtype(precision)
    members = {}
    for name, path in paths.items():
        try:
            members[name] = load_denoiser(member_path_or_source(path, name))
        except (ConfigError, DataUnavailableError) as error:
            raise type(error)(f"family member {name!r}: {error}") from error
        members[name].compute_dtype = dtype
    check_family(members)
    return members
