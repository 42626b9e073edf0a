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
    """The tests' one tiny model: a randomly initialised 2-layer Llama with a (tied) LM head of large logits."""
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


def make_moe_model(vocab_size: int, seed: int = 0, hidden: int = 32):
    """A tiny randomly initialised Mixture-of-Experts model (Mixtral: 4 experts, 2 per token) with the router's
    load-balancing loss on, as TRL trains MoE models."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    return MixtralForCausalLM(cfg)


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


# -- trainer configurations -------------------------------------------------------------------------------------------

# Settings of every tiny in-process run: no reporting or saving, no progress bars, float32, the dataset's own order
QUIET = dict(
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
    activation_checkpointing=False,
    bf16=False,
    dataloader_pin_memory=False,
    shuffle_dataset=False,
)


def make_config(config_class, output_dir, **kwargs):
    """
    A `CalibSFTConfig` or `RCFTConfig` for a tiny run: `QUIET`, batches of 4, `max_length=1024` (and E-step batches of
    8 for RCFT); `kwargs` override any of them.
    """
    from calib_trl import RCFTConfig

    defaults = {**QUIET, "per_device_train_batch_size": 4, "max_length": 1024}
    if issubclass(config_class, RCFTConfig):
        defaults["estep_batch_size"] = 8
    return config_class(str(output_dir), **{**defaults, **kwargs})


# -- independent references -------------------------------------------------------------------------------------------


def letter_ids(tok, k: int = 4) -> list[int]:
    """The option letters' token ids, read off the tokenizer: with the character-level tokenizer each is one token."""
    ids = [tok.convert_tokens_to_ids(letter) for letter in string.ascii_uppercase[:k]]
    assert tok.unk_token_id not in ids
    return ids


def reference_option_scores(model, tok, dataset) -> dict:
    """
    Multiple-choice scores written from the definition, one row at a time, with no calib-trl code: the row's
    conversational prompt through the chat template with the generation prompt, the full logits at its last position,
    and the softmax over that row's own option letters. Returns numpy arrays: option `logits` (`[N, max K]`, -inf
    beyond a row's options) and `probs` (0 there), `labels`, `confidences`, `correct`, `answer_mass` (the letters'
    share of the full softmax), and `lm_nll`, the NLL per token of the user message's own text (with the
    character-level tokenizer, its characters).
    """
    import numpy as np

    k_max = max(len(c) for c in dataset["choices"])
    logits = np.full((len(dataset), k_max), -np.inf)
    answer_mass = np.zeros(len(dataset))
    lm_nll, lm_tokens = 0.0, 0
    training = model.training
    model.eval()
    for i, row in enumerate(dataset):
        assert isinstance(row["prompt"], list), "conversational rows only"
        ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids])).logits[0].double()
        k = len(row["choices"])
        letters = letter_ids(tok, k)
        logits[i, :k] = full[-1, letters].numpy()
        answer_mass[i] = float(full[-1].softmax(-1)[letters].sum())
        # the message's characters: where its text starts in the rendered prompt, one token per character
        content = row["prompt"][-1]["content"]
        text = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        first = len(tok(text[: text.index(content)], add_special_tokens=False)["input_ids"])
        assert tok.decode(ids[first : first + len(content)]) == content
        logp = full.log_softmax(-1)
        lm_nll -= sum(float(logp[p - 1, ids[p]]) for p in range(first, first + len(content)))
        lm_tokens += len(content)
    model.train(training)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.array([a if isinstance(a, int) else string.ascii_uppercase.index(a) for a in dataset["answer"]])
    return {
        "logits": logits,
        "probs": probs,
        "labels": labels,
        "confidences": probs.max(1),
        "correct": probs.argmax(1) == labels,
        "answer_mass": answer_mass,
        "lm_nll": lm_nll / lm_tokens,
    }


def grads(model) -> dict:
    """The gradient of every trainable parameter that has one, by name (copies)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def first_batch(trainer) -> dict:
    """The first batch of the trainer's training dataloader, as a plain dict."""
    return dict(next(iter(trainer.get_train_dataloader())))


def trainer_loss_and_grads(trainer, batch):
    """The trainer's training loss on one batch (normalised by its completion tokens) and the gradients it gives."""
    model = trainer.model
    model.train()
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(num_items))
    loss.backward()
    got = grads(model)
    model.zero_grad()
    return loss, got, num_items


# Batch columns that are not model inputs: the labels, the known flags, the answer marks
NOT_INPUTS = ("labels", "known", "calib_answer_token", "calib_num_choices")


