"""Tiny, randomly initialised models and in-process tokenizers for fast tests (no download, no embedded model)."""

from __future__ import annotations

import random
import string

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from calib_trl.mcq import make_mcq_example

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a ChatML template: every printable ASCII character is one token."""
    chars = list(string.printable)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(
    vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, tie: bool = True, **config
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
        **config,
    )
    model = LlamaForCausalLM(cfg)
    # Larger logits than the default init, so that probabilities are far from uniform and terms are not negligible
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


WORDS = "cat dog sun moon tree rock blue red fast slow big tiny old new hot cold".split()


def make_mcq_dataset(
    n: int, seed: int = 0, num_choices: int = 4, conversational: bool = True, known: bool | None = None
) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + "?"
        choices = [rng.choice(WORDS) for _ in range(num_choices)]
        row = make_mcq_example(question, choices, rng.randrange(num_choices), conversational=conversational)
        if known is not None:
            row["known"] = rng.random() < 0.5 if known else False
        rows.append(row)
    return Dataset.from_list(rows)


# ChatML with `{% generation %}` markers around the assistant's messages, for `assistant_only_loss`
TRAINING_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_open_ended_dataset(n: int, messages: bool = False) -> Dataset:
    """Open-ended rows "Say <word> <i>" -> "<word>": conversational prompt/completion, or `messages` rows."""
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Say {WORDS[i % len(WORDS)]} {i}"}]
        completion = [{"role": "assistant", "content": WORDS[i % len(WORDS)]}]
        rows.append({"messages": prompt + completion} if messages else {"prompt": prompt, "completion": completion})
    return Dataset.from_list(rows)


def memorize(model, tokenizer, dataset, steps: int = 60):
    """Overfit `model` on `dataset` (a few seconds), so that it answers those rows, and only those, correctly."""
    import tempfile

    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            tmp,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            activation_checkpointing=False,
            bf16=False,
            per_device_train_batch_size=len(dataset),
            max_steps=steps,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
        )
        SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    return model
