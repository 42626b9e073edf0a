"""Calibration of generated (open-ended) answers.

For each row with a reference answer (a prompt/completion row whose completion is the answer), the model answers
greedily, and calib-trl measures:

- **correctness**: whether the answer states the reference (`match_answer`, or a function of the user's);
- **confidence**: what a deployed model can say about its own answer without knowing the reference. Two are measured
  in the same pass, from the logits of the generated tokens:
  - `sequence` (the default): the length-normalised probability of the answer's tokens, `exp(mean_t log p(y_t))`,
    over every generated token up to and including the end-of-sequence token when the model stopped;
  - `first_token`: the probability of the answer's first content token (the first one with a letter or digit).
  The default follows the comparison on the embedded arithmetic task in benchmarks/README.md, by AUROC and ECE;
- **entropy**: the mean entropy of the next-token distribution at the answer's positions, what a temperature-1
  sample draws from;
- the language-modelling check (`lm_nll`): the NLL of the prompts' own text, as for multiple choice.

The probability of the *reference* answer needs the answer, so it serves knowledge detection, not confidence (its AUROC
is near 1 by construction). `GenerationScores.report` gives accuracy (the match rate), ECE, smooth ECE, Brier and
AUROC of the chosen confidence, like `calibration_report` does for multiple choice.

Temperature scaling of generated answers divides the token logits by `T`, fitted by the NLL of the reference answers'
tokens on held-out rows (`fit_answer_temperature`); greedy answers do not change with `T`, their confidence does
(`score_generations(..., temperatures=[T])`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from transformers import GenerationConfig
from trl.data_utils import common_prefix_length, is_conversational

from ..core.capture import BackboneHook
from ..metrics import confidence_report
from ..tokenization import prompt_text_tokens, template_kwargs, tokenize_prompt, tokenize_prompt_completion
from .scoring import (
    ScoringPass,
    check_answer_rows,
    check_length,
    inference,
    last_logits,
    no_router_logits,
    normalize_text,
    pad_id,
    position_limit,
    prompt_text_nll,
)
from .temperature_scaling import at_temperature_bound, fit_temperature

CONFIDENCES = ("sequence", "first_token")
DEFAULT_CONFIDENCE = "sequence"

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


# ---------------------------------------------------------------------------------------------------------------------
# The match rule
# ---------------------------------------------------------------------------------------------------------------------


def _as_number(text: str) -> str | None:
    """A number written `text` as its canonical string (`"1,024"` -> `"1024"`, `"+7"` -> `"7"`), or `None`."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = text.replace(",", "").lstrip("+")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return "0" if value in ("-0", "") else value


