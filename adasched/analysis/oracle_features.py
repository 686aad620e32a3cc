"""Which state predicts the analysis oracle's choices: what the oracle knows that routers don't read.

From ``DecisionRecords`` of the oracle's trajectories, the columns a router could read (the ``router_features``
columns the shipped routers read, the candidate ``EXTRA_FEATURES``) and one it could not (the light model's
increment at the row's previous decision: measuring it takes the heavy's forward), scored by how well they predict
whether the oracle left the heavy, on trajectories held out whole (a trajectory's decisions are correlated):

* each column alone: a one-feature logistic regression's ROC AUC and accuracy;
* sets: the existing columns, the existing plus each candidate, all deployable columns, and all plus the
  oracle-only one, each by a logistic regression and by a depth-3 decision tree (with its feature importances).

Read the accuracies against ``majority_accuracy``, what always predicting the commoner choice scores. The top-k
deployable columns by their AUC on the training trajectories (the held-out ones stay out of every choice) are the
inputs of a router fitted to follow the oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from adasched.analysis.decision_records import DecisionRecords
from adasched.analysis.plots import save_figure
from adasched.errors import ConfigError
from adasched.sampling.features import EXTRA_FEATURES, feature_names

EXISTING, CANDIDATE, ORACLE_ONLY = "existing", "candidate", "oracle_only"
PREVIOUS_INCREMENT = "previous_light_increment (oracle-only)"  # the light model's increment at the row's previous decision
TREE_DEPTH = 3
TABLE_COLUMNS = ("budget", "fit", "inputs", "kind", "needs", "auc", "accuracy", "importances")


@dataclass
class FeatureColumns:
    """Every column a predictor may read, per decision, and what it predicts."""

    names: list[str]
    kinds: list[str]  # EXISTING, CANDIDATE or ORACLE_ONLY
    needs: list[str]  # what the sampler computes for it: "state" (nothing), a policy feature, or "heavy" (oracle-only)
    values: np.ndarray  # (N, C) float64
    left_heavy: np.ndarray  # (N,) bool: the oracle chose another member than the heavy
    seed: np.ndarray  # (N,) the decision's trajectory

    def index(self, names: Sequence[str]) -> list[int]:
        return [self.names.index(name) for name in names]


def finite(values: np.ndarray) -> np.ndarray:
    """Infinite increments (both the member and the seed baseline left the heavy's nucleus) as the extreme finite ones."""
    values = np.nan_to_num(values, nan=0.0, posinf=np.inf, neginf=-np.inf)
    seen = values[np.isfinite(values)]
    return np.clip(values, seen.min(initial=0.0), seen.max(initial=0.0))


def previous_increment(records: DecisionRecords, member: int) -> np.ndarray:
    """(N,) ``member``'s increment at each decision's previous one in its trajectory (0 at a trajectory's first)."""
    seed, step = records.seed.numpy(), records.step.numpy()
    order = np.lexsort((step, seed))
    increment = finite(records.increments[:, member].numpy())[order]
    same = np.r_[False, seed[order][1:] == seed[order][:-1]]
    previous = np.zeros(len(seed))
    previous[order] = np.where(same, np.r_[0.0, increment[:-1]], 0.0)
    return previous


def feature_columns(records: DecisionRecords, extra_names: Sequence[str], light: int) -> FeatureColumns:
    """The records' columns: ``router_features``, the extra features and the oracle-only previous increment of ``light``."""
    existing = feature_names(records.increments.shape[1])
    values = np.column_stack([records.features.double().numpy(), records.extras.double().numpy(), previous_increment(records, light)])
    return FeatureColumns(
        names=[*existing, *extra_names, PREVIOUS_INCREMENT],
        kinds=[EXISTING] * len(existing) + [CANDIDATE] * len(extra_names) + [ORACLE_ONLY],
        needs=["state"] * len(existing) + [EXTRA_FEATURES[name].needs for name in extra_names] + ["heavy"],
        values=values, left_heavy=records.choice.numpy() != 0, seed=records.seed.numpy(),
    )


def held_out_trajectories(seed: np.ndarray, fraction: float) -> np.ndarray:
    """(N,) True for the decisions of the last ``fraction`` of the trajectories (by seed), held out whole."""
    trajectories = np.unique(seed)
    count = round(fraction * len(trajectories))
    if not 0 < count < len(trajectories):
        raise ConfigError(
            f"validation_fraction={fraction} holds out {count} of {len(trajectories)} recorded trajectories; it must hold out between 1 and all but one"
        )
    return np.isin(seed, trajectories[-count:])


def logistic() -> ClassifierMixin:
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def tree() -> ClassifierMixin:
    return DecisionTreeClassifier(max_depth=TREE_DEPTH, random_state=0)


FITS: dict[str, Callable[[], ClassifierMixin]] = {"logistic": logistic, f"tree depth {TREE_DEPTH}": tree}
ONE_FEATURE = "logistic, one feature"  # the fit column of the rows scoring a column alone


def scores(left_heavy: np.ndarray, score: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """ROC AUC of ``score`` (higher: more likely the oracle left the heavy; NaN where the held-out decisions hold one
    choice only) and accuracy of ``predicted``."""
    auc = float(roc_auc_score(left_heavy, score)) if len(np.unique(left_heavy)) == 2 else float("nan")
    return {"auc": auc, "accuracy": float(accuracy_score(left_heavy, predicted))}


def fitted_scores(fit: str, columns: FeatureColumns, inputs: Sequence[str], test: np.ndarray) -> tuple[ClassifierMixin, dict[str, float]]:
    """Fit ``fit`` on the training decisions' ``inputs`` and score it on the held-out ones."""
    x, y = columns.values[:, columns.index(inputs)], columns.left_heavy
    model = FITS[fit]().fit(x[~test], y[~test])
    return model, scores(y[test], model.predict_proba(x[test])[:, 1], model.predict(x[test]))


def importances(model: DecisionTreeClassifier, inputs: Sequence[str]) -> str:
    """The tree's nonzero feature importances, largest first: ``name 0.52, name 0.31``."""
    ranked = sorted(zip(model.feature_importances_, inputs), reverse=True)
    return ", ".join(f"{name} {weight:.2f}" for weight, name in ranked if weight > 0)


def row(fit: str, inputs: Sequence[str], label: str, kind: str, columns: FeatureColumns, test: np.ndarray) -> dict[str, Any]:
    """One row of the table: ``fit`` (a key of FITS, or ONE_FEATURE) on ``inputs``, shown as ``label``."""
    model, measured = fitted_scores("logistic" if fit == ONE_FEATURE else fit, columns, inputs, test)
    needs = sorted({columns.needs[i] for i in columns.index(inputs)} - {"state"}) or ["state"]
    shown = importances(model, inputs) if isinstance(model, DecisionTreeClassifier) else ""
    return {"fit": fit, "inputs": label, "kind": kind, "needs": "+".join(needs), **measured, "importances": shown}


def feature_sets(columns: FeatureColumns) -> list[tuple[str, str, list[str]]]:
    """(label, kind, inputs): the existing columns, existing plus each other column, all deployable, all."""
    existing = [name for name, kind in zip(columns.names, columns.kinds) if kind == EXISTING]
    others = [(name, kind) for name, kind in zip(columns.names, columns.kinds) if kind != EXISTING]
    deployable = [name for name, kind in zip(columns.names, columns.kinds) if kind != ORACLE_ONLY]
    return [
        ("existing", EXISTING, existing),
        *((f"existing + {name}", kind, [*existing, name]) for name, kind in others),
        ("all deployable", CANDIDATE, deployable),
        ("all + oracle-only", ORACLE_ONLY, columns.names),
    ]


def training_ranking(columns: FeatureColumns, test: np.ndarray) -> list[str]:
    """The deployable columns by how well each alone separates the training decisions (AUC or 1 - AUC), best first."""
    train = ~test
    y = columns.left_heavy[train]
    separation = {}
    for index, (name, kind) in enumerate(zip(columns.names, columns.kinds)):
        if kind != ORACLE_ONLY:
            auc = roc_auc_score(y, columns.values[train, index]) if len(np.unique(columns.values[train, index])) > 1 else 0.5
            separation[name] = max(auc, 1 - auc)
    return sorted(separation, key=lambda name: -separation[name])


@dataclass
class FeatureAnalysis:
    columns: FeatureColumns
    test: np.ndarray  # (N,) bool: decisions of held-out trajectories
    rows: list[dict[str, Any]]  # TABLE_COLUMNS but the budget
    ranking: list[str]  # deployable columns, best first (on the training trajectories)

    def summary(self) -> dict[str, Any]:
        """What results.json keeps besides the rows."""
        left, test = self.columns.left_heavy, self.test
        majority = max(left[test].mean(), 1 - left[test].mean())
        return {
            "decisions": len(left), "held_out_decisions": int(test.sum()), "trajectories": len(np.unique(self.columns.seed)),
            "held_out_trajectories": len(np.unique(self.columns.seed[test])), "left_heavy_share": float(left.mean()),
            "majority_accuracy": float(majority), "ranking": self.ranking,
        }


def analyse(records: DecisionRecords, extra_names: Sequence[str], light: int, validation_fraction: float) -> FeatureAnalysis:
    """Score every column alone and every feature set on the held-out trajectories (see the module's docstring)."""
    columns = feature_columns(records, extra_names, light)
    test = held_out_trajectories(columns.seed, validation_fraction)
    if len(np.unique(columns.left_heavy[~test])) < 2:
        raise ConfigError("the oracle made the same choice at every training decision: record more trajectories (num_samples) or change the budget")
    rows = [row(ONE_FEATURE, [name], name, kind, columns, test) for name, kind in zip(columns.names, columns.kinds)]
    rows += [row(fit, inputs, label, kind, columns, test) for label, kind, inputs in feature_sets(columns) for fit in FITS]
    return FeatureAnalysis(columns, test, rows, training_ranking(columns, test))


KIND_COLORS = {EXISTING: "#1f4e79", CANDIDATE: "#2ca02c", ORACLE_ONLY: "#d62728"}
FIT_COLORS = dict(zip(FITS, ("#9467bd", "#ff7f0e")))


def plot_feature_auc(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Held-out AUC per budget (a column each): every feature alone above, the feature sets by each fit below."""
    budgets = sorted({r["budget"] for r in rows})
    singles = [[r for r in rows if r["budget"] == b and r["fit"] == ONE_FEATURE] for b in budgets]
    sets = [[r for r in rows if r["budget"] == b and r["fit"] in FITS] for b in budgets]
    height = 0.22 * max(len(singles[0]), len(sets[0]))
    figure, axes = plt.subplots(2, len(budgets), figsize=(6 * len(budgets), 2 + 2 * height), squeeze=False)
    for column, budget in enumerate(budgets):
        top, bottom = axes[0, column], axes[1, column]
        ordered = sorted(singles[column], key=lambda r: np.nan_to_num(r["auc"]))
        top.barh([r["inputs"] for r in ordered], [r["auc"] for r in ordered], color=[KIND_COLORS[r["kind"]] for r in ordered])
        top.set_title(f"budget {budget:g}: one feature (logistic)")
        labels = list(dict.fromkeys(r["inputs"] for r in sets[column]))
        for offset, fit in enumerate(FITS):
            auc = {r["inputs"]: r["auc"] for r in sets[column] if r["fit"] == fit}
            bottom.barh(np.arange(len(labels)) + 0.4 * offset, [auc[label] for label in labels], height=0.4, color=FIT_COLORS[fit])
        bottom.set_yticks(np.arange(len(labels)) + 0.2, labels)
        bottom.set_title(f"budget {budget:g}: feature sets")
        for axis in (top, bottom):
            axis.axvline(0.5, color="grey", linestyle=":", linewidth=1)  # chance
            axis.set_xlim(0.0, 1.0)
            axis.set_xlabel("held-out ROC AUC: does the oracle leave the heavy?")
    colors = KIND_COLORS | FIT_COLORS  # one feature's bars by its kind, the sets' by the fit
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for color in colors.values()]
    figure.legend(handles, list(colors), loc="upper center", ncol=len(colors), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    return save_figure(figure, path)
