import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

from calib_trl.metrics import (
    NLL_EPS,
    brier_score,
    calibration_gaps,
    calibration_report,
    classwise_ece,
    confidence_auroc,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_diagram_data,
    smooth_ece,
)

REPORT_KEYS = {
    "accuracy",
    "mean_confidence",
    "ece",
    "ece_equal_mass",
    "smooth_ece",
    "cw_ece",
    "mce",
    "brier",
    "nll",
    "auroc",
    "n",
    "n_bins",
}


def random_probs(n, k, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).softmax(-1).to(dtype)
    labels = torch.randint(0, k, (n,), generator=g)
    return probs, labels


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with torchmetrics
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes,n_bins,n", list(itertools.product([2, 4, 7], [1, 5, 10, 15], [1, 37, 300])))
def test_ece_and_mce_match_torchmetrics(n_classes, n_bins, n):
    # float32 inputs, so that torchmetrics (which casts to float32) and calib-trl see the same numbers
    probs, labels = random_probs(n, n_classes, seed=1000 * n_classes + 10 * n_bins + n, scale=1.0 + n_bins / 5)
    conf, pred = probs.max(dim=1)
    correct = pred == labels
    expected_ece = multiclass_calibration_error(probs, labels, num_classes=n_classes, n_bins=n_bins, norm="l1")
    expected_mce = multiclass_calibration_error(probs, labels, num_classes=n_classes, n_bins=n_bins, norm="max")
    assert expected_calibration_error(conf, correct, n_bins=n_bins) == pytest.approx(expected_ece.item(), abs=1e-6)
    assert maximum_calibration_error(conf, correct, n_bins=n_bins) == pytest.approx(expected_mce.item(), abs=1e-6)
    report = calibration_report(probs, labels, n_bins=n_bins)
    assert report["ece"] == pytest.approx(expected_ece.item(), abs=1e-6)
    assert report["mce"] == pytest.approx(expected_mce.item(), abs=1e-6)


def test_edge_confidences_match_torchmetrics():
    # Confidences exactly on edges (0.0, 0.3, 0.5, 1.0 with 10 bins; 0.25, 0.5, 0.75 with 4 bins) and some just off.
    probs = torch.tensor(
        [
            [1.0, 0.0],
            [0.0, 1.0],
            [0.5, 0.5],
            [0.3, 0.7],
            [0.7, 0.3],
            [0.25, 0.75],
            [0.75, 0.25],
            [0.95, 0.05],
            [0.999, 0.001],
            [0.6, 0.4],
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0, 1, 1])
    for n_bins in (2, 4, 10):
        report = calibration_report(probs, labels, n_bins=n_bins)
        for norm, key in (("l1", "ece"), ("max", "mce")):
            expected = multiclass_calibration_error(probs, labels, num_classes=2, n_bins=n_bins, norm=norm)
            assert report[key] == pytest.approx(expected.item(), abs=1e-6), (n_bins, key)


def test_auroc_matches_torchmetrics():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        conf = torch.rand(200, generator=g)
        conf[:50] = torch.round(conf[:50] * 4) / 4  # plenty of ties
        correct = torch.rand(200, generator=g) < conf
        expected = binary_auroc(conf, correct.long()).item()
        assert confidence_auroc(conf, correct) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------------------


def test_ece_tiny_hand_computed():
    # 10 bins. Bin [0.9, 1.0): 0.95 (right), 0.92 (wrong): acc 1/2, conf 0.935, gap 0.435, weight 2/5
    # Bin [0.6, 0.7):   0.65 (right), 0.61 (right): acc 1, conf 0.63, gap 0.37, weight 2/5
    # Bin [0.2, 0.3):   0.25 (wrong):              acc 0, conf 0.25, gap 0.25, weight 1/5
    # ECE = 0.4 * 0.435 + 0.4 * 0.37 + 0.2 * 0.25 = 0.174 + 0.148 + 0.05 = 0.372
    # MCE = max(0.435, 0.37, 0.25) = 0.435
    conf = [0.95, 0.92, 0.65, 0.61, 0.25]
    correct = [1, 0, 1, 1, 0]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.372, abs=1e-12)
    assert maximum_calibration_error(conf, correct) == pytest.approx(0.435, abs=1e-12)


