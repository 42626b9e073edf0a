import json

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from calib_trl.evaluation.plotting import plot_reliability_diagram, plot_reliability_diagrams
from calib_trl.metrics import reliability_diagram_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample(n=300, seed=0, low=0.0):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(low, 1.0, size=n)
    correct = rng.uniform(size=n) < conf - 0.1
    return conf, correct


def accuracy_bars(ax):
    return [patch for patch in ax.patches if patch.get_gid() == "accuracy"]


def count_labels(ax):
    return [text for text in ax.texts if text.get_gid() == "bin_count"]


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15])
def test_one_bar_per_bin(n_bins):
    conf, correct = sample()
    figure = plot_reliability_diagram(conf, correct, n_bins=n_bins)
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    bars = accuracy_bars(ax)
    assert len(bars) == n_bins
    data = reliability_diagram_data(conf, correct, n_bins=n_bins)
    for bar, lo, hi, acc in zip(bars, data["bin_edges"], data["bin_edges"][1:], data["bin_accuracy"]):
        assert bar.get_x() == pytest.approx(lo)
        assert bar.get_width() == pytest.approx(hi - lo)
        assert bar.get_height() == pytest.approx(0.0 if acc is None else acc)
    assert ax.get_xlabel() == "Confidence" and ax.get_ylabel() == "Accuracy"
    assert ax.get_xlim() == (0.0, 1.0) and ax.get_ylim() == (0.0, 1.0)


def test_count_annotations_equal_bin_counts():
    conf, correct = sample(n=157, seed=1)
    data = reliability_diagram_data(conf, correct, n_bins=10)
    figure = plot_reliability_diagram(conf, correct, n_bins=10)
    labels = count_labels(figure.axes[0])
    assert [int(t.get_text()) for t in labels] == [c for c in data["bin_counts"] if c > 0]
    centers = [(lo + hi) / 2 for lo, hi, c in zip(data["bin_edges"], data["bin_edges"][1:], data["bin_counts"]) if c]
    assert [t.get_position()[0] for t in labels] == pytest.approx(centers)


def test_ece_shown_in_legend_and_title():
    conf, correct = sample()
    data = reliability_diagram_data(conf, correct)
    figure = plot_reliability_diagram(data=data, title="base model")
    ax = figure.axes[0]
    assert ax.get_legend().get_title().get_text() == f"ECE = {data['ece']:.4f}"
    assert ax.get_title() == "base model"
    legend_labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Accuracy" in legend_labels and "Perfect calibration" in legend_labels


def test_gap_is_shaded_for_non_empty_bins():
    conf, correct = sample(low=0.5)
    data = reliability_diagram_data(conf, correct)
    ax = plot_reliability_diagram(data=data).axes[0]
    gaps = [patch for patch in ax.patches if patch.get_gid() == "gap"]
    filled = [i for i, c in enumerate(data["bin_counts"]) if c]
    assert len(gaps) == len(filled)
    for patch, i in zip(gaps, filled):
        acc, mean_conf = data["bin_accuracy"][i], data["bin_confidence"][i]
        assert patch.get_y() == pytest.approx(min(acc, mean_conf))
        assert patch.get_height() == pytest.approx(abs(mean_conf - acc))


def test_writes_png(tmp_path):
    conf, correct = sample()
    path = tmp_path / "plots" / "nested" / "reliability.png"
    plot_reliability_diagram(conf, correct, path=path)
    content = path.read_bytes()
    assert len(content) > 1000
    assert content.startswith(PNG_MAGIC)
    # a path without a suffix is written as PNG too
    plot_reliability_diagram(conf, correct, path=str(tmp_path / "plain"))
    assert (tmp_path / "plain").read_bytes().startswith(PNG_MAGIC)


