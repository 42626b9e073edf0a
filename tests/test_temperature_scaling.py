"""Temperature scaling: recovers a known temperature, agrees with a brute-force minimum, refuses bad input."""

import numpy as np
import pytest
import torch

from calib_trl.evaluation.temperature_scaling import apply_temperature, fit_temperature


def nll(logits, labels, t):
    return float(-(torch.as_tensor(logits) / t).log_softmax(-1).gather(1, torch.as_tensor(labels)[:, None]).mean())


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_recovers_the_temperature_that_generated_the_labels(true_t):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40000, 4, generator=g, dtype=torch.float64) * 3
    labels = torch.multinomial((z / true_t).softmax(-1), 1, generator=g).squeeze(1)
    assert fit_temperature(z, labels) == pytest.approx(true_t, rel=0.03)


def test_is_the_minimum_of_the_nll_over_a_fine_grid():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(300, 5, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 5, (300,), generator=g)
    labels[:150] = z[:150].argmax(-1)  # right half the time: overconfident logits
    t = fit_temperature(z, labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(50), 20001))
    best = grid[np.argmin([nll(z, labels, s) for s in grid])]
    assert t == pytest.approx(best, rel=1e-3)
    assert nll(z, labels, t) <= min(nll(z, labels, t * 1.001), nll(z, labels, t / 1.001))


def test_rows_with_fewer_options_use_minus_infinity():
    z = torch.tensor([[2.0, 0.0, float("-inf")], [2.0, 0.0, 1.0], [0.0, 2.0, float("-inf")], [1.0, 0.0, -1.0]])
    labels = torch.tensor([0, 0, 0, 1])
    t = fit_temperature(z, labels)
    grid = np.linspace(0.05, 20, 40000)
    assert t == pytest.approx(grid[np.argmin([nll(z, labels, s) for s in grid])], abs=1e-3)
    probs = apply_temperature(z, t)
    assert probs[0, 2] == 0 and np.allclose(probs.sum(1), 1)


def test_bounds_and_degenerate_cases():
    z = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    assert fit_temperature(z, [0, 1], min_temperature=0.1) == 0.1  # always right: as sharp as allowed
    assert fit_temperature(z, [1, 0], max_temperature=50.0) == 50.0  # always wrong: as flat as allowed


@pytest.mark.parametrize(
    "logits,labels,match",
    [
        ([[1.0, 0.0]], [2], "option indices"),
        ([1.0, 0.0], [0], "N x K"),
        ([[float("nan"), 0.0]], [0], "NaN"),
        ([[float("-inf"), 0.0]], [0], "right option is -inf"),
        ([[1.0, 0.0]], [0, 1], "one option index per row"),
    ],
)
def test_bad_input_is_refused(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(logits, labels)
    with pytest.raises(ValueError, match="must be > 0"):
        apply_temperature([[1.0, 0.0]], 0.0)
