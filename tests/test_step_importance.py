"""Step importance (paper sec. 4.1) on a tiny family: the identities eq. 5-7 must satisfy, shared z_t, the job."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from adasched.analysis.step_importance import (
    corruptions,
    score_sequences,
    summarize,
    time_grid,
)
from adasched.analysis.step_statistics import masked_kl
from adasched.errors import ConfigError
from adasched.jobs.step_importance import step_importance
from adasched.models.dit import MDLMDenoiser
from adasched.models.family import load_family
from tests.helpers import compose_config

SEED = 3


@pytest.fixture(scope="module")
def models(tiny_family: Path) -> dict[str, MDLMDenoiser]:
    return load_family({name: tiny_family / name for name in ("heavy", "light")})


@pytest.fixture(scope="module")
def blocks(models: dict[str, MDLMDenoiser]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten random 16-token blocks, the last one half padding (never masked nor scored)."""
    mask_id = models["heavy"].config.mask_token_id
    x = torch.randint(mask_id + 1, models["heavy"].config.vocab_size, (10, 16), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(x)
    attention_mask[-1, 8:] = 0
    return x, attention_mask


def scores_of(models: dict[str, MDLMDenoiser], blocks: tuple[torch.Tensor, torch.Tensor], batch_size: int = 4, num_times: int = 5):
    return score_sequences(models, "heavy", *blocks, time_grid(num_times), SEED, batch_size)


def test_kl_of_a_model_with_itself_is_zero_and_its_relative_kl_is_minus_the_baseline(models, blocks) -> None:
    result = summarize(scores_of(models, blocks), baseline="light", light=["heavy", "light"])
    assert torch.equal(result.kl["heavy"], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(result.loss_diff["heavy"], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(result.kl_relative["heavy"], -result.kl_baseline)
    assert torch.all(result.kl_baseline > 0)  # two different models disagree
    assert torch.allclose(result.kl_relative["light"], torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_loss_difference_and_kl_match_a_direct_recomputation(models, blocks) -> None:
    x, attention_mask = blocks
    result = summarize(scores_of(models, blocks), baseline="heavy", light=["light"])
    assert torch.all(result.loss_diff["light"] >= 0)
    i, t = 2, time_grid(5)[2].item()
    z = corruptions(x, time_grid(5), models["heavy"].config.mask_token_id, SEED)[i]
    masked = (z == models["heavy"].config.mask_token_id) & attention_mask.bool()
    times = torch.full((len(x),), t)
    with torch.no_grad():  # the full (B, L, V) forward: another code path than the masked-only projection
        nll = {name: -model(z, times).gather(-1, x[..., None])[..., 0].double() for name, model in models.items()}
        kl = masked_kl(models["heavy"], models["light"], z, times)
    loss = {name: (values * masked).sum(1) / masked.sum(1) for name, values in nll.items()}
    assert result.loss_diff["light"][i].item() == pytest.approx((loss["light"] - loss["heavy"]).abs().mean().item(), rel=1e-5)
    assert result.loss["heavy"][i].item() == pytest.approx(loss["heavy"].mean().item(), rel=1e-5)
    assert result.kl["light"][i].item() == pytest.approx(kl.mean().item(), rel=1e-5)
    assert torch.equal(result.kl_baseline, torch.zeros(5, dtype=torch.float64))


def test_every_model_sees_the_same_corruption_whatever_the_batching(models, blocks, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, torch.Tensor]] = []
    hidden_states = MDLMDenoiser.hidden_states

    def spy(model: MDLMDenoiser, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        seen.append((model.config.n_blocks, z.clone()))
        return hidden_states(model, z, t)

    monkeypatch.setattr(MDLMDenoiser, "hidden_states", spy)
    scores = scores_of(models, blocks, batch_size=4)
    assert len(seen) == 2 * 5 * 3  # two models, five times, three batches
    for (heavy_depth, heavy_z), (light_depth, light_z) in zip(seen[::2], seen[1::2]):
        assert (heavy_depth, light_depth) == (2, 1) and torch.equal(heavy_z, light_z)
    mask_id = models["heavy"].config.mask_token_id
    heavy_z = [z for _, z in seen[::2]]
    for i in range(5):  # the masked positions counted are the z_t's mask tokens outside the padding
        z_t = torch.cat(heavy_z[3 * i : 3 * (i + 1)])
        assert torch.equal(scores.masked[i], ((z_t == mask_id) & blocks[1].bool()).sum(1))
    assert scores.masked[0].sum() < scores.masked[-1].sum()  # t = 0.1 masks fewer positions than t = 0.9
    monkeypatch.undo()
    rebatched = scores_of(models, blocks, batch_size=3)
    assert torch.equal(rebatched.masked, scores.masked)
    assert torch.allclose(rebatched.kl["light"], scores.kl["light"], equal_nan=True)


def job_config(tiny_family: Path, tiny_corpus: dict[str, str], tmp_path: Path, *overrides: str):
    cfg = compose_config(
        "step_importance",
        [
            f"family.dir={tiny_family}", "data=text_files", f"data.corpus.train_files=[{tiny_corpus['train']}]",
            f"data.corpus.validation_files=[{tiny_corpus['validation']}]", "data.seq_len=16", f"paths.cache={tmp_path / 'cache'}",
            "baseline=heavy", "num_times=4", "num_sequences=6", "batch_size=4", "logger.mode=disabled", "device=cpu", *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    return cfg


def test_job_writes_table_json_and_figures(tiny_family: Path, tiny_corpus: dict[str, str], tmp_path: Path) -> None:
    step_importance(job_config(tiny_family, tiny_corpus, tmp_path))
    run_dir = tmp_path / "run"
    rows = list(csv.DictReader((run_dir / "step_importance.csv").open()))
    assert [(float(r["t"]), r["light"]) for r in rows] == [(t, "light") for t in (0.125, 0.375, 0.625, 0.875)]
    assert all(float(r["kl_baseline"]) == 0 and float(r["kl_relative"]) == float(r["kl"]) > 0 for r in rows)
    saved = json.loads((run_dir / "step_importance.json").read_text())
    assert saved["t"] == [0.125, 0.375, 0.625, 0.875] and set(saved["loss"]) == {"heavy", "light"}
    assert saved["family"]["n_blocks"] == {"heavy": 2, "light": 1} and saved["peak_t"]["light"]["kl_relative"] in saved["t"]
    assert all((run_dir / png).stat().st_size > 1000 for png in ("loss_difference.png", "kl_relative.png"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("light_models=[light,nope]", "light_models names 'nope', which has no denoiser folder in"),
        ("baseline=heavy_seed9", "baseline names 'heavy_seed9'"),
        ("num_times=0", "num_times=0 is invalid; it must be a positive integer"),
        ("num_sequences=100000", "num_sequences=100000 is invalid; it must lie in [1, "),
    ],
)
def test_bad_values_fail_with_a_one_line_config_error(override: str, expected: str, tiny_family, tiny_corpus, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        step_importance(job_config(tiny_family, tiny_corpus, tmp_path, override))
    message = str(error.value)
    assert expected in message and "\n" not in message
    if "names" in expected:
        assert message.endswith("choose from: heavy, heavy_seed1, heavy_seed3, light")
