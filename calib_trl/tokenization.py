"""Prompts tokenized exactly as `SFTTrainer` tokenizes them, and the tokens of their option letters.

Which token a letter becomes depends on the tokenizer and on what precedes it (`"A"` and `" A"` are different tokens
for most BPE tokenizers), so the letter tokens are read off the tokenized prompt + completion rather than off the letter
alone. Conversational prompts go through the chat template with the row's `tools` and `chat_template_kwargs`, as
`SFTTrainer` passes them; the split between prompt and completion is TRL's own (`trl.data_utils.common_prefix_length`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from trl.data_utils import common_prefix_length, is_conversational

from .mcq import LETTERS


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
    if is_conversational({"prompt": prompt}):
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
    if is_conversational({"prompt": prompt}):
        out = tokenizer.apply_chat_template(
            prompt + completion,
            tokenize=True,
            return_dict=True,
            chat_template=chat_template,
            **(template_kwargs or {}),
        )
        return list(out["input_ids"])
    return list(tokenizer(text=prompt + completion)["input_ids"])


def _letter_completion(prompt: Any, completion_template: Any, letter: str) -> Any:
    if is_conversational({"prompt": prompt}):
        return [{"role": "assistant", "content": letter}]
    if isinstance(completion_template, str) and completion_template.strip():
        # Keep the separator the dataset uses between prompt and letter (e.g. " B" after "Answer:")
        return completion_template[: len(completion_template) - len(completion_template.lstrip())] + letter
    return letter if prompt[-1:].isspace() else f" {letter}"


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
        n = common_prefix_length(prompt_ids, full)
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
    if is_conversational({"prompt": prompt}):
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
