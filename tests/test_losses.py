"""calib_trl.losses: the chunked logit penalty, the LS identity, RCFT's target and ECE term."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from calib_trl import losses
from calib_trl.losses import ChunkedLogitPenalty, label_smoothing_term, rcft_ece_loss, rcft_target
from calib_trl.metrics import equal_width_bins


def authors_target(p, acc):
    """RCFT's target written as the design states it, one row at a time, on the sorted non-top probabilities."""
    k = len(p)
    top = max(range(k), key=lambda j: (p[j], -j))
    others = sorted([j for j in range(k) if j != top], key=lambda j: -p[j])
    q = [p[j] for j in others]
    t = [0.0] * k
    t[top] = acc
    if acc < 1:
        gamma = math.log(k - 1) / (q[0] * (1 - acc))
        th = [math.tanh(gamma * x) for x in q]
        for j, x in zip(others, th):
            t[j] = (1 - acc) * (1 + x) / (k - 1 + sum(th))
    return t


def authors_target_torch(p: torch.Tensor, acc: float) -> torch.Tensor:
    """
    The authors' target as their code computes it (`not_max_target_confidence`, with `K - 1` for their hard-coded 3),
    differentiable: the sorted non-top probabilities `q` (descending) followed by their targets, so that
    `((q - t) ** 2).sum()` is their per-row non-top term, with the gradient flowing through `t` as in their code.
    """
    q = torch.sort(p, descending=True).values[1:]
    if acc == 1.0:
        return q, torch.zeros_like(q)
    gamma = math.log(len(p) - 1) / q[0] * (1 / (1 - acc))
    th = torch.tanh(gamma * q)
    alpha = (1 - acc) / (th.sum() + len(p) - 1)
    return q, alpha * th + alpha