def test_empty_bins_are_skipped():
    # Only bins [0.7, 0.8) (acc 1/3, conf 0.75) and [0.1, 0.2) (acc 1, conf 0.15) hold examples; 8 bins are empty.
    # ECE = 3/4 * |1/3 - 0.75| + 1/4 * |1 - 0.15| = 0.3125 + 0.2125 = 0.525; MCE = 0.85 (the empty bins count as nothing)
    conf = [0.74, 0.75, 0.76, 0.15]
    correct = [True, False, False, True]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.525, abs=1e-12)
    assert maximum_calibration_error(conf, correct) == pytest.approx(0.85, abs=1e-12)
    data = reliability_diagram_data(conf, correct)
    assert data["bin_counts"] == [0, 1, 0, 0, 0, 0, 0, 3, 0, 0]
    assert data["bin_accuracy"][7] == pytest.approx(1 / 3)
    assert [a is None for a in data["bin_accuracy"]] == [c == 0 for c in data["bin_counts"]]
    assert [c is None for c in data["bin_confidence"]] == [c == 0 for c in data["bin_counts"]]


def test_all_correct_and_all_wrong():
    conf = [0.6, 0.8, 1.0, 0.35]
    # all right: every bin has accuracy 1, so ECE = mean(1 - c) = (0.4 + 0.2 + 0 + 0.65) / 4
    assert expected_calibration_error(conf, [1, 1, 1, 1]) == pytest.approx(1.25 / 4, abs=1e-12)
    assert maximum_calibration_error(conf, [1, 1, 1, 1]) == pytest.approx(0.65, abs=1e-12)
    # all wrong: accuracy 0 everywhere, ECE = mean(c)
    assert expected_calibration_error(conf, [0, 0, 0, 0]) == pytest.approx(2.75 / 4, abs=1e-12)
    assert maximum_calibration_error(conf, [0, 0, 0, 0]) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(confidence_auroc(conf, [1, 1, 1, 1]))
    assert math.isnan(confidence_auroc(conf, [0, 0, 0, 0]))


def test_confidence_on_inner_edge_goes_to_the_right_bin():
    # 0.3 shares [0.3, 0.4) with 0.35: acc 1/2, conf 0.325 -> ECE 0.175.
    # (Were 0.3 in [0.2, 0.3), ECE would be 0.5 * 0.7 + 0.5 * 0.35 = 0.525.)
    assert expected_calibration_error([0.3, 0.35], [1, 0]) == pytest.approx(0.175, abs=1e-12)
    # 0.5 is in [0.5, 0.6) with 2 bins of width 0.5 as well: together with 0.9 -> acc 1/2, conf 0.7 -> ECE 0.2
    assert expected_calibration_error([0.5, 0.9], [1, 0], n_bins=2) == pytest.approx(0.2, abs=1e-12)
    data = reliability_diagram_data([0.0, 0.3, 0.5, 0.7, 0.1, 0.9], [1] * 6)
    assert data["bin_counts"] == [1, 1, 0, 1, 0, 1, 0, 1, 0, 1]


def test_confidence_of_one_is_its_own_bin():
    # 0.95 (right) and 1.0 (wrong): [0.9, 1) gives 0.5 * 0.05, the degenerate bin [1, 1] gives 0.5 * 1 -> 0.525.
    # (One merged bin [0.9, 1] would give |0.5 - 0.975| = 0.475.)
    conf, correct = [0.95, 1.0], [1, 0]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.525, abs=1e-12)
    assert maximum_calibration_error(conf, correct) == pytest.approx(1.0, abs=1e-12)
    expected = multiclass_calibration_error(torch.tensor([[0.95, 0.05], [1.0, 0.0]]), torch.tensor([0, 1]), 2)
    assert expected.item() == pytest.approx(0.525, abs=1e-6)
    # the diagram draws 1.0 in its last bar, but reports the metric's ECE
    data = reliability_diagram_data(conf, correct)
    assert data["bin_counts"][-1] == 2
    assert data["bin_confidence"][-1] == pytest.approx(0.975)
    assert data["ece"] == pytest.approx(0.525, abs=1e-12)


def test_confidence_slightly_above_one_is_clipped():
    assert expected_calibration_error([1.0005], [1]) == 0.0
    with pytest.raises(ValueError, match="`confidences` must lie in"):
        expected_calibration_error([1.01], [1])


def test_equal_mass_ece_hand_computed():
    # 5 examples in 2 bins: sizes 3 and 2 (larger groups first).
    # {0.1, 0.2, 0.3} with 1 right: acc 1/3, conf 0.2 -> 3/5 * (1/3 - 0.2) = 0.08
    # {0.4, 0.5}      with 2 right: acc 1,   conf 0.45 -> 2/5 * 0.55      = 0.22     -> ECE 0.30
    conf = [0.4, 0.1, 0.5, 0.3, 0.2]  # order of the input does not matter
    correct = [1, 0, 1, 1, 0]
    assert expected_calibration_error(conf, correct, n_bins=2, strategy="quantile") == pytest.approx(0.3, abs=1e-12)


