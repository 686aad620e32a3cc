"""The benchmark job on tiny models: the JSON has every field with sane values; bad values fail by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from adasched.errors import ConfigError
from adasched.jobs.benchmark import benchmark
from adasched.models.family import load_denoiser
from tests.helpers import compose_config

SIZES = ("shipped_b4", "paper")


def tiny_config(family: Path, run_dir: Path, *overrides: str) -> DictConfig:
    """Both sizes shrunk: the 'shipped' one whole 12-step runs, the 'paper' one 8 steps from mid-trajectory."""
    cfg = compose_config(
        "benchmark",
        [
            "sizes=[shipped_b4,paper]", "device=cpu", "repeats=2", "threads=1", "precisions=[float32]",  # tiny ops: 2 threads only contend
            f"size.shipped_b1.family.dir={family}", "size.shipped_b4.num_steps=12", "size.shipped_b4.seq_len=16",
            "size.shipped_b4.batch_size=2", "size.shipped_b4.num_samples=3", "size.shipped_b4.warmup_steps=2",
            "size.paper.random_family.n_blocks=[2,1]", "size.paper.random_family.d_model=32", "size.paper.random_family.n_heads=2",
            "size.paper.random_family.vocab_size=50", "size.paper.random_family.mask_token_id=49", "size.paper.seq_len=32",
            "size.paper.num_steps=50", "size.paper.slice_start=25", "size.paper.steps_timed=8", "size.paper.batch_size=2",
            "size.paper.num_samples=2", *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def test_benchmark_writes_timings_and_savings(tiny_family: Path, tmp_path: Path) -> None:
    threads_before = torch.get_num_threads()
    results = benchmark(tiny_config(tiny_family, tmp_path))
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved == json.loads(json.dumps(results, default=str))
    meta = saved["metadata"]
    assert meta["device"] == "cpu" and meta["device_name"] and meta["torch"] == torch.__version__
    assert meta["threads"] == 1 and meta["repeats"] == 2 and meta["dtype"] == "float32" and meta["precisions"] == ["float32"]
    assert torch.get_num_threads() == threads_before
    assert set(saved["sizes"]) == set(SIZES)
    vocab = {"shipped_b4": load_denoiser(tiny_family / "heavy").config.vocab_size, "paper": 50}
    for name in SIZES:
        assert saved["sizes"][name]["setup"]["depths"] == [2, 1] and saved["sizes"][name]["setup"]["vocab"] == vocab[name]
        size = saved["sizes"][name]["precisions"]["float32"]
        assert size["matmul_dtype"] == "float32" and size["bare_matmul_gflops_per_s"] > 0
        assert set(size["cells"]) == {"static_heavy", "static_light", "static_sandwich"}
        for by_sampler in size["cells"].values():
            for cell in by_sampler.values():
                assert len(cell["wall_s_repeats"]) == 2 and cell["wall_s"] > 0 and cell["s_per_step"] > 0
                assert cell.get("samples_per_s", cell.get("samples_per_s_extrapolated", 0)) > 0
                assert cell["gflops_per_s"] == pytest.approx(cell["flops_executed"] / cell["wall_s"] / 1e9)
                assert cell["of_bare_matmul"] == pytest.approx(cell["gflops_per_s"] / size["bare_matmul_gflops_per_s"])
        assert all(speedup > 0 for speedup in size["speedup_event_over_reference"].values())
        assert all(speedup > 0 for speedup in size["speedup_event_over_step"].values())
        savings = size["savings_vs_static_heavy"]
        assert set(savings) == {"static_light", "static_sandwich"}
        for by_sampler in savings.values():
            assert set(by_sampler) == {"event", "step", "reference"}
            for row in by_sampler.values():  # no bound on the wall-clock saving of tiny models but < 1: noise
                assert row["wall_saved"] < 1 and 0 < row["flops_saved_executed"] <= 1 and 0 < row["flops_saved_nominal"] <= 1
                assert row["realized_over_predicted"] == pytest.approx(row["wall_saved"] / row["flops_saved_executed"])
        assert savings["static_light"]["event"]["flops_saved_nominal"] == pytest.approx(0.5)
    shipped, paper = (saved["sizes"][name]["precisions"]["float32"] | saved["sizes"][name] for name in ("shipped_b4", "paper"))
    assert "samples_per_s" in shipped["cells"]["static_heavy"]["event"] and shipped["setup"]["steps_timed"] == 12
    # the slice: 8 steps, the sandwich's schedule laid over them (2 of 8 light), both batches timed
    assert paper["setup"]["steps_timed"] == 8 and "samples_per_s_extrapolated" in paper["cells"]["static_heavy"]["event"]
    sandwich = paper["savings_vs_static_heavy"]["static_sandwich"]
    assert 0 < sandwich["reference"]["flops_saved_nominal"] < 0.5  # its light head and tail cover a quarter of the slice
    assert sandwich["event"]["flops_saved_executed"] == pytest.approx(sandwich["step"]["flops_saved_executed"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sizes=[huge]"], "unknown size 'huge'; choose from: shipped_b1, shipped_b4, shipped_b16, shipped_b64, shipped_b64_whole, paper"),
        (["size.paper.steps_timed=30"], r"size.paper.steps_timed=30 must lie in \[1, 25\]"),
        (["+policies.static_quarter.quarter=7"], "policy.quarter=7"),
        (["dtype=float8"], "dtype='float8' is unknown"),
        (["precisions=[fp8]"], "^precisions='fp8' is unknown; choose one of: auto, float32, bf16"),
        (["precisions=[]"], r"^precisions=\[\] selects nothing to time"),
        (["sizes=[paper]", "+policies.router.policy=mask_fraction_router", "+policies.router.budget=0.2"], "^size paper times a slice, but policy router has a budget"),
        (["samplers=[fast]"], r"samplers=\['fast'\] is invalid; choose one or more of: event, step, reference"),
    ],
)
def test_bad_values_fail_by_name(overrides: list[str], message: str, tiny_family: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        benchmark(tiny_config(tiny_family, tmp_path, *overrides))


def test_both_precisions_are_timed_and_budgets_calibrated_before_timing(tiny_family: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        tiny_family, tmp_path, "sizes=[shipped_b4]", "precisions=[bf16,float32,bf16]", "repeats=1", "samplers=[event]",
        "calibration.num_samples=4", "calibration.tolerance=0.05", "+policies.banded.policy=mask_fraction_router", "+policies.banded.budget=0.2",
    )
    size = benchmark(cfg)["sizes"]["shipped_b4"]
    assert list(size["precisions"]) == ["bf16", "float32"]  # each once, in order
    bf16, float32 = size["precisions"]["bf16"], size["precisions"]["float32"]
    assert bf16["matmul_dtype"] == "bfloat16" and float32["matmul_dtype"] == "float32"
    for timed in (bf16, float32):
        calibration = timed["calibrations"]["banded"]
        assert calibration["tries"] >= 1 and abs(calibration["saved_executed"] - 0.2) <= 0.05
        assert set(timed["calibrations"]) == {"banded"}  # the static policies have nothing to calibrate
    assert size["speedup_bf16_over_float32"]["static_heavy"]["event"] == pytest.approx(
        float32["cells"]["static_heavy"]["event"]["wall_s"] / bf16["cells"]["static_heavy"]["event"]["wall_s"]
    )
