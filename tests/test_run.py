"""The main job end to end on a tiny family: files written, fields present, common seeds, clear errors; path
KL's seed floor where it must be 0 or the path KL itself, and (slow) on the shipped family where it must agree."""

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
from adasched.errors import ConfigError
from adasched.jobs.fit_kl_router import fit_kl_router
from adasched.jobs.run import run
from tests.helpers import TINY_MEMBERS, ROOT, SHIPPED, compose_config, fit_kl_router_config

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


def test_run_writes_results_samples_and_schedule(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    floor, excess = kl["floor"], kl["excess"]
    assert floor["seed_baseline"] == "heavy_seed1" and floor["per_sequence"]["mean"] > 0 and excess["per_sequence"]["ci95"] > 0
    assert excess["per_sequence"]["mean"] == pytest.approx(kl["per_sequence"]["mean"] - floor["per_sequence"]["mean"])
    assert excess["per_token"]["mean"] == pytest.approx(excess["per_sequence"]["mean"] / 16)
    for part in (floor, excess):
        assert len(part["per_step"]) == 20 and sum(part["per_step"]) == pytest.approx(part["per_sequence"]["mean"])
    assert "path_kl_per_sample" not in saved and "path_kl_excess_per_sample" not in saved  # per-sample values stay in sweeps' arm logs
    excess_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("excess over seed"))
    assert f"{excess['per_sequence']['mean']:.3f} +- {excess['per_sequence']['ci95']:.3f} nats/sequence" in excess_line
    assert f"(floor {floor['per_sequence']['mean']:.3f}: what heavy_seed1 costs at the same steps)" in excess_line
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
    assert heavy["path_kl"]["floor"]["per_sequence"] == heavy["path_kl"]["excess"]["per_sequence"] == {"mean": 0.0, "ci95": 0.0}
    assert light["path_kl"]["per_sequence"]["mean"] > 0
    rows = table_rows(load_rows(find_results([tmp_path])))
    assert [row["label"] for row in rows] == ["static_heavy", "static_light"]
    assert rows[0]["path_kl_floor"] == rows[0]["path_kl_excess"] == 0.0 and rows[1]["path_kl_floor"] > 0


def test_the_excess_is_exactly_zero_where_the_seed_baseline_runs_the_light_slots(tiny_family: Path, tmp_path: Path) -> None:
    results = run(run_config(
        tiny_family, tmp_path, "policy=static_sandwich", "policy.light_fraction=0.5", "family.members=[heavy,heavy_seed1]",
        "eval.seed_baseline=heavy_seed1", "eval.compare_to_heavy=false",
    ))
    kl = results["path_kl"]
    assert kl["per_sequence"]["mean"] > 0 and kl["floor"]["per_sequence"] == kl["per_sequence"] and kl["floor"]["per_step"] == kl["per_step"]
    assert kl["excess"]["per_sequence"] == {"mean": 0.0, "ci95": 0.0} and not any(kl["excess"]["per_step"])


