"""Step importance (paper sec. 4.1): at which noise levels a light model departs most from the heavy one.

For every t on a grid, every held-out block x is corrupted once, z_t ~ q(.|x) (each token masked with
probability t, from one fixed seed), and every model scores the SAME z_t: differences between models are
then differences between models, not between noise draws. Per sequence and over its masked positions M(z_t):
- the unweighted masked-token cross entropy L(z_t, t) of every model (eq. 5);
- the mean KL(p_reference || p_model) of every model, in float64 (eq. 7).
Averaged over sequences: |L_light - L_reference| (eq. 6), the KL of each light model, the same KL between the
reference and an independently trained heavy seed (the baseline: the disagreement that intrinsic ambiguity of
text alone causes), and the relative KL = KL - baseline, paired by sequence.

A sequence with no masked position at some t (likely only at small t: probability (1 - t)^L) has neither
loss nor KL there; it is skipped at that t, and ``sequences`` counts those that were not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from adasched.analysis.evaluation import mean_ci95
from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.training.diffusion import corrupt


def time_grid(num_times: int) -> torch.Tensor:
    """t_i = (i + 0.5) / n, evenly spaced in (0, 1): t = 0 masks nothing, and t = 1 is the same for every model."""
    if not isinstance(num_times, int) or num_times < 1:
        raise ConfigError(f"num_times={num_times!r} is invalid; it must be a positive integer")
    return (torch.arange(num_times, dtype=torch.float64) + 0.5) / num_times


def choose_sequences(num_available: int, num_sequences: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``num_sequences`` of the blocks, drawn with ``seed``: spread over the whole held-out set."""
    if not isinstance(num_sequences, int) or not 1 <= num_sequences <= num_available:
        raise ConfigError(f"num_sequences={num_sequences!r} is invalid; it must lie in [1, {num_available}] (the validation blocks)")
    return torch.randperm(num_available, generator=torch.Generator().manual_seed(seed))[:num_sequences].sort().values


def corruptions(x: torch.Tensor, times: torch.Tensor, mask_id: int, seed: int) -> torch.Tensor:
    """(T, N, L) z_t of every block at every t, drawn on the CPU up front: independent of batching and device."""
    generator = torch.Generator().manual_seed(seed)
    x = x.cpu()
    return torch.stack([corrupt(x, torch.full((len(x),), float(t), dtype=torch.float64), mask_id, generator) for t in times])