def test_equal_mass_ties_are_broken_by_correctness():
    # All confidences tie at 0.5; sorted wrong-first, the two bins are {wrong, wrong} and {right, right}:
    # ECE = 1/2 * 0.5 + 1/2 * 0.5 = 0.5 whatever the order of the input.
    for correct in ([1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]):
        ece = expected_calibration_error([0.5] * 4, correct, n_bins=2, strategy="quantile")
        assert ece == pytest.approx(0.5, abs=1e-12)


def test_equal_mass_with_fewer_examples_than_bins():
    # every example is a bin of its own: ECE = mean |correct - conf|
    conf, correct = [0.2, 0.9, 0.6], [1, 1, 0]
    expected = (0.8 + 0.1 + 0.6) / 3
    assert expected_calibration_error(conf, correct, n_bins=10, strategy="quantile") == pytest.approx(expected)


def test_equal_mass_matches_array_split_reference():
    rng = np.random.default_rng(0)
    for n, n_bins in [(1, 1), (7, 3), (100, 10), (101, 15), (50, 7)]:
        conf = rng.uniform(size=n)
        correct = rng.uniform(size=n) < conf
        order = np.argsort(conf, kind="stable")
        ece = sum(
            len(group) / n * abs(correct[group].mean() - conf[group].mean())
            for group in np.array_split(order, n_bins)
            if len(group)
        )
        assert expected_calibration_error(conf, correct, n_bins=n_bins, strategy="quantile") == pytest.approx(ece)


def test_uniform_ece_matches_loop_reference():
    rng = np.random.default_rng(1)
    conf = rng.uniform(size=200)
    correct = rng.uniform(size=200) < conf**2
    for n_bins in (1, 3, 10):
        ece = 0.0
        for b in range(n_bins):
            in_bin = (conf >= b / n_bins) & (conf < (b + 1) / n_bins)
            if in_bin.any():
                ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
        assert expected_calibration_error(conf, correct, n_bins=n_bins) == pytest.approx(ece)


def test_classwise_ece_two_classes_hand_computed():
    # 2 bins, edges 0, 0.5, 1. Labels [0, 0, 1, 1].
    # class 0: p = [0.9, 0.6, 0.3, 0.2]; [0, 0.5): {0.3, 0.2} acc 0, conf 0.25 -> 1/2 * 0.25 = 0.125
    #                                    [0.5, 1): {0.9, 0.6} acc 1, conf 0.75 -> 1/2 * 0.25 = 0.125  => 0.25
    # class 1: p = [0.1, 0.4, 0.7, 0.8]; [0, 0.5): {0.1, 0.4} acc 0, conf 0.25 -> 0.125
    #                                    [0.5, 1): {0.7, 0.8} acc 1, conf 0.75 -> 0.125               => 0.25
    # mean over classes: 0.25
    probs = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]
    assert classwise_ece(probs, [0, 0, 1, 1], n_bins=2) == pytest.approx(0.25, abs=1e-12)
    # Labels [1, 0, 0, 1]: class 0 bins {0.3, 0.2}: acc 1/2, conf 0.25 -> 0.125; {0.9, 0.6}: acc 1/2, conf 0.75 -> 0.125
    # class 1 mirrors class 0 -> 0.25; mean 0.25.
    assert classwise_ece(probs, [1, 0, 0, 1], n_bins=2) == pytest.approx(0.25, abs=1e-12)
    # Labels [0, 1, 0, 1] with 10 bins: every probability is alone in its bin, so ECE_k = mean_i |hit_ik - p_ik|:
    # class 0: (|1 - 0.9| + |0 - 0.6| + |1 - 0.3| + |0 - 0.2|) / 4 = 0.4, class 1 likewise 0.4 -> mean 0.4
    assert classwise_ece(probs, [0, 1, 0, 1], n_bins=10) == pytest.approx(0.4, abs=1e-12)


def test_classwise_ece_three_classes_hand_computed():
    # 2 bins. probs [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], labels [0, 2]
    # class 0: {0.6} in [0.5, 1): acc 1 -> 1/2 * 0.4 = 0.2; {0.2} in [0, 0.5): acc 0 -> 1/2 * 0.2 = 0.1 => 0.3
    # class 1: {0.3, 0.2} in [0, 0.5): acc 0, conf 0.25 => 0.25
    # class 2: {0.1}: acc 0 -> 0.05; {0.6}: acc 1 -> 0.2 => 0.25
    # mean: 0.8 / 3
    probs = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]
    assert classwise_ece(probs, [0, 2], n_bins=2) == pytest.approx(0.8 / 3, abs=1e-12)


