"""Calibration loss terms computed without materialising `[batch, seq, vocab]` logits.

CogCalib adds a calibration term to the cross-entropy of the tokens of *known* examples. Written per token, with
`z` the logits over the vocabulary `V`, `y` the label, `p = softmax(z)` and `NLL = -log p_y`:

- label smoothing (`ls`):       LS_eps  = (1 - eps) NLL + eps mean_v(-log p_v) = NLL + eps (z_y - mean_v z_v)
- margin-based LS (`mbls`):     MbLS    = NLL + lambda mean_v relu(max_k z_k - z_v - m)
- confidence penalty (`ecp`):   ECP     = NLL - beta H(p)

so every method is `NLL + term`, and the trainer only needs the per-token `term`:

- `ls`: `z_y - mean_v z_v`. Without final-logit soft-capping, `z = s (h W^T + b)`, so
  `z_y - mean_v z_v = s (h . (W_y - mean_v W_v) + b_y - mean_v b_v)`: one gather and one mean over the rows of the
  LM head, `O(tokens x hidden)` (`label_smoothing_term`). With soft-capping the identity does not hold, and the exact
  mean is computed by `ChunkedLogitPenalty` instead.
- `mbls`: needs the max logit, so `MarginPenalty` projects the selected tokens through the LM head once, in token
  chunks (a bounded `[chunk, V]` buffer), and keeps only the few logits within the margin of the max: the backward
  needs no projection (with soft-capping, `ChunkedLogitPenalty` recomputes each chunk in the backward instead).
- `ecp`: the entropy that TRL's fused LM head already returns, with its gradient.

`rcft_target` and `rcft_ece_loss` implement the ECE regulariser of RCFT (see `calib_trl.rcft_trainer`).
"""

from __future__ import annotations

import math

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

# Elements of the `[chunk, V]` logits buffer of `ChunkedLogitPenalty` (64 MiB in float32)
_CHUNK_ELEMENTS = 1 << 24


def lm_head_transform(model) -> dict:
    """
    How a causal LM turns `hidden @ lm_head.weight.T (+ bias)` into logits: `logit_scale` and `softcap`, read from the
    config exactly as TRL's fused LM head reads them. TRL computes them inline in `trl.trainer.utils.add_fused_lm_head`,
    with no function of its own to import, so the reading is repeated here; `tests/test_losses.py` compares the logits
    it gives with TRL's fused head on models that scale and soft-cap their logits, so that a model TRL learns to read
    and this function does not fails a test.
    """
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return {"logit_scale": 1.0 if scale is None else float(scale), "softcap": softcap}


def full_lm_head_params(lm_head: torch.nn.Module):
    """
    The LM head's weight and bias as full tensors, plus a context that keeps them gathered.

    FSDP2 shards parameters as DTensors (gathered with `full_tensor()`, differentiable); DeepSpeed ZeRO-3 partitions
    them to empty tensors that are only materialised inside their module's forward, so they are gathered for the
    duration of the context (TRL's `maybe_gather_lm_head_ctx`).
    """
    weight, bias = lm_head.weight, lm_head.bias
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if DTensor and isinstance(weight, DTensor):
        weight = weight.full_tensor()
        if bias is not None:
            bias = bias.full_tensor()
    return weight, bias, _gather_lm_head(lm_head.weight, lm_head.bias)


def _gather_lm_head(weight: torch.Tensor, bias: torch.Tensor | None):
    """A context that keeps a ZeRO-3-partitioned LM head gathered (TRL's `maybe_gather_lm_head_ctx`; a no-op otherwise)."""
    return maybe_gather_lm_head_ctx(weight, bias)


def label_smoothing_term(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, logit_scale: float
) -> torch.Tensor:
    """
    `z_y - mean_v z_v` per token through the identity `s (h . (W_y - mean_v W_v) + b_y - mean_v b_v)`.

    Args:
        hidden: `[N, H]` final hidden states of the selected tokens.
        labels: `[N]` their next-token labels.
        weight: `[V, H]` LM head weight; bias: `[V]` or `None`.
        logit_scale: the model's logit multiplier.

    Only valid without final-logit soft-capping; `ChunkedLogitPenalty` covers that case.
    """
    # In float32: under bf16 the difference of two nearby logits would lose most of its digits
    direction = weight[labels].float() - weight.float().mean(0)  # [N, H]
    term = (hidden.float() * direction).sum(-1)
    if bias is not None:
        term = term + (bias[labels] - bias.mean()).float()
    return logit_scale * term


