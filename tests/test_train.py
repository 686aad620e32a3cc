"""Training end to end on a tiny config: export, metadata, resume, and one-line errors from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from adasched.errors import ConfigError
from adasched.jobs.train import train
from adasched.models.family import load_denoiser
from adasched.training.learning_curve import CurvePoint, plateau, read_curve
from adasched.training.module import compile_blocks, warmup_cosine
from tests.helpers import ROOT, compose_config, tiny_train_config


def test_train_exports_a_denoiser_with_metadata_and_resumes(tmp_path: Path, tiny_corpus: dict[str, str]) -> None:
    cfg = tiny_train_config(tmp_path, tiny_corpus)
    first = train(cfg)
    # tokens are counted without padding: at most one block of 32 (the split's last) is partly padding
    assert first["steps"] == 4 and 4 * 8 * 32 - 32 < first["tokens_seen"] <= 4 * 8 * 32
    assert 0 < first["val_nelbo_nats_per_token"] < 20
    exported = tmp_path / "export"
    saved = json.loads((exported / "metadata.json").read_text())
    assert saved["steps"] == 4 and saved["exported_step"] in (2, 4)  # the best of the two validations
    model = load_denoiser(exported)
    assert model.config.n_blocks == 1 and model.config.seq_len == 32
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == saved["exported_step"]
    assert torch.equal(model.head.weight, best["state_dict"]["model.head.weight"].half().float())

    with open_dict(cfg):
        cfg.trainer.max_steps = 6
    resumed = train(cfg)  # same run_dir: continues from last.ckpt instead of starting over
    assert resumed["steps"] == 6 and 6 * 8 * 32 - 64 < resumed["tokens_seen"] <= 6 * 8 * 32
    assert resumed["train_wall_seconds"] >= first["train_wall_seconds"]
    # one curve point per validation, kept across the resume, shipped beside the model with its plot
    curve = read_curve(exported / "learning_curve.csv")
    assert [p.step for p in curve] == [2, 4, 6]
    assert all(a.tokens_seen < b.tokens_seen for a, b in zip(curve, curve[1:]))
    assert (exported / "learning_curve.png").is_file()
    saved = json.loads((exported / "metadata.json").read_text())
    assert saved["learning_curve"] == "learning_curve.csv"
    assert saved["plateau"]["best_val_loss"] == min(p.val_loss for p in curve)
    assert not (exported / "tokenizer.json").exists()  # one tokenizer per family, not one per member


def test_a_fresh_start_never_overwrites_an_earlier_run(tmp_path: Path, tiny_corpus: dict[str, str]) -> None:
    cfg = tiny_train_config(tmp_path, tiny_corpus, extra=["trainer.max_steps=2"])
    train(cfg)
    with open_dict(cfg):
        cfg.resume = False
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)


def test_the_ar_evaluator_trains_with_the_same_code(tmp_path: Path, tiny_corpus: dict[str, str]) -> None:
    metadata = train(tiny_train_config(tmp_path, tiny_corpus, model="ar_evaluator"))
    assert 0 < metadata["val_nll_nats_per_token"] < 20
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert model.dtype == torch.float16  # shipped in 16-bit
    assert model.config.n_positions == 32


@pytest.mark.parametrize("name", ["heavy", "light", "ar_evaluator"])
def test_every_model_config_composes(name: str) -> None:
    assert compose_config("train", [f"model={name}"]).model.name == name


def run_cli(*overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train.py"), *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=gigantic"], "unknown model 'gigantic'; choose one of: ar_evaluator, heavy, light"),
        (["trainer.max_steps=-5"], "trainer.max_steps=-5 is invalid; it must be a positive integer"),
        (["data=text_files", "data.corpus.train_files=[no_such_corpus.txt]"], "corpus file not found: no_such_corpus.txt"),
        (["logger.mode=loud"], "logger.mode='loud' is invalid"),
        (["optim.fused=maybe"], "optim.fused='maybe' is invalid; it must be true or false"),
        (["export_dir=null"], "export_dir=None is invalid; it must name the folder"),
    ],
)
def test_cli_rejects_bad_values_with_one_line(overrides: list[str], expected: str, tmp_path: Path) -> None:
    result = run_cli(*overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path: Path, tiny_corpus: dict[str, str]) -> None:
    result = run_cli(
        "model=light", "strategy=ddp", "trainer.devices=2",
        "data=text_files", f"data.corpus.train_files=[{tiny_corpus['train']}]",
        f"data.corpus.validation_files=[{tiny_corpus['validation']}]",
        "data.seq_len=32", "data.module.batch_size=4", "tokenizer.vocab_size=300", f"tokenizer.path={tmp_path / 'tok'}",
        f"paths.cache={tmp_path / 'cache'}", "model.net.n_blocks=1", "model.net.d_model=32", "model.net.n_heads=2",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "optim.warmup_steps=2",
        "logger.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'export'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.loads((tmp_path / "export" / "metadata.json").read_text())
    assert metadata["steps"] == 4
    assert metadata["tokens_seen"] > 4 * 4 * 32  # two processes: more tokens than one process could see


def test_the_schedule_warms_up_then_decays_to_its_final_ratio() -> None:
    lrs = [warmup_cosine(step, warmup_steps=10, total_steps=110, final_lr_ratio=0.1) for step in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warmup
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine
    assert lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)  # held at the floor after the end
    assert warmup_cosine(500, 10, 110, 1.0) == 1.0  # ratio 1: constant after warmup


def test_plateau_reports_the_gain_of_the_last_fifth_and_a_rising_loss() -> None:
    def curve(losses: list[float]) -> list[CurvePoint]:
        return [CurvePoint(step=i, tokens_seen=100 * i, train_seconds=i, lr=1e-3, val_loss=v) for i, v in enumerate(losses, 1)]

    still_learning = plateau(curve([5.0, 4.0, 3.5, 3.2, 3.1, 3.0, 2.95, 2.9, 2.85, 2.8]))
    assert still_learning["gain_last"] == pytest.approx(0.1) and not still_learning["rising"]
    overfit = plateau(curve([5.0, 4.0, 3.5, 3.4, 3.45, 3.5, 3.6, 3.7, 3.8, 3.9]))
    assert overfit["gain_last"] < 0 and overfit["rising"] and overfit["best_step"] == 4


def test_compiled_blocks_compute_what_eager_blocks_do(tiny_family: Path) -> None:
    model = load_denoiser(tiny_family / "heavy")
    z = torch.randint(0, model.config.vocab_size - 1, (2, 16))
    z[:, ::3] = model.config.mask_token_id
    expected = model(z)
    compile_blocks(model)
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    torch.testing.assert_close(model(z), expected, rtol=1e-4, atol=1e-4)


def test_a_run_ended_by_early_stopping_is_not_trained_further_on_rerun(tmp_path: Path, tiny_corpus: dict[str, str]) -> None:
    cfg = tiny_train_config(tmp_path, tiny_corpus, extra=["trainer.max_steps=2"])
    train(cfg)
    (tmp_path / "run" / "stopped_early.json").write_text(json.dumps({"step": 2, "best": 5.0}))  # as EarlyStopping leaves it
    with open_dict(cfg):
        cfg.trainer.max_steps = 6
    rerun = train(cfg)
    assert rerun["steps"] == 2 and rerun["max_steps"] == 6 and rerun["stopped_early"]


def test_the_foreach_ema_averages_as_lightnings_per_tensor_ema() -> None:
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from adasched.training.module import exponential_moving_average

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.randn(64, 1, generator=torch.Generator().manual_seed(1)))
    averaged = []
    for callback in (exponential_moving_average(0.9), EMAWeightAveraging(decay=0.9)):
        torch.manual_seed(0)
        module = Regression()
        trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
        averaged.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    torch.manual_seed(0)
    assert not torch.allclose(averaged[0], torch.cat([p.detach().flatten() for p in Regression().parameters()]))  # it trained
    torch.testing.assert_close(averaged[0], averaged[1])


def test_a_fused_optimizers_gradients_are_clipped_by_the_module() -> None:
    from adasched.training.module import LanguageModelModule

    model = torch.nn.Linear(8, 8)
    module = LanguageModelModule(model, objective=None, fused=True)  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 10.0)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])) == pytest.approx(1.0, rel=1e-4)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 10.0)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="value")
    assert all(torch.all(p.grad == 0.5) for p in model.parameters())
