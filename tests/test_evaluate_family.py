"""Scoring a family: one row per member on the same validation noise, and every member's curve on one figure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import open_dict

from adasched.jobs.evaluate import evaluate_family
from adasched.training.learning_curve import CurvePoint, write_curve
from tests.helpers import compose_config


def test_the_family_is_scored_and_its_curves_drawn(tmp_path: Path, tiny_family: Path, tiny_corpus: dict[str, str]) -> None:
    family = tmp_path / "family"
    shutil.copytree(tiny_family, family)
    for step, name in enumerate(("heavy", "light"), 1):
        (family / name / "metadata.json").write_text(json.dumps({"n_blocks": 3 - step, "steps": 10, "tokens_seen": 100, "seed": 0}))
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
