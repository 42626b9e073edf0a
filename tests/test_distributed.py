"""Data-parallel training on 2 CPU processes (gloo) agrees with a single process.

One `accelerate launch` runs every configuration of `distributed_scripts/run_training.py` on 2 processes with a
per-device batch of B and no gradient accumulation; this process runs the same configurations with a batch of B and
gradient accumulation 2. Accelerate deals the sequential batches round-robin (process 0 gets batches 0, 2, 4, ...,
process 1 gets 1, 3, 5, ...), so each optimizer step sees the same two micro-batches in both runs. The logged losses,
the final weights, the online detection thresholds and the RCFT bin statistics must agree, and `detect_known` must
return exactly the same columns.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, concatenate_datasets
from helpers import make_mcq_dataset, make_model, make_tokenizer

SCRIPTS = Path(__file__).parent / "distributed_scripts"
sys.path.insert(0, str(SCRIPTS))
import run_training  # noqa: E402

pytestmark = pytest.mark.distributed

RTOL, ATOL = 1e-4, 1e-6
LAUNCH_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open_ended(words):
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": f"Say {w}"}], "completion": [{"role": "assistant", "content": w}]}
            for w in words
        ]
    )


def _prepare(workdir: Path) -> None:
    tok = make_tokenizer()
    tok.save_pretrained(workdir / "tokenizer")
    make_model(len(tok), seed=11).save_pretrained(workdir / "model")
    datasets = {
        # 12 rows = 3 steps x 2 processes x 2 per device, with both known and unknown examples
        "mcq_known": make_mcq_dataset(12, seed=1, known=True),
        "mcq_online": make_mcq_dataset(12, seed=6),
        # RCFT: 2, 3 and 4 options, so that the rows spread over several confidence bins
        "mcq_train": concatenate_datasets([make_mcq_dataset(4, seed=2 + k, num_choices=k) for k in (2, 3, 4)])
        .shuffle(seed=0)
        .flatten_indices(),
        "mcq_calibration": make_mcq_dataset(24, seed=3),
        # odd sizes: the last shard of a 2-process scoring pass is padded
        "mcq_detect": make_mcq_dataset(11, seed=4),
        "open_detect": _open_ended(["cat", "a dog", "sunny day", "x", "blue moon"]),
        "open_calibration": _open_ended(["red", "tiny rock", "old tree", "fast", "hot sun", "new", "z"]),
    }
    known = datasets["mcq_known"]["known"]
    assert 0 < sum(known) < len(known)
    for name, data in datasets.items():
        data.save_to_disk(str(workdir / "data" / name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("distributed")
    _prepare(workdir)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])),
    )
    # `--multi_gpu` selects accelerate's torchrun launcher (`--cpu` alone starts a single process without mpirun);
    # `use_cpu=True` in the script's configs then makes the group a gloo one on the CPU.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "1",
        "--main_process_port",
        str(_free_port()),
        str(SCRIPTS / "run_training.py"),
        str(workdir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    ranks = []
    for rank in range(2):
        with open(workdir / "out" / f"rank{rank}.json") as f:
            record = json.load(f)
        ranks.append((record, torch.load(workdir / "out" / f"rank{rank}.pt")))
    # one thread, like each launched process, so that `detect_known` can be compared bit for bit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run_training.run_all(str(workdir), grad_accum=2, run_dir=str(workdir / "runs-1"))
    finally:
        torch.set_num_threads(threads)
    reference = (json.loads(json.dumps(reference[0])), reference[1])
    initial = run_training._load(str(workdir))[0].state_dict()
    return {"ranks": ranks, "reference": reference, "initial": initial}


def _close(a, b, path=""):
    """Nested comparison of JSON records: floats within tolerance, everything else (ints, flags, "nan") equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_two_processes_ran_and_hold_identical_results(runs):
    (rank0, weights0), (rank1, weights1) = runs["ranks"]
    assert rank0["num_processes"] == rank1["num_processes"] == 2
    for name in run_training.CONFIGS:
        assert rank0[name]["num_processes"] == 2
        assert rank0[name] == rank1[name], name
        for key in weights0[name]:
            assert torch.equal(weights0[name][key], weights1[name][key]), (name, key)
    assert rank0["detect"] == rank1["detect"]