def project_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    transform: dict,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    float32 logits `transform(hidden @ weight[rows].T + bias[rows])` of some rows of the LM head (all when `rows` is
    `None`), for `[N, H]` hidden states: the option letters' logits at answer positions, or every token's logits for
    a chunk of tokens. Projected in float32, so that bf16 does not round logits whose differences matter.
    """
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    y = hidden.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return _transform(y, transform["logit_scale"], transform["softcap"])[0]


def _transform(y: torch.Tensor, logit_scale: float, softcap: float | None):
    """Logits from the raw projection `y`, and `dz/dy` (needed by the backward)."""
    if logit_scale != 1.0:
        y = y * logit_scale
    if softcap is None:
        return y, None
    t = torch.tanh(y / softcap)
    return softcap * t, (1 - t * t)


def _chunk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dtype,
    logit_scale: float,
    softcap: float | None,
):
    """float32 logits of a chunk of tokens, projected in `dtype` (the autocast dtype), and `dz/dy` (see `_transform`)."""
    y = hidden.to(dtype) @ weight.t()
    if bias is not None:
        y = y + bias.to(dtype)
    return _transform(y.float(), logit_scale, softcap)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the LM head projects in: autocast's when it is on, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class ChunkedLogitPenalty(torch.autograd.Function):
    """
    Per-token `mean_v z_v` and `mean_v relu(max_k z_k - z_v - margin)` of `z = transform(hidden @ weight.T + bias)`,
    exact, without the `[N, V]` logits: tokens are projected in chunks of `[chunk, V]`, and the backward recomputes
    each chunk and turns it into the gradient in place.

    The margin term's subgradient sends `-1/V` to each logit more than `margin` below the max and `+count/V` to the
    max (the first maximal index, as `torch.max`), matching autograd on the full logits.

    Returns `(mean_logit, margin_penalty)`, each `[N]` float32 or `None` when not requested.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # [N, H]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        logit_scale: float,
        softcap: float | None,
        margin: float | None,  # None: no margin penalty
        want_mean: bool,
    ):
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        dtype = _compute_dtype(hidden)
        mean = torch.zeros(n, device=hidden.device, dtype=torch.float32) if want_mean else None
        penalty = torch.zeros(n, device=hidden.device, dtype=torch.float32) if margin is not None else None
        max_val = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        max_idx = torch.zeros(n, device=hidden.device, dtype=torch.long)
        w = weight.to(dtype)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            z, _ = _chunk_logits(hidden[start:end], w, bias, dtype, logit_scale, softcap)
            if want_mean:
                mean[start:end] = z.mean(-1)
            if margin is not None:
                m, idx = z.max(-1)
                max_val[start:end], max_idx[start:end] = m, idx
                penalty[start:end] = ((m - margin).unsqueeze(-1) - z).clamp(min=0).mean(-1)
        ctx.save_for_backward(hidden, weight, bias, max_val, max_idx)
        ctx.args = (logit_scale, softcap, margin, want_mean, dtype, chunk)
        return mean, penalty

    @staticmethod
    def backward(ctx, grad_mean, grad_penalty):
        hidden, weight, bias, max_val, max_idx = ctx.saved_tensors
        margin, want_mean = ctx.args[2], ctx.args[3]
        use_mean = want_mean and grad_mean is not None
        use_pen = margin is not None and grad_penalty is not None
        needs = ctx.needs_input_grad[:3]
        if not (use_mean or use_pen):
            return None, None, None, None, None, None, None
        # Like TRL's fused head: under ZeRO-3 the saved parameter is partitioned again by now, so gather it anew
        with _gather_lm_head(weight, bias):
            grads = ChunkedLogitPenalty._backward_chunks(
                hidden, weight, bias, max_val, max_idx, grad_mean, grad_penalty, ctx.args, use_mean, use_pen, needs
            )
        return (*grads, None, None, None, None)

    @staticmethod
    def _backward_chunks(
        hidden, weight, bias, max_val, max_idx, grad_mean, grad_penalty, args, use_mean, use_pen, needs
    ):
        logit_scale, softcap, margin, want_mean, dtype, chunk = args
        need_h, need_w, need_b = needs
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_h = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_b else None
        w = weight.to(dtype)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h = hidden[start:end].to(dtype)
            z, dz_dy = _chunk_logits(h, w, bias, dtype, logit_scale, softcap)
            g = torch.zeros_like(z)
            if use_mean:
                g += (grad_mean[start:end].float() / vocab).unsqueeze(-1)
            if use_pen:
                gp = grad_penalty[start:end].float() / vocab
                below = z < (max_val[start:end] - margin).unsqueeze(-1)
                g -= below * gp.unsqueeze(-1)
                count = below.sum(-1).float()
                g.scatter_add_(1, max_idx[start:end].unsqueeze(-1), (gp * count).unsqueeze(-1))
            if dz_dy is not None:
                g *= dz_dy
            g *= logit_scale
            if need_h:
                grad_h[start:end] = g @ w.float()
            if need_w:
                grad_w.addmm_(g.t(), h.float())
            if need_b:
                grad_b += g.sum(0)
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )


