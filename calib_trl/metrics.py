"""Calibration metrics for multiple-choice predictions.

Every function accepts numpy arrays, torch tensors (any device, any floating or integer dtype) or plain lists, computes
in `float64` on the CPU, and returns plain Python numbers, so the results can be logged or written to JSON directly.

For multiple choice, `probs` is an `N x K` matrix of option probabilities (one row per example, rows summing to 1),
`labels` holds the index of the right option, the prediction is `argmax(probs)` (ties go to the lowest index, as with
`torch.argmax`) and the confidence is `max(probs)`. The confidence-only functions take `confidences` (shape `(N,)`,
values in `[0, 1]`) and `correct` (shape `(N,)`, booleans or 0/1).

Binning convention (equal-width bins)
-------------------------------------
With `n` bins the edges are `e_j = j / n` for `j = 0, ..., n`, each computed as the correctly rounded `float64` value
of `j / n` (so `e_3` for `n = 10` is the float `0.3`). Bins are closed on the left and open on the right: a confidence
`c < 1` goes to bin `b = #{j in 1..n : c >= e_j}`, i.e. `[e_b, e_(b+1))`. Consequently:

- a confidence lying exactly on an inner edge goes to the bin on its *right* (`0.3` is in `[0.3, 0.4)`, `0.5` in
  `[0.5, 0.6)`);
- a confidence of `0.0` is in the first bin;
- a confidence of exactly `1.0` forms a bin of its own, `[1, 1]`, separate from `[e_(n-1), 1)`.

This is what `torch.bucketize(confidences, edges, right=True) - 1` gives, and it is the convention of torchmetrics
(`torchmetrics.functional.classification.multiclass_calibration_error`), with which `expected_calibration_error` and
`maximum_calibration_error` agree (`norm="l1"` and `norm="max"`). torchmetrics computes in `float32` with
`torch.linspace` edges, so the two can place differently a confidence that lies within `float32` rounding of an edge
(e.g. `float32(0.7)`, which is slightly below the `float64` edge `0.7`); everywhere else they differ only by
torchmetrics' `float32` rounding (below `1e-6` for a few hundred examples). Bins that receive no example contribute
nothing to the ECE and are skipped by the MCE. `reliability_diagram_data` describes `n` bars, and for display the
last bar `[e_(n-1), 1]` also holds the confidences equal to `1.0`.

Confidences may exceed 1 by at most `1e-3` (the tolerance on row sums), as float arithmetic sometimes produces; such
values are clipped to `1.0`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "NLL_EPS",
    "brier_score",
    "calibration_gaps",
    "calibration_report",
    "classwise_ece",
    "confidence_auroc",
    "confidence_report",
    "equal_width_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "reliability_diagram_data",
    "smooth_ece",
]

#: Probabilities are clamped to at least this value before taking the log in `negative_log_likelihood`, so a zero
#: probability on the right answer costs `-log(1e-12) ~ 27.6` nats instead of infinity.
NLL_EPS = 1e-12

# Tolerance on `sum_k probs[i, k] == 1` (and on confidences slightly above 1).
_SUM_ATOL = 1e-3

_STRATEGIES = ("uniform", "quantile")

_EMPTY_MESSAGE = "calibration metrics need at least one example"


# ---------------------------------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------------------------------


def _to_float64(x: Any, name: str) -> torch.Tensor:
    """Any array-like as a `float64` CPU tensor (a copy-free view when possible)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.is_complex():
            raise ValueError(f"`{name}` must be real-valued, got a tensor of dtype {t.dtype}.")
        return t.to(device="cpu", dtype=torch.float64)
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as err:  # ragged nested lists
        raise ValueError(f"`{name}` must be a numeric array, tensor or list: {err}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"`{name}` must be numeric, got an array of dtype {arr.dtype}.")
    if np.iscomplexobj(arr):
        raise ValueError(f"`{name}` must be real-valued, got an array of dtype {arr.dtype}.")
    return torch.as_tensor(arr.astype(np.float64, copy=False))


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}.")
    return int(n_bins)


