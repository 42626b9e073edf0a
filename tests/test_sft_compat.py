"""
The one-class swap: `SFTTrainer`'s own scenarios run with `CalibSFTTrainer`, calibration on (the defaults) and off.

In each scenario the swapped trainer either trains, with finite losses and changed parameters, or gives TRL's own error,
whatever calib-trl's detection mode. With calibration off (`calibration_loss="none"`) its losses equal `SFTTrainer`'s
step for step. Tiny in-process models, two steps each.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset
from helpers import (
    QUIET,
    TRAINING_CHAT_TEMPLATE,
    make_mcq_dataset,
    make_model,
    make_moe_model,
    make_open_ended_dataset,
    make_tokenizer,
)
from huggingface_hub import ModelCard
from peft import LoraConfig, PromptTuningConfig
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from calib_trl import CalibSFTConfig, CalibSFTTrainer

COMMON = dict(
    **QUIET,
    per_device_train_batch_size=4,
    max_steps=2,
    logging_steps=1,
    learning_rate=1e-3,
    seed=7,
)
TOOLS = json.dumps(
    [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
)


def mcq():
    return make_mcq_dataset(8, seed=1)


def mcq_messages():
    """Multiple-choice rows in TRL's conversational language-modelling format, with a `tools` column."""
    rows = mcq().to_list()
    return Dataset.from_list(
        [
            {"messages": r["prompt"] + r["completion"], "choices": r["choices"], "answer": r["answer"], "tools": TOOLS}
            for r in rows
        ]
    )


def text():
    return Dataset.from_list([{"text": r["prompt"][0]["content"]} for r in mcq()])


def stream():
    rows = mcq().to_list()
    return IterableDataset.from_generator(lambda: iter(rows))


def tokenized():
    tok = make_tokenizer()
    return Dataset.from_list([{"input_ids": tok(r["text"])["input_ids"][:64]} for r in text()])


def with_training_template():
    tok = make_tokenizer()
    tok.chat_template = TRAINING_CHAT_TEMPLATE
    return tok


# name: train dataset, config, trainer keyword arguments (factories: PEFT configs and datasets are not reused)
SCENARIOS = {
    "language_modeling": dict(data=text),
    "prompt_completion": dict(data=mcq),
    "messages_with_tools": dict(data=mcq_messages),
    "formatting_func": dict(
        data=mcq,
        config=dict(completion_only_loss=False),
        trainer=lambda: dict(
            formatting_func=lambda row: row["prompt"][0]["content"] + row["completion"][0]["content"]
        ),
    ),
    **{
        f"packing_{strategy}": dict(data=mcq, config=dict(packing=True, packing_strategy=strategy, max_length=128))
        for strategy in ("bfd", "bfd_split", "wrapped")
    },
    "padding_free": dict(data=mcq, config=dict(padding_free=True, max_length=None)),
    "completion_only_loss": dict(data=mcq, config=dict(completion_only_loss=True)),
    "full_sequence_loss": dict(data=mcq, config=dict(completion_only_loss=False)),
    "assistant_only_loss": dict(data=mcq_messages, config=dict(assistant_only_loss=True), tok=with_training_template),
    "lora": dict(data=mcq, trainer=lambda: dict(peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))),
    "prompt_tuning": dict(
        data=mcq, trainer=lambda: dict(peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ),
    "eval_dataset_dict": dict(
        data=mcq,
        config=dict(eval_strategy="steps", eval_steps=1),
        trainer=lambda: dict(eval_dataset={"a": make_mcq_dataset(4, seed=2), "b": make_mcq_dataset(4, seed=3)}),
    ),
    "iterable_dataset": dict(data=stream),
    "skip_prepare_dataset": dict(data=tokenized, config=dict(dataset_kwargs={"skip_prepare_dataset": True})),
    "model_path": dict(data=mcq, model="path"),
    "training_arguments": dict(data=mcq, args=TrainingArguments),
    "gradient_accumulation": dict(data=mcq, config=dict(gradient_accumulation_steps=2, per_device_train_batch_size=2)),
    "resume_from_checkpoint": dict(data=mcq, config=dict(save_strategy="steps", save_steps=1), resume=True),
    # a Mixture-of-Experts model with its load-balancing loss on: detection scores and generates on padded batches
    "moe_open_ended": dict(data=lambda: make_open_ended_dataset(8), model="moe"),
}


