"""The shipped Shakespeare family: complete, consistent, documented, small, and heavy beats light."""

from __future__ import annotations

import pytest

from adasched.export import read_metadata
from adasched.models.family import load_family
from tests.conftest import SHIPPED

DENOISERS = ("heavy", "light", "heavy_seed1")
MEMBERS = (*DENOISERS, "ar_evaluator")
METADATA_FIELDS = ("command", "steps", "tokens_seen", "train_wall_seconds", "parameters", "seed")


@pytest.mark.parametrize("member", MEMBERS)
def test_every_member_has_metadata(member: str) -> None:
    metadata = read_metadata(SHIPPED / member)
    assert all(field in metadata for field in METADATA_FIELDS)
    assert metadata["command"].startswith("python experiments/train.py")
    assert any(key.startswith("val_") for key in metadata)


def test_denoisers_form_a_family_with_the_papers_depth_ratio() -> None:
    family = load_family({name: SHIPPED / name for name in DENOISERS})
    heavy, light = family["heavy"].config, family["light"].config
    assert light.n_blocks * 3 == heavy.n_blocks and light.d_model == heavy.d_model
    assert read_metadata(SHIPPED / "heavy")["seed"] != read_metadata(SHIPPED / "heavy_seed1")["seed"]


def test_heavy_beats_light_on_validation_nelbo() -> None:
    heavy = read_metadata(SHIPPED / "heavy")["val_nelbo_nats_per_token"]
    light = read_metadata(SHIPPED / "light")["val_nelbo_nats_per_token"]
    assert heavy < light - 0.05


def test_evaluator_is_at_least_as_large_as_the_heavy_denoiser() -> None:
    assert read_metadata(SHIPPED / "ar_evaluator")["parameters"] >= read_metadata(SHIPPED / "heavy")["parameters"]


def test_shipped_checkpoints_are_small_enough_for_git() -> None:
    total = sum(path.stat().st_size for path in SHIPPED.rglob("*") if path.is_file())
    assert total < 50 * 2**20
