"""DataCollatorWithKnowledgeFlags, and the known flags reaching the loss intact in padded, padding-free and packed modes."""

import pytest
import torch
from helpers import make_mcq_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from calib_trl import DataCollatorWithKnowledgeFlags

EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "known": True},
    {"input_ids": [8, 9], "labels": [-100, 9], "known": False},
    {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13], "known": 1},
]


@pytest.mark.parametrize("padding_free", [False, True])
def test_collator_adds_aligned_flags_and_keeps_trl_output(padding_free):
    ours = DataCollatorWithKnowledgeFlags(pad_token_id=0, padding_free=padding_free)(EXAMPLES)
    trl = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(
        [{k: v for k, v in e.items() if k != "known"} for e in EXAMPLES]
    )
    for key, value in trl.items():
        assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(value)), key
    if padding_free:
        expected = torch.tensor([[1.0] * 3 + [0.0] * 2 + [1.0] * 4])
    else:
        expected = torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(ours["known"], expected)


def test_collator_per_token_values_and_errors():
    packed = [{"input_ids": [1, 2, 3, 4], "known": [1, 1, 0, 0], "seq_lengths": [2, 2]}]
    out = DataCollatorWithKnowledgeFlags(pad_token_id=0, padding_free=True)(packed)
    assert out["known"].tolist() == [[1.0, 1.0, 0.0, 0.0]]
    collator = DataCollatorWithKnowledgeFlags(pad_token_id=0)
    with pytest.raises(KeyError, match="Run `calib_trl.detect_known`"):
        collator([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="NaN"):
        collator([{"input_ids": [1, 2], "known": float("nan")}])
    with pytest.raises(TypeError, match="booleans or numbers"):
        collator([{"input_ids": [1, 2], "known": "yes"}])
    with pytest.raises(ValueError, match="3 values for 2 tokens"):
        collator([{"input_ids": [1, 2], "known": [1, 0, 1]}])


MODES = {
    "padded": dict(max_length=1024),
    "padding_free": dict(padding_free=True, max_length=None),
    "packed": dict(packing=True, max_length=300),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_flags_reach_compute_loss_intact(make_trainer, tok, mode):
    """Every token that reaches `compute_loss` carries the flag of the example it comes from."""
    data = make_mcq_dataset(24, seed=21, known=True)
    flag_of = {}
    for row in data:
        text = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        flag_of[text] = float(row["known"])
    assert 0 < sum(flag_of.values()) < len(flag_of)
    trainer = make_trainer(data, calibration_loss="ls", **MODES[mode])
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, *a, **k):
        seen.append({k2: v.clone() if torch.is_tensor(v) else v for k2, v in inputs.items()})
        return original(model, inputs, *a, **k)

    trainer.compute_loss = spy
    trainer.args.max_steps = -1
    trainer.args.num_train_epochs = 1
    trainer.train()
    checked = 0
    for batch in seen:
        ids, known = batch["input_ids"], batch["known"]
        if "position_ids" in batch and batch["position_ids"].shape[0] == 1 and mode != "padded":
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            segments = [(0, s, e) for s, e in zip(starts[:-1], starts[1:])]
        else:
            lengths = batch["attention_mask"].sum(-1).tolist()
            segments = [(r, 0, n) for r, n in enumerate(lengths)]
        for row, start, end in segments:
            text = tok.decode(ids[row, start:end])
            if text not in flag_of:
                continue  # padding at the end of a padding-free batch
            flags = set(known[row, start:end].tolist())
            assert flags == {flag_of[text]}, (mode, text[:40])
            checked += 1
    assert checked == len(data)
