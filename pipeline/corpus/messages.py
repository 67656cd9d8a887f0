"""Messages as chat templates read them: canonical `{role, content}` messages with their reasoning and
tool keys, checked once when a row is parsed (`pipeline.corpus.records`), and the split of an assistant message
into its reasoning and its answer.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipeline import errors
from pipeline.errors import RowError

KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "ipython"})
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Message keys that reach the template besides role and content (agentic rows).
TOOL_KEYS = ("tool_calls", "name", "tool_call_id")
# Canonical messages as Arrow data, from the parse stage to the tokenize stages. The tool keys hold any
# JSON value (a call's arguments, a numeric id), so they travel as one JSON object, present when any is.
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.large_string()), ("reasoning_content", pa.large_string()),
                     ("tool_keys", pa.large_string())])  # fmt: skip
MESSAGES = pa.list_(MESSAGE)


def _text_content(content: Any, i: int) -> Any:
    """A message's content as text: a list of parts (OpenAI and HF multimodal messages) is the join of
    its text parts; any other part cannot be scored as text."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise RowError(errors.UNSUPPORTED_CONTENT_PART, f"message {i} has a content part of type {str(kind)[:40]!r}")
        if not isinstance(part.get("text"), str):
            raise RowError(errors.NON_STRING_CONTENT, f"message {i} has a text part without a string text")
        texts.append(part["text"])
    return "".join(texts)


def canonical_messages(messages: Any) -> Any:
    """Messages as templates read them: `{role, content}`, `reasoning_content` when the message has
    reasoning (given as `reasoning_content` or `thinking`), and the tool keys as given when present;
    content parts joined. Anything malformed is passed on for `validate_messages` to name."""
    if not isinstance(messages, list):
        return messages
    canonical = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            canonical.append(message)
            continue
        entry = {"role": message.get("role"), "content": _text_content(message.get("content"), i)}
        reasoning = message.get("reasoning_content")
        if reasoning is None:
            reasoning = message.get("thinking")
        if reasoning is not None and reasoning != "":
            entry["reasoning_content"] = reasoning
        for key in TOOL_KEYS:
            if message.get(key) is not None:
                entry[key] = message[key]
        canonical.append(entry)
    return canonical


def messages_to_arrow(conversations: list[list[dict] | None]) -> pa.Array:
    """Canonical messages (None for a row without) as a MESSAGES array."""

    def entry(message: dict) -> dict:
        tools = {key: message[key] for key in TOOL_KEYS if key in message}
        return {"role": message["role"], "content": message["content"], "reasoning_content": message.get("reasoning_content"),
                "tool_keys": json.dumps(tools, ensure_ascii=False) if tools else None}  # fmt: skip

    return pa.array([None if c is None else [entry(m) for m in c] for c in conversations], MESSAGES)


def messages_from_arrow(conversation: list[dict]) -> list[dict]:
    """One row of a MESSAGES array (as `to_pylist` gives it) back to the canonical messages it was made of,
    key for key: role and content always, the others only when present."""
    messages = []
    for entry in conversation:
        message = {"role": entry["role"], "content": entry["content"]}
        if entry["reasoning_content"] is not None:
            message["reasoning_content"] = entry["reasoning_content"]
        if entry["tool_keys"] is not None:
            message.update(json.loads(entry["tool_keys"]))
        messages.append(message)
    return messages


def _check_tool_calls(calls: Any, i: int) -> None:
    if not isinstance(calls, list) or not all(
        isinstance(c, dict) and isinstance((c.get("function") or c).get("name"), str) for c in calls
    ):
        raise RowError(errors.BAD_MESSAGE, f"message {i} tool_calls is not a list of calls with a function name")


def validate_messages(messages: Any) -> list[dict]:
    """Check the shape of canonical messages; raise RowError naming the first problem."""
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
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""  # a tool call alone: its content may be null
        if not isinstance(content, str):
            raise RowError(errors.NON_STRING_CONTENT, f"message {i} ({role}) content is {type(content).__name__}, not a string")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise RowError(errors.NON_STRING_REASONING, f"message {i} reasoning is {type(reasoning).__name__}, not a string")
        if "tool_calls" in message:
            _check_tool_calls(message["tool_calls"], i)
        if role == "assistant":
            if not content.strip() and not (reasoning or "").strip() and not message.get("tool_calls"):
                raise RowError(errors.EMPTY_ASSISTANT_CONTENT, f"assistant message {i} is empty")
            n_assistant += 1
    if n_assistant == 0:
        raise RowError(errors.NO_ASSISTANT_TURN, "no assistant message")
    return messages


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message: its `reasoning_content` (or `thinking`), else an
    inline think block (everything before the last `</think>`, the opening tag removed), else no reasoning."""
    content = message["content"] or ""
    reasoning = message.get("reasoning_content") or message.get("thinking")
    if reasoning:
        return reasoning, content
    if THINK_CLOSE not in content:
        return "", content
    reasoning, _, answer = content.rpartition(THINK_CLOSE)
    reasoning = reasoning.lstrip()
    return reasoning.removeprefix(THINK_OPEN), answer