def test_rcft_target_hand_computed():
    p = torch.tensor([[0.25, 0.6, 0.1, 0.05]])
    t = rcft_target(p, torch.tensor([0.5]))[0]
    # gamma = ln 3 / (0.25 * 0.5); tanh(gamma q) for q = 0.25, 0.1, 0.05
    gamma = math.log(3) / 0.125
    th = [math.tanh(gamma * q) for q in (0.25, 0.1, 0.05)]
    denom = 3 + sum(th)
    expected = [0.5 * (1 + th[0]) / denom, 0.5, 0.5 * (1 + th[1]) / denom, 0.5 * (1 + th[2]) / denom]
    torch.testing.assert_close(t, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert abs(t.sum().item() - 1) < 1e-6


def test_rcft_target_full_accuracy_and_two_options():
    t = rcft_target(torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([1.0]))
    torch.testing.assert_close(t, torch.tensor([[1.0, 0.0, 0.0]]))
    t2 = rcft_target(torch.tensor([[0.3, 0.7]]), torch.tensor([0.6]))
    torch.testing.assert_close(t2, torch.tensor([[0.4, 0.6]]))


probability_rows = st.integers(2, 8).flatmap(
    lambda k: st.lists(st.lists(st.floats(0.001, 1.0), min_size=k, max_size=k), min_size=1, max_size=6)
)


@settings(max_examples=60, deadline=None)
@given(rows=probability_rows, acc=st.floats(0.0, 1.0))
@example(rows=[[0.001, 0.0010000000000000002]], acc=0.0)  # the two options tie once rounded to float32
def test_rcft_target_properties(rows, acc):
    p = torch.tensor(rows, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    accuracy = torch.full((p.shape[0],), acc)
    t = rcft_target(p, accuracy).double()
    torch.testing.assert_close(t.sum(-1), torch.ones(p.shape[0], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert (t >= -1e-7).all()
    for row_p, row_t in zip(p.tolist(), t.tolist()):
        top = max(range(len(row_p)), key=lambda j: (row_p[j], -j))
        assert abs(row_t[top] - acc) < 1e-5
        others = [j for j in range(len(row_p)) if j != top]
        for a in others:  # rank order of the non-top entries is kept
            for b in others:
                if row_p[a] > row_p[b] + 1e-9:
                    assert row_t[a] >= row_t[b] - 1e-7
        torch.testing.assert_close(torch.tensor(row_t), torch.tensor(authors_target(row_p, acc)), rtol=1e-4, atol=1e-5)


def reference_ece_loss(p, bins, bin_accuracy, n_bins):
    total = 0.0
    for b in range(n_bins):
        rows = [i for i in range(len(bins)) if bins[i] == b]
        if not rows:
            continue
        s = 0.0
        for i in rows:
            t = authors_target(p[i].tolist(), bin_accuracy[b])
            s += sum((p[i][j].item() - t[j]) ** 2 for j in range(p.shape[1]))
        total += s / len(rows)
    return total


def test_rcft_ece_loss_matches_reference():
    torch.manual_seed(0)
    probs = torch.randn(40, 4).mul(2).softmax(-1)
    bins = equal_width_bins(probs.max(-1).values, 10, one_apart=False)
    bin_accuracy = torch.rand(10)
    loss = rcft_ece_loss(probs, bins, bin_accuracy[bins], 10)
    assert abs(loss.item() - reference_ece_loss(probs, bins.tolist(), bin_accuracy.tolist(), 10)) < 1e-5


def test_rcft_ece_loss_divides_by_given_bin_counts():
    # the authors' normalisation: each bin's sum over the batch divided by its count over the E-step
    torch.manual_seed(3)
    probs = torch.randn(12, 4).mul(2).softmax(-1)
    bins = equal_width_bins(probs.max(-1).values, 10, one_apart=False)
    bin_accuracy = torch.rand(10)
    counts = torch.arange(1.0, 11.0) * 7
    loss = rcft_ece_loss(probs, bins, bin_accuracy[bins], 10, bin_counts=counts)
    want = 0.0
    for i in range(12):
        t = authors_target(probs[i].tolist(), bin_accuracy[bins[i]].item())
        want += sum((probs[i, j].item() - t[j]) ** 2 for j in range(4)) / counts[bins[i]].item()
    assert abs(loss.item() - want) < 1e-6
    # and not the per-batch mean, which the default gives
    assert abs(rcft_ece_loss(probs, bins, bin_accuracy[bins], 10).item() - want) > 1e-3


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_rcft_target_gradient_flows_only_when_asked(k):
    # Default: the target is a constant (calib-trl). `target_gradient=True`: the authors' code, whose target is a
    # differentiable function of the probabilities it is compared with.
    torch.manual_seed(k)
    logits = torch.randn(6, k, dtype=torch.float64).mul(1.5).requires_grad_()
    bins = equal_width_bins(logits.softmax(-1).max(-1).values, 10, one_apart=False)
    acc = (torch.rand(10, dtype=torch.float64) * 0.9)[bins]
    grads = {}
    for flow in (False, True):
        probs = logits.softmax(-1)
        loss = rcft_ece_loss(probs, bins, acc, 10, bin_counts=torch.ones(10), target_gradient=flow)
        grads[flow] = torch.autograd.grad(loss, logits)[0]
        probs = logits.softmax(-1)
        reference = 0.0
        for i in range(6):
            q, t = authors_target_torch(probs[i], acc[i].item())
            t = t if flow else t.detach()
            reference = reference + (probs[i].max() - acc[i]) ** 2 + ((q - t) ** 2).sum()
        torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)
        want = torch.autograd.grad(reference, logits)[0]
        torch.testing.assert_close(grads[flow], want, rtol=1e-4, atol=1e-6)
    if k > 2:  # with two options the non-top target is `1 - acc`, a constant either way
        assert (grads[True] - grads[False]).abs().max() > 1e-4
    else:
        torch.testing.assert_close(grads[True], grads[False])


def test_top_bin_gets_the_term():
    # The authors' loss loop stops one bin short: rows with confidence >= 0.9 never get the term. calib-trl's does.
    probs = torch.tensor([[0.95, 0.03, 0.015, 0.005]], requires_grad=True)
    bins = equal_width_bins(probs.max(-1).values, 10, one_apart=False)
    assert bins.tolist() == [9]
    loss = rcft_ece_loss(probs, bins, torch.tensor([0.6]), 10)
    t = authors_target([0.95, 0.03, 0.015, 0.005], 0.6)
    assert abs(loss.item() - sum((p - x) ** 2 for p, x in zip([0.95, 0.03, 0.015, 0.005], t))) < 1e-6
    assert loss.item() > 0.1 and probs.grad is None
    loss.backward()
    assert probs.grad[0, 0] > 0  # pulls the top probability down towards the bin's accuracy


def test_rcft_bins_edges_and_top_bin():
    conf = torch.tensor([0.0, 0.05, 0.1, 0.1000001, 0.95, 1.0])
    assert equal_width_bins(conf, 10, one_apart=False).tolist() == [0, 0, 1, 1, 9, 9]


def test_ls_identity_and_chunked_penalty_match_full_logits(monkeypatch):
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 64)  # several chunks
    torch.manual_seed(1)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (7,))
    for softcap in (None, 2.5):
        z = (h @ w.t() + b) * 0.7
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        ref_mean = z.mean(-1)
        ref_pen = (z.max(-1, keepdim=True).values - z - 0.5).clamp(min=0).mean(-1)
        mean, pen = ChunkedLogitPenalty.apply(h, w, b, 0.7, softcap, 0.5, True)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pen.double(), ref_pen, rtol=1e-5, atol=1e-6)
        g = torch.randn(7, dtype=torch.float64)
        got = torch.autograd.grad((mean * g).sum() + (pen * g).sum(), (h, w, b))
        want = torch.autograd.grad((ref_mean * g).sum() + (ref_pen * g).sum(), (h, w, b))
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    z = (h @ w.t() + b) * 0.7
    torch.testing.assert_close(
        label_smoothing_term(h, y, w, b, 0.7), z.gather(1, y[:, None]).squeeze(1) - z.mean(-1), check_dtype=False
    )


