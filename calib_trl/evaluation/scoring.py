"""The one batched scoring path: every forward pass calib-trl makes over a dataset outside training.

Multiple-choice scoring (evaluation, `CalibrationCallback`, RCFT's E-step, detection on multiple-choice rows) and
open-ended scoring (detection on prompt/completion or conversational rows) go through `ScoringPass`: under
`accelerate launch` each process takes an equal share of the rows (`PartialState.split_between_processes`), scores it
in length-sorted, left-padded batches (`trl.trainer.utils.pad`) in inference mode, and the results are gathered in
dataset order, so every process returns what a single-process run returns.

- `score_multiple_choice`: the softmax over the option letters at the answer position, the answer's NLL over the
  whole vocabulary, the letters' share of the vocabulary (`answer_mass`) and, on request, the NLL of the prompts' own
  text (the language-modelling check), from one forward pass with `logits_to_keep=1`.
- `score_completions`: the mean NLL of each completion, and whether the greedy answer matches it.
- `score_answers`: either, by the kind of rows; what knowledge detection reads.
"""

from __future__ import annotations

import re
import string
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel, gather_object
from tqdm.auto import tqdm
from trl.data_utils import common_prefix_length, get_dataset_column_names, maybe_convert_to_chatml
from trl.trainer.utils import pad

from ..core.capture import BackboneHook
from ..mcq import answer_index, is_multiple_choice, validate_mcq_dataset
from ..tokenization import (
    OptionTokenLookup,
    prompt_text_tokens,
    template_kwargs,
    tokenize_prompt,
    tokenize_prompt_completion,
)

# --------------------------------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------------------------------


class ScoringPass:
    """
    One batched pass over the rows of a dataset, shared by every scorer.

    Args:
        n (`int`): rows in the dataset.
        shard (`bool`): under `accelerate launch`, give each process an equal share of the rows (the last row repeated
            where needed, so that sharded models, whose forward is a collective, run as many forward passes on every
            process) and gather the results.
        progress (`bool`): show progress bars (main process only).
    """

    def __init__(self, n: int, shard: bool = False, progress: bool = True):
        self.state = None
        self.rows = list(range(n))
        if shard and n > 0:
            state = PartialState()
            if state.num_processes > 1:
                with state.split_between_processes(self.rows, apply_padding=True) as share:
                    self.rows, self.state = list(share), state
        self.progress = progress and (self.state is None or self.state.is_main_process)

    def batches(self, model, sequences: dict, batch_size: int, pad_id: int, desc: str, unit: str, lengths=None):
        """
        `(rows, input_ids, attention_mask, position_ids)` for this process's rows, longest first (by `lengths`, or by
        the sequences' own lengths), left-padded; position ids count real tokens only, so padding shifts nothing.
        """
        lengths = lengths or {i: len(s) for i, s in sequences.items()}
        # The repeated rows of a padded share are scored again: every process runs as many forward passes
        order = sorted(self.rows, key=lambda i: -lengths[i])
        device = _model_device(model)
        bar = tqdm(total=len(order), desc=desc, disable=not self.progress, unit=unit)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids = [torch.tensor(sequences[i], dtype=torch.long) for i in rows]
            input_ids = pad(ids, padding_value=pad_id, padding_side="left")
            attention_mask = pad([torch.ones_like(t) for t in ids], padding_value=0, padding_side="left")
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            yield rows, input_ids.to(device), attention_mask.to(device), position_ids.to(device)
            bar.update(len(rows))
        bar.close()

    def gather(self, results: dict) -> dict:
        """Every process's `{row: result}`, merged (the repeated rows of the padded shares collapse)."""
        if self.state is None:
            return results
        return dict(gather_object([(i, results[i]) for i in self.rows]))