def test_classwise_ece_matches_loop_reference():
    probs, labels = random_probs(150, 5, seed=3, dtype=torch.float64)
    probs, labels = probs.numpy(), labels.numpy()
    for n_bins in (1, 4, 10):
        per_class = []
        for k in range(5):
            p, hit = probs[:, k], labels == k
            index = np.minimum(np.floor(p * n_bins), n_bins).astype(int)  # no probability is exactly on an edge here
            ece = 0.0
            for b in np.unique(index):
                in_bin = index == b
                ece += in_bin.mean() * abs(hit[in_bin].mean() - p[in_bin].mean())
            per_class.append(ece)
        assert classwise_ece(probs, labels, n_bins=n_bins) == pytest.approx(np.mean(per_class))


def test_brier_and_nll_hand_computed():
    probs = [[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]
    labels = [0, 1]
    # (0.3^2 + 0.2^2 + 0.1^2 + 0.5^2 + 0.5^2 + 0^2) / 2 = (0.14 + 0.5) / 2
    assert brier_score(probs, labels) == pytest.approx(0.32, abs=1e-12)
    # -(log 0.7 + log 0.5) / 2 = (0.3566749439 + 0.6931471806) / 2
    assert negative_log_likelihood(probs, labels) == pytest.approx(0.5249110622493389, abs=1e-12)
    # zero probability on the answer: clamped to NLL_EPS
    assert negative_log_likelihood([[1.0, 0.0]], [1]) == pytest.approx(-math.log(NLL_EPS))
    assert negative_log_likelihood([[1.0, 0.0]], [0]) == 0.0
    assert brier_score([[1.0, 0.0]], [1]) == 2.0
    assert brier_score([[0.0, 1.0]], [1]) == 0.0


def test_brier_and_nll_match_direct_formulas():
    probs, labels = random_probs(100, 4, seed=5, dtype=torch.float64)
    p, y = probs.numpy(), labels.numpy()
    onehot = np.eye(4)[y]
    assert brier_score(probs, labels) == pytest.approx(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    assert negative_log_likelihood(probs, labels) == pytest.approx(np.mean(-np.log(p[np.arange(100), y])))
    expected_nll = torch.nn.functional.nll_loss(probs.log(), labels).item()
    assert negative_log_likelihood(probs, labels) == pytest.approx(expected_nll)


def test_auroc_hand_computed():
    # right: 0.9, 0.8; wrong: 0.8, 0.4. Pairs (right, wrong): 0.9>0.8, 0.9>0.4, 0.8=0.8 (1/2), 0.8>0.4 -> 3.5 / 4
    assert confidence_auroc([0.9, 0.8, 0.8, 0.4], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert confidence_auroc([0.9, 0.1], [1, 0]) == 1.0
    assert confidence_auroc([0.9, 0.1], [0, 1]) == 0.0
    assert confidence_auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5


def test_auroc_degenerate_is_nan_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(confidence_auroc([0.2, 0.9], [True, True]))
        assert math.isnan(confidence_auroc([0.2], [0]))
        report = calibration_report([[0.9, 0.1], [0.2, 0.8]], [0, 1])
    assert math.isnan(report["auroc"])


# ---------------------------------------------------------------------------------------------------------------------
# calibration_report and reliability_diagram_data
# ---------------------------------------------------------------------------------------------------------------------


def test_calibration_report_keys_types_and_consistency():
    probs, labels = random_probs(120, 4, seed=7, dtype=torch.float64)
    report = calibration_report(probs, labels, n_bins=8)
    assert set(report) == REPORT_KEYS
    assert report["n"] == 120 and report["n_bins"] == 8
    assert type(report["n"]) is int and type(report["n_bins"]) is int
    for key in REPORT_KEYS - {"n", "n_bins"}:
        assert type(report[key]) is float, key
    conf, pred = probs.max(dim=1)
    correct = pred == labels
    assert report["accuracy"] == pytest.approx(correct.double().mean().item())
    assert report["mean_confidence"] == pytest.approx(conf.mean().item())
    assert report["ece"] == pytest.approx(expected_calibration_error(conf, correct, n_bins=8))
    assert report["ece_equal_mass"] == pytest.approx(
        expected_calibration_error(conf, correct, n_bins=8, strategy="quantile")
    )
    assert report["mce"] == pytest.approx(maximum_calibration_error(conf, correct, n_bins=8))
    assert report["cw_ece"] == pytest.approx(classwise_ece(probs, labels, n_bins=8))
    assert report["brier"] == pytest.approx(brier_score(probs, labels))
    assert report["nll"] == pytest.approx(negative_log_likelihood(probs, labels))
    assert report["auroc"] == pytest.approx(confidence_auroc(conf, correct))
    json.dumps(report)


def test_calibration_report_argmax_ties_go_to_lowest_index():
    assert calibration_report([[0.5, 0.5]], [0])["accuracy"] == 1.0
    assert calibration_report([[0.5, 0.5]], [1])["accuracy"] == 0.0
    assert calibration_report([[0.2, 0.4, 0.4]], [1])["accuracy"] == 1.0


def test_accepts_numpy_torch_and_lists():
    probs, labels = random_probs(30, 3, seed=11, dtype=torch.float64)
    expected = calibration_report(probs, labels)
    for p, y in [
        (probs.numpy(), labels.numpy()),
        (probs.tolist(), labels.tolist()),
        (probs.float().numpy().astype(np.float64), labels.int()),
        (probs.numpy(), labels.numpy().astype(np.float32)),  # integral floats are fine as labels
    ]:
        report = calibration_report(p, y)
        for key in REPORT_KEYS:
            assert report[key] == pytest.approx(expected[key], abs=1e-6), key
    conf = probs.max(dim=1).values
    correct = probs.argmax(dim=1) == labels
    ece = expected_calibration_error(conf, correct)
    assert expected_calibration_error(conf.numpy(), correct.numpy()) == ece
    assert expected_calibration_error(conf.tolist(), correct.int().tolist()) == ece
    exact = torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.75, 0.125]])
    bf16 = calibration_report(exact.bfloat16(), [0, 2])
    assert bf16 == calibration_report(exact.double(), torch.tensor([0, 2]))


