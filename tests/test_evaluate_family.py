"""Scoring a family: one row per member on the same validation noise, and every member's curve on one figure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from adasched.errors import ConfigError
from adasched.jobs.evaluate import evaluate_family, mask_rate_profile
from adasched.models.family import load_denoiser
from adasched.training.module import validation_generator
from adasched.training.learning_curve import CurvePoint, write_curve
from tests.helpers import compose_config


def test_the_family_is_scored_and_its_curves_drawn(tmp_path: Path, tiny_family: Path, tiny_corpus: dict[str, str]) -> None:
    family = tmp_path / "family"
    shutil.copytree(tiny_family, family)
    for step, name in enumerate(("heavy", "light"), 1):
        (family / name / "metadata.json").write_text(json.dumps({"n_blocks": 3 - step, "steps": 10, "tokens_seen": 2_500_000, "seed": 0, "train_wall_seconds": 90 * step, "plateau": {"gain_last": 0.01 * step}}))
        write_curve(family / name / "learning_curve.csv", [CurvePoint(s, 50 * s, s, 1e-3, 6.0 - s / step) for s in (1, 2)])
    (family / "ar_evaluator" / "metadata.json").write_text("{}")  # trained before curves were kept: left off the figure
    cfg = compose_config(
        "evaluate",
        [
            "data=text_files", f"data.corpus.train_files=[{tiny_corpus['train']}]",
            f"data.corpus.validation_files=[{tiny_corpus['validation']}]", "data.seq_len=16",
            f"tokenizer.path={family / 'tokenizer'}", f"paths.cache={tmp_path / 'cache'}",
            f"family_dir={family}", "denoisers=[heavy,light]",
        ],
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    rows = evaluate_family(cfg)
    assert [row["member"] for row in rows] == ["heavy", "light", "ar_evaluator"]
    assert all(row["nats_per_token"] > 0 for row in rows)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["members"] == rows
    scores = {row["member"]: row["nats_per_token"] for row in rows}
    assert results["checks"]["falls_with_depth"] == (scores["light"] > scores["heavy"])
    assert results["checks"]["seeds_agree"] is None  # no second heavy seed in this family
    assert (tmp_path / "run" / "learning_curves.png").stat().st_size > 0
    for row in rows[:2]:
        assert list(row["cross_entropy_by_mask_rate"]) == ["0.05", "0.15", "0.3", "0.5", "0.7", "0.85", "0.95"]
    assert "cross_entropy_by_mask_rate" not in rows[2]  # the autoregressive evaluator has no mask rate
    assert (tmp_path / "run" / "mask_rate_profile.png").stat().st_size > 0
    table = (tmp_path / "run" / "family_table.md").read_text().splitlines()
    assert len(table) == 2 + len(rows)
    assert table[2].startswith(f"| `heavy` | 2 | {rows[0]['parameters'] / 1e6:.2f}M | 10 | 2.5M | 2 min | NELBO {scores['heavy']:.3f} | 0.010 |")
    assert table[4].startswith("| `ar_evaluator` | — |") and table[4].endswith(f"| NLL {scores['ar_evaluator']:.3f} | — |")


def test_the_mask_rate_profile_is_the_cross_entropy_of_the_masked_positions(tiny_family: Path) -> None:
    """Checked against the model's full subs log-probabilities on masks drawn the same way, independently."""
    model = load_denoiser(tiny_family / "heavy")
    generator = torch.Generator().manual_seed(3)
    batches = [
        {"input_ids": torch.randint(0, model.config.mask_token_id, (4, 16), generator=generator), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
        for _ in range(3)
    ]
    batches[1]["attention_mask"][:, 12:] = 0  # padding never counts
    rates = [0.2, 0.9]
    profile = mask_rate_profile(model, batches, rates, max_batches=2)
    for rate, value in zip(rates, profile):
        total, count = 0.0, 0
        for batch_idx, batch in enumerate(batches[:2]):
            x = batch["input_ids"]
            noise = torch.rand(x.shape, generator=validation_generator(batch_idx, torch.device("cpu")))
            z = torch.where(noise < rate, model.config.mask_token_id, x)
            counted = (z == model.config.mask_token_id) & batch["attention_mask"].bool()
            with torch.no_grad():
                log_probs = model(z).double()
            total -= float(log_probs.gather(-1, x[..., None])[..., 0][counted].sum())
            count += int(counted.sum())
        assert value == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize(("override", "message"), [
    ("mask_rates=[0.5,0]", "mask_rates contains 0"),
    ("mask_rates=[1.5]", "mask_rates contains 1.5"),
    ("mask_rates=0.5", "mask_rates=0.5 is invalid"),
    ("mask_rate_batches=0", "mask_rate_batches=0 is invalid"),
])
def test_bad_mask_rates_are_refused_before_loading(tmp_path: Path, override: str, message: str) -> None:
    cfg = compose_config("evaluate", [f"family_dir={tmp_path / 'absent'}", override])
    with pytest.raises(ConfigError, match=message):
        evaluate_family(cfg)
