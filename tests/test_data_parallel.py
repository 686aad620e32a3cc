"""Data-parallel sampling and scoring give exactly the single-process run: same tokens, costs and scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adasched.analysis.evaluation import load_evaluator, sample_nll
from adasched.data.tokenizer import load_tokenizer
from adasched.errors import ConfigError
from adasched.models.family import load_family
from adasched.parallel import (
    generate_data_parallel,
    predict_trainer,
    score_data_parallel,
)
from adasched.sampling.costs import CostMeter
from adasched.sampling.generation import generate
from adasched.sampling.spec import SamplingSpec
from policies import make_policy
from tests.helpers import TINY_MEMBERS, ROOT


def test_predict_path_matches_the_in_process_loop(tiny_family: Path) -> None:
    models = list(load_family({name: tiny_family / name for name in ("heavy", "light")}).values())
    seeds = 40 + torch.arange(7)
    trainer = predict_trainer("cpu", 1, 1)
    meters = [CostMeter(["heavy", "light"], [2, 1]) for _ in range(2)]
    policy = make_policy("static_sandwich", light_fraction=0.5)
    alone = generate(models, policy, seeds, SamplingSpec(20, 16, batch_size=4), meters[0], progress=False)
    spread = generate_data_parallel(trainer, models, policy, seeds, SamplingSpec(20, 16, batch_size=3), meters[1])
    assert torch.equal(alone.tokens, spread.tokens) and torch.equal(alone.actions, spread.actions)
    assert torch.equal(spread.seeds, seeds)
    assert meters[0].summary()["flops"] == meters[1].summary()["flops"] and meters[0].forwards == meters[1].forwards

    evaluator, tokenizer = load_evaluator(str(tiny_family / "ar_evaluator"), "cpu", str(tiny_family / "tokenizer"))
    texts = load_tokenizer(tiny_family / "tokenizer").batch_decode(alone.tokens.tolist(), skip_special_tokens=True)
    expected = sample_nll(texts, evaluator, tokenizer, 4, None, "cpu")
    scores = score_data_parallel(trainer, texts, evaluator, tokenizer, 3)
    assert torch.allclose(scores.nll, expected.nll, rtol=1e-6) and torch.equal(scores.tokens, expected.tokens)


def test_merging_costs_of_another_family_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot merge costs"):
        CostMeter(["heavy", "light"], [2, 1]).merge(CostMeter(["heavy", "light_b3"], [2, 3]))


def test_a_non_positive_device_count_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"parallel.devices=0 is invalid"):
        predict_trainer("cpu", 0, 1)


def run_job(tiny_family: Path, run_dir: Path, devices: int) -> dict:
    overrides = [
        f"family.dir={tiny_family}", TINY_MEMBERS, "sampling.num_samples=7", "sampling.batch_size=2", "sampling.num_steps=20",
        "sampling.seq_len=16", "eval.batch_size=3", "eval.heldout_text=false", "policy=static_sandwich", "policy.light_fraction=0.5",
        "device=cpu", "parallel.accelerator=cpu", f"parallel.devices={devices}", f"hydra.run.dir={run_dir}",
    ]
    env = os.environ | {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *overrides, "logger.mode=disabled"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (run_dir / "run.log").exists()  # the console is the log: no empty file in every run folder
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_two_cpu_processes_give_the_single_process_run(tiny_family: Path, tmp_path: Path) -> None:
    one, two = run_job(tiny_family, tmp_path / "one", 1), run_job(tiny_family, tmp_path / "two", 2)
    assert (one["processes"], two["processes"]) == (1, 2)
    samples = [(tmp_path / run / "samples.jsonl").read_text().splitlines() for run in ("one", "two")]
    assert [json.loads(line)["seed"] for line in samples[1]] == list(range(7))
    for a, b in zip(*samples):
        a, b = json.loads(a), json.loads(b)
        assert a["text"] == b["text"] and a["nll"] == pytest.approx(b["nll"], rel=1e-6)
    assert one["forwards"] == two["forwards"]
    assert one["flops"]["executed"] == pytest.approx(two["flops"]["executed"])
    assert one["gen_ppl"]["mean"] == pytest.approx(two["gen_ppl"]["mean"], rel=1e-6)
    assert one["gen_ppl_paired_diff"]["mean"] == pytest.approx(two["gen_ppl_paired_diff"]["mean"], rel=1e-6, abs=1e-9)