# Logged values that are the same quantity in both runs. The token-weighted metrics (`calib/nll`,
# `calib/known_fraction`, TRL's `entropy`, ...) are averaged per micro-batch, as TRL averages its own metrics:
# with gradient accumulation that is a mean over micro-batches, across processes a pooled mean, so they are not
# compared.
COMPARED_LOGS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "epoch",
    "rcft/ece_loss",
    "calib/threshold",
    "calib/detection_accuracy",
    "rcft/estep_accuracy",
    "rcft/estep_ece",
    "rcft/estep_cw_ece",
)


@pytest.mark.parametrize("name", list(run_training.CONFIGS))
def test_losses_and_final_weights_match_single_process(runs, name):
    (ddp, ddp_weights), _ = runs["ranks"]
    ref, ref_weights = runs["reference"]
    ddp, ref, ddp_weights, ref_weights = ddp[name], ref[name], ddp_weights[name], ref_weights[name]
    assert ref["num_processes"] == 1
    steps = list(range(1, run_training.MAX_STEPS + 1))
    assert [h["step"] for h in ddp["logs"]] == [h["step"] for h in ref["logs"]] == steps
    for got, want in zip(ddp["logs"], ref["logs"]):
        compared = {k: want[k] for k in COMPARED_LOGS if k in want}
        assert "loss" in compared and "grad_norm" in compared
        _close({k: got[k] for k in compared}, compared, f"{name} step {want['step']}")
    assert ddp["skipped_steps"] == ref["skipped_steps"] == 0
    assert ddp_weights.keys() == ref_weights.keys()
    for key, want in ref_weights.items():
        torch.testing.assert_close(ddp_weights[key], want, rtol=RTOL, atol=ATOL, msg=f"{name}: {key}")
    # the steps move the weights far more than the tolerance, so an update that differs cannot hide in it
    moved = max((ref_weights[k] - v).abs().max().item() for k, v in runs["initial"].items())
    assert moved > 100 * RTOL


def test_known_flags_mix_within_the_steps(runs):
    """The calibration term applies to part of each batch, so selecting the wrong tokens would change the loss."""
    ref, _ = runs["reference"]
    for name in ("ls", "mbls", "ecp", "online", "auto"):
        fractions = [h["calib/known_fraction"] for h in ref[name]["logs"]]
        assert sum(0 < f < 1 for f in fractions) >= 2, (name, fractions)


def test_online_thresholds_match_single_process(runs):
    (ddp, _), _ = runs["ranks"]
    ref, _ = runs["reference"]
    history, want = ddp["online"]["detector"], ref["online"]["detector"]
    assert [h["step"] for h in want] == [0, 2]  # fitted before the first step and re-fitted every 2 steps
    assert all(math.isfinite(h["threshold"]) for h in want)
    assert want[0]["threshold"] != want[1]["threshold"]  # the re-fit follows the model
    _close(history, want, "detector")
    # the logged threshold of each step is the one in force: step 3 already uses the step-2 re-fit
    assert [h["calib/threshold"] for h in ref["online"]["logs"]] == [want[0]["threshold"]] * 2 + [want[1]["threshold"]]


def test_rcft_bin_statistics_match_single_process(runs):
    (ddp, _), _ = runs["ranks"]
    ref, _ = runs["reference"]
    esteps, want = ddp["rcft"]["esteps"], ref["rcft"]["esteps"]
    assert [e["step"] for e in want] == [0, 2]  # bin_refresh="2"
    for estep in want:
        assert sum(estep["counts"]) == 12  # every row scored once, although the shards were padded
    assert sum(c > 0 for c in want[0]["counts"]) >= 2  # several bins in use
    _close(esteps, want, "esteps")
    _close(ddp["rcft"]["final_bins"], ref["rcft"]["final_bins"], "final_bins")
    assert all(h["rcft/ece_loss"] > 0 for h in ref["rcft"]["logs"])  # the ECE term takes part in the loss


def test_detect_known_is_exactly_the_single_process_result(runs):
    (ddp, _), _ = runs["ranks"]
    ref, _ = runs["reference"]
    assert ddp["detect"] == ref["detect"]  # exact: NLLs, flags, threshold and detection accuracy
    mcq = ref["detect"]["mcq"]
    assert len(mcq["answer_nll"]) == 11 and 0 < sum(mcq["known"]) < 11
    assert len(ref["detect"]["open"]["answer_nll"]) == 5
