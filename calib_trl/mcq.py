"""Multiple-choice prompts, option-letter token lookup and option scoring.

A multiple-choice dataset in calib-trl is a TRL prompt/completion dataset with two extra columns:

- `prompt`: the question with its lettered options, either a string or a list of chat messages;
- `completion`: the answer letter (`"B"`, or `[{"role": "assistant", "content": "B"}]`);
- `choices`: the option texts (`list[str]`); the number of options may differ between rows;
- `answer`: the index of the correct option (`int`), or its letter (`"B"`).

The model's confidence in each option is the softmax, over the option-letter tokens only, of the next-token logits at
the answer position (the first completion token). Which token a letter becomes depends on the tokenizer and on what
precedes it (`"A"` and `" A"` are different tokens for most BPE tokenizers), so the letter tokens are read off the
tokenized prompt + completion rather than off the letter alone.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

LETTERS = tuple(string.ascii_uppercase)
DEFAULT_INSTRUCTION = "Answer with only a single letter."
REQUIRED_COLUMNS = ("prompt", "choices", "answer")


def format_question(question: str, choices: Sequence[str], instruction: str = DEFAULT_INSTRUCTION) -> str:
    """
    Render a question and its options as one prompt text.

    ```
    {question}

    A. {choices[0]}
    B. {choices[1]}
    ...

    Answer with only a single letter.
    ```
    """
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"A multiple-choice question needs 2 to {len(LETTERS)} choices, got {len(choices)}.")
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
    return f"{question.strip()}\n\n{options}\n\n{instruction}"


def make_mcq_example(
    question: str,
    choices: Sequence[str],
    answer: int | str,
    conversational: bool = True,
    instruction: str = DEFAULT_INSTRUCTION,
) -> dict[str, Any]:
    """
    Build one prompt/completion row of a multiple-choice dataset.

    With `conversational=True` the prompt is a user message and the completion an assistant message holding the
    letter, so the tokenizer's chat template is applied (as `SFTTrainer` does). Otherwise the prompt ends with
    `"Answer:"` and the completion is `" {letter}"`.
    """
    index = normalize_answer(answer, len(choices))
    letter = LETTERS[index]
    text = format_question(question, choices, instruction)
    if conversational:
        prompt = [{"role": "user", "content": text}]
        completion = [{"role": "assistant", "content": letter}]
    else:
        prompt = f"{text}\nAnswer:"
        completion = f" {letter}"
    return {"prompt": prompt, "completion": completion, "choices": list(choices), "answer": index}


def normalize_answer(answer: Any, num_choices: int, row: int | None = None) -> int:
    """Return the answer as an option index, accepting an index or a letter; raise if it is not among the options."""
    where = "" if row is None else f" (row {row})"
    if isinstance(answer, str):
        letter = answer.strip().upper()
        if len(letter) != 1 or letter not in LETTERS:
            raise ValueError(f"`answer`{where} must be an option index or a single letter, got {answer!r}.")
        index = LETTERS.index(letter)
    elif isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
        index = int(answer)
    else:
        raise ValueError(f"`answer`{where} must be an option index or a letter, got {answer!r}.")
    if not 0 <= index < num_choices:
        raise ValueError(
            f"`answer`{where} is {answer!r}, which is not among the {num_choices} choices "
            f"({', '.join(LETTERS[:num_choices])})."
        )
    return index


def is_conversational_prompt(prompt: Any) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def _letter_completion(prompt: Any, completion_template: Any, letter: str) -> Any:
    if is_conversational_prompt(prompt):
        return [{"role": "assistant", "content": letter}]
    if isinstance(completion_template, str) and completion_template.strip():
        # Keep the separator the dataset uses between prompt and letter (e.g. " B" after "Answer:")
        return completion_template[: len(completion_template) - len(completion_template.lstrip())] + letter
    return letter if prompt[-1:].isspace() else f" {letter}"


def template_kwargs(row: dict) -> dict:
    """
    What `SFTTrainer` passes to `apply_chat_template` besides the messages for this row: its `tools` (a list, or a
    JSON string) and its `chat_template_kwargs`.
    """
    kwargs = dict(row.get("chat_template_kwargs") or {})
    tools = row.get("tools")
    if tools is not None:
        kwargs["tools"] = json.loads(tools) if isinstance(tools, str) else tools
    return kwargs


def tokenize_prompt(
    tokenizer, prompt: Any, chat_template: str | None = None, template_kwargs: dict | None = None
) -> list[int]:
    """
    Token ids of a prompt as `SFTTrainer` tokenizes it (chat template with the generation prompt, or plain);
    `template_kwargs` are the row's `tools` and `chat_template_kwargs` (see `template_kwargs`).
    """
    if is_conversational_prompt(prompt):
        out = tokenizer.apply_chat_template(
            prompt,
            tokenize=True,
            return_dict=True,
            add_generation_prompt=True,
            chat_template=chat_template,
            **(template_kwargs or {}),
        )
        return list(out["input_ids"])
    if not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be a string or a list of chat messages, got {type(prompt).__name__}.")
    return list(tokenizer(text=prompt)["input_ids"])


def tokenize_prompt_completion(
    tokenizer, prompt: Any, completion: Any, chat_template: str | None = None, template_kwargs: dict | None = None
) -> list[int]:
    """Token ids of prompt + completion as `SFTTrainer` tokenizes them (before it appends the EOS token)."""
    if is_conversational_prompt(prompt):
        out = tokenizer.apply_chat_template(
            prompt + completion,
            tokenize=True,
            return_dict=True,
            chat_template=chat_template,
            **(template_kwargs or {}),
        )
        return list(out["input_ids"])
    return list(tokenizer(text=prompt + completion)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def option_token_ids(
    tokenizer,
    prompt: Any,
    num_options: int,
    completion: Any = None,
    chat_template: str | None = None,
    template_kwargs: dict | None = None,
) -> list[int]:
    """
    Token id of each option letter at the answer position of `prompt`.

    For each letter, the prompt followed by that letter as the completion is tokenized, and the first token after the
    tokenized prompt is the letter's token. Raises `ValueError` when the tokenized prompt is not a prefix of the
    tokenized prompt + completion (the letter merges with the end of the prompt, so there is no answer position), when
    a letter is not a single token there, or when two letters share a token.
    """
    prompt_ids = tokenize_prompt(tokenizer, prompt, chat_template, template_kwargs)
    ids = []
    for letter in LETTERS[:num_options]:
        full = tokenize_prompt_completion(
            tokenizer, prompt, _letter_completion(prompt, completion, letter), chat_template, template_kwargs
        )
        n = _common_prefix(prompt_ids, full)
        if n < len(prompt_ids) or len(full) <= n:
            raise ValueError(
                f"The option letter {letter!r} merges with the end of the prompt when tokenized, so the prompt has no "
                "answer position. End the prompt on a token boundary (e.g. with a newline or 'Answer:') and put the "
                "letter in the completion."
            )
        token = full[n]
        decoded = tokenizer.decode([token]).strip()
        if decoded != letter:
            pieces = [tokenizer.decode([t]) for t in full[n : n + 3]]
            raise ValueError(
                f"The option letter {letter!r} is not a single token at the answer position: the tokens after the "
                f"prompt decode to {pieces!r}, so the letter's probability cannot be read off one token. Option letters "
                "must be single tokens there: move what precedes the letter (e.g. a space) to the end of the prompt "
                "and make the completion the bare letter, or use a prompt format whose letters are single tokens."
            )
        ids.append(token)
    if len(set(ids)) != len(ids):
        raise ValueError(f"Option letters {LETTERS[:num_options]} do not map to distinct tokens: {ids}.")
    return ids


def validate_mcq_dataset(dataset, name: str = "dataset", require_completion: bool = False) -> None:
    """Raise a `ValueError` naming the problem if `dataset` is not a usable multiple-choice dataset."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise ValueError(f"The {name} must be a `datasets.Dataset`, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError(f"The {name} is empty: there is nothing to score.")
    required = REQUIRED_COLUMNS + (("completion",) if require_completion else ())
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"The {name} is missing the column(s) {missing}; a multiple-choice dataset needs {list(required)} "
            f"(got {columns}). `calib_trl.defaults.load_default_dataset` or `calib_trl.mcq.make_mcq_example` builds "
            "rows in this format."
        )
    for i, (choices, answer) in enumerate(zip(dataset["choices"], dataset["answer"])):
        if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(
                f"`choices` (row {i}) must be a list of 2 to {len(LETTERS)} option texts, got {choices!r}."
            )
        normalize_answer(answer, len(choices), row=i)