def build(kind, scenario, tmp_path, model_dir, **calibration):
    """`kind`: "sft" (SFTTrainer), or "calib" (CalibSFTTrainer with `calibration`'s settings)."""
    spec = SCENARIOS[scenario]
    tok = spec.get("tok", make_tokenizer)()
    values = {**COMMON, **spec.get("config", {}), "output_dir": str(tmp_path / kind)}
    if spec.get("args") is TrainingArguments:
        names = {f.name for f in dataclasses.fields(TrainingArguments)}
        args = TrainingArguments(**{k: v for k, v in values.items() if k in names})
    elif kind == "sft":
        args = SFTConfig(**values)
    else:
        args = CalibSFTConfig(**values, **calibration)
    model = {"path": str(model_dir), "moe": "moe"}.get(spec.get("model"))
    model = make_moe_model(len(tok), seed=3) if model == "moe" else model or make_model(len(tok), seed=3)
    trainer_class = SFTTrainer if kind == "sft" else CalibSFTTrainer
    kwargs = spec["trainer"]() if "trainer" in spec else {}
    return trainer_class(model=model, args=args, train_dataset=spec["data"](), processing_class=tok, **kwargs)


def run(kind, scenario, tmp_path, model_dir, **calibration):
    """
    Build and train; with `resume`, train to a checkpoint, then resume a new trainer from it. Returns the trainer, its
    losses, and its trainable parameters before training.
    """
    trainer = build(kind, scenario, tmp_path, model_dir, **calibration)
    resume = None
    if SCENARIOS[scenario].get("resume"):
        trainer.train()
        shutil.rmtree(f"{trainer.args.output_dir}/checkpoint-2")
        trainer = build(kind, scenario, tmp_path, model_dir, **calibration)
        resume = f"{trainer.args.output_dir}/checkpoint-1"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h], before


DETECTION_PATHS = {
    "language_modeling": "no_answer",
    "skip_prepare_dataset": "no_answer",
    "iterable_dataset": "stream",
    "moe_open_ended": "generation",
}
# calibration_space="auto": the option letters for multiple-choice prompt/completion rows in a `Dataset` (packed
# with 'bfd', which keeps each question whole); the whole vocabulary for rows without choices, conversational rows,
# a stream and packing that can cut a question off its answer
VOCABULARY_SPACE = {
    "language_modeling",
    "skip_prepare_dataset",
    "messages_with_tools",
    "assistant_only_loss",
    "iterable_dataset",
    "packing_bfd_split",
    "packing_wrapped",
    "moe_open_ended",
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_calibration_on_trains(scenario, tmp_path, tiny_model_dir):
    trainer, losses, before = run("calib", scenario, tmp_path, tiny_model_dir)
    assert trainer.args.has_calibration_term
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert before and any(not torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in before.items())
    # the path detection took, by README's rule for the rows passed: multiple-choice rows are flagged by the model's
    # own answer (a `formatting_func` formats them for training only), rows without an answer get the term on every
    # token, a stream gets a threshold fitted before the first step
    assert trainer.detection_summary["path"] == DETECTION_PATHS.get(scenario, "multiple_choice")
    assert trainer.calibration_space == ("vocabulary" if scenario in VOCABULARY_SPACE else "options")
    known = [h["calib/known_fraction"] for h in trainer.state.log_history if "calib/known_fraction" in h]
    # the calibration term reached some tokens; a random model answers no open-ended row, so none of those is known
    assert known and (np.mean(known) > 0 or scenario == "moe_open_ended")


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "training_arguments"])  # converted: calibration on
def test_calibration_off_equals_sft_trainer(scenario, tmp_path, tiny_model_dir):
    _, sft, _ = run("sft", scenario, tmp_path, tiny_model_dir)
    _, calib, _ = run("calib", scenario, tmp_path, tiny_model_dir, calibration_loss="none")
    assert len(sft) == 2 and calib == sft


