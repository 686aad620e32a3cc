"""The shipped Shakespeare family: complete, consistent, documented, small, and heavy beats light."""

from __future__ import annotations

import pytest

from adasched.models.export import read_metadata
from adasched.models.family import load_family
from tests.helpers import SHIPPED, compose_config

LIGHT_DEPTHS = {"light": 2, "light_b3": 3, "light_b4": 4, "light_b5": 5}  # the light-size table's members
DENOISERS = ("heavy", "heavy_seed1", *LIGHT_DEPTHS)
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


def test_light_depths_are_trained_alike_and_differ_only_in_depth() -> None:
    family = load_family({name: SHIPPED / name for name in LIGHT_DEPTHS})
    assert {name: model.config.n_blocks for name, model in family.items()} == LIGHT_DEPTHS
    metadata = [read_metadata(SHIPPED / name) for name in LIGHT_DEPTHS]
    assert len({(m["steps"], m["seed"], m["seq_len"]) for m in metadata}) == 1
    tokens = [m["tokens_seen"] for m in metadata]  # blocks are padded at document ends: counts differ by a few
    assert max(tokens) - min(tokens) < 1e-4 * max(tokens)
    assert len({model.config.d_model for model in family.values()}) == 1


def test_heavy_beats_light_on_validation_nelbo() -> None:
    heavy = read_metadata(SHIPPED / "heavy")["val_nelbo_nats_per_token"]
    light = read_metadata(SHIPPED / "light")["val_nelbo_nats_per_token"]
    assert heavy < light - 0.05


def test_evaluator_is_at_least_as_large_as_the_heavy_denoiser() -> None:
    assert read_metadata(SHIPPED / "ar_evaluator")["parameters"] >= read_metadata(SHIPPED / "heavy")["parameters"]


def test_shipped_checkpoints_are_small_enough_for_git() -> None:
    total = sum(path.stat().st_size for path in SHIPPED.rglob("*") if path.is_file())
    assert total < 100 * 2**20  # GitHub refuses files over 100 MB; the whole family stays below that


@pytest.mark.parametrize(
    ("config", "key"),
    [("run", "sampling.seq_len"), ("train_router", "sampling.seq_len"), ("fit_kl_router", "seq_len"), ("oracle_features", "sampling.seq_len")],
)
def test_jobs_sample_at_the_shipped_members_length(config: str, key: str) -> None:
    """family.seq_len, which every sampling job defaults to, is the length the shipped members were trained at."""
    length = compose_config(config, [])
    for part in key.split("."):
        length = length[part]
    assert length == load_family({"heavy": SHIPPED / "heavy"})["heavy"].config.seq_len == read_metadata(SHIPPED / "heavy")["seq_len"]