def _check_strategy(strategy: Any) -> str:
    if strategy not in _STRATEGIES:
        raise ValueError(f"`strategy` must be one of {_STRATEGIES}, got {strategy!r}.")
    return strategy


def _check_confidences(confidences: Any, correct: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated `(confidences, correct)` as `float64` tensors of shape `(N,)`, confidences clipped to `[0, 1]`."""
    conf = _to_float64(confidences, "confidences")
    acc = _to_float64(correct, "correct")
    if conf.ndim != 1:
        raise ValueError(f"`confidences` must be 1-D (one confidence per example), got shape {tuple(conf.shape)}.")
    if acc.ndim != 1:
        raise ValueError(f"`correct` must be 1-D (one flag per example), got shape {tuple(acc.shape)}.")
    if conf.numel() == 0:
        raise ValueError(f"`confidences` is empty: {_EMPTY_MESSAGE}.")
    if acc.numel() != conf.numel():
        raise ValueError(
            f"`correct` must have one entry per confidence: got {acc.numel()} entries for {conf.numel()} confidences."
        )
    if not torch.isfinite(conf).all():
        raise ValueError("`confidences` contains NaN or infinite values.")
    if (conf < 0).any() or (conf > 1 + _SUM_ATOL).any():
        raise ValueError(
            f"`confidences` must lie in [0, 1], got values in [{conf.min().item():.6g}, {conf.max().item():.6g}]."
        )
    if not ((acc == 0) | (acc == 1)).all():
        raise ValueError("`correct` must contain only True/False or 1/0 values.")
    return conf.clamp(max=1.0), acc


def _check_probs_labels(probs: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated `probs` (`float64`, `N x K`) and `labels` (`int64`, `(N,)`)."""
    p = _to_float64(probs, "probs")
    y = _to_float64(labels, "labels")
    if p.ndim != 2:
        raise ValueError(
            f"`probs` must be 2-D (N examples x K options), got shape {tuple(p.shape)}; "
            "for the confidences of the predicted option use the functions that take `confidences`."
        )
    if p.shape[0] == 0:
        raise ValueError(f"`probs` is empty: {_EMPTY_MESSAGE}.")
    if p.shape[1] == 0:
        raise ValueError(f"`probs` must have at least one option (column), got shape {tuple(p.shape)}.")
    if y.ndim != 1:
        raise ValueError(f"`labels` must be 1-D (one class index per example), got shape {tuple(y.shape)}.")
    if y.numel() != p.shape[0]:
        raise ValueError(
            f"`labels` must have one entry per row of `probs`: got {y.numel()} labels for {p.shape[0]} rows."
        )
    if not torch.isfinite(p).all():
        raise ValueError("`probs` contains NaN or infinite values.")
    if (p < 0).any():
        raise ValueError(f"`probs` must be non-negative, got a minimum of {p.min().item():.6g}.")
    sums = p.sum(dim=1)
    bad = ((sums - 1).abs() > _SUM_ATOL).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"Every row of `probs` must sum to 1 (within {_SUM_ATOL:g}), but row {i} sums to {sums[i].item():.6g}; "
            "pass softmax probabilities, not logits."
        )
    n_classes = p.shape[1]
    if not torch.isfinite(y).all() or (y != y.round()).any():
        raise ValueError("`labels` must be integer class indices.")
    if (y < 0).any() or (y >= n_classes).any():
        raise ValueError(
            f"`labels` must be class indices in [0, {n_classes}) for `probs` with {n_classes} columns, "
            f"got values in [{int(y.min())}, {int(y.max())}]."
        )
    return p, y.long()


# ---------------------------------------------------------------------------------------------------------------------
# Binning (vectorised)
# ---------------------------------------------------------------------------------------------------------------------


def _bin_edges(n_bins: int, device=None) -> torch.Tensor:
    """`[0, 1/n, ..., 1]`, each the correctly rounded float64 value of `j / n`."""
    return torch.arange(n_bins + 1, dtype=torch.float64, device=device) / n_bins


