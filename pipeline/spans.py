"""Response spans: which tokens of a chat-template encoding are assistant content.

The student's own chat template renders the conversation. Each assistant turn's content is located
in the rendered text by rendering the conversation prefix before it (with the generation prompt),
so no per-template marker table is needed; the tokenizer's offsets then map characters to tokens.
A token is a response token when it holds a character of an assistant turn's content, which excludes
the end-of-turn marker and anything else the template adds around the content.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

from pipeline import errors
from pipeline.errors import RowError

KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "ipython"})


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    # Positions q of response tokens; the logits at q - 1 predict them. Always 0 < q < len(input_ids).
    response_positions: list[int]
    truncated: bool


def validate_messages(messages: Any) -> list[dict]:
    """Check the shape of a `messages` value; raise RowError naming the first problem."""
    if messages is None:
        raise RowError(errors.MISSING_MESSAGES, "row has no messages")
    if not isinstance(messages, list):
        raise RowError(errors.MESSAGES_NOT_A_LIST, f"messages is a {type(messages).__name__}, not a list")
    n_assistant = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(errors.BAD_MESSAGE, f"message {i} is a {type(message).__name__}, not an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise RowError(errors.BAD_MESSAGE, f"message {i} has no string role")
        if role not in KNOWN_ROLES:
            raise RowError(errors.UNKNOWN_ROLE, f"message {i} has unknown role {role[:40]!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise RowError(
                errors.NON_STRING_CONTENT, f"message {i} ({role}) content is {type(content).__name__}, not a string"
            )
        if role == "assistant":
            if not content.strip():
                raise RowError(errors.EMPTY_ASSISTANT_CONTENT, f"assistant message {i} is empty")
            n_assistant += 1
    if n_assistant == 0:
        raise RowError(errors.NO_ASSISTANT_TURN, "no assistant message")
    return messages


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja raises arbitrary exceptions (raise_exception(), TypeError, ...)
        raise RowError(errors.TEMPLATE_ERROR, f"chat template failed: {type(exc).__name__}: {exc}") from exc


def assistant_char_spans(tokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, [(start, end) of each assistant content])."""
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        # Templates that rewrite earlier turns break the prefix property; then search from the cursor.
        start_hint = max(cursor, len(prefix)) if text.startswith(prefix) else cursor
        content = message["content"]
        for candidate in (content, content.strip()):  # some templates trim content
            start = text.find(candidate, start_hint)
            if start >= 0:
                break
        else:
            raise RowError(errors.TEMPLATE_ERROR, f"assistant message {i} content not found in the rendered template")
        end = start + len(candidate)
        spans.append((start, end))
        cursor = end
    return text, spans


def encode_conversation(
    tokenizer, messages: Any, max_model_len: int | None = None, truncate: bool = True
) -> EncodedConversation:
    """Encode `messages` with the tokenizer's chat template and find the response token positions.

    Rows longer than `max_model_len` keep the first `max_model_len` tokens and are flagged truncated,
    or raise RowError(too_long) when `truncate` is False.
    """
    messages = validate_messages(messages)
    text, spans = assistant_char_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    token_ends = [end for _, end in encoding["offset_mapping"]]

    positions: list[int] = []
    for char_start, char_end in spans:
        # Offsets are non-decreasing, so bisect to the first token that ends inside the span; a token
        # that merges template text with the content's first characters carries content and counts.
        q = bisect.bisect_right(token_ends, char_start)
        while q < len(input_ids) and encoding["offset_mapping"][q][0] < char_end:
            if q > 0:
                positions.append(q)
            q += 1

    truncated = max_model_len is not None and len(input_ids) > max_model_len
    if truncated:
        if not truncate:
            raise RowError(errors.TOO_LONG, f"{len(input_ids)} tokens > max_model_len {max_model_len}")
        input_ids = input_ids[:max_model_len]
        positions = [q for q in positions if q < max_model_len]
    if not positions:
        where = " inside max_model_len" if truncated else ""
        raise RowError(errors.NO_RESPONSE_TOKENS, f"no response tokens{where}")
    return EncodedConversation(input_ids, positions, truncated)