class MarginPenalty(torch.autograd.Function):
    """
    MbLS's `mean_v relu(max_k z_k - z_v - margin)` per token, for logits `z = s (hidden @ weight.T + bias)` without
    soft-capping, with one projection of the selected tokens and no projection in the backward.

    The penalty's gradient is sparse in structure: each logit more than `margin` below the max (the "far" set) gets
    `-1/V`, the max gets `+count/V` (`count` the size of the far set), and the logits within `margin` of the max (the
    "near" set) get 0. So the forward projects each chunk of tokens once, to find the max and the penalty, and keeps
    whichever of the near and far sets is smaller, as a sparse `[N, V]` matrix `S` (+1 per near entry, -1 per far
    entry); the backward then needs no logits at all:

        near kept:  dL/dz_t = s g_t / V (-1 + 1_{near t} + count_t e_{argmax_t})
        far kept:   dL/dz_t = s g_t / V (-1_{far t} + count_t e_{argmax_t})

    so `dL/dh = c (S W - d sum_v W_v + count W_argmax)` and `dL/dW = S^T (c h) - sum_t d_t c_t h_t + ...` with
    `c = s g / V` and `d` = 1 where the near set is kept: one sparse-dense product each way, `O(nnz x hidden)`. A
    trained model's near set at a margin of 10 is usually tens to hundreds of tokens; a near-uniform distribution
    (random initialisation) keeps an empty or tiny far set. When both are large, storing them would cost more than
    recomputing, and the token chunk falls back to `ChunkedLogitPenalty`'s recompute-in-backward path (`max_near`
    bounds the average number of entries per token kept).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, logit_scale: float, margin: float, max_near: int):
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        dtype = _compute_dtype(hidden)
        penalty = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        argmax = torch.zeros(n, device=hidden.device, dtype=torch.long)
        below = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        max_val = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        near_kept = torch.zeros(n, device=hidden.device, dtype=torch.float32)  # 1 where S holds the near set
        dense = torch.zeros(n, device=hidden.device, dtype=torch.bool)  # chunks too wide to store sparsely
        indices, values = [], []
        w = weight.to(dtype)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            z, _ = _chunk_logits(hidden[start:end], w, bias, dtype, logit_scale, None)
            m, idx = z.max(-1)
            cut = (m - margin).unsqueeze(-1)
            penalty[start:end] = (cut - z).clamp_(min=0).mean(-1)
            near = z >= cut
            counts = near.sum(-1)
            n_near = int(counts.sum())
            n_far = (end - start) * vocab - n_near
            argmax[start:end], max_val[start:end] = idx, m
            below[start:end] = vocab - counts
            budget = max_near * (end - start)
            if min(n_near, n_far) > budget:
                dense[start:end] = True
                continue
            keep_near = n_near <= n_far
            entries = (near if keep_near else ~near).nonzero().t()  # row-major: sorted and unique
            entries[0] += start
            indices.append(entries.to(torch.int32))  # 8 bytes an entry kept
            values.append(torch.full((entries.shape[1],), 1.0 if keep_near else -1.0, device=hidden.device))
            near_kept[start:end] = float(keep_near)
        if indices:
            indices, values = torch.cat(indices, 1), torch.cat(values)
        else:
            indices = torch.zeros(2, 0, dtype=torch.int32, device=hidden.device)
            values = torch.zeros(0, device=hidden.device)
        ctx.save_for_backward(hidden, weight, bias, argmax, below, max_val, near_kept, indices, values, dense)
        ctx.args = (logit_scale, margin, dtype, chunk)
        return penalty

    @staticmethod
    def backward(ctx, grad_penalty):
        hidden, weight, bias, argmax, below, max_val, near_kept, indices, values, dense = ctx.saved_tensors
        logit_scale, margin, dtype, chunk = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with _gather_lm_head(weight, bias):
            n, vocab = hidden.shape[0], weight.shape[0]
            c = (grad_penalty.float() * logit_scale / vocab) * ~dense  # per token; dense chunks handled below
            d = c * near_kept  # the tokens whose -1 over the whole vocabulary is not in S
            indices = indices.long()
            s = torch.sparse_coo_tensor(indices, values, (n, vocab), is_coalesced=True, check_invariants=False)
            grad_h = grad_w = grad_b = None
            if need_h:
                row_sum = weight.sum(0, dtype=torch.float32)
                grad_h = c.unsqueeze(-1) * torch.sparse.mm(s, weight.float())
                grad_h -= d.unsqueeze(-1) * row_sum
                grad_h += (c * below).unsqueeze(-1) * weight[argmax].float()
            if need_w:
                h = hidden.float()
                ch = c.unsqueeze(-1) * h  # [N, H]
                grad_w = (-(d.unsqueeze(-1) * h).sum(0)).expand(vocab, -1).clone()
                grad_w.index_add_(0, argmax, below.unsqueeze(-1) * ch)
                grad_w = torch.sparse.addmm(grad_w, s.t(), ch)
            if need_b:
                grad_b = torch.full((vocab,), -float(d.sum()), device=c.device)
                grad_b.index_add_(0, indices[1], values * c[indices[0]])
                grad_b.index_add_(0, argmax, below * c)
            if dense.any():  # the chunks whose near and far sets were both too large: recompute them
                idx = dense.nonzero().flatten()
                sub = ChunkedLogitPenalty._backward_chunks(
                    hidden[idx],
                    weight,
                    bias,
                    max_val[idx],
                    argmax[idx],
                    None,
                    grad_penalty[idx],
                    (logit_scale, None, margin, False, dtype, chunk),
                    False,
                    True,
                    (need_h, need_w, need_b),
                )
                if need_h:
                    grad_h[idx] = sub[0].float()
                if need_w:
                    grad_w += sub[1].float()
                if need_b:
                    grad_b += sub[2].float()
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


# Average number of entries per token (near or far set, whichever is smaller) up to which `MarginPenalty` keeps them
# sparse, against recomputing the chunk's `[chunk, V]` logits in the backward: at most 1024 x 8 bytes of indices per
# token (134 MB for 16k known tokens), a bound on memory rather than a tuned crossover
MAX_NEAR = 1024


def calibration_term(
    method: str,
    hidden: torch.Tensor | None,
    labels: torch.Tensor,
    entropy: torch.Tensor | None,
    lm_head: torch.nn.Module | None,
    transform: dict | None,
    *,
    ls_epsilon: float,
    mbls_margin: float,
    mbls_lambda: float,
    ecp_beta: float,
) -> torch.Tensor:
    """
    The per-token term that turns `NLL` into the method's standard loss (`L_method - NLL`), for selected tokens.

    Args:
        method: `"ls"`, `"mbls"` or `"ecp"`.
        hidden: `[N, H]` final hidden states of the selected tokens (`ls`, `mbls`).
        labels: `[N]` next-token labels of the selected tokens.
        entropy: `[N]` differentiable entropies of the selected tokens (`ecp`).
        lm_head: the model's output embedding module (`ls`, `mbls`).
        transform: `lm_head_transform(model)`.
    """
    if method == "ecp":
        return -ecp_beta * entropy
    if method not in ("ls", "mbls"):
        raise ValueError(f"Unknown calibration method {method!r}; expected 'ls', 'mbls' or 'ecp'.")
    weight, bias, gather_ctx = full_lm_head_params(lm_head)
    scale, softcap = transform["logit_scale"], transform["softcap"]
    with gather_ctx:
        if method == "ls":
            if softcap is None:
                return ls_epsilon * label_smoothing_term(hidden, labels, weight, bias, scale)
            mean, _ = ChunkedLogitPenalty.apply(hidden, weight, bias, scale, softcap, None, True)
            z_y, _ = _transform(
                ((hidden * weight[labels]).sum(-1) + (0 if bias is None else bias[labels])).float(), scale, softcap
            )
            return ls_epsilon * (z_y - mean)
        if softcap is None:
            return mbls_lambda * MarginPenalty.apply(hidden, weight, bias, scale, mbls_margin, MAX_NEAR)
        _, penalty = ChunkedLogitPenalty.apply(hidden, weight, bias, scale, softcap, mbls_margin, False)
        return mbls_lambda * penalty


def option_calibration_term(
    method: str,
    option_logits: torch.Tensor,
    num_choices: torch.Tensor,
    target: torch.Tensor,
    *,
    ls_epsilon: float,
    mbls_margin: float,
    mbls_lambda: float,
    ecp_beta: float,
) -> torch.Tensor:
    """
    The per-answer term `L_method - NLL` on the softmax over each question's option letters (`calibration_space=
    "options"`): the distribution that option-letter ECE measures, and nothing else of the vocabulary.

    With `z` the `K_i` option logits of a row, `p = softmax(z)` and `y` the right option:
    `ls`: `eps (z_y - mean_k z_k)`; `mbls`: `lambda mean_k relu(max_j z_j - z_k - m)`; `ecp`: `-beta H(p)`. Each is
    unchanged when a constant is added to all of a row's option logits, so the term moves probability between the
    options only: the letters' share of the full vocabulary (`answer_mass`) is left to the cross-entropy.

    Args:
        method: `"ls"`, `"mbls"` or `"ecp"`.
        option_logits: `[N, K]` differentiable option logits (`project_logits` of the option rows).
        num_choices: `[N]` options of each row (the columns beyond are ignored).
        target: `[N]` index of the right option.
    """
    k = option_logits.shape[1]
    valid = torch.arange(k, device=option_logits.device)[None, :] < num_choices[:, None]
    z = option_logits.float()
    count = valid.sum(-1).to(z.dtype)
    if method == "ls":
        mean = torch.where(valid, z, torch.zeros_like(z)).sum(-1) / count
        return ls_epsilon * (z.gather(1, target[:, None]).squeeze(1) - mean)
    if method == "mbls":
        top = z.masked_fill(~valid, float("-inf")).max(-1, keepdim=True).values
        penalty = torch.where(valid, (top - z - mbls_margin).clamp(min=0), torch.zeros_like(z))
        return mbls_lambda * penalty.sum(-1) / count
    if method == "ecp":
        logp = z.masked_fill(~valid, float("-inf")).log_softmax(-1)
        # p log p with the absent options' -inf replaced before the product, so that no 0 * inf reaches the backward
        entropy = -(logp.exp() * torch.where(valid, logp, torch.zeros_like(z))).sum(-1)
        return -ecp_beta * entropy
    raise ValueError(f"Unknown calibration method {method!r}; expected 'ls', 'mbls' or 'ecp'.")


# --------------------------------------------------------------------------------------------------------------------
# RCFT: the EM-style ECE regulariser
# --------------------------------------------------------------------------------------------------------------------


def rcft_target(probs: torch.Tensor, bin_accuracy: torch.Tensor, gradient: bool = False) -> torch.Tensor:
    """
    RCFT's M-step target for each row of option probabilities.

    The top entry becomes the accuracy of the row's bin, `acc`; the other `K - 1` entries, sorted descending as
    `q_1 >= ... >= q_{K-1}`, share the remainder `1 - acc` as

        t_j = (1 - acc) (1 + tanh(gamma q_j)) / (K - 1 + sum_l tanh(gamma q_l)),   gamma = ln(K - 1) / (q_1 (1 - acc)),

    which keeps their rank order (`tanh` is increasing) and sums to `1 - acc`; `t = 0` when `acc = 1`. The targets are
    returned in the original option order, so each row sums to 1.

    Args:
        probs: `[N, K]` option probabilities (rows sum to 1), `K >= 2`.
        bin_accuracy: `[N]` accuracy of each row's confidence bin.
        gradient: keep the targets' dependence on `probs` in the graph (through `gamma` and the `tanh` terms), as the
            authors' code does. By default the targets are constants of the step: a fixed point for the regression,
            as in the E/M alternation.

    Returns:
        `[N, K]` targets.
    """
    # The top option is read in the caller's precision: float32 rounding can tie two nearly equal options
    top = probs.detach().argmax(-1)
    probs = probs.float() if gradient else probs.detach().float()
    acc = bin_accuracy.detach().float().to(probs.device)
    n, k = probs.shape
    if k < 2:
        raise ValueError(f"RCFT needs at least 2 options per question, got {k}.")
    others_mask = torch.ones_like(probs, dtype=torch.bool)
    others_mask[torch.arange(n), top] = False
    others = probs[others_mask].view(n, k - 1)  # original order of the non-top options
    remainder = (1 - acc).unsqueeze(-1)
    if k == 2:
        rest = remainder.expand(n, 1)
    else:
        q1 = others.max(-1).values.unsqueeze(-1)
        denom_q = (q1 * remainder).clamp(min=torch.finfo(torch.float32).tiny)
        gamma = math.log(k - 1) / denom_q
        th = torch.tanh(gamma * others)
        rest = remainder * (1 + th) / (k - 1 + th.sum(-1, keepdim=True))
        # acc = 1 leaves nothing to share; q_1 = 0 (all mass on the top option) shares it equally
        rest = torch.where(remainder > 0, rest, torch.zeros_like(rest))
    target = torch.empty_like(probs)
    target[torch.arange(n), top] = acc
    target[others_mask] = rest.reshape(-1)
    return target


def rcft_ece_loss(
    probs: torch.Tensor,
    bins: torch.Tensor,
    row_accuracy: torch.Tensor,
    n_bins: int,
    num_choices: torch.Tensor | None = None,
    bin_counts: torch.Tensor | None = None,
    target_gradient: bool = False,
) -> torch.Tensor:
    """
    RCFT's ECE surrogate: `sum_b (1/N_b) sum_{i in b} [(m_i - acc_b)^2 + sum_j (q_ij - t_ij)^2]`, i.e. the squared
    distance of each row's option probabilities to its `rcft_target`, divided by its bin's count `N_b` and summed.

    Args:
        probs: `[N, K]` differentiable option probabilities (rows with fewer options zero-padded).
        bins: `[N]` confidence bin of each row (`calib_trl.metrics.equal_width_bins(..., one_apart=False)`).
        row_accuracy: `[N]` the E-step's accuracy of each row's bin.
        n_bins: number of bins.
        num_choices: `[N]` options of each row (default: all `K`).
        bin_counts: `[n_bins]` the `N_b` each bin's sum is divided by. Default: the rows of this batch in the bin, so
            each bin present contributes its mean. The authors divide by the bin's count over the E-step instead
            (see `RCFTConfig.ece_normalization`).
        target_gradient: let the gradient flow through the targets (`rcft_target(..., gradient=True)`), as the
            authors' code does.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    k_max = probs.shape[1]
    if num_choices is None:
        num_choices = torch.full((probs.shape[0],), k_max, device=probs.device, dtype=torch.long)
    sq = torch.zeros(probs.shape[0], device=probs.device, dtype=torch.float32)
    for k in torch.unique(num_choices).tolist():
        rows = num_choices == k
        p = probs[rows][:, :k].float()
        target = rcft_target(p, row_accuracy[rows], gradient=target_gradient)
        sq = sq.index_put((rows.nonzero().squeeze(1),), ((p - target) ** 2).sum(-1))
    if bin_counts is None:
        bin_counts = torch.zeros(n_bins, device=probs.device).index_add_(0, bins, torch.ones_like(sq))
    return (sq / bin_counts.to(sq.device, sq.dtype)[bins]).sum()
