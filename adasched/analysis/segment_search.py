"""The paper's exhaustive search over coarse segments (sec. 3.3 and 4.2): its arms and its analysis.

The steps are cut into ``num_segments`` equal segments and every choice of ``light_segments`` of them runs
the light model (10 choose 4 = 210 schedules in the paper). A schedule's quality is its mean generative
perplexity; the analysis ranks schedules (top/bottom k, Fig. 2), counts how often each segment is light among
the best and worst (Fig. 3, 4), and scores each segment's influence I(j) (eq. 8, Fig. 7): the mean perplexity
of the schedules where segment j is light, minus the mean over all schedules.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from adasched.analysis.plots import MODEL_COLORS, save_figure
from adasched.errors import ConfigError

POLICY = "static_segment_mask"


def segment_search_arms(num_segments: int, light_segments: int, light: int = 1) -> dict[str, dict[str, Any]]:
    """One ``static_segment_mask`` policy config per choice of light segments, named ``light_0-1-8-9``."""
    if not 0 < light_segments <= num_segments:
        raise ConfigError(f"segment_search.light_segments={light_segments} is invalid; it must lie in 1..num_segments={num_segments}")
    return {
        "light_" + "-".join(map(str, chosen)): {
            "_target_": "policies.make_policy", "name": POLICY, "num_segments": num_segments,
            "light_segments": list(chosen), "light": light,
        }
        for chosen in combinations(range(num_segments), light_segments)
    }


def searched(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The segment-mask schedules among a sweep's finished arms, best (lowest perplexity) first."""
    found = [r for r in records if r["policy"] == POLICY]
    return sorted(found, key=lambda r: r["gen_ppl"]["mean"])


def light_matrix(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """(schedules, segments) booleans: which segments each schedule runs light."""
    num_segments = records[0]["policy_config"]["num_segments"]
    matrix = np.zeros((len(records), num_segments), dtype=bool)
    for row, record in enumerate(records):
        matrix[row, record["policy_config"]["light_segments"]] = True
    return matrix


def segment_influence(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """I(j) of eq. 8 for every segment j: mean PPL of schedules with j light minus the mean over all."""
    ppl = np.array([r["gen_ppl"]["mean"] for r in records])
    light = light_matrix(records)
    return np.array([ppl[light[:, j]].mean() if light[:, j].any() else np.nan for j in range(light.shape[1])]) - ppl.mean()


def segment_frequency(records: Sequence[dict[str, Any]], k: int, best: bool) -> np.ndarray:
    """How often each segment is light among the ``k`` best (or worst) schedules of ``records`` (sorted best first)."""
    chosen = records[:k] if best else records[-k:]
    return light_matrix(chosen).sum(axis=0)


def analysis(records: Sequence[dict[str, Any]], top_k: int = 20) -> dict[str, Any]:
    """The JSON summary of a search: influence, top/bottom-k frequencies and the best and worst five."""
    ranked = searched(records)
    k = min(top_k, len(ranked))
    return {
        "schedules": len(ranked),
        "influence": segment_influence(ranked).tolist(),
        f"frequency_top{k}": segment_frequency(ranked, k, best=True).tolist(),
        f"frequency_bottom{k}": segment_frequency(ranked, k, best=False).tolist(),
        "best": [(r["label"], r["gen_ppl"]["mean"]) for r in ranked[:5]],
        "worst": [(r["label"], r["gen_ppl"]["mean"]) for r in ranked[-5:]],
    }


def plot_analysis(records: Sequence[dict[str, Any]], folder: Path, top_k: int = 20) -> list[Path]:
    """The paper's Fig. 2 (best/worst five as strips), Fig. 3-4 (top/bottom-k frequency) and Fig. 7 (influence)."""
    ranked = searched(records)
    k = min(top_k, len(ranked))
    segments = np.arange(light_matrix(ranked).shape[1])
    paths = []

    figure, axes = plt.subplots(1, 2, figsize=(11, 2.8), sharey=True)
    for axis, chosen, title in ((axes[0], ranked[:5], "best 5"), (axes[1], ranked[-5:][::-1], "worst 5")):
        light = light_matrix(chosen)
        axis.imshow(light, aspect="auto", cmap=plt.matplotlib.colors.ListedColormap([MODEL_COLORS[0], MODEL_COLORS[1]]), vmin=0, vmax=1)
        axis.set_yticks(range(len(chosen)), [f"{r['gen_ppl']['mean']:.1f}" for r in chosen])
        axis.set_xticks(segments)
        axis.set_xlabel("segment (0: t = 1, fully masked)")
        axis.set_title(f"{title} (red: light)")
    axes[0].set_ylabel("gen PPL")
    paths.append(save_figure(figure, folder / "segments_best_worst.png"))

    figure, axes = plt.subplots(1, 2, figsize=(11, 3), sharey=True)
    for axis, best in ((axes[0], True), (axes[1], False)):
        axis.bar(segments, segment_frequency(ranked, k, best), color=MODEL_COLORS[1])
        axis.set_title(f"{'top' if best else 'bottom'} {k}: how often each segment is light")
        axis.set_xticks(segments)
        axis.set_xlabel("segment")
    paths.append(save_figure(figure, folder / "segments_frequency.png"))

    figure, axis = plt.subplots(figsize=(6, 3))
    axis.bar(segments, segment_influence(ranked), color=MODEL_COLORS[1])
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(segments)
    axis.set_xlabel("segment")
    axis.set_ylabel("I(j): PPL when light - mean PPL")
    paths.append(save_figure(figure, folder / "segments_influence.png"))
    return paths
