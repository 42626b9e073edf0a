"""calib-trl's training state inside transformers' checkpoints, and which checkpoints a run can resume from.

What a calibration method must carry across a resume (the online threshold, RCFT's bin statistics, the known flags of
`detection="auto"`, the skipped-step count) is saved the way transformers saves its own callbacks' state: a
`TrainerCallback` that is also an `ExportableState`, whose `state()` transformers writes into `trainer_state.json`
(`TrainerState.stateful_callbacks`) as the last file of each checkpoint, after the weights, the optimizer and the RNG
state. A checkpoint without a readable `trainer_state.json` is therefore an interrupted save: it holds no complete
state, transformers' or calib-trl's, and `resume_from_checkpoint=True` skips it for the last complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import weakref

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"

# The trainer each state callback reads its state from, by the output directory it saves to: transformers re-creates a
# stateful callback from its `args` when `restore_callback_states_from_checkpoint` is set, and the new instance finds
# its trainer here
_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CalibrationState(TrainerCallback, ExportableState):
    """
    The stateful callback through which a calib-trl trainer's state (`trainer.calibration_state()`) is saved in each
    checkpoint's `trainer_state.json`, under `stateful_callbacks["CalibrationState"]["attributes"]["calib_trl"]`.
    """

    def __init__(self, owner: str):
        self.owner = owner

    @classmethod
    def attach(cls, trainer) -> CalibrationState:
        owner = os.path.abspath(trainer.args.output_dir)
        _OWNERS[owner] = trainer
        return cls(owner)

    def state(self) -> dict:
        trainer = _OWNERS.get(self.owner)
        return {
            "args": {"owner": self.owner},
            "attributes": {"calib_trl": trainer.calibration_state() if trainer else {}},
        }


def checkpoint_state(checkpoint: str) -> dict | None:
    """
    The calib-trl state a checkpoint holds, or `None` when it holds none (written by another trainer). A checkpoint
    whose `trainer_state.json` is missing or unreadable raises a `ValueError` that names it: its save was interrupted.
    """
    path = os.path.join(checkpoint, TRAINER_STATE_FILE)
    problem = _unreadable(path)
    if problem:
        raise ValueError(
            f"{path} {problem}: the save of {checkpoint} was interrupted, so it holds no complete state. Resume from an "
            "earlier checkpoint (`resume_from_checkpoint=True` picks the last complete one), or delete it."
        )
    with open(path, encoding="utf-8") as f:
        callbacks = json.load(f).get("stateful_callbacks") or {}
    entry = callbacks.get(CalibrationState.__name__)
    if isinstance(entry, list):  # several trainers' callbacks of the type: the first is this run's
        entry = entry[0] if entry else None
    if entry is None:
        return None
    state = (entry.get("attributes") or {}).get("calib_trl") if isinstance(entry, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: the calib-trl state in `stateful_callbacks` is not an object; the file is damaged.")
    return state


def _unreadable(path: str) -> str | None:
    """Why a checkpoint's `trainer_state.json` cannot be read (missing, not JSON, not an object), or `None`."""
    if not os.path.isfile(path):
        return "is missing"
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"is not readable JSON ({err})"
    return None if isinstance(content, dict) else "is not a JSON object"


def last_complete_checkpoint(output_dir: str) -> str | None:
    """
    The checkpoint `resume_from_checkpoint=True` resumes from: the highest-numbered `checkpoint-N` of `output_dir` whose
    `trainer_state.json` is readable. Later, incomplete ones (interrupted saves) are skipped with a warning naming them.
    """
    if not os.path.isdir(output_dir):
        return None
    found = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(found):
        path = os.path.join(output_dir, name)
        problem = _unreadable(os.path.join(path, TRAINER_STATE_FILE))
        if problem is None:
            return path
        logger.warning(
            "Skipping %s: its %s %s (an interrupted save); resuming from an earlier checkpoint.",
            path,
            TRAINER_STATE_FILE,
            problem,
        )
    return None