@contextmanager
def inference(model):
    """The model in evaluation mode for the block, its training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def no_router_logits(model) -> dict:
    """
    `{"output_router_logits": False}` for a Mixture-of-Experts model, as inference runs it: `SFTTrainer` turns the
    config's `output_router_logits` on for training, and a forward or `generate` call with it on computes the
    load-balancing loss, which fails on a padded or cached batch. `{}` for other models, whose forward has no such
    argument.
    """
    config = extract_model_from_parallel(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"output_router_logits": False} if hasattr(config, "output_router_logits") else {}


def check_answer_rows(dataset) -> int:
    """The number of open-ended rows (`prompt`, and `completion`: the reference answer), or a `ValueError` saying why
    there are none to score."""
    for column in ("prompt", "completion"):
        if column not in dataset.column_names:
            raise ValueError(
                f"Scoring open-ended answers needs `prompt` and `completion` columns (the completion is the reference "
                f"answer); `{column}` is missing (got {dataset.column_names})."
            )
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to score.")
    return len(dataset)


def position_limit(model) -> int | None:
    """The number of positions the model declares (`max_position_embeddings`), or `None` when its config has none."""
    config = extract_model_from_parallel(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def check_length(row: int, length: int, limit: int | None, what: str, why: str) -> None:
    """Refuse a row longer than `limit` tokens, naming it: a longer input would be scored past the model's positions."""
    if limit is not None and length > limit:
        raise ValueError(
            f"The {what} of row {row} is {length} tokens long, over the {limit} positions {why}: its scores would not "
            "be the model's. Drop or shorten the long rows."
        )


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def last_logits(model, input_ids, attention_mask, position_ids, keep: int) -> torch.Tensor:
    """float32 logits of the last `keep` positions of a left-padded batch (the completion's, teacher-forced)."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return model(**kwargs, logits_to_keep=keep, **no_router_logits(model)).logits.float()


@torch.no_grad()
def next_token_logits(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Logits of the token after the last position, without building logits for the whole sequence."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    kwargs.update(no_router_logits(model))
    try:
        logits = model(**kwargs, logits_to_keep=1).logits
    except TypeError:  # models without `logits_to_keep`
        logits = model(**kwargs).logits
    return logits[:, -1, :]


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
        `answer_mass` (mean over rows) and `lm_nll` (when measured) beside it, and `temperature` when one was applied,
        with `temperature_at_bound` (`at_temperature_bound`).
        """
        from ..metrics import calibration_report
        from .temperature_scaling import apply_temperature, at_temperature_bound

        probs = self.probs if temperature is None else apply_temperature(self.logits, temperature)
        report = calibration_report(probs, self.labels, n_bins=n_bins)
        if self.answer_mass is not None:
            report["answer_mass"] = float(self.answer_mass.mean())
        if self.lm_nll is not None:
            report["lm_nll"] = self.lm_nll
        if temperature is not None:
            report.update(temperature=float(temperature), temperature_at_bound=at_temperature_bound(temperature))
        return report


# Tokens projected through the LM head at once by the LM check (a [chunk, vocab] float32 buffer)
_LM_CHECK_CHUNK = 512


@torch.no_grad()
def _token_nll(base_model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`-log p(target)` of each `[hidden, target]` pair through the model's LM head, in float32, chunk by chunk."""
    from ..losses import full_lm_head_params, lm_head_transform, project_logits

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
    labels = np.array([answer_index(a, k, row=i) for i, (a, k) in enumerate(zip(dataset["answer"], num_choices))])
    k_max = int(num_choices.max())

    scoring = ScoringPass(n, shard, progress)
    limit = position_limit(model)
    lookup = OptionTokenLookup(tokenizer, k_max, chat_template)
    extra = [c for c in ("tools", "chat_template_kwargs") if c in dataset.column_names]
    rows_extra = dataset.select_columns(extra) if extra else None
    encoded, letter_ids, text_tokens = {}, {}, {}
    for i in dict.fromkeys(scoring.rows):
        kwargs = template_kwargs(rows_extra[i]) if extra else {}
        ids = tokenize_prompt(tokenizer, prompts[i], chat_template, kwargs)
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"The prompt of row {i} is {len(ids)} tokens long, over `max_length`={max_length}: truncating it would "
                "cut off the answer position. Raise `max_length` or drop the long rows."
            )
        check_length(i, len(ids), limit, "prompt", "the model has (`max_position_embeddings`)")
        encoded[i] = ids
        letter_ids[i] = lookup(prompts[i], ids, completions[i], kwargs)
        if lm_check:
            text_tokens[i] = prompt_text_tokens(tokenizer, prompts[i], ids, chat_template, kwargs)

    results = {}
    capture = BackboneHook(model) if lm_check else None
    try:
        with inference(model):
            batches = scoring.batches(model, encoded, batch_size, pad_id(tokenizer), desc, unit="q")
            for batch, *inputs in batches:
                if capture is not None:
                    capture.reset()
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
                lm = {}
                if capture is not None:
                    lm = prompt_text_nll(capture, [encoded[i] for i in batch], [text_tokens[i] for i in batch], batch)
                for row, i in enumerate(batch):
                    results[i] = (
                        option_logits[row].double().cpu().numpy(),
                        float(gold_nll[row]),
                        float(letter_mass[row]),
                        lm.get(i),
                    )
    finally:
        if capture is not None:
            capture.remove()
    results = scoring.gather(results)
    logits_out = {i: r[0] for i, r in results.items()}
    nll = {i: r[1] for i, r in results.items()}
    mass = {i: r[2] for i, r in results.items()}
    lm = {i: r[3] for i, r in results.items()}
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


def prompt_text_nll(capture: BackboneHook, sequences: list, positions: list, rows: list) -> dict:
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


# --------------------------------------------------------------------------------------------------------------------
# Open-ended answers
# --------------------------------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation: lower case, no accents, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(ch))
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _as_trained(completion: Any, tokenizer) -> Any:
    """The completion as `SFTTrainer` trains on it: a plain-text completion gets the EOS token appended."""
    if isinstance(completion, str) and tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
        return completion + tokenizer.eos_token
    return completion