def with_transform():
    return mcq().with_transform(lambda batch: batch)


def vision():
    return mcq().add_column("image", [None] * 8)


def masks_without_labels():
    return tokenized().map(lambda row: {"completion_mask": [1] * len(row["input_ids"])})


def remote_code_model(tmp_path, model_dir):
    """A checkpoint whose config asks for custom code, which TRL loads only with `trust_remote_code=True`."""
    path = tmp_path / "remote"
    shutil.copytree(model_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="tiny_custom",
        auto_map={"AutoConfig": "modeling_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyModel"},
    )
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


# name: what makes SFTTrainer raise, and its error
TRL_ERRORS = {
    "with_transform": dict(data=with_transform, error=r"SFTTrainer cannot prepare a dataset that uses"),
    "padding_free_with_max_length": dict(
        data=mcq, config=dict(padding_free=True, max_length=64), error=r"`max_length` is not enforced"
    ),
    "skip_prepare_with_masks_but_no_labels": dict(
        data=masks_without_labels,
        config=dict(dataset_kwargs={"skip_prepare_dataset": True}),
        error=r"The train dataset has mask columns but no 'labels'",
    ),
    "vision_dataset_with_a_text_model": dict(data=vision, error=r"The dataset appears to be vision-related"),
    "trust_remote_code": dict(data=mcq, model=remote_code_model, error=r"pass the argument `trust_remote_code=True`"),
}


@pytest.mark.parametrize("scenario", list(TRL_ERRORS))
def test_trl_errors_come_first(scenario, tmp_path, tiny_model_dir):
    spec = TRL_ERRORS[scenario]
    values = {**COMMON, **spec.get("config", {}), "output_dir": str(tmp_path)}
    tok = make_tokenizer()

    def construct(trainer_class, args):
        model = spec["model"](tmp_path, tiny_model_dir) if "model" in spec else make_model(len(tok))
        trainer_class(model=model, args=args, train_dataset=spec["data"](), processing_class=tok)

    with pytest.raises(ValueError, match=spec["error"]) as trl_error:
        construct(SFTTrainer, SFTConfig(**values))
    # whatever calib-trl's detection mode: the swapped trainer gives TRL's own error
    for calibration in (dict(calibration_loss="none"), dict(), dict(detection="precomputed")):
        with pytest.raises(ValueError) as error:
            construct(CalibSFTTrainer, CalibSFTConfig(**values, **calibration))
        assert str(error.value) == str(trl_error.value)


# -- vision-language models -------------------------------------------------------------------------------------------

VISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vlm():
    """A tiny Llava (CLIP vision tower, Llama text model), its processor, and a prompt/completion image dataset."""
    from PIL import Image
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
        chat_template=VISION_TEMPLATE,
    )
    rng = np.random.default_rng(0)
    rows = [
        {
            "images": [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Colour {i}?"}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
        }
        for i in range(4)
    ]
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config), processor, Dataset.from_list(rows)


def test_vision_language_models_train_as_sft_trainer_and_refuse_calibration(tmp_path):
    values = {**COMMON, "per_device_train_batch_size": 2, "max_length": None}
    losses = []
    for trainer_class, args in (
        (SFTTrainer, SFTConfig(str(tmp_path / "sft"), **values)),
        (CalibSFTTrainer, CalibSFTConfig(str(tmp_path / "calib"), calibration_loss="none", **values)),
    ):
        model, processor, data = tiny_vlm()
        trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=processor)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 2 and losses[1] == losses[0]
    model, processor, data = tiny_vlm()
    with pytest.raises(ValueError, match=r"calib-trl's calibration terms do not support vision datasets"):
        CalibSFTTrainer(
            model=model, args=CalibSFTConfig(str(tmp_path), **values), train_dataset=data, processing_class=processor
        )


