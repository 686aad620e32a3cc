"""The paper's exhaustive search over coarse segments (sec. 3.3 and 4.2): its arms and its analysis.

The steps are cut into ``num_segments`` equal segments and every choice of ``light_segments`` of them runs
the light model (10 choose 4 = 210 schedules in the paper). A schedule's quality is its mean generative
perplexity, and its mean path KL to the all-heavy sampler where measured. For each measure the analysis ranks
schedules (top/bottom k, Fig. 2), counts how often each segment is light among the best and worst (Fig. 3, 4),
and scores each segment's influence I(j) (eq. 8, Fig. 7): the mean quality of the schedules where segment j
is light, minus the mean over all schedules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Measure:
    """A quality measure a search ranks schedules by: lower is better for both."""

    key: str  # the key in results.json
    label: str  # axis and column label
    value: Callable[[dict[str, Any]], float]


MEASURES = (
    Measure("gen_ppl", "gen PPL", lambda record: record["gen_ppl"]["mean"]),
    Measure("path_kl", "path KL, nats/sequence", lambda record: record["path_kl"]["per_sequence"]["mean"]),
)


def measures_of(records: Sequence[dict[str, Any]]) -> list[Measure]:
    """Gen PPL, and path KL where every schedule measured it (runs from before path KL did not)."""
    return [m for m in MEASURES if m.key == "gen_ppl" or all(m.key in r for r in records)]


def searched(records: Sequence[dict[str, Any]], measure: Measure = MEASURES[0]) -> list[dict[str, Any]]:
    """The segment-mask schedules among a sweep's finished arms, best (lowest ``measure``) first."""
    found = [r for r in records if r["policy"] == POLICY]
    return sorted(found, key=measure.value)


def light_matrix(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """(schedules, segments) booleans: which segments each schedule runs light."""
    num_segments = records[0]["policy_config"]["num_segments"]
    matrix = np.zeros((len(records), num_segments), dtype=bool)
    for row, record in enumerate(records):
        matrix[row, record["policy_config"]["light_segments"]] = True
    return matrix


def segment_influence(records: Sequence[dict[str, Any]], measure: Measure = MEASURES[0]) -> np.ndarray:
    """I(j) of eq. 8 for every segment j: mean ``measure`` of schedules with j light minus the mean over all."""
    quality = np.array([measure.value(r) for r in records])
    light = light_matrix(records)
    return np.array([quality[light[:, j]].mean() if light[:, j].any() else np.nan for j in range(light.shape[1])]) - quality.mean()


def segment_frequency(records: Sequence[dict[str, Any]], k: int, best: bool) -> np.ndarray:
    """How often each segment is light among the ``k`` best (or worst) schedules of ``records`` (sorted best first)."""
    chosen = records[:k] if best else records[-k:]
    return light_matrix(chosen).sum(axis=0)


def analysis(records: Sequence[dict[str, Any]], top_k: int = 20) -> dict[str, Any]:
    """The JSON summary of a search, per measure: influence, top/bottom-k frequencies and the best and worst five."""
    summary: dict[str, Any] = {"schedules": len(searched(records))}
    for measure in measures_of(records):
        ranked = searched(records, measure)
        k = min(top_k, len(ranked))
        summary[measure.key] = {
            "influence": segment_influence(ranked, measure).tolist(),
            f"frequency_top{k}": segment_frequency(ranked, k, best=True).tolist(),
            f"frequency_bottom{k}": segment_frequency(ranked, k, best=False).tolist(),
            "best": [(r["label"], measure.value(r)) for r in ranked[:5]],
            "worst": [(r["label"], measure.value(r)) for r in ranked[-5:]],
        }
    return summary


def plot_analysis(records: Sequence[dict[str, Any]], folder: Path, top_k: int = 20) -> list[Path]:
    """The paper's Fig. 2 (best/worst five as strips), Fig. 3-4 (top/bottom-k frequency) and Fig. 7 (influence),
    one row (or panel) per measure."""
    measures = measures_of(records)
    rows = len(measures)
    segments = np.arange(light_matrix(searched(records)).shape[1])
    colors = plt.matplotlib.colors.ListedColormap([MODEL_COLORS[0], MODEL_COLORS[1]])
    paths = []

    figure, axes = plt.subplots(rows, 2, figsize=(11, 2.8 * rows), squeeze=False)
    for measure, pair in zip(measures, axes):
        ranked = searched(records, measure)
        for axis, chosen, title in ((pair[0], ranked[:5], "best 5"), (pair[1], ranked[-5:][::-1], "worst 5")):
            axis.imshow(light_matrix(chosen), aspect="auto", cmap=colors, vmin=0, vmax=1)
            axis.set_yticks(range(len(chosen)), [f"{measure.value(r):.1f}" for r in chosen])
            axis.set_xticks(segments)
            axis.set_xlabel("segment (0: t = 1, fully masked)")
            axis.set_title(f"{title} by {measure.label} (red: light)")
        pair[0].set_ylabel(measure.label)
    figure.tight_layout()
    paths.append(save_figure(figure, folder / "segments_best_worst.png"))

    figure, axes = plt.subplots(rows, 2, figsize=(11, 3 * rows), squeeze=False)
    for measure, pair in zip(measures, axes):
        ranked = searched(records, measure)
        k = min(top_k, len(ranked))
        for axis, best in zip(pair, (True, False)):
            axis.bar(segments, segment_frequency(ranked, k, best), color=MODEL_COLORS[1])
            axis.set_title(f"{'top' if best else 'bottom'} {k} by {measure.label}")
            axis.set_xticks(segments)
            axis.set_xlabel("segment (0: t = 1)")
        pair[0].set_ylabel("schedules with the segment light")
    figure.tight_layout()
    paths.append(save_figure(figure, folder / "segments_frequency.png"))

    figure, axes = plt.subplots(1, rows, figsize=(6 * rows, 3), squeeze=False)
    for measure, axis in zip(measures, axes[0]):
        axis.bar(segments, segment_influence(searched(records, measure), measure), color=MODEL_COLORS[1])
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(segments)
        axis.set_xlabel("segment (0: t = 1)")
        axis.set_ylabel("mean with j light - mean of all")
        axis.set_title(f"influence I(j) on {measure.label}")
    figure.tight_layout()
    paths.append(save_figure(figure, folder / "segments_influence.png"))
    return paths
