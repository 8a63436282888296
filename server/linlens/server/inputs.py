"""A request's input as token ids: plain text, chat turns through the model's template, or ids checked against the
vocabulary. What is wrong is an :class:`InputError` whose message says what to change (INVALID_ARGUMENT).

Kept apart from :mod:`linlens.server.generation`, which holds the generation loop only: explanations, concept prompts
and the warm-up encode their input here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from linlens.engine import check_token_id


class InputError(ValueError):
    """The request's input or parameters are unusable; the message says what to change (INVALID_ARGUMENT)."""


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Tokenise plain text with the tokenizer's usual special tokens (a BOS where the model expects one)."""
    if not text:
        raise InputError("input.text is empty; send the prompt text, token ids or chat messages")
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise InputError("input.text tokenised to no tokens at all")
    return [int(i) for i in ids]


def encode_chat(tokenizer: Any, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> list[int]:
    """Render ``(role, content)`` turns with the model's chat template and tokenise them."""
    if not messages:
        raise InputError("input.chat.messages is empty; send at least one message")
    for i, (role, _content) in enumerate(messages):
        if not role:
            raise InputError(f"input.chat.messages[{i}].role is empty; use e.g. 'system', 'user' or 'assistant'")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("this model has no chat template; send input.text or input.token_ids instead")
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages],
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
        )
    except Exception as exc:  # templates raise arbitrary errors (e.g. "roles must alternate")
        raise InputError(f"the model's chat template rejected the messages: {exc}") from None
    ids = rendered["input_ids"] if not isinstance(rendered, list) else rendered
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def check_token_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """Refuse an empty id list or an id outside the vocabulary (OptionError naming the first bad position)."""
    if not ids:
        raise InputError("input.token_ids.ids is empty; send at least one token id")
    return [check_token_id(int(tid), vocab_size, f"input.token_ids.ids[{pos}]") for pos, tid in enumerate(ids)]


__all__ = ["InputError", "check_token_ids", "encode_chat", "encode_text"]