# -- the swap in a TRL script, on the embedded defaults ---------------------------------------------------------------

TRL_SCRIPT = """\
from trl import SFTConfig
from trl import SFTTrainer

trainer = SFTTrainer(
    model=MODEL,
    args=SFTConfig(OUTPUT, max_steps=2, per_device_train_batch_size=2, logging_steps=1, bf16=False, report_to=[]),
    train_dataset=DATASET,
)
trainer.train()
"""


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["arithmetic-mc", "arithmetic"])
def test_swapping_one_class_in_a_trl_script(default_model_dir, tmp_path, dataset):
    """
    The README's swap: one changed import and one changed class name. The script trains with calibration: on the
    option letters of multiple-choice rows, over the vocabulary on open-ended rows.
    """
    from calib_trl.defaults import load_default_dataset

    script = TRL_SCRIPT.replace("from trl import SFTTrainer", "from calib_trl import CalibSFTTrainer")
    script = script.replace("SFTTrainer(", "CalibSFTTrainer(")
    changed = [(a, b) for a, b in zip(TRL_SCRIPT.splitlines(), script.splitlines()) if a != b]
    assert changed == [
        ("from trl import SFTTrainer", "from calib_trl import CalibSFTTrainer"),
        ("trainer = SFTTrainer(", "trainer = CalibSFTTrainer("),
    ]
    namespace = {
        "MODEL": str(default_model_dir),
        "OUTPUT": str(tmp_path),
        "DATASET": load_default_dataset(dataset)["train"].select(range(8)),
    }
    exec(script, namespace)
    trainer = namespace["trainer"]
    assert isinstance(trainer, CalibSFTTrainer) and trainer.args.has_calibration_term
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all("calib/known_fraction" in h for h in logs)
    if dataset == "arithmetic-mc":  # multiple choice: the model's own answers flag the rows, the letters get the term
        assert trainer.detection_summary["path"] == "multiple_choice" and trainer.calibration_space == "options"
    else:  # open-ended: the model's own greedy answers flag the rows, CoLS over the vocabulary (the default rule)
        assert trainer.detection_summary["path"] == "generation" and trainer.calibration_space == "vocabulary"
        assert (trainer.args.calibration_loss, trainer.args.ls_epsilon) == ("ls", 0.1)


def test_trls_own_sft_script_with_the_class_swapped_runs_offline(tiny_model_dir, tmp_path):
    """
    README's recipe: TRL's stock `trl/scripts/sft.py` with its trainer swapped, pointed at a local model and at an
    embedded dataset written as JSON lines (`calib-trl export`), offline; `--bf16 false` because `SFTConfig` turns
    bf16 on where the CPU cannot run it.
    """
    import difflib
    import subprocess
    import sys

    import trl.scripts.sft

    from calib_trl.cli import main

    source = open(trl.scripts.sft.__file__).read()
    swapped = source.replace(
        "    from trl import SFTTrainer, get_dataset, get_peft_config, get_quantization_config\n",
        "    from trl import get_dataset, get_peft_config, get_quantization_config\n\n"
        "    from calib_trl import CalibSFTTrainer\n",
    ).replace("    trainer = SFTTrainer(\n", "    trainer = CalibSFTTrainer(\n")
    diff = [line for line in difflib.ndiff(source.splitlines(), swapped.splitlines()) if line[:2] in ("- ", "+ ")]
    assert len(diff) == 6  # one import line and the class name changed, one import (and a blank line) added
    (tmp_path / "sft.py").write_text(swapped)
    # the letter form: detection scores one forward pass per row, where the open-ended form generates an answer
    assert (
        main(["export", "--dataset", "arithmetic-mc", "--output", str(tmp_path / "data"), "--max-samples", "8"]) == 0
    )
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(tmp_path / "data")]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4"]
    argv += ["--bf16", "false", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "sft.py"), *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training completed" in result.stdout and "Knowledge detection (detection='auto')" in result.stderr
    assert "cogcalib" in ModelCard.load(tmp_path / "out" / "README.md").data.tags