def test_reliability_diagram_data_structure():
    rng = np.random.default_rng(3)
    conf = rng.uniform(0.5, 1.0, size=64)
    correct = rng.uniform(size=64) < conf
    data = reliability_diagram_data(conf, correct, n_bins=10)
    assert set(data) == {"bin_edges", "bin_counts", "bin_accuracy", "bin_confidence", "ece", "n_bins"}
    assert data["n_bins"] == 10
    assert data["bin_edges"] == pytest.approx([i / 10 for i in range(11)])
    assert len(data["bin_counts"]) == len(data["bin_accuracy"]) == len(data["bin_confidence"]) == 10
    assert sum(data["bin_counts"]) == 64
    assert data["bin_counts"][:5] == [0] * 5 and data["bin_accuracy"][:5] == [None] * 5
    assert data["ece"] == pytest.approx(expected_calibration_error(conf, correct))
    for lo, hi, c in zip(data["bin_edges"], data["bin_edges"][1:], data["bin_confidence"]):
        assert c is None or lo <= c <= hi
    # strict JSON: no NaN anywhere
    assert json.loads(json.dumps(data, allow_nan=False)) == data


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probs,labels,match",
    [
        (np.zeros((0, 3)), [], "`probs` is empty: calibration metrics need at least one example"),
        ([0.5, 0.5], [0], "`probs` must be 2-D"),
        (np.ones((2, 2, 2)) / 2, [0, 1], "`probs` must be 2-D"),
        (np.zeros((2, 0)), [0, 1], "`probs` must have at least one option"),
        ([[0.5, 0.5]], [[0]], "`labels` must be 1-D"),
        ([[0.5, 0.5], [0.5, 0.5]], [0], "`labels` must have one entry per row of `probs`"),
        ([[0.5, 0.5]], [2], r"`labels` must be class indices in \[0, 2\)"),
        ([[0.5, 0.5]], [-1], r"`labels` must be class indices in \[0, 2\)"),
        ([[0.5, 0.5]], [0.5], "`labels` must be integer class indices"),
        ([[float("nan"), 0.5]], [0], "`probs` contains NaN or infinite values"),
        ([[float("inf"), 0.5]], [0], "`probs` contains NaN or infinite values"),
        ([[1.5, -0.5]], [0], "`probs` must be non-negative"),
        ([[2.0, 1.0]], [0], "pass softmax probabilities, not logits"),
        ([[0.5, 0.49]], [0], "row 0 sums to 0.99"),
        ([["a", "b"]], [0], "`probs` must be numeric"),
    ],
)
def test_probs_labels_validation(probs, labels, match):
    for fn in (calibration_report, classwise_ece, brier_score, negative_log_likelihood):
        with pytest.raises(ValueError, match=match):
            fn(probs, labels)


def test_row_sum_tolerance():
    calibration_report([[0.5, 0.4995]], [0])  # within 1e-3
    with pytest.raises(ValueError, match=r"must sum to 1 \(within 0.001\)"):
        calibration_report([[0.5, 0.498]], [0])