def reference_loss(model, batch, args, num_items, virtual_tokens=0):
    """
    The CogCalib loss from the full `[B, T, V]` logits, written literally from the method definitions. With
    prompt-learning PEFT, the logits also cover the `virtual_tokens` positions it prepends, whose labels are -100.
    """
    inputs = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
    logits = model(**inputs, use_cache=False).logits.float()[:, :-1]
    labels = batch["labels"]
    known = batch["known"] if "known" in batch else torch.zeros_like(labels, dtype=torch.float)
    if virtual_tokens:
        labels = torch.cat([labels.new_full((labels.shape[0], virtual_tokens), -100), labels], dim=1)
        known = torch.cat([known.new_zeros((known.shape[0], virtual_tokens)), known], dim=1)
    assert logits.shape[1] == labels.shape[1] - 1
    labels = labels[:, 1:]
    mask = labels != -100
    known = known[:, 1:] > 0.5
    selected = mask & (known if args.apply_to == "known" else torch.ones_like(mask))
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if args.calibration_loss == "ls":
        eps = args.ls_epsilon
        method = (1 - eps) * nll + eps * (-logp).mean(-1)
    elif args.calibration_loss == "mbls":
        top = logits.max(-1, keepdim=True).values
        method = nll + args.mbls_lambda * (top - logits - args.mbls_margin).clamp(min=0).mean(-1)
    elif args.calibration_loss == "ecp":
        entropy = -(logp.exp() * logp).sum(-1)
        method = nll - args.ecp_beta * entropy
    else:
        method = nll
    per_token = torch.where(selected, nll + args.calibration_weight * (method - nll), nll)
    return (per_token * mask).sum() / num_items


def answer_marks(batch) -> torch.Tensor:
    """The number of options of each row at its answer token, 0 elsewhere (`[batch, seq]`)."""
    return batch["calib_answer_token"] * batch["calib_num_choices"]


def option_reference_loss(model, batch, args, num_items, option_ids, known=None):
    """
    The option-space loss from the full `[B, T, V]` logits: cross-entropy on every token, plus, at the answer token of
    each selected example, `calibration_weight * (L_method - NLL)` on the softmax over that row's option letters
    (`option_ids`: the letters' token ids).
    """
    inputs = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
    logits = model(**inputs, use_cache=False).logits.float()[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = logits.log_softmax(-1)
    per_token = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    answers = answer_marks(batch)[:, 1:]
    if known is None:
        known = batch["known"][:, 1:] > 0.5 if args.apply_to == "known" else torch.ones_like(mask)
    picked = (answers > 0) & known & mask
    assert picked.any()
    terms = []
    for r, t in picked.nonzero().tolist():
        k = int(answers[r, t])
        z = logits[r, t, option_ids[:k]]
        y = option_ids.index(int(labels[r, t]))
        lp = z.log_softmax(-1)
        if args.calibration_loss == "ls":
            method = (1 - args.ls_epsilon) * -lp[y] + args.ls_epsilon * (-lp).mean()
            term = method - -lp[y]
        elif args.calibration_loss == "mbls":
            term = args.mbls_lambda * (z.max() - z - args.mbls_margin).clamp(min=0).mean()
        else:
            term = args.ecp_beta * (lp.exp() * lp).sum()
        terms.append(((r, t), term))
    extra = torch.zeros_like(per_token)
    for (r, t), term in terms:
        extra = extra.index_put((torch.tensor([r]), torch.tensor([t])), term.reshape(1), accumulate=True)
    per_token = per_token + args.calibration_weight * extra
    return (per_token * mask).sum() / num_items


def mixed_choices_dataset(n=12, seed=1, known=True):
    """Rows with 4 options and rows with 3, so that the softmax over each row's own options is exercised."""
    from datasets import concatenate_datasets

    return concatenate_datasets(
        [
            make_mcq_dataset(n // 2, seed=seed, known=known),
            make_mcq_dataset(n - n // 2, seed=seed + 50, num_choices=3, known=known),
        ]
    ).shuffle(seed=seed)


def reference_greedy_answers(model, tok, dataset, max_new_tokens: int, temperature: float = 1.0) -> dict:
    """
    Greedy answers written from the definition, one row at a time, with no calib-trl code and no `generate`: the
    row's conversational prompt through the chat template, then the argmax of the full logits, token by token, until
    the end-of-sequence token or `max_new_tokens`. Returns per row the decoded `answers`, the length-normalised
    probability of the answer's tokens and of the end-of-sequence token when it came (`sequence`, with the logits
    divided by `temperature`), the probability of the first token with a letter or digit (`first_token`), and the
    mean entropy of the next-token distribution over those positions (`entropy`).
    """
    import numpy as np

    out = {"answers": [], "sequence": [], "first_token": [], "entropy": []}
    model.eval()
    for row in dataset:
        ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
        logps, scaled, entropies, tokens = [], [], [], []
        for _ in range(max_new_tokens):
            with torch.no_grad():
                z = model(input_ids=torch.tensor([ids + tokens])).logits[0, -1].double()
            token = int(z.argmax())
            logp = z.log_softmax(-1)
            logps.append(float(logp[token]))
            scaled.append(float((z / temperature).log_softmax(-1)[token]))
            entropies.append(float(-(logp.exp() * logp).sum()))
            if token == tok.eos_token_id:
                break
            tokens.append(token)
        first = next((k for k, t in enumerate(tokens) if any(ch.isalnum() for ch in tok.decode([t]))), 0)
        out["answers"].append(tok.decode(tokens, skip_special_tokens=True).strip())
        out["sequence"].append(float(np.exp(np.mean(scaled))))
        out["first_token"].append(float(np.exp(scaled[first])))
        out["entropy"].append(float(np.mean(entropies)))
    return {k: (np.array(v) if k != "answers" else v) for k, v in out.items()}