@dataclass
class MCQScores:
    """
    What one scoring pass over a multiple-choice dataset measured, per row in dataset order.

    Confidence is the softmax over the option letters at the answer position (`probs`), as calibration metrics read
    it; `answer_mass` says how much of the model's full next-token distribution those letters hold there, and
    `lm_nll_sum` / `lm_tokens` measure how well the model still predicts the prompts' text (see
    `score_multiple_choice`).
    """

    probs: np.ndarray  # [N, K] softmax over each row's option letters (rows with fewer options are zero-padded)
    labels: np.ndarray  # [N]
    num_choices: np.ndarray  # [N]
    answer_nll: np.ndarray  # [N] -log p(correct letter) over the whole vocabulary, at the answer position
    logits: np.ndarray | None = None  # [N, K] option-letter logits (-inf where a row has fewer options)
    answer_mass: np.ndarray | None = None  # [N] full-vocabulary probability of the row's option letters
    lm_nll_sum: np.ndarray | None = None  # [N] summed NLL of the prompt's text tokens (with `lm_check=True`)
    lm_tokens: np.ndarray | None = None  # [N] number of those tokens

    @property
    def confidences(self) -> np.ndarray:
        return self.probs.max(axis=1)

    @property
    def predictions(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels

    @property
    def lm_nll(self) -> float | None:
        """Mean NLL per prompt-text token, over every token of every row (`None` without `lm_check=True`)."""
        if self.lm_nll_sum is None or self.lm_tokens.sum() == 0:
            return None
        return float(self.lm_nll_sum.sum() / self.lm_tokens.sum())

    def report(self, n_bins: int = 10, temperature: float | None = None) -> dict:
        """
        `calibration_report` of the option probabilities (after temperature scaling by `temperature`, if given), with
        `answer_mass` (mean over rows) and `lm_nll` (when measured) beside it, and `temperature` when one was applied.
        """
        from .metrics import calibration_report
        from .temperature_scaling import apply_temperature

        probs = self.probs if temperature is None else apply_temperature(self.logits, temperature)
        report = calibration_report(probs, self.labels, n_bins=n_bins)
        if self.answer_mass is not None:
            report["answer_mass"] = float(self.answer_mass.mean())
        if self.lm_nll is not None:
            report["lm_nll"] = self.lm_nll
        if temperature is not None:
            report["temperature"] = float(temperature)
        return report


class OptionTokenLookup:
    """Letter token ids per prompt ending, computed once per distinct last prompt token and cached."""

    def __init__(self, tokenizer, num_options: int, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.num_options = num_options
        self.chat_template = chat_template
        self._cache: dict[int, list[int]] = {}

    def __call__(
        self, prompt: Any, prompt_ids: Sequence[int], completion: Any = None, template_kwargs: dict | None = None
    ) -> list[int]:
        key = prompt_ids[-1]
        if key not in self._cache:
            self._cache[key] = option_token_ids(
                self.tokenizer,
                prompt,
                self.num_options,
                completion=completion,
                chat_template=self.chat_template,
                template_kwargs=template_kwargs,
            )
        return self._cache[key]


def _padded_batch(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Left-pad `sequences`; position ids count real tokens only, so padding does not shift positions."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


@torch.no_grad()
def next_token_logits(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Logits of the token after the last position, without building logits for the whole sequence."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=1).logits
    except TypeError:  # models without `logits_to_keep`
        logits = model(**kwargs).logits
    return logits[:, -1, :]


def shard_indices(n: int):
    """
    This process's share of `range(n)` under `accelerate launch`, and the `PartialState` (`None` with one process).

    Every process gets the same number of items (the last share is padded by repeating an item), so that sharded
    models (FSDP, DeepSpeed ZeRO-3), whose forward is a collective, run the same number of forward passes everywhere.
    Duplicates are harmless: results are keyed by item index when gathered.
    """
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes <= 1 or n == 0:
        return np.arange(n), None
    per = -(-n // state.num_processes)
    idx = np.arange(state.process_index * per, (state.process_index + 1) * per)
    return np.minimum(idx, n - 1), state


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def prompt_text_tokens(
    tokenizer, prompt: Any, ids: Sequence[int], chat_template: str | None = None, template_kwargs: dict | None = None
) -> list[int]:
    """
    Indices in `ids` (the tokenized `prompt`) of the tokens of the prompt's own text: the content of the last message
    of a conversational prompt (the question and its options), every token of a plain-text prompt. Template tokens
    (roles, a system prompt the template adds) are left out, and so is the first token, which nothing predicts.

    Found through the tokenizer's character offsets; a tokenizer without them (a slow tokenizer), or one whose
    re-tokenization of the rendered prompt differs from `ids`, falls back to every token after the first.
    """
    if is_conversational_prompt(prompt):
        text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True, chat_template=chat_template, **(template_kwargs or {})
        )
        content = prompt[-1].get("content")
        content = content if isinstance(content, str) else ""
        begin = text.rfind(content) if content else -1
        special = False
    else:
        text, content, begin, special = prompt, prompt, 0, True
    fallback = list(range(1, len(ids)))
    if begin < 0 or not getattr(tokenizer, "is_fast", False):
        return fallback
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(ids):
        return fallback
    end = begin + len(content)
    return [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if i > 0 and begin <= a and b <= end and b > a]


class _LastHidden:
    """Keeps the last hidden state of a causal LM's backbone during one forward pass (the LM check reads it)."""

    def __init__(self, model):
        from .trainer_utils import unwrap_base

        self.base = unwrap_base(model)
        self.value = None
        self._handle = self.base.base_model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def remove(self):
        self._handle.remove()


# Tokens projected through the LM head at once by the LM check (a [chunk, vocab] float32 buffer)
_LM_CHECK_CHUNK = 512


@torch.no_grad()
def _token_nll(base_model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`-log p(target)` of each `[hidden, target]` pair through the model's LM head, in float32, chunk by chunk."""
    from .losses import full_lm_head_params, lm_head_transform, project_logits

    weight, bias, gather = full_lm_head_params(base_model.get_output_embeddings())
    transform = lm_head_transform(base_model)
    out = []
    with gather:
        for start in range(0, hidden.shape[0], _LM_CHECK_CHUNK):
            z = project_logits(hidden[start : start + _LM_CHECK_CHUNK], weight, bias, transform)
            t = targets[start : start + _LM_CHECK_CHUNK]
            out.append(z.logsumexp(-1) - z.gather(1, t[:, None]).squeeze(1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def score_multiple_choice(
    model,
    tokenizer,
    dataset,
    batch_size: int = 16,
    max_length: int | None = None,
    chat_template: str | None = None,
    progress: bool = True,
    desc: str = "Scoring options",
    shard: bool = False,
    lm_check: bool = False,
) -> MCQScores:
    """
    Probability of each option of each question: softmax over the option-letter logits at the answer position.

    Prompts are scored in length-sorted, left-padded batches with `logits_to_keep=1`, in inference mode; the model's
    training mode is restored afterwards. Results are returned in dataset order.

    Besides the option probabilities, the same forward pass gives:
    - `answer_mass`: the full-vocabulary probability of the row's option letters at the answer position, which is the
      chance that a temperature-1 sample starts with a valid option. A calibration loss that flattens the whole
      vocabulary lowers it while option-letter ECE may look better.
    - with `lm_check=True`, a language-modelling check: the NLL of every token of each prompt's own text (the question
      and its options, not the chat template; `prompt_text_tokens`) given what precedes it. The prompts of held-out
      rows are text the model was never trained to produce (SFT's loss is on the completion), so a rise says that
      the model outside the answer has changed. It costs one projection of those tokens through the LM head (about
      a fifth of the forward pass for a 135M model).

    Args:
        model: any causal LM (a `PreTrainedModel`, a `PeftModel`, or one patched by TRL's fused LM head).
        tokenizer: its tokenizer.
        dataset (`datasets.Dataset`): multiple-choice rows (see the module docstring).
        batch_size (`int`): prompts per forward pass.
        max_length (`int`, *optional*): prompts longer than this raise an error rather than being truncated, since
            truncation would cut off the answer position.
        chat_template (`str`, *optional*): chat template overriding the tokenizer's.
        progress (`bool`): show a progress bar (main process only).
        shard (`bool`): under `accelerate launch`, score a 1/num_processes share on each process and gather the
            results, so every process returns the full result without duplicating work.
        lm_check (`bool`): also measure the prompts' text NLL (`MCQScores.lm_nll`).
    """
    validate_mcq_dataset(dataset)
    n = len(dataset)
    prompts = dataset["prompt"]
    completions = dataset["completion"] if "completion" in dataset.column_names else [None] * n
    num_choices = np.array([len(c) for c in dataset["choices"]])
    labels = np.array([normalize_answer(a, k, row=i) for i, (a, k) in enumerate(zip(dataset["answer"], num_choices))])
    k_max = int(num_choices.max())

    indices, state = shard_indices(n) if shard else (np.arange(n), None)
    show = progress and (state is None or state.is_main_process)

    lookup = OptionTokenLookup(tokenizer, k_max, chat_template)
    extra = [c for c in ("tools", "chat_template_kwargs") if c in dataset.column_names]
    rows_extra = dataset.select_columns(extra) if extra else None
    encoded, letter_ids, text_tokens = {}, {}, {}
    for i in indices:
        kwargs = template_kwargs(rows_extra[int(i)]) if extra else {}
        ids = tokenize_prompt(tokenizer, prompts[i], chat_template, kwargs)
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"The prompt of row {i} is {len(ids)} tokens long, over `max_length`={max_length}: truncating it would "
                "cut off the answer position. Raise `max_length` or drop the long rows."
            )
        encoded[i] = ids
        letter_ids[i] = lookup(prompts[i], ids, completions[i], kwargs)
        if lm_check:
            text_tokens[i] = prompt_text_tokens(tokenizer, prompts[i], ids, chat_template, kwargs)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _model_device(model)
    order = sorted(indices, key=lambda i: -len(encoded[i]))
    logits_out, nll, mass, lm = {}, {}, {}, {}
    was_training = model.training
    model.eval()
    capture = _LastHidden(model) if lm_check else None
    try:
        bar = tqdm(total=len(order), desc=desc, disable=not show, unit="q")
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = _padded_batch([encoded[i] for i in batch], pad_id, device)
            logits = next_token_logits(model, *inputs).float()
            cols = torch.tensor([letter_ids[i] for i in batch], device=logits.device)
            valid = (
                torch.arange(k_max, device=logits.device)[None, :]
                < torch.tensor(num_choices[batch], device=logits.device)[:, None]
            )
            option_logits = logits.gather(1, cols).masked_fill(~valid, float("-inf"))
            gold = cols.gather(1, torch.tensor(labels[batch], device=logits.device)[:, None])
            total = logits.logsumexp(-1)
            gold_nll = total - logits.gather(1, gold).squeeze(1)
            letter_mass = (option_logits.logsumexp(-1) - total).exp()
            if capture is not None:
                lm.update(
                    _prompt_text_nll(capture, [encoded[i] for i in batch], [text_tokens[i] for i in batch], batch)
                )
            for row, i in enumerate(batch):
                logits_out[i] = option_logits[row].double().cpu().numpy()
                nll[i] = float(gold_nll[row])
                mass[i] = float(letter_mass[row])
            bar.update(len(batch))
        bar.close()
    finally:
        model.train(was_training)
        if capture is not None:
            capture.remove()

    if state is not None:
        from accelerate.utils import gather_object

        gathered = gather_object([(int(i), logits_out[i], nll[i], mass[i], lm.get(i)) for i in indices])
        logits_out = {i: z for i, z, _, _, _ in gathered}
        nll = {i: v for i, _, v, _, _ in gathered}
        mass = {i: m for i, _, _, m, _ in gathered}
        lm = {i: t for i, _, _, _, t in gathered if t is not None}
    option_logits = np.stack([logits_out[i] for i in range(n)])
    return MCQScores(
        probs=torch.as_tensor(option_logits).softmax(-1).numpy(),
        labels=labels,
        num_choices=num_choices,
        answer_nll=np.array([nll[i] for i in range(n)]),
        logits=option_logits,
        answer_mass=np.array([mass[i] for i in range(n)]),
        lm_nll_sum=np.array([lm[i][0] for i in range(n)]) if lm_check else None,
        lm_tokens=np.array([lm[i][1] for i in range(n)]) if lm_check else None,
    )


def _prompt_text_nll(capture: _LastHidden, sequences: list, positions: list, rows: list) -> dict:
    """Summed NLL and count of each row's prompt-text tokens, from the hidden states of its left-padded batch."""
    hidden = capture.value
    width = hidden.shape[1]
    picks, targets, owner = [], [], []
    for r, (seq, pos) in enumerate(zip(sequences, positions)):
        offset = width - len(seq)
        picks += [(r, offset + p - 1) for p in pos]  # the hidden state that predicts token p
        targets += [seq[p] for p in pos]
        owner += [r] * len(pos)
    if picks:
        index = torch.tensor(picks, device=hidden.device)
        token_nll = _token_nll(
            capture.base, hidden[index[:, 0], index[:, 1]], torch.tensor(targets, device=hidden.device)
        )
        sums = torch.zeros(len(sequences), dtype=torch.float64).index_add_(
            0, torch.tensor(owner), token_nll.double().cpu()
        )
    else:
        sums = torch.zeros(len(sequences), dtype=torch.float64)
    return {i: (float(sums[r]), len(positions[r])) for r, i in enumerate(rows)}