def masked_log_probs(model: MDLMDenoiser, z: torch.Tensor, t: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """(P, V) float64 log p(. | z_t) at the P masked positions (row-major); only these are projected, as in
    ``nelbo_of_corruption``, which keeps memory at P x V rather than B x L x V."""
    return torch.log_softmax(model.project(model.hidden_states(z, t)[masked]).double(), -1)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(P,) KL(p || q) per position; the mask token's column (probability 0 under both, "subs") is dropped,
    where both log-probabilities are -inf."""
    keep = torch.arange(log_p.shape[-1], device=log_p.device) != mask_id
    log_p, log_q = log_p[:, keep], log_q[:, keep]
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def row_means(values: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """(B,) float64 mean of per-position ``values`` over each row's masked positions; NaN where none is masked."""
    rows = masked.nonzero()[:, 0]
    total = torch.zeros(len(masked), dtype=torch.float64, device=values.device).index_add_(0, rows, values.double())
    return total / masked.sum(1)


@torch.inference_mode()
def score_batch(
    models: Mapping[str, MDLMDenoiser], reference: str, x: torch.Tensor, z: torch.Tensor, t: float, attention_mask: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-sequence (B,) loss (eq. 5) and KL(reference || model) (eq. 7) of every model on one batch of z_t.

    Each model runs once; the reference's log-probabilities are kept and shared by every KL. Padding is
    never scored, as in ``nelbo_of_corruption``.
    """
    mask_id = models[reference].config.mask_token_id
    masked = (z == mask_id) & attention_mask.bool()
    times = torch.full((len(z),), t, device=z.device)
    targets = x[masked][:, None]
    log_p = masked_log_probs(models[reference], z, times, masked)
    loss, kl = {}, {}
    for name, model in models.items():
        log_q = log_p if name == reference else masked_log_probs(model, z, times, masked)
        loss[name] = row_means(-log_q.gather(1, targets)[:, 0], masked).cpu()
        kl[name] = row_means(kl_divergence(log_p, log_q, mask_id), masked).cpu()
    return loss, kl


@dataclass(frozen=True)
class SequenceScores:
    """Per (t, sequence) numbers, NaN where the sequence has no masked position at that t."""

    reference: str  # the model every KL is taken from
    times: torch.Tensor  # (T,) float64
    masked: torch.Tensor  # (T, N) int64 masked (non-padding) positions
    loss: dict[str, torch.Tensor]  # model -> (T, N) float64 masked-token cross entropy, nats (eq. 5)
    kl: dict[str, torch.Tensor]  # model -> (T, N) float64 mean KL(reference || model), nats (eq. 7)


def score_sequences(
    models: Mapping[str, MDLMDenoiser],
    reference: str,
    x: torch.Tensor,
    attention_mask: torch.Tensor,
    times: torch.Tensor,
    seed: int,
    batch_size: int,
    on_batch: Callable[[], None] | None = None,
) -> SequenceScores:
    """Score blocks ``x`` (N, L) at every t with every model, ``batch_size`` sequences per forward."""
    if reference not in models:
        raise ConfigError(f"reference={reference!r} is not among the models: {', '.join(models)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is invalid; it must be a positive integer")
    device = next(models[reference].parameters()).device
    x = x.long()
    z_all = corruptions(x, times, models[reference].config.mask_token_id, seed)
    loss = {name: torch.empty(len(times), len(x), dtype=torch.float64) for name in models}
    kl = {name: torch.empty(len(times), len(x), dtype=torch.float64) for name in models}
    for i, t in enumerate(times.tolist()):
        for start in range(0, len(x), batch_size):
            rows = slice(start, start + batch_size)
            batch = [tensor[rows].to(device) for tensor in (x, z_all[i], attention_mask)]
            batch_loss, batch_kl = score_batch(models, reference, batch[0], batch[1], t, batch[2])
            for name in models:
                loss[name][i, rows], kl[name][i, rows] = batch_loss[name], batch_kl[name]
            if on_batch is not None:
                on_batch()
    masked = ((z_all == models[reference].config.mask_token_id) & attention_mask.cpu().bool()).sum(-1)
    return SequenceScores(reference=reference, times=times, masked=masked, loss=loss, kl=kl)


def mean_over_sequences(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) means and 95% half-widths over the sequences of each row of ``values`` (T, N), skipping NaN."""
    means, half_widths = [], []
    for row in values:
        kept = row[~row.isnan()]
        mean, half_width = mean_ci95(kept) if len(kept) >= 2 else (kept.mean().item(), math.nan)
        means.append(mean)
        half_widths.append(half_width)
    return torch.tensor(means, dtype=torch.float64), torch.tensor(half_widths, dtype=torch.float64)


@dataclass(frozen=True)
class StepImportance:
    """Per-t curves, each (T,) float64; the dicts are keyed by light model (``loss``: by every model)."""

    reference: str
    baseline: str
    times: torch.Tensor
    sequences: torch.Tensor  # (T,) int64 sequences with at least one masked position: what each mean is over
    loss: dict[str, torch.Tensor]  # mean masked-token cross entropy per model, nats
    loss_diff: dict[str, torch.Tensor]  # eq. 6: mean |L_light - L_reference|
    loss_diff_ci95: dict[str, torch.Tensor]
    kl: dict[str, torch.Tensor]  # eq. 7: mean KL(reference || light)
    kl_baseline: torch.Tensor  # eq. 7 between the reference and the second heavy seed
    kl_relative: dict[str, torch.Tensor]  # kl - kl_baseline (mean of the per-sequence paired difference)
    kl_relative_ci95: dict[str, torch.Tensor]


def summarize(scores: SequenceScores, baseline: str, light: Sequence[str]) -> StepImportance:
    """Average the per-sequence scores into the curves of the paper's Fig. 5 and 6."""
    for name in (baseline, *light):
        if name not in scores.loss:
            raise ConfigError(f"model {name!r} was not scored; scored models: {', '.join(scores.loss)}")
    loss_diff = {name: mean_over_sequences((scores.loss[name] - scores.loss[scores.reference]).abs()) for name in light}
    kl_relative = {name: mean_over_sequences(scores.kl[name] - scores.kl[baseline]) for name in light}
    return StepImportance(
        reference=scores.reference,
        baseline=baseline,
        times=scores.times,
        sequences=(scores.masked > 0).sum(1),
        loss={name: mean_over_sequences(loss)[0] for name, loss in scores.loss.items()},
        loss_diff={name: mean for name, (mean, _) in loss_diff.items()},
        loss_diff_ci95={name: half_width for name, (_, half_width) in loss_diff.items()},
        kl={name: mean_over_sequences(scores.kl[name])[0] for name in light},
        kl_baseline=mean_over_sequences(scores.kl[baseline])[0],
        kl_relative={name: mean for name, (mean, _) in kl_relative.items()},
        kl_relative_ci95={name: half_width for name, (_, half_width) in kl_relative.items()},
    )


def table_rows(result: StepImportance) -> list[dict[str, float | int | str]]:
    """One row per (t, light model), t ascending: what step_importance.csv holds."""
    rows = []
    for i, t in enumerate(result.times.tolist()):
        for name in result.kl:
            rows.append(
                {
                    "t": round(t, 6), "light": name, "sequences": int(result.sequences[i]),
                    "loss_diff": result.loss_diff[name][i].item(), "loss_diff_ci95": result.loss_diff_ci95[name][i].item(),
                    "kl": result.kl[name][i].item(), "kl_baseline": result.kl_baseline[i].item(),
                    "kl_relative": result.kl_relative[name][i].item(), "kl_relative_ci95": result.kl_relative_ci95[name][i].item(),
                    "loss_light": result.loss[name][i].item(), "loss_reference": result.loss[result.reference][i].item(),
                }
            )
    return rows


def peak_times(result: StepImportance) -> dict[str, dict[str, float]]:
    """The t at which each light model's loss difference and relative KL are largest (NaN-free curves)."""
    return {
        name: {
            "loss_diff": result.times[result.loss_diff[name].nan_to_num(-math.inf).argmax()].item(),
            "kl_relative": result.times[result.kl_relative[name].nan_to_num(-math.inf).argmax()].item(),
        }
        for name in result.kl
    }