def test_without_a_seed_baseline_path_kl_stands_alone_and_tables_leave_the_floor_blank(
    tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What runs from before the floor was measured hold too: their tables and summaries must still read."""
    results = run(run_config(tiny_family, tmp_path, "policy=static_light", "eval.seed_baseline=null", "eval.compare_to_heavy=false"))
    assert results["path_kl"]["per_sequence"]["mean"] > 0 and not {"floor", "excess"} & results["path_kl"].keys()
    printed = capsys.readouterr().out
    assert "path KL to heavy" in printed and "excess over seed" not in printed
    [row] = table_rows(load_rows(find_results([tmp_path])))
    assert row["path_kl"] > 0 and [row[key] for key in ("path_kl_floor", "path_kl_floor_ci95", "path_kl_excess", "path_kl_excess_ci95", "floor_share_%")] == [""] * 5


def test_a_seed_baseline_with_no_folder_fails_on_one_line_before_any_model_loads(
    tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as error:
        run(run_config(tiny_family, tmp_path, "eval.seed_baseline=heavy_seed9"))
    message = str(error.value)
    assert message.startswith(f"eval.seed_baseline='heavy_seed9' names no denoiser folder in {tiny_family}; choose from: heavy, heavy_seed1, heavy_seed3, light")
    assert "\n" not in message and "sampling precision" not in capsys.readouterr().out  # nothing loaded
    run(run_config(tiny_family, tmp_path, "policy=static_heavy", "eval.seed_baseline=heavy_seed9", "eval.path_kl=false", "eval.compare_to_heavy=false"))


def test_a_router_is_judged_by_another_seed_baseline_than_the_one_it_was_fitted_against(
    tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit_kl_router(fit_kl_router_config(tiny_family, tmp_path / "router", "objective=excess"))  # against heavy_seed3
    capsys.readouterr()
    router = ("policy=kl_router_excess", f"policy.path={tmp_path / 'router'}", "eval.compare_to_heavy=false")
    with pytest.raises(ConfigError) as error:
        run(run_config(tiny_family, tmp_path / "refused", *router, "eval.seed_baseline=heavy_seed3"))
    assert str(error.value) == (
        "policy kl_router was trained against heavy_seed3; judge it with another seed baseline (eval.seed_baseline=heavy_seed1) or eval.seed_baseline=null"
    )
    assert "sampling precision" not in capsys.readouterr().out and not (tmp_path / "refused").exists()  # nothing loaded
    results = run(run_config(tiny_family, tmp_path / "judged", *router))  # the family's seed baseline, heavy_seed1
    assert results["policy_config"]["path"] == str(tmp_path / "router") and results["path_kl"]["floor"]["seed_baseline"] == "heavy_seed1"


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


def test_a_multirun_gives_each_policy_config_its_own_folder(tiny_family: Path, tmp_path: Path) -> None:
    """kl_router and kl_router_excess are one policy in two configs: their runs must not share a folder."""
    checkpoints = tmp_path / "checkpoints"
    for objective, folder in (("raw", "kl_router"), ("excess", "kl_router_excess")):
        fit_kl_router(fit_kl_router_config(tiny_family, checkpoints / "shakespeare" / "routers" / folder, f"objective={objective}"))
    result = run_cli(
        "-m", "policy=kl_router,kl_router_excess", f"paths.checkpoints={checkpoints}", f"family.dir={tiny_family}", TINY_MEMBERS,
        "sampling.num_samples=2", "sampling.num_steps=10", "sampling.seq_len=16", "eval.compare_to_heavy=false", "device=cpu",
        "logger.mode=disabled", f"hydra.sweep.dir={tmp_path / 'multirun'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(path.parent.name for path in (tmp_path / "multirun").glob("*/results.json")) == ["kl_router", "kl_router_excess"]


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
        (["eval.seed_baseline=heavy_seed9"], "eval.seed_baseline='heavy_seed9' names no denoiser folder in"),
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


def shipped_sandwich(run_dir: Path, *overrides: str) -> dict:
    """The 25% sandwich on the shipped family, short enough for a slow test: 16 samples, 100 steps."""
    cfg = compose_config(
        "run",
        [
            "policy=static_sandwich", "sampling.num_samples=16", "sampling.batch_size=16", "sampling.num_steps=100",
            "eval.compare_to_heavy=false", "eval.heldout_text=false", "logger.mode=disabled", *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return run(cfg)["path_kl"]


def agree(a: dict[str, float], b: dict[str, float]) -> bool:
    """Two means with 95% half-widths agree where their difference lies within the interval of a difference."""
    return abs(a["mean"] - b["mean"]) <= (a["ci95"] ** 2 + b["ci95"] ** 2) ** 0.5


@pytest.mark.slow
def test_the_floor_is_what_the_seed_costs_when_it_runs_the_light_slots(tmp_path: Path) -> None:
    """The floor of the sandwich (light in its light slots) predicts the path KL of the same sandwich with
    heavy_seed1 in them, sampled on the same seeds, whose own excess is exactly 0."""
    floor = shipped_sandwich(tmp_path / "light")["floor"]
    seeded = shipped_sandwich(tmp_path / "seed", "family.members=[heavy,heavy_seed1]")
    assert floor["seed_baseline"] == "heavy_seed1" and seeded["excess"]["per_sequence"] == {"mean": 0.0, "ci95": 0.0}
    assert agree(floor["per_sequence"], seeded["per_sequence"]), (floor["per_sequence"], seeded["per_sequence"])


@pytest.mark.slow
@pytest.mark.parametrize("other", ["heavy_seed3"])
def test_the_floor_does_not_depend_on_which_other_seed_measures_it(other: str, tmp_path: Path) -> None:
    assert (SHIPPED / other / "model.safetensors").is_file(), (
        f"{SHIPPED / other} is missing: train it (make family-{other}) before running this test; it is never skipped"
    )
    floors = [shipped_sandwich(tmp_path / name, f"eval.seed_baseline={name}")["floor"]["per_sequence"] for name in ("heavy_seed1", other)]
    assert agree(*floors), floors
