"""Tokenization as SFTTrainer does it: the prompt-text tokens the language-model check reads."""

from helpers import make_mcq_dataset

from calib_trl.tokenization import prompt_text_tokens, tokenize_prompt


def test_prompt_text_tokens_are_the_last_messages_content(tok):
    row = make_mcq_dataset(1, seed=1)[0]
    ids = tokenize_prompt(tok, row["prompt"])
    positions = prompt_text_tokens(tok, row["prompt"], ids)
    # the tokenizer is character-level, so the selected tokens spell the message exactly, template tokens left out
    content = row["prompt"][-1]["content"]
    assert tok.decode([ids[p] for p in positions]) == content
    assert positions == list(range(positions[0], positions[0] + len(content)))
    plain = "Question: which?\nAnswer:"
    plain_ids = tokenize_prompt(tok, plain)
    assert prompt_text_tokens(tok, plain, plain_ids) == list(range(1, len(plain_ids)))