def test_draws_on_given_axes():
    figure = Figure()
    ax_left, ax_right = figure.subplots(1, 2)
    conf, correct = sample()
    returned = plot_reliability_diagram(conf, correct, n_bins=8, ax=ax_right)
    assert returned is figure
    assert len(accuracy_bars(ax_right)) == 8
    assert len(ax_left.patches) == 0 and len(ax_left.texts) == 0


def test_empty_bins():
    # only two bins hold examples
    conf = [0.91, 0.95, 0.99, 0.42]
    correct = [1, 1, 0, 0]
    data = reliability_diagram_data(conf, correct)
    assert data["bin_counts"] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 3]
    ax = plot_reliability_diagram(conf, correct).axes[0]
    bars = accuracy_bars(ax)
    assert len(bars) == 10
    assert [bar.get_height() for bar in bars] == pytest.approx([0, 0, 0, 0, 0, 0, 0, 0, 0, 2 / 3])
    assert [t.get_text() for t in count_labels(ax)] == ["1", "3"]


def test_nearly_full_bar_keeps_its_count_inside_the_axes():
    ax = plot_reliability_diagram([0.97, 0.98], [1, 1]).axes[0]
    (label,) = count_labels(ax)
    assert label.get_text() == "2"
    assert label.get_position()[1] < 1.0


def test_accepts_json_round_tripped_data():
    conf, correct = sample(low=0.6)
    data = json.loads(json.dumps(reliability_diagram_data(conf, correct, n_bins=12)))
    ax = plot_reliability_diagram(data=data).axes[0]
    assert len(accuracy_bars(ax)) == 12
    assert [int(t.get_text()) for t in count_labels(ax)] == [c for c in data["bin_counts"] if c]


def test_does_not_touch_pyplot_or_backend():
    backend = matplotlib.get_backend()
    conf, correct = sample()
    plot_reliability_diagram(conf, correct)
    plot_reliability_diagrams({"a": (conf, correct)})
    assert matplotlib.get_backend() == backend
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []


def test_side_by_side_panels(tmp_path):
    base = sample(seed=2)
    tuned = sample(seed=3, low=0.4)
    path = tmp_path / "compare" / "before_after.png"
    figure = plot_reliability_diagrams(
        {"base": base, "CogCalib": reliability_diagram_data(*tuned, n_bins=10)}, path=path, suptitle="MMLU"
    )
    assert [ax.get_title() for ax in figure.axes] == ["base", "CogCalib"]
    for ax, (conf, correct) in zip(figure.axes, (base, tuned)):
        assert len(accuracy_bars(ax)) == 10
        counts = reliability_diagram_data(conf, correct)["bin_counts"]
        assert [int(t.get_text()) for t in count_labels(ax)] == [c for c in counts if c]
    assert figure.get_suptitle() == "MMLU"
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_panels_use_n_bins_for_raw_inputs():
    figure = plot_reliability_diagrams({"a": sample(), "b": sample(seed=4)}, n_bins=6)
    assert [len(accuracy_bars(ax)) for ax in figure.axes] == [6, 6]


def test_argument_errors():
    conf, correct = sample()
    data = reliability_diagram_data(conf, correct)
    with pytest.raises(ValueError, match="not both"):
        plot_reliability_diagram(conf, correct, data=data)
    with pytest.raises(ValueError, match="pass `confidences` and `correct`"):
        plot_reliability_diagram()
    with pytest.raises(ValueError, match="pass `confidences` and `correct`"):
        plot_reliability_diagram(conf)
    with pytest.raises(ValueError, match="must be the dict returned by `reliability_diagram_data`"):
        plot_reliability_diagram(data={"ece": 0.1})
    with pytest.raises(ValueError, match="inconsistent lengths"):
        plot_reliability_diagram(data={**data, "bin_counts": data["bin_counts"][:-1]})
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_reliability_diagrams({})
    with pytest.raises(ValueError, match="panel 'x'"):
        plot_reliability_diagrams({"x": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="`confidences` must lie in"):
        plot_reliability_diagram([1.5], [1])