@pytest.mark.parametrize(
    "confidences,correct,match",
    [
        ([], [], "`confidences` is empty: calibration metrics need at least one example"),
        ([[0.5]], [1], "`confidences` must be 1-D"),
        ([0.5], [[1]], "`correct` must be 1-D"),
        ([0.5, 0.6], [1], "`correct` must have one entry per confidence"),
        ([float("nan")], [1], "`confidences` contains NaN or infinite values"),
        ([-0.1], [1], r"`confidences` must lie in \[0, 1\]"),
        ([1.2], [1], r"`confidences` must lie in \[0, 1\]"),
        ([0.5], [2], "`correct` must contain only True/False or 1/0 values"),
        ([0.5], [0.5], "`correct` must contain only True/False or 1/0 values"),
    ],
)
def test_confidence_validation(confidences, correct, match):
    for fn in (expected_calibration_error, maximum_calibration_error, confidence_auroc, reliability_diagram_data):
        with pytest.raises(ValueError, match=match):
            fn(confidences, correct)


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True, "10", None])
def test_n_bins_validation(n_bins):
    with pytest.raises(ValueError, match="`n_bins` must be a positive integer"):
        expected_calibration_error([0.5], [1], n_bins=n_bins)
    with pytest.raises(ValueError, match="`n_bins` must be a positive integer"):
        maximum_calibration_error([0.5], [1], n_bins=n_bins)
    with pytest.raises(ValueError, match="`n_bins` must be a positive integer"):
        reliability_diagram_data([0.5], [1], n_bins=n_bins)
    with pytest.raises(ValueError, match="`n_bins` must be a positive integer"):
        classwise_ece([[0.5, 0.5]], [1], n_bins=n_bins)
    with pytest.raises(ValueError, match="`n_bins` must be a positive integer"):
        calibration_report([[0.5, 0.5]], [1], n_bins=n_bins)


def test_n_bins_accepts_numpy_integers():
    assert expected_calibration_error([0.5], [1], n_bins=np.int64(4)) == pytest.approx(0.5)


def test_unknown_strategy():
    with pytest.raises(ValueError, match=r"`strategy` must be one of \('uniform', 'quantile'\), got 'equal'"):
        expected_calibration_error([0.5], [1], strategy="equal")


# ---------------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def confidences_and_correct(draw, max_size=60):
    n = draw(st.integers(1, max_size))
    conf = draw(
        st.lists(
            st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0])), min_size=n, max_size=n
        )
    )
    correct = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return conf, correct


@st.composite
def probs_and_labels(draw, max_n=40, max_k=6):
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    # small integer weights: many ties, within rows (argmax ties) and across examples (equal confidences)
    weights = np.array(draw(st.lists(st.integers(0, 4), min_size=n * k, max_size=n * k)), dtype=np.float64)
    weights = weights.reshape(n, k)
    weights[weights.sum(axis=1) == 0, 0] = 1.0
    labels = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    return weights / weights.sum(axis=1, keepdims=True), labels


SETTINGS = settings(max_examples=60, deadline=None)


def reference_bins(conf, n_bins):
    """
    The documented equal-width bin of each confidence, one at a time: `#{j in 1..n : c >= j / n}` (the edges as Python
    computes `j / n`) for `c < 1`, and a bin of its own for `c == 1`.
    """
    return [n_bins if c == 1.0 else sum(c >= j / n_bins for j in range(1, n_bins + 1)) for c in conf]


def reference_gaps(groups):
    """ECE and MCE of groups of `(confidence, correct)` pairs: the weighted mean and the max of `|acc - conf|`."""
    n = sum(len(g) for g in groups)
    gaps = [abs(sum(y for _, y in g) / len(g) - sum(c for c, _ in g) / len(g)) for g in groups if g]
    return sum(len(g) / n * gap for g, gap in zip([g for g in groups if g], gaps)), max(gaps)


def reference_ece_mce(conf, correct, n_bins):
    bins = reference_bins(conf, n_bins)
    return reference_gaps([[(c, y) for c, y, b2 in zip(conf, correct, bins) if b2 == b] for b in range(n_bins + 1)])


def reference_equal_mass_ece(conf, correct, n_bins):
    """Sorted by confidence, ties wrong first, cut into `n_bins` groups, the larger ones first (`numpy.array_split`)."""
    order = sorted(range(len(conf)), key=lambda i: (conf[i], bool(correct[i])))
    return reference_gaps([[(conf[i], correct[i]) for i in group] for group in np.array_split(order, n_bins)])[0]