def score_completions(
    model,
    tokenizer,
    dataset,
    batch_size: int = 16,
    check_correct: bool = False,
    max_new_tokens: int | None = None,
    progress: bool = True,
    desc: str = "Scoring answers",
    shard: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """
    Mean NLL of each row's completion tokens given its prompt (teacher forcing, length-sorted left-padded batches; only
    the completion positions are projected through the LM head), and, with `check_correct=True`, whether the greedy
    answer states the completion (`calib_trl.evaluation.generation.match_answer`; up to `max_new_tokens` new tokens,
    by default the completion's length + 8 and at least 32, so that an answer in a sentence fits).

    Returns:
        `(nll [N], correct [N] or None)`.
    """
    from .generation import match_answer, reference_text

    n = check_answer_rows(dataset)
    prompts, completions = dataset["prompt"], dataset["completion"]
    scoring = ScoringPass(n, shard, progress)
    limit = position_limit(model)
    seqs, comp_len, prompt_ids = {}, {}, {}
    for i in dict.fromkeys(scoring.rows):
        p = tokenize_prompt(tokenizer, prompts[i])
        full = tokenize_prompt_completion(tokenizer, prompts[i], _as_trained(completions[i], tokenizer))
        k = common_prefix_length(p, full)
        if k >= len(full):
            raise ValueError(f"Row {i} has an empty completion: there is no answer to score.")
        check_length(i, len(full), limit, "prompt and completion", "the model has (`max_position_embeddings`)")
        seqs[i], comp_len[i], prompt_ids[i] = full, len(full) - k, p[:k]
    pad_token = pad_id(tokenizer)
    nll, correct = {}, {}
    with inference(model), torch.no_grad():
        for batch, ids, mask, pos in scoring.batches(model, seqs, batch_size, pad_token, desc, unit="ex"):
            keep = max(comp_len[i] for i in batch) + 1
            logits = last_logits(model, ids, mask, pos, keep)
            logp = logits[:, :-1].log_softmax(-1)  # predicts the last keep-1 tokens
            targets = ids[:, ids.shape[1] - keep + 1 :].to(logp.device)
            token_nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            for r, i in enumerate(batch):
                nll[i] = float(token_nll[r, -comp_len[i] :].mean())
        if check_correct:
            # `generate` lives on the model itself, not on its DDP/FSDP wrapper; with several processes each one
            # keeps stepping until all are done (`synced_gpus`), since sharded models gather weights in every forward
            generator = extract_model_from_parallel(model)
            lengths = {i: len(s) for i, s in seqs.items()}  # the batches of the NLL pass
            batches = scoring.batches(model, prompt_ids, batch_size, pad_token, "Greedy answers", "ex", lengths)
            for batch, ids, mask, _ in batches:
                width = ids.shape[1]
                new = max_new_tokens or max(32, max(comp_len[i] for i in batch) + 8)
                out = generator.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    do_sample=False,
                    pad_token_id=pad_token,
                    synced_gpus=scoring.state is not None,
                    **no_router_logits(model),
                )
                texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
                for r, i in enumerate(batch):
                    correct[i] = match_answer(texts[r], reference_text(completions[i]))
    results = scoring.gather({i: (nll[i], correct.get(i)) for i in nll})
    nll = {i: v for i, (v, _) in results.items()}
    correct = {i: c for i, (_, c) in results.items()}
    nll_arr = np.array([nll[i] for i in range(n)])
    correct_arr = np.array([bool(correct[i]) for i in range(n)]) if check_correct else None
    return nll_arr, correct_arr


def answer_rows(dataset):
    """
    `dataset` in the form the scorers read: prompt/completion rows as they are; conversational language-modelling rows
    (`messages`, or ShareGPT `conversations`, converted to ChatML by TRL's `maybe_convert_to_chatml`) split at their
    last assistant message into `prompt` (the messages before it) and `completion` (that message). `choices` and
    `answer` are kept. Returns `None` when the rows hold no answer to score (plain text, pre-tokenized rows).
    """
    columns = get_dataset_column_names(dataset)
    if "prompt" in columns and "completion" in columns:
        return dataset
    if "messages" not in columns and "conversations" not in columns:
        return None

    def split(example):
        messages = maybe_convert_to_chatml(dict(example))["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ValueError(
                "A conversational row has no assistant message, so it has no answer to score: "
                f"{[m.get('role') for m in messages]}."
            )
        return {"prompt": messages[:last], "completion": [messages[last]]}

    keep = ("choices", "answer")
    return dataset.map(split, remove_columns=[c for c in columns if c not in keep])


def score_answers(
    model,
    tokenizer,
    dataset,
    batch_size: int = 16,
    check_correct: bool = False,
    progress: bool = True,
    desc: str = "Scoring answers",
    shard: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Answer NLL of each row (and correctness when asked), multiple choice or open-ended (see the module doc)."""
    if is_multiple_choice(dataset):
        scores = score_multiple_choice(
            model, tokenizer, dataset, batch_size=batch_size, progress=progress, desc=desc, shard=shard
        )
        return scores.answer_nll, scores.correct
    return score_completions(
        model,
        tokenizer,
        dataset,
        batch_size=batch_size,
        check_correct=check_correct,
        progress=progress,
        desc=desc,
        shard=shard,
    )
