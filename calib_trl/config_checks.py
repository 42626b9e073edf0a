"""Validation of the configs' arguments, and the one default calib-trl sets differently from TRL (`bf16`)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def check_in(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def check_range(name: str, value: float, low: float | None, high: float | None, high_inclusive: bool = True) -> None:
    ok = value == value and (low is None or value >= low)  # value == value rejects NaN
    if high is not None:
        ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        upper = "" if high is None else (f", {high}]" if high_inclusive else f", {high})")
        interval = f"in [{low}{upper}" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be {interval}, got {value!r}.")


def bf16_supported() -> bool:
    """Whether bfloat16 mixed precision runs natively on this machine's accelerator."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return True
    return False


def resolve_bf16_default(config) -> None:
    """
    TRL turns bf16 on whenever it is unset; calib-trl turns it on only where it is native, so that a CPU run uses
    float32 (bf16 autocast on a CPU without native support is an order of magnitude slower).
    """
    if config.bf16 is None and not config.fp16:
        config.bf16 = bool(bf16_supported() and not getattr(config, "use_cpu", False))
        if not config.bf16:
            logger.info("bf16 is not supported natively here: training in float32 (set `bf16=True` to override).")