@SETTINGS
@given(confidences_and_correct(), st.integers(1, 20))
def test_ece_and_mce_match_a_one_at_a_time_reference(data, n_bins):
    # confidences on the edges and ties included: the documented binning, and the equal-mass cut
    conf, correct = data
    ece, mce = reference_ece_mce(conf, correct, n_bins)
    assert expected_calibration_error(conf, correct, n_bins=n_bins) == pytest.approx(ece, abs=1e-12)
    assert maximum_calibration_error(conf, correct, n_bins=n_bins) == pytest.approx(mce, abs=1e-12)
    assert reliability_diagram_data(conf, correct, n_bins=n_bins)["ece"] == pytest.approx(ece, abs=1e-12)
    assert expected_calibration_error(conf, correct, n_bins=n_bins, strategy="quantile") == pytest.approx(
        reference_equal_mass_ece(conf, correct, n_bins), abs=1e-12
    )


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(1, 12), st.integers(0, 12)), min_size=1, max_size=15),
    st.integers(1, 20),
    st.randoms(use_true_random=False),
)
def test_perfectly_calibrated_groups_have_zero_ece(groups, n_bins, rnd):
    # Each group of m examples with k right answers has confidence k / m. Any bin then holds whole groups, its
    # mean confidence sum(k) / sum(m) equals its accuracy, so ECE and MCE are 0.
    conf, correct = [], []
    for m, k in groups:
        k = min(k, m)
        conf += [k / m] * m
        correct += [1] * k + [0] * (m - k)
    order = list(range(len(conf)))
    rnd.shuffle(order)
    conf, correct = [conf[i] for i in order], [correct[i] for i in order]
    assert expected_calibration_error(conf, correct, n_bins=n_bins) == pytest.approx(0.0, abs=1e-12)
    assert maximum_calibration_error(conf, correct, n_bins=n_bins) == pytest.approx(0.0, abs=1e-12)


@SETTINGS
@given(probs_and_labels(), st.integers(1, 15), st.randoms(use_true_random=False))
def test_calibration_report_is_invariant_to_sample_order(data, n_bins, rnd):
    probs, labels = data
    order = list(range(len(labels)))
    rnd.shuffle(order)
    report = calibration_report(probs, labels, n_bins=n_bins)
    shuffled = calibration_report(probs[order], labels[order], n_bins=n_bins)
    assert set(report) == REPORT_KEYS
    for key in REPORT_KEYS:
        if isinstance(report[key], float) and math.isnan(report[key]):
            assert math.isnan(shuffled[key]), key
        else:
            assert shuffled[key] == pytest.approx(report[key], abs=1e-12), key


@SETTINGS
@given(probs_and_labels(), st.integers(1, 15))
def test_report_matches_one_at_a_time_references(data, n_bins):
    # many ties (within rows and across them): every metric of the report from its definition, in plain Python
    probs, labels = data
    report = calibration_report(probs, labels, n_bins=n_bins)
    rows, y, n = probs.tolist(), labels.tolist(), len(labels)
    pred = [row.index(max(row)) for row in rows]  # argmax ties go to the lowest index
    conf = [max(row) for row in rows]
    correct = [int(p == t) for p, t in zip(pred, y)]
    assert report["n"] == n and report["accuracy"] == pytest.approx(sum(correct) / n, abs=1e-12)
    assert report["mean_confidence"] == pytest.approx(sum(conf) / n, abs=1e-12)
    ece, mce = reference_ece_mce(conf, correct, n_bins)
    assert report["ece"] == pytest.approx(ece, abs=1e-12) and report["mce"] == pytest.approx(mce, abs=1e-12)
    assert report["ece_equal_mass"] == pytest.approx(reference_equal_mass_ece(conf, correct, n_bins), abs=1e-12)
    per_class = [
        reference_ece_mce([row[k] for row in rows], [int(t == k) for t in y], n_bins)[0] for k in range(len(rows[0]))
    ]
    assert report["cw_ece"] == pytest.approx(sum(per_class) / len(per_class), abs=1e-12)
    brier = sum(sum((p - (k == t)) ** 2 for k, p in enumerate(row)) for row, t in zip(rows, y)) / n
    assert report["brier"] == pytest.approx(brier, abs=1e-12)
    nll = sum(-math.log(max(row[t], NLL_EPS)) for row, t in zip(rows, y)) / n
    assert report["nll"] == pytest.approx(nll, abs=1e-9)
    right = [c for c, ok in zip(conf, correct) if ok]
    wrong = [c for c, ok in zip(conf, correct) if not ok]
    if right and wrong:  # the chance that a right answer is more confident than a wrong one, ties counting half
        pairs = sum((a > b) + 0.5 * (a == b) for a in right for b in wrong)
        assert report["auroc"] == pytest.approx(pairs / (len(right) * len(wrong)), abs=1e-12)
    else:
        assert math.isnan(report["auroc"])