def equal_width_bins(confidences: torch.Tensor, n_bins: int, one_apart: bool = True) -> torch.Tensor:
    """
    The equal-width bin of each confidence in `[0, 1]`, as every binned quantity of calib-trl reads it (ECE, MCE,
    class-wise ECE, reliability diagrams, RCFT's E-step and ECE term): `b` in `0..n_bins-1` for `[b/n, (b+1)/n)`,
    the convention of the module docstring and of torchmetrics. A confidence of exactly 1 gets index `n_bins`, a bin
    of its own, with `one_apart=True` (ECE and MCE, as torchmetrics), or joins the top bin with `one_apart=False`
    (the diagrams and RCFT, which have `n_bins` bins). Computed in float64 on the confidences' device, without
    gradient.
    """
    conf = confidences.detach().to(torch.float64)
    index = torch.bucketize(conf, _bin_edges(n_bins, conf.device), right=True) - 1
    return index if one_apart else index.clamp(max=n_bins - 1)


def _quantile_bin_index(conf: torch.Tensor, acc: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-mass bin of each example (see `expected_calibration_error`)."""
    n = conf.numel()
    # Sort by (confidence, correctness): stable sort by the secondary key, then by the primary key.
    order = torch.argsort(acc, stable=True)
    order = order[torch.argsort(conf[order], stable=True)]
    # numpy.array_split sizes: the first `n % n_bins` groups hold `n // n_bins + 1` examples, the others `n // n_bins`.
    q, r = divmod(n, n_bins)
    pos = torch.arange(n)
    big = r * (q + 1)
    group = torch.where(pos < big, pos // (q + 1), r + (pos - big) // max(q, 1))
    index = torch.empty(n, dtype=torch.long)
    index[order] = group
    return index


def _bin_sums(
    index: torch.Tensor, conf: torch.Tensor, acc: torch.Tensor, n_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin example counts, confidence sums and accuracy sums."""
    counts = torch.zeros(n_slots, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros(n_slots, dtype=torch.float64).scatter_add_(0, index, conf)
    acc_sum = torch.zeros(n_slots, dtype=torch.float64).scatter_add_(0, index, acc)
    return counts, conf_sum, acc_sum


def _ece(conf: torch.Tensor, acc: torch.Tensor, n_bins: int, strategy: str = "uniform") -> float:
    if strategy == "uniform":
        index, n_slots = equal_width_bins(conf, n_bins), n_bins + 1
    else:
        index, n_slots = _quantile_bin_index(conf, acc, n_bins), n_bins
    counts, conf_sum, acc_sum = _bin_sums(index, conf, acc, n_slots)
    # sum_b (n_b / N) |acc_b - conf_b| = sum_b |sum_acc_b - sum_conf_b| / N
    return float((acc_sum - conf_sum).abs().sum() / conf.numel())


def _mce(conf: torch.Tensor, acc: torch.Tensor, n_bins: int) -> float:
    counts, conf_sum, acc_sum = _bin_sums(equal_width_bins(conf, n_bins), conf, acc, n_bins + 1)
    filled = counts > 0
    return float(((acc_sum[filled] - conf_sum[filled]) / counts[filled]).abs().max())


def _classwise_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    n, n_classes = probs.shape
    hits = torch.nn.functional.one_hot(labels, n_classes).to(torch.float64)
    slots = n_bins + 1
    # Bin index of every (example, class) pair, offset by class so one scatter covers all classes.
    probs = probs.clamp(max=1.0)
    index = equal_width_bins(probs, n_bins) + slots * torch.arange(n_classes)
    _, conf_sum, acc_sum = _bin_sums(index.flatten(), probs.flatten(), hits.flatten(), slots * n_classes)
    per_class = (acc_sum - conf_sum).abs().view(n_classes, slots).sum(dim=1) / n
    return float(per_class.mean())


def _auroc(conf: torch.Tensor, acc: torch.Tensor) -> float:
    positive = acc.bool()
    n_pos = int(positive.sum())
    n_neg = conf.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Mann-Whitney U with average ranks for ties (a tie between a right and a wrong answer counts 1/2).
    _, inverse, counts = torch.unique(conf, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    average_rank = torch.cumsum(counts, 0) - (counts - 1) / 2  # 1-based
    rank_sum = average_rank[inverse][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# Smallest bandwidth the smooth ECE's fixed-point search considers (as in Blasiok & Nakkiran's reference code), and the
# number of grid points per bandwidth of the kernel smoothing (the grid has at least `_SMOOTH_MIN_GRID` points).
_SMOOTH_MIN_SIGMA = 1e-3
_SMOOTH_POINTS_PER_SIGMA = 20
_SMOOTH_MIN_GRID = 2001


def _smooth_ece_at(conf: np.ndarray, residual: np.ndarray, sigma: float) -> float:
    """
    `smECE_sigma = integral over t in [0, 1] of |(1/N) sum_i K_sigma(t, f_i) r_i| dt`, with `K_sigma` the Gaussian kernel
    reflected at 0 and 1: `K_sigma(t, f) = sum_m phi_sigma(t - f - 2m) + phi_sigma(t + f - 2m)`, so every example keeps
    unit mass on `[0, 1]` whatever the bandwidth.

    The residuals are spread onto a regular grid of `[0, 1]` by linear interpolation, each also at its mirror image
    `-f` (a node on 0 or 1 is its own image), on the circle of circumference 2; a circular convolution with the
    Gaussian wrapped on that circle gives the reflected smoothing, and the trapezoid rule the integral.
    """
    points = max(_SMOOTH_MIN_GRID, int(np.ceil(_SMOOTH_POINTS_PER_SIGMA / sigma)) + 1)
    h = 1.0 / (points - 1)
    period = 2 * (points - 1)  # grid nodes on the circle [0, 2)
    position = conf * (points - 1)
    left = np.clip(np.floor(position).astype(np.int64), 0, points - 2)
    frac = position - left
    circle = np.zeros(period)
    for node, weight in ((left, (1 - frac) * residual), (left + 1, frac * residual)):
        np.add.at(circle, node, weight)
        np.add.at(circle, (-node) % period, weight)
    offsets = np.arange(period) * h
    kernel = sum(np.exp(-0.5 * ((offsets - 2 * m) / sigma) ** 2) for m in range(-3, 4))
    kernel /= np.sqrt(2 * np.pi) * sigma
    smoothed = np.fft.irfft(np.fft.rfft(circle) * np.fft.rfft(kernel), n=period)[:points]
    density = np.abs(smoothed) / len(conf)
    return float(h * (density.sum() - (density[0] + density[-1]) / 2))


def _smooth_ece(conf: torch.Tensor, acc: torch.Tensor) -> float:
    f = conf.numpy()
    r = f - acc.numpy()
    at_min = _smooth_ece_at(f, r, _SMOOTH_MIN_SIGMA)
    if at_min <= _SMOOTH_MIN_SIGMA:
        return at_min
    # smECE_sigma does not increase with sigma, so smECE_sigma - sigma has one root: bisect for it
    lo, hi = _SMOOTH_MIN_SIGMA, 1.0
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if _smooth_ece_at(f, r, mid) > mid:
            lo = mid
        else:
            hi = mid
    return _smooth_ece_at(f, r, hi)


# ---------------------------------------------------------------------------------------------------------------------
# Public metrics
# ---------------------------------------------------------------------------------------------------------------------


def expected_calibration_error(confidences: Any, correct: Any, n_bins: int = 10, strategy: str = "uniform") -> float:
    r"""
    Expected calibration error (ECE) of the confidences of predicted answers.

    Examples are grouped into bins; with `n_b` examples in bin `b`, mean accuracy `acc_b` and mean confidence
    `conf_b`, `ECE = sum_b (n_b / N) |acc_b - conf_b|`. Empty bins contribute nothing.

    Args:
        confidences (`array-like` of shape `(N,)`):
            Confidence of each prediction (for multiple choice, the largest option probability), in `[0, 1]`.
        correct (`array-like` of shape `(N,)`):
            Whether each prediction is right (booleans or 0/1).
        n_bins (`int`, *optional*, defaults to `10`):
            Number of bins.
        strategy (`str`, *optional*, defaults to `"uniform"`):
            How examples are binned:

            - `"uniform"`: equal-width bins on `[0, 1]`, with the convention of the module docstring (left-closed
              bins, a confidence of exactly 1 in a bin of its own), identical to torchmetrics'
              `multiclass_calibration_error(..., norm="l1")`.
            - `"quantile"` (equal-mass): examples are sorted by confidence (ties broken by correctness, wrong answers
              first, so the result does not depend on the order of the examples) and the sorted list is cut into
              `n_bins` contiguous groups whose sizes differ by at most one, the larger groups first (the sizes of
              `numpy.array_split`). With fewer examples than bins, every example is a bin of its own.

    Returns:
        `float`: The ECE, in `[0, 1]`.

    Example:

    ```python
    >>> # bin [0.9, 1): accuracy 1/2, confidence 0.9; bin [0.6, 0.7): accuracy 1, confidence 0.6
    >>> round(expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1]), 6)
    0.4
    >>> round(expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1], n_bins=2, strategy="quantile"), 6)
    0.4
    ```
    """
    n_bins = _check_n_bins(n_bins)
    strategy = _check_strategy(strategy)
    conf, acc = _check_confidences(confidences, correct)
    return _ece(conf, acc, n_bins, strategy)


def maximum_calibration_error(confidences: Any, correct: Any, n_bins: int = 10) -> float:
    r"""
    Maximum calibration error (MCE): the largest `|acc_b - conf_b|` over the non-empty equal-width bins.

    Uses the same bins as `expected_calibration_error(..., strategy="uniform")`, and agrees with torchmetrics'
    `multiclass_calibration_error(..., norm="max")`.

    Args:
        confidences, correct: as in `expected_calibration_error`.
        n_bins (`int`, *optional*, defaults to `10`):
            Number of equal-width bins.

    Returns:
        `float`: The MCE, in `[0, 1]`; never smaller than the equal-width ECE.

    Example:

    ```python
    >>> round(maximum_calibration_error([0.9, 0.9, 0.3, 0.3], [1, 0, 1, 0]), 6)
    0.4
    ```
    """
    n_bins = _check_n_bins(n_bins)
    conf, acc = _check_confidences(confidences, correct)
    return _mce(conf, acc, n_bins)


def classwise_ece(probs: Any, labels: Any, n_bins: int = 10) -> float:
    r"""
    Class-wise ECE (Kull et al., 2019), as reported by RCFT (Xiao et al., 2025).

    For each class `k`, the probabilities `probs[:, k]` of *all* examples are put in equal-width bins (same
    convention as `expected_calibration_error`), the "accuracy" of a bin is the fraction of its examples whose label
    is `k`, and `ECE_k = sum_b (n_b / N) |acc_b - conf_b|`. The result is the mean of `ECE_k` over the `K` classes.

    Args:
        probs (`array-like` of shape `(N, K)`):
            Option probabilities; every row sums to 1.
        labels (`array-like` of shape `(N,)`):
            Index of the right option of each example, in `[0, K)`.
        n_bins (`int`, *optional*, defaults to `10`):
            Number of equal-width bins.

    Returns:
        `float`: The class-wise ECE, in `[0, 1]`.

    Example:

    ```python
    >>> round(classwise_ece([[0.8, 0.2], [0.8, 0.2]], [0, 1]), 6)
    0.3
    ```
    """
    n_bins = _check_n_bins(n_bins)
    p, y = _check_probs_labels(probs, labels)
    return _classwise_ece(p, y, n_bins)


def brier_score(probs: Any, labels: Any) -> float:
    r"""
    Multi-class Brier score: the mean over examples of `sum_k (probs[i, k] - onehot(labels[i])_k)^2`.

    Args:
        probs (`array-like` of shape `(N, K)`):
            Option probabilities; every row sums to 1.
        labels (`array-like` of shape `(N,)`):
            Index of the right option of each example, in `[0, K)`.

    Returns:
        `float`: The Brier score, in `[0, 2]` (0 for certain right answers, 2 for certain wrong ones).

    Example:

    ```python
    >>> brier_score([[0.5, 0.5], [1.0, 0.0]], [0, 1])
    1.25
    ```
    """
    p, y = _check_probs_labels(probs, labels)
    target = torch.nn.functional.one_hot(y, p.shape[1]).to(torch.float64)
    return float(((p - target) ** 2).sum(dim=1).mean())


def negative_log_likelihood(probs: Any, labels: Any) -> float:
    r"""
    Mean negative log-likelihood of the right options, `mean_i -log probs[i, labels[i]]`, in nats.

    Probabilities are clamped to at least `NLL_EPS = 1e-12` first, so that a zero probability on the right option
    gives a finite (large, `~27.6`) loss instead of infinity.

    Args:
        probs, labels: as in `brier_score`.

    Returns:
        `float`: The NLL (non-negative).

    Example:

    ```python
    >>> round(negative_log_likelihood([[0.5, 0.5], [0.25, 0.75]], [0, 1]), 6)
    0.490415
    ```
    """
    p, y = _check_probs_labels(probs, labels)
    p_label = p.gather(1, y[:, None]).squeeze(1).clamp(min=NLL_EPS, max=1.0)
    return float(-torch.log(p_label).mean())


def confidence_auroc(confidences: Any, correct: Any) -> float:
    r"""
    Area under the ROC curve of the confidence used as a score to tell right predictions from wrong ones.

    It is the probability that a random right prediction has a higher confidence than a random wrong one, ties
    counting 1/2 (the Mann-Whitney U statistic, computed from average ranks). 0.5 means the confidence carries no
    information about correctness.

    Args:
        confidences, correct: as in `expected_calibration_error`.

    Returns:
        `float`: The AUROC in `[0, 1]`, or `nan` (no exception, no warning) when all predictions are right or all are
        wrong, where it is undefined.

    Example:

    ```python
    >>> confidence_auroc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    0.75
    ```
    """
    conf, acc = _check_confidences(confidences, correct)
    return _auroc(conf, acc)


def smooth_ece(confidences: Any, correct: Any) -> float:
    r"""
    Smooth ECE (Blasiok & Nakkiran, 2023, "Smooth ECE: Principled Reliability Diagrams via Kernel Smoothing"): a
    calibration error without bins.

    The residuals `f_i - y_i` (confidence minus correctness) are smoothed over the confidence axis with a Gaussian
    kernel of bandwidth `sigma`, reflected at 0 and 1; `smECE_sigma` is the integral over `[0, 1]` of the absolute
    smoothed residual density, and the smooth ECE is `smECE_sigma*` at the bandwidth where `smECE_sigma* = sigma*`
    (the unique fixed point; bandwidths below `1e-3` are not considered). It is consistent (a perfectly calibrated
    predictor tends to 0) and continuous in the predictions, unlike binned ECE, whose value jumps as a confidence
    crosses a bin edge.

    Args:
        confidences, correct: as in `expected_calibration_error`.

    Returns:
        `float`: The smooth ECE, in `[0, 1]`.

    Example:

    ```python
    >>> round(smooth_ece([1.0, 1.0], [0, 0]), 6)  # certain and always wrong
    1.0
    ```
    """
    conf, acc = _check_confidences(confidences, correct)
    return _smooth_ece(conf, acc)


def reliability_diagram_data(confidences: Any, correct: Any, n_bins: int = 10) -> dict[str, Any]:
    r"""
    Per-bin statistics for a reliability diagram, as JSON-serialisable Python lists.

    Bins are equal-width with the convention of the module docstring, except that the last bin is closed,
    `[e_(n-1), 1]`, and also holds the confidences equal to 1: a diagram has exactly `n_bins` bars. The `ece` entry
    is `expected_calibration_error(confidences, correct, n_bins)`, where a confidence of exactly 1 is a bin of its
    own, so it can differ slightly from an ECE recomputed from the bars when some confidences are exactly 1.

    Args:
        confidences, correct: as in `expected_calibration_error`.
        n_bins (`int`, *optional*, defaults to `10`):
            Number of equal-width bins.

    Returns:
        `dict`: With keys

        - `bin_edges` (`list[float]`, length `n_bins + 1`): `[0, 1/n_bins, ..., 1]`;
        - `bin_counts` (`list[int]`, length `n_bins`): number of examples per bin (they sum to `N`);
        - `bin_accuracy` (`list[float | None]`): fraction of right predictions per bin, `None` for an empty bin;
        - `bin_confidence` (`list[float | None]`): mean confidence per bin, `None` for an empty bin;
        - `ece` (`float`): the equal-width ECE;
        - `n_bins` (`int`).

    Example:

    ```python
    >>> data = reliability_diagram_data([0.95, 0.95, 0.15], [1, 0, 0], n_bins=2)
    >>> data["bin_counts"], data["bin_accuracy"]
    ([1, 2], [0.0, 0.5])
    ```
    """
    n_bins = _check_n_bins(n_bins)
    conf, acc = _check_confidences(confidences, correct)
    index = equal_width_bins(conf, n_bins, one_apart=False)
    counts, conf_sum, acc_sum = _bin_sums(index, conf, acc, n_bins)
    filled = counts > 0
    return {
        "bin_edges": _bin_edges(n_bins).tolist(),
        "bin_counts": [int(c) for c in counts.tolist()],
        "bin_accuracy": [a if f else None for a, f in zip((acc_sum / counts).tolist(), filled.tolist())],
        "bin_confidence": [c if f else None for c, f in zip((conf_sum / counts).tolist(), filled.tolist())],
        "ece": _ece(conf, acc, n_bins),
        "n_bins": n_bins,
    }


def _confidence_metrics(conf: torch.Tensor, acc: torch.Tensor, n_bins: int) -> dict[str, float | int]:
    """The metrics of confidences against correctness that every report holds (validated float64 inputs)."""
    return {
        "accuracy": float(acc.mean()),
        "mean_confidence": float(conf.mean()),
        "ece": _ece(conf, acc, n_bins, "uniform"),
        "ece_equal_mass": _ece(conf, acc, n_bins, "quantile"),
        "smooth_ece": _smooth_ece(conf, acc),
        "mce": _mce(conf, acc, n_bins),
        "auroc": _auroc(conf, acc),
        "n": int(conf.numel()),
        "n_bins": n_bins,
    }


def confidence_report(confidences: Any, correct: Any, n_bins: int = 10) -> dict[str, float | int]:
    r"""
    All calibration metrics of a set of answers given as a confidence and a correctness each: generated answers (the
    confidence of the answer, correct when it matches the reference), or any binary prediction.

    Args:
        confidences (`array-like` of shape `(N,)`):
            Confidence of each answer, in `[0, 1]`.
        correct (`array-like` of shape `(N,)`):
            Whether each answer is right (booleans or 0/1).
        n_bins (`int`, *optional*, defaults to `10`):
            Number of bins of the ECE, equal-mass ECE and MCE.

    Returns:
        `dict`: the keys of `calibration_report` but `cw_ece` (there are no classes), with `brier` the squared error
        `mean (c - correct)^2` and `nll` the log loss `mean -[correct log c + (1 - correct) log(1 - c)]` of the
        confidence (clamped to `[NLL_EPS, 1 - NLL_EPS]`).

    Example:

    ```python
    >>> report = confidence_report([0.9, 0.6, 0.2], [1, 0, 0])
    >>> report["accuracy"], round(report["brier"], 6), report["auroc"]
    (0.3333333333333333, 0.136667, 1.0)
    ```
    """
    n_bins = _check_n_bins(n_bins)
    conf, acc = _check_confidences(confidences, correct)
    clamped = conf.clamp(min=NLL_EPS, max=1 - NLL_EPS)
    log_loss = -(acc * torch.log(clamped) + (1 - acc) * torch.log1p(-clamped))
    report = _confidence_metrics(conf, acc, n_bins)
    return {**report, "brier": float(((conf - acc) ** 2).mean()), "nll": float(log_loss.mean())}


def calibration_report(probs: Any, labels: Any, n_bins: int = 10) -> dict[str, float | int]:
    r"""
    All calibration metrics of a set of multiple-choice predictions.

    The prediction of an example is `argmax(probs[i])` (ties go to the lowest index) and its confidence is
    `max(probs[i])`.

    Args:
        probs (`array-like` of shape `(N, K)`):
            Option probabilities (softmax over the options); every row sums to 1 within `1e-3`.
        labels (`array-like` of shape `(N,)`):
            Index of the right option of each example, in `[0, K)`.
        n_bins (`int`, *optional*, defaults to `10`):
            Number of bins of the ECE, equal-mass ECE, class-wise ECE and MCE.

    Returns:
        `dict`: With keys

        - `accuracy`: fraction of right predictions;
        - `mean_confidence`: mean confidence (accuracy minus mean confidence < 0 means overconfidence);
        - `ece`: `expected_calibration_error` with equal-width bins;
        - `ece_equal_mass`: `expected_calibration_error` with equal-mass (`"quantile"`) bins;
        - `smooth_ece`: `smooth_ece`, which needs no bins;
        - `cw_ece`: `classwise_ece`;
        - `mce`: `maximum_calibration_error`;
        - `brier`: `brier_score`;
        - `nll`: `negative_log_likelihood`;
        - `auroc`: `confidence_auroc` (`nan` when all predictions are right or all wrong);
        - `n` (`int`): number of examples;
        - `n_bins` (`int`).

        All values are plain Python `float`s except `n` and `n_bins`.

    Example:

    ```python
    >>> report = calibration_report([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1]], [0, 2])
    >>> report["accuracy"], round(report["ece"], 6)
    (0.5, 0.4)
    ```
    """
    n_bins = _check_n_bins(n_bins)
    p, y = _check_probs_labels(probs, labels)
    prediction = p.argmax(dim=1)
    conf = p.gather(1, prediction[:, None]).squeeze(1).clamp(max=1.0)
    acc = (prediction == y).to(torch.float64)
    target = torch.nn.functional.one_hot(y, p.shape[1]).to(torch.float64)
    p_label = p.gather(1, y[:, None]).squeeze(1).clamp(min=NLL_EPS, max=1.0)
    return {
        **_confidence_metrics(conf, acc, n_bins),
        "cw_ece": _classwise_ece(p, y, n_bins),
        "brier": float(((p - target) ** 2).sum(dim=1).mean()),
        "nll": float(-torch.log(p_label).mean()),
    }


def calibration_gaps(report: dict, train_report: dict | None = None) -> dict[str, float]:
    r"""
    The two gaps that tell whether fine-tuning on more of the same data can still restore calibration, read from
    `calibration_report` results.

    - `confidence_gap`: `|accuracy - mean_confidence|` on the evaluated rows. It is a lower bound on the ECE under any
      binning, since `ECE = sum_b (n_b / n) |acc_b - conf_b| >= |sum_b (n_b / n) (acc_b - conf_b)|`: a model whose
      mean confidence is off by this much cannot be calibrated by re-spreading its confidences within bins.
    - `train_accuracy` and `accuracy_gap` (with `train_report`, the same metrics on training rows): the training rows'
      accuracy and how far it runs ahead of the evaluated rows' (`train - evaluated`). A large gap means the model is
      fitting its training rows, and an E-step on those rows would give targets above held-out accuracy.

    The RCFT paper (Xiao et al., 2025) separates "calibratable" and "non-calibratable" regimes by bounds on the ECE and
    a critical accuracy; those definitions are not implemented here (see the README's CFT/RCFT guide).
    """
    gaps = {"confidence_gap": abs(float(report["accuracy"]) - float(report["mean_confidence"]))}
    if train_report is not None:
        gaps["train_accuracy"] = float(train_report["accuracy"])
        gaps["accuracy_gap"] = float(train_report["accuracy"]) - float(report["accuracy"])
    return gaps