# 10_000: the near sets kept sparsely; 3: the far sets where they are the smaller (wide margins), else the recompute
# fallback; 0: the recompute fallback (and empty far sets at the widest margin)
@pytest.mark.parametrize("max_near", [10_000, 3, 0])
def test_margin_penalty_matches_full_logits(monkeypatch, max_near):
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 64)  # several chunks
    torch.manual_seed(2)
    h = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(17, dtype=torch.float64, requires_grad=True)
    for margin in (0.0, 1.5, 4.0, 6.0, 100.0):
        z = (h @ w.t() + b) * 0.7
        ref = (z.max(-1, keepdim=True).values - z - margin).clamp(min=0).mean(-1)
        got = losses.MarginPenalty.apply(h, w, b, 0.7, margin, max_near)
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
        g = torch.randn(9, dtype=torch.float64)
        for a, e in zip(
            torch.autograd.grad((got * g).sum(), (h, w, b)), torch.autograd.grad((ref * g).sum(), (h, w, b))
        ):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_calibration_term_rejects_unknown_method():
    with pytest.raises(ValueError, match="Unknown calibration method"):
        losses.calibration_term(
            "focal",
            None,
            torch.zeros(1),
            None,
            None,
            None,
            ls_epsilon=0.1,
            mbls_margin=10.0,
            mbls_lambda=0.1,
            ecp_beta=0.1,
        )


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"logit_scale": 0.5},
        {"output_multiplier": 1.7},
        {"lm_head_multiplier": 0.3},
        {"logits_scaling": 4.0},
        {"final_logit_softcapping": 2.0, "logit_scale": 1.5},
    ],
)
def test_the_lm_head_transform_is_the_one_trls_fused_head_reads(fields):
    """`lm_head_transform` repeats what `add_fused_lm_head` reads off the config: the logits it gives through
    `project_logits` have the log-probabilities of TRL's fused head, for every scale field TRL knows."""
    from helpers import make_model
    from trl.trainer.utils import add_fused_lm_head

    from calib_trl.losses import lm_head_transform, project_logits

    model = make_model(40, seed=3)
    for name, value in fields.items():
        setattr(model.config, name, value)
    add_fused_lm_head(model)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, model.config.hidden_size)
        head = model.get_output_embeddings()
        z = project_logits(hidden, head.weight, head.bias, lm_head_transform(model))
    ours = z.log_softmax(-1).gather(1, ids[:, 1:].reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(ours, fused.log_probs[fused.label_mask].float(), rtol=1e-5, atol=1e-5)