# ---------------------------------------------------------------------------------------------------------------------
# Smooth ECE
# ---------------------------------------------------------------------------------------------------------------------


def direct_smooth_ece_at(f, y, sigma, points=20001):
    """smECE_sigma written from its definition: the reflected-Gaussian smoothing summed over images, integrated densely."""
    t = np.linspace(0, 1, points)[:, None]
    kernel = sum(
        np.exp(-0.5 * ((t - f[None, :] - 2 * m) / sigma) ** 2) + np.exp(-0.5 * ((t + f[None, :] - 2 * m) / sigma) ** 2)
        for m in range(-3, 4)
    ) / (np.sqrt(2 * np.pi) * sigma)
    density = np.abs(kernel @ (f - y)) / len(f)
    return np.trapezoid(density, t[:, 0])


@pytest.mark.parametrize("seed", range(4))
def test_smooth_ece_at_a_bandwidth_matches_its_definition(seed):
    from calib_trl.metrics import _smooth_ece_at

    rng = np.random.default_rng(seed)
    f = rng.uniform(size=40) ** (seed + 1)
    y = (rng.uniform(size=40) < f**0.5).astype(float)
    for sigma in (0.02, 0.1, 0.5):
        assert _smooth_ece_at(f, f - y, sigma) == pytest.approx(direct_smooth_ece_at(f, y, sigma), abs=2e-4)


@pytest.mark.parametrize("seed", range(6))
def test_smooth_ece_matches_relplot(seed):
    relplot = pytest.importorskip("relplot")
    rng = np.random.default_rng(seed)
    n = [5, 30, 200, 2000, 50, 1000][seed]
    f = rng.uniform(size=n) ** [1, 0.3, 2, 1, 0.5, 3][seed]
    y = (rng.uniform(size=n) < f ** [1, 2, 0.5, 1.3, 1, 1][seed]).astype(float)
    # relplot finds its bandwidth with 10 halvings (about 1e-3) and smooths on a coarser grid
    assert smooth_ece(f, y) == pytest.approx(relplot.smECE(f, y), abs=5e-3)


def test_smooth_ece_hand_computed_cases():
    assert smooth_ece([1.0, 1.0, 1.0], [0, 0, 0]) == pytest.approx(1.0, abs=1e-6)  # certain and always wrong
    assert smooth_ece([0.0, 0.0], [1, 1]) == pytest.approx(1.0, abs=1e-6)
    assert smooth_ece([0.5] * 4, [1, 0, 1, 0]) == pytest.approx(0.0, abs=1e-9)  # exactly calibrated
    rng = np.random.default_rng(0)
    f = rng.uniform(size=20000)
    assert smooth_ece(f, rng.uniform(size=20000) < f) < 0.02  # calibrated in expectation
    assert smooth_ece(f, rng.uniform(size=20000) < f**2) > 0.1  # overconfident


def test_smooth_ece_is_in_the_report_and_order_invariant():
    probs, labels = random_probs(300, 4, seed=3)
    report = calibration_report(probs, labels)
    conf, pred = probs.max(dim=1)
    assert report["smooth_ece"] == smooth_ece(conf, pred == labels)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    assert calibration_report(probs[perm], labels[perm])["smooth_ece"] == pytest.approx(
        report["smooth_ece"], abs=1e-12
    )


def test_calibration_gaps_hand_computed():
    report = calibration_report([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.9, 0.05, 0.05]], [0, 2, 0])
    train = calibration_report([[0.6, 0.4], [0.2, 0.8]], [0, 1])
    gaps = calibration_gaps(report, train)
    assert gaps["confidence_gap"] == pytest.approx(abs(2 / 3 - (0.7 + 0.5 + 0.9) / 3))
    assert gaps["train_accuracy"] == 1.0 and gaps["accuracy_gap"] == pytest.approx(1 - 2 / 3)
    assert set(calibration_gaps(report)) == {"confidence_gap"}


@settings(max_examples=60, deadline=None)
@given(data=probs_and_labels(), n_bins=st.integers(1, 20))
def test_confidence_gap_is_a_lower_bound_on_ece(data, n_bins):
    probs, labels = data
    report = calibration_report(probs, labels, n_bins=n_bins)
    gap = calibration_gaps(report)["confidence_gap"]
    assert gap <= report["ece"] + 1e-9 and gap <= report["ece_equal_mass"] + 1e-9
