"""The main job end to end on a tiny family: files written, fields present, common seeds, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from adasched.analysis.comparison import find_results, load_rows, table_rows
from adasched.analysis.evaluation import load_evaluator, sample_nll
from adasched.data.tokenizer import load_tokenizer
from adasched.jobs.run import run
from tests.helpers import ROOT, compose_config

RESULT_FIELDS = ("policy", "num_samples", "seq_len", "steps", "gen_ppl", "entropy", "flops", "wall_s", "forwards", "precision")


def run_config(family: Path, run_dir: Path, *overrides: str, heldout_text: bool = False):
    """A run on the tiny family; held-out text scoring reads the data, so it is off unless a test asks for it."""
    cfg = compose_config(
        "run",
        [
            f"family.dir={family}", "sampling.num_samples=6", "sampling.batch_size=4", "sampling.num_steps=20",
            "sampling.seq_len=16", "eval.batch_size=4", "logger.mode=disabled", "device=cpu",
            f"eval.heldout_text={str(heldout_text).lower()}", *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def test_run_writes_results_samples_and_schedule(tiny_family: Path, tmp_path: Path) -> None:
    results = run(run_config(tiny_family, tmp_path, "policy=static_sandwich", "policy.light_fraction=0.5"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert all(field in saved for field in RESULT_FIELDS)
    assert saved["precision"] in ("bf16", "float32")  # auto, resolved for this machine
    assert saved["gen_ppl"]["mean"] > 1 and saved["gen_ppl"]["ci95"] > 0
    assert 0.15 < saved["flops"]["saved_nominal"] < 0.35  # half the decisions light, in expectation, each saving 1/2
    assert 0 < saved["flops"]["saved_executed"] < 0.5
    assert "gen_ppl_paired_diff" in saved and saved["speedup_vs_all_heavy"] > 0  # baseline sampled in-run
    kl = saved["path_kl"]
    assert kl["per_sequence"]["mean"] > 0 and kl["per_sequence"]["ci95"] > 0 and kl["eval_flops"] > 0
    assert kl["per_token"]["mean"] == pytest.approx(kl["per_sequence"]["mean"] / 16)
    assert len(kl["per_step"]) == 20 and sum(kl["per_step"]) == pytest.approx(kl["per_sequence"]["mean"])
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["seed"] for s in samples] == list(range(6))
    assert (tmp_path / "schedule.png").stat().st_size > 1000 and (tmp_path / "schedule_path_kl.png").stat().st_size > 1000
    assert results["forwards"]["heavy"] > 0 and results["forwards"]["light"] > 0


def test_policies_share_seeds_and_compare(tiny_family: Path, tmp_path: Path) -> None:
    for policy in ("static_heavy", "static_light"):
        run(run_config(tiny_family, tmp_path / policy, f"policy={policy}", "eval.compare_to_heavy=false"))
    heavy, light = (json.loads((tmp_path / p / "results.json").read_text()) for p in ("static_heavy", "static_light"))
    assert heavy["flops"]["saved_executed"] == 0 and light["flops"]["saved_nominal"] == pytest.approx(0.5)
    assert heavy["path_kl"]["per_sequence"] == {"mean": 0.0, "ci95": 0.0} and heavy["path_kl"]["eval_flops"] == 0
    assert light["path_kl"]["per_sequence"]["mean"] > 0
    rows = table_rows(load_rows(find_results([tmp_path])))
    assert [row["label"] for row in rows] == ["static_heavy", "static_light"]


def test_prefix_mode_keeps_the_prompt_and_scores_the_rest_of_its_block(tiny_family: Path, tmp_path: Path, tiny_corpus: dict[str, str]) -> None:
    cfg = run_config(
        tiny_family, tmp_path, "sampling.prefix_len=4", "eval.compare_to_heavy=false", "data=text_files",
        f"data.corpus.train_files=[{tiny_corpus['train']}]", f"data.corpus.validation_files=[{tiny_corpus['validation']}]",
        "data.seq_len=32", f"paths.cache={tmp_path / 'cache'}", heldout_text=True,
    )
    results = run(cfg)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(sample["prompt"] for sample in samples)
    # Independently: the held-out blocks of the samples' length (16, not data.seq_len) in the seeds' order,
    # each prompt their first 4 tokens, and the held-out score that of the other 12 after their prompt.
    tokenizer = load_tokenizer(cfg.family.tokenizer)
    datamodule = instantiate(cfg.data.module, corpus=instantiate(cfg.data.corpus), tokenizer=tokenizer, seq_len=16)
    datamodule.setup()
    blocks = torch.as_tensor(datamodule.blocks["validation"]["input_ids"][:])
    chosen = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))[torch.arange(6) % len(blocks)]]
    assert [s["prompt"] for s in samples] == [tokenizer.decode(row, skip_special_tokens=True) for row in chosen[:, :4].tolist()]
    evaluator, evaluator_tokenizer = load_evaluator(cfg.eval.ppl_model, "cpu", cfg.eval.tokenizer_path)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in chosen[:, 4:].tolist()]
    scores = sample_nll(texts, evaluator, evaluator_tokenizer, 4, None, "cpu", [s["prompt"] for s in samples])
    heldout = json.loads((tmp_path / "results.json").read_text())["heldout_text"]
    assert heldout == results["heldout_text"] and heldout["num_texts"] == 6
    assert heldout["gen_ppl"]["mean"] == pytest.approx(scores.nll.exp().mean().item())


def run_cli(*overrides: str) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["policy=fancy"], "unknown policy 'fancy'; choose one of: entropy_router"),
        (["policy=static_segments", "policy.spec='L100,Q800,L100'"], "invalid segment 'Q800'"),
        (["policy=static_sandwich", "policy.light_fraction=2"], "policy.light_fraction=2"),
        (["policy=static_segments", "policy.spec='L100,H800'"], "covers 900 steps, not num_steps=1000"),
        (["sampling.num_steps=0"], "sampling.num_steps=0 is invalid"),
        (["sampling.num_samples=-3"], "sampling.num_samples=-3 is invalid"),
        (["sampling.precision=fp8"], "sampling.precision='fp8' is invalid; it must be one of: auto, float32, bf16"),
        (["eval.heldout_text=maybe"], "eval.heldout_text='maybe' is invalid; it must be true or false"),
    ],
)
def test_cli_rejects_bad_values_with_one_line_and_leaves_no_folder(overrides: list[str], expected: str, tmp_path: Path) -> None:
    result = run_cli(*overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last and "Traceback" not in result.stderr
    assert "Loading weights" not in result.stdout + result.stderr  # refused before any model loads
    assert not (tmp_path / "run").exists()


def test_help_says_what_the_script_does_and_its_main_options() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("experiments/run.py: sample with one scheduling policy")
    for option in ("policy=NAME", "budget=FRACTION", "sampling.num_samples=N", "family=NAME"):
        assert option in result.stdout
