"""Temperature scaling: the post-hoc calibration baseline (Guo et al., 2017, "On Calibration of Modern Neural Networks").

One scalar `T > 0` divides the option logits of every question, `p = softmax(z / T)`, and is fitted by minimising the
negative log-likelihood of the right options on held-out rows (the calibration split). It changes confidences, never
the argmax, so accuracy is unchanged. A model fine-tuned with a calibration loss should be compared with plain SFT +
temperature scaling, the baseline a user would otherwise pick.

The fit is exact up to floating-point precision: with `b = 1 / T`, the NLL `mean_i logsumexp_k(b z_ik) - b z_iy` is
convex in `b`, and its derivative `mean_i E_{softmax(b z_i)}[z_i] - z_iy` increases with `b`, so the minimiser is the
root of the derivative, found by bisection within `[1 / max_temperature, 1 / min_temperature]`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["MAX_TEMPERATURE", "MIN_TEMPERATURE", "apply_temperature", "at_temperature_bound", "fit_temperature"]

#: The search interval of `fit_temperature`. A fit at its upper bound says that a flatter distribution than any it
#: tried fits best: on those rows the confidence carries no information about correctness (see `at_temperature_bound`).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0

# Rows of logits processed at once by the fit (the token logits of generated answers have a vocabulary of columns)
_CHUNK_ROWS = 256


def at_temperature_bound(
    temperature: float, min_temperature: float = MIN_TEMPERATURE, max_temperature: float = MAX_TEMPERATURE
) -> bool:
    """
    Whether a fitted temperature sits at a bound of the search: at the upper bound the fit wants confidences flatter
    than any it tried (the logits carry no information about which answer is right); at the lower bound, sharper.
    Reports and tables flag such a temperature instead of showing it as an ordinary number.
    """
    return bool(
        np.isclose(temperature, max_temperature, rtol=1e-6) or np.isclose(temperature, min_temperature, rtol=1e-6)
    )


def describe_temperature(temperature: float) -> str:
    """`T = 1.83`, or, at a bound of the search, what that bound means."""
    if np.isclose(temperature, MAX_TEMPERATURE, rtol=1e-6):
        return (
            f"T = {temperature:.4g} (search bound): confidence carries no information about correctness on these rows"
        )
    if np.isclose(temperature, MIN_TEMPERATURE, rtol=1e-6):
        return f"T = {temperature:.4g} (search bound): the fit wants confidences sharper than any it tried"
    return f"T = {temperature:.4g}"


def _logits_labels(logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.detach().cpu() if torch.is_tensor(logits) else torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels)).long()
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"`logits` must be a non-empty N x K array of option logits, got shape {tuple(z.shape)}.")
    if y.shape != (z.shape[0],):
        raise ValueError(f"`labels` must hold one option index per row of `logits`, got shape {tuple(y.shape)}.")
    if ((y < 0) | (y >= z.shape[1])).any():
        raise ValueError(f"`labels` must be option indices in [0, {z.shape[1]}).")
    if torch.isnan(z).any() or torch.isposinf(z).any():
        raise ValueError("`logits` holds NaN or +inf values.")
    if not torch.isfinite(z.gather(1, y[:, None])).all():
        raise ValueError("The logit of a right option is -inf; `-inf` may only mark options a row does not have.")
    return z, y


def _nll_slope(z: torch.Tensor, y: torch.Tensor, b: float) -> float:
    """d/db of `mean_i logsumexp(b z_i) - b z_iy`: `mean_i E_{softmax(b z_i)}[z_i] - z_iy`, in float64, by row chunks."""
    total = 0.0
    for start in range(0, z.shape[0], _CHUNK_ROWS):
        zc, yc = z[start : start + _CHUNK_ROWS].double(), y[start : start + _CHUNK_ROWS]
        valid = torch.isfinite(zc)
        p = (b * zc).softmax(-1)
        expected = (p * torch.where(valid, zc, torch.zeros_like(zc))).sum(-1)
        total += float((expected - zc.gather(1, yc[:, None]).squeeze(1)).sum())
    return total / z.shape[0]


def fit_temperature(
    logits: Any,
    labels: Any,
    min_temperature: float = MIN_TEMPERATURE,
    max_temperature: float = MAX_TEMPERATURE,
    tol: float = 1e-10,
) -> float:
    """
    The temperature `T` that minimises the NLL of `softmax(logits / T)` on these rows.

    Args:
        logits (`array-like` of shape `(N, K)`): option logits (any shift per row; `-inf` marks options a row lacks,
            as `MCQScores.logits` does for questions with fewer options).
        labels (`array-like` of shape `(N,)`): index of the right option of each row.
        min_temperature, max_temperature (`float`): the search interval; the bound is returned when the optimum lies
            beyond it (e.g. `max_temperature` when the logits carry no information about the answer), which
            `at_temperature_bound` tells.
        tol (`float`): bisection tolerance on `1 / T`.

    Returns:
        `float`: the fitted temperature.

    Example:
    ```python
    >>> # the top option is right 3 times in 4: softmax([2, 0] / T) puts 3/4 on it at T = 2 / ln 3
    >>> round(fit_temperature([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [0, 0, 0, 0]), 4)
    1.8205
    ```
    """
    if not 0 < min_temperature < max_temperature:
        raise ValueError(f"Need 0 < min_temperature < max_temperature, got {min_temperature} and {max_temperature}.")
    z, y = _logits_labels(logits, labels)
    lo, hi = 1.0 / max_temperature, 1.0 / min_temperature
    if _nll_slope(z, y, lo) >= 0:
        return max_temperature
    if _nll_slope(z, y, hi) <= 0:
        return min_temperature
    while hi - lo > tol * max(1.0, lo):
        mid = (lo + hi) / 2
        if _nll_slope(z, y, mid) < 0:
            lo = mid
        else:
            hi = mid
    return 1.0 / ((lo + hi) / 2)


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Option probabilities `softmax(logits / temperature)` (`-inf` logits get probability 0), as a float64 array."""
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    return (z / temperature).softmax(-1).numpy()