def first_line(text: str) -> str:
    """The first line of `text` that holds more than white space (`""` when there is none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def match_answer(answer: str, reference: str) -> bool:
    """
    Whether a generated `answer` states the `reference` answer. Only the answer's first non-empty line is read.

    - A numeric reference (`"72"`, `"-3"`, `"1,024"`, `"2.5"`): the **last number** of that line must equal it (commas
      between digits are thousands separators). `"27 + 45 = 72"` and `"The answer is 72."` answer `"72"`;
      `"27 + 45 = 70"` does not, and `"17"` does not answer `"7"`.
    - Any other reference: its normalised words (lower case, no punctuation or articles, single spaces) must appear in
      the line's normalised words, **as whole words in a row**. `"The capital of Kenya is Nairobi."` and
      `"Nairobi, Kenya"` answer `"Nairobi"`; `"Nairobian"` does not, and `"New York"` does not answer `"York"`... it
      does: `"York"` is a whole word of it, which is the rule's known false positive.

    Number words (`"seventy-two"`) are not read as numbers. Pass another rule as `match=` to the scorers.
    """
    line = first_line(answer)
    number = _as_number(reference)
    if number is not None:
        found = [_as_number(n) for n in _NUMBER.findall(line)]
        return bool(found) and found[-1] == number
    words, wanted = normalize_text(line).split(), normalize_text(reference).split()
    if not wanted:
        return False
    return any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1))


def reference_text(completion: Any) -> str:
    """The reference answer of a row: its completion's text (the assistant messages' content, for a conversation)."""
    if is_conversational({"prompt": completion}):
        return "".join(m.get("content") or "" for m in completion).strip()
    if not isinstance(completion, str):
        raise ValueError(f"`completion` must be a string or a list of chat messages, got {type(completion).__name__}.")
    return completion.strip()


# ---------------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationScores:
    """
    What one pass of greedy answers measured, per row in dataset order (see the module docstring).

    `confidence[name]` holds each confidence of `CONFIDENCES` at temperature 1, `scaled[(name, T)]` the same after
    dividing the token logits by `T` (the temperatures asked for).
    """

    answers: list[str]
    references: list[str]
    correct: np.ndarray  # [N] the answer states the reference
    confidence: dict[str, np.ndarray]  # name -> [N]
    answer_tokens: np.ndarray  # [N] tokens the sequence confidence averages over
    entropy: np.ndarray  # [N] mean next-token entropy (nats) at the answer's positions
    scaled: dict[tuple[str, float], np.ndarray] = field(default_factory=dict)
    lm_nll_sum: np.ndarray | None = None  # [N] summed NLL of the prompt's text tokens (with `lm_check=True`)
    lm_tokens: np.ndarray | None = None

    @property
    def lm_nll(self) -> float | None:
        if self.lm_nll_sum is None or self.lm_tokens.sum() == 0:
            return None
        return float(self.lm_nll_sum.sum() / self.lm_tokens.sum())

    def confidences(self, confidence: str = DEFAULT_CONFIDENCE, temperature: float | None = None) -> np.ndarray:
        if confidence not in CONFIDENCES:
            raise ValueError(f"`confidence` must be one of {list(CONFIDENCES)}, got {confidence!r}.")
        if temperature is None:
            return self.confidence[confidence]
        key = (confidence, float(temperature))
        if key not in self.scaled:
            raise ValueError(
                f"No confidences at temperature {temperature}: pass `temperatures=[{temperature}]` to "
                "`score_generations`."
            )
        return self.scaled[key]

    def report(self, n_bins: int = 10, confidence: str = DEFAULT_CONFIDENCE, temperature: float | None = None) -> dict:
        """
        `confidence_report` of the chosen confidence against correctness (its `accuracy` is the match rate), with the
        answers' mean `entropy`, `lm_nll` when measured, `kind: "generation"`, and the temperature when one was
        applied (with `temperature_at_bound`).
        """
        report = confidence_report(self.confidences(confidence, temperature), self.correct, n_bins=n_bins)
        report.update(kind="generation", confidence=confidence, entropy=float(self.entropy.mean()))
        if self.lm_nll is not None:
            report["lm_nll"] = self.lm_nll
        if temperature is not None:
            report.update(temperature=float(temperature), temperature_at_bound=at_temperature_bound(temperature))
        return report


def _generation_config(model, tokenizer, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding, stopping at the tokenizer's and the model's end-of-sequence tokens."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos or None,
        pad_token_id=pad_id(tokenizer),
        return_dict_in_generate=True,
        output_logits=True,
    )


def _is_content(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


@torch.no_grad()
def score_generations(
    model,
    tokenizer,
    dataset,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    match: Callable[[str, str], bool] | None = None,
    temperatures: Sequence[float] = (),
    lm_check: bool = True,
    chat_template: str | None = None,
    progress: bool = True,
    desc: str = "Greedy answers",
    shard: bool = False,
) -> GenerationScores:
    """
    Answer every row greedily and measure the answers' correctness, confidence, entropy and (with `lm_check`) the
    language-modelling check; see the module docstring.

    Rows are answered in length-sorted, left-padded batches in inference mode (the model's training mode is restored
    afterwards), sharded across processes under `accelerate launch` with `shard=True`, and returned in dataset order.

    Args:
        model: any causal LM (a `PreTrainedModel`, a `PeftModel`, or one wrapped for distributed training).
        tokenizer: its tokenizer.
        dataset (`datasets.Dataset`): prompt/completion rows; the completion's text is the reference answer.
        batch_size (`int`): prompts per `generate` call.
        max_new_tokens (`int`): the longest answer; a longer one is cut there (and judged as it is).
        match (`Callable[[str, str], bool]`, *optional*): `match(answer, reference)`; default `match_answer`.
        temperatures (`Sequence[float]`): also compute the confidences with the token logits divided by each of these.
        lm_check (`bool`): also measure the NLL of the prompts' own text (`GenerationScores.lm_nll`).
        chat_template (`str`, *optional*): chat template overriding the tokenizer's.
        progress (`bool`): show a progress bar (main process only).
        desc (`str`): its label.
        shard (`bool`): under `accelerate launch`, answer a share of the rows on each process and gather them.
    """
    n = check_answer_rows(dataset)
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
    temperatures = [float(t) for t in temperatures]
    if any(not t > 0 for t in temperatures):
        raise ValueError(f"Temperatures must be > 0, got {temperatures}.")
    match = match or match_answer
    prompts, completions = dataset["prompt"], dataset["completion"]
    extra = [c for c in ("tools", "chat_template_kwargs") if c in dataset.column_names]
    rows_extra = dataset.select_columns(extra) if extra else None
    scoring = ScoringPass(n, shard, progress)
    limit = position_limit(model)
    encoded, text_tokens, references = {}, {}, {}
    for i in dict.fromkeys(scoring.rows):
        kwargs = template_kwargs(rows_extra[i]) if extra else {}
        ids = tokenize_prompt(tokenizer, prompts[i], chat_template, kwargs)
        check_length(i, len(ids) + max_new_tokens, limit, "prompt and answer", "the model has")
        encoded[i] = ids
        references[i] = reference_text(completions[i])
        if lm_check:
            text_tokens[i] = prompt_text_tokens(tokenizer, prompts[i], ids, chat_template, kwargs)

    generator = extract_model_from_parallel(model)  # `generate` lives on the model, not on its DDP/FSDP wrapper
    config = _generation_config(generator, tokenizer, max_new_tokens)
    stop = set(config.eos_token_id or [])
    capture = BackboneHook(model) if lm_check else None
    results = {}
    try:
        with inference(model):
            for batch, ids, mask, _ in scoring.batches(model, encoded, batch_size, pad_id(tokenizer), desc, "ex"):
                if capture is not None:
                    capture.reset()
                out = generator.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=config,
                    synced_gpus=scoring.state is not None,
                    **no_router_logits(model),
                )
                new = out.sequences[:, ids.shape[1] :]
                logits = torch.stack(out.logits, dim=1).float()  # [B, S, V], before any logits processor
                logp = logits.log_softmax(-1)
                chosen = logp.gather(-1, new[..., None]).squeeze(-1)  # [B, S]
                entropy = -(logp.exp() * logp).sum(-1)
                scaled = {t: (logits / t).log_softmax(-1).gather(-1, new[..., None]).squeeze(-1) for t in temperatures}
                lm = {}
                if capture is not None:
                    lm = prompt_text_nll(capture, [encoded[i] for i in batch], [text_tokens[i] for i in batch], batch)
                for r, i in enumerate(batch):
                    tokens = new[r].tolist()
                    end = next((k for k, t in enumerate(tokens) if t in stop), None)
                    answer_ids = tokens if end is None else tokens[:end]
                    counted = len(tokens) if end is None else end + 1  # the end-of-sequence token counts
                    pieces = [tokenizer.decode([t]) for t in answer_ids]
                    first = next((k for k, piece in enumerate(pieces) if _is_content(piece)), 0)
                    text = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
                    row_scaled = {}
                    for t, lp in scaled.items():
                        row_scaled[("sequence", t)] = float(lp[r, :counted].mean().exp())
                        row_scaled[("first_token", t)] = float(lp[r, first].exp())
                    results[i] = (
                        text,
                        bool(match(text, references[i])),
                        float(chosen[r, :counted].mean().exp()),
                        float(chosen[r, first].exp()),
                        counted,
                        float(entropy[r, :counted].mean()),
                        row_scaled,
                        lm.get(i),
                    )
    finally:
        if capture is not None:
            capture.remove()
    results = scoring.gather(results)
    rows = [results[i] for i in range(n)]
    scaled_out = {key: np.array([r[6][key] for r in rows]) for key in (rows[0][6] if rows else {})}
    return GenerationScores(
        answers=[r[0] for r in rows],
        references=[reference_text(c) for c in completions],
        correct=np.array([r[1] for r in rows], dtype=bool),
        confidence={"sequence": np.array([r[2] for r in rows]), "first_token": np.array([r[3] for r in rows])},
        answer_tokens=np.array([r[4] for r in rows]),
        entropy=np.array([r[5] for r in rows]),
        scaled=scaled_out,
        lm_nll_sum=np.array([r[7][0] for r in rows]) if lm_check else None,
        lm_tokens=np.array([r[7][1] for r in rows]) if lm_check else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Temperature scaling of the token logits
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_token_logits(
    model, tokenizer, dataset, batch_size: int = 16, chat_template: str | None = None, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The float32 logits `[tokens, V]` at every token of the rows' reference answers, as `SFTTrainer` trains on them
    (the completion and the end-of-sequence token), teacher-forced after the prompt, and those tokens `[tokens]`.
    """
    prompts, completions = dataset["prompt"], dataset["completion"]
    scoring = ScoringPass(len(dataset), False, progress)
    limit = position_limit(model)
    sequences, answer_len = {}, {}
    for i in scoring.rows:
        prompt = tokenize_prompt(tokenizer, prompts[i], chat_template)
        completion = completions[i]
        if isinstance(completion, str) and tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        full = tokenize_prompt_completion(tokenizer, prompts[i], completion, chat_template)
        k = common_prefix_length(prompt, full)
        if is_conversational({"prompt": prompts[i]}) and tokenizer.eos_token_id is not None:
            full = full[
                : len(full) - next((j for j, t in enumerate(reversed(full)) if t == tokenizer.eos_token_id), 0)
            ]
        if k >= len(full):
            raise ValueError(f"Row {i} has an empty completion: there is no reference answer to fit on.")
        check_length(i, len(full), limit, "prompt and completion", "the model has")
        sequences[i], answer_len[i] = full, len(full) - k
    chunks, targets = {}, {}
    with inference(model):
        for batch, ids, mask, pos in scoring.batches(
            model, sequences, batch_size, pad_id(tokenizer), "Reference answers", "ex"
        ):
            keep = max(answer_len[i] for i in batch) + 1
            logits = last_logits(model, ids, mask, pos, keep)
            for r, i in enumerate(batch):
                m = answer_len[i]
                chunks[i] = logits[r, keep - 1 - m : keep - 1].cpu()
                targets[i] = ids[r, ids.shape[1] - m :].cpu()
    order = sorted(chunks)  # dataset order
    return torch.cat([chunks[i] for i in order]), torch.cat([targets[i] for i in order])


def fit_answer_temperature(
    model, tokenizer, dataset, batch_size: int = 16, chat_template: str | None = None, progress: bool = True
) -> float:
    """
    The temperature `T` of the token logits that minimises the NLL of the reference answers' tokens on `dataset`
    (held-out prompt/completion rows), within `fit_temperature`'s bounds (see `at_temperature_bound`).
    """
    logits, targets = reference_token_logits(model, tokenizer, dataset, batch_size, chat_template, progress)
    return fit_temperature(logits, targets)
