"""Which token ids to read the answers from, taken from the loaded tokenizer (no model, no constants).

A choice's probability is the next-token probability of its token after the prompt, so every
choice must be exactly one token there, the prompt's own tokens must not change at the boundary,
and the choices must be different tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class AnswerTokenError(ValueError):
    """The answers cannot be read as distinct single next tokens after this prompt."""


def opens_answer(text: str) -> bool:
    """True when an answer follows ``text`` without a space (after a newline, a quote, a bracket)."""
    return not text or text[-1].isspace() or text[-1] in "\"'([{"


def join_answer_prefix(chat_text: str, answer_prefix: str) -> str:
    """The assistant turn forced to begin with ``answer_prefix`` (one space after 'ASSISTANT:')."""
    if not answer_prefix:
        return chat_text
    return chat_text + ("" if opens_answer(chat_text) else " ") + answer_prefix


def answer_token_ids(tokenizer: Any, text: str, choices: Sequence[str]) -> tuple[str, list[int]]:
    """The text to score and the id of each choice's token after it, from the tokenizer.

    The answer follows ``text`` the way the model would write it: with a leading space after a
    word or colon ('ASSISTANT: Yes' is ``▁Yes`` in LLaVA's tokenizer), bare after a newline or a
    quote. If a choice is then more than one token (LLaVA writes every digit as ``▁`` + digit)
    the space moves into the prompt and the bare choices are read. Raises AnswerTokenError when
    the prompt's own tokens change at the boundary, a choice is not one token, or two choices
    are the same token.
    """
    lead = "" if opens_answer(text) else " "
    attempts = [(text, lead)] + ([(text + lead, "")] if lead else [])
    problems = []
    for prompt, sep in attempts:
        try:
            return prompt, single_token_ids(tokenizer, prompt, [sep + c for c in choices])
        except AnswerTokenError as exc:
            problems.append(str(exc))
    raise AnswerTokenError("; ".join(problems))


def single_token_ids(tokenizer: Any, prompt: str, answers: Sequence[str]) -> list[int]:
    """The one token each answer adds after ``prompt``; AnswerTokenError if that is not so."""
    base = tokenizer.encode(prompt, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = []
    for answer in answers:
        full = tokenizer.encode(prompt + answer, add_special_tokens=False)
        if full[: len(base)] != base or len(full) == len(base):
            raise AnswerTokenError(f"the prompt's last tokens merge with the answer {answer!r}")
        added = full[len(base) :]
        if len(added) != 1:
            pieces = tokenizer.convert_ids_to_tokens(added)
            raise AnswerTokenError(f"the answer {answer!r} is {len(added)} tokens {pieces}, not one")
        if added[0] == unk:
            raise AnswerTokenError(f"the answer {answer!r} is an unknown token")
        ids.append(added[0])
    if len(set(ids)) != len(ids):
        named = {a: tokenizer.convert_ids_to_tokens(i) for a, i in zip(answers, ids, strict=True)}
        raise AnswerTokenError(f"the answers are the same token: {named}")
    return ids
