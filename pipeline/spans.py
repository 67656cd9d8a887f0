"""Response spans: which tokens of a chat-template encoding are the bodies of assistant turns.

Definition (the official RSR code's marker scan): for every assistant turn, the response tokens are
what the student's chat template renders for that turn after the turn's header (`<|im_start|>assistant\n`,
`<|start_header_id|>assistant<|end_header_id|>\n\n`, ...) up to, not including, its end-of-turn marker.
That includes what the template itself writes into the turn: a think block built from
`reasoning_content`, an empty think block it inserts.

The header and end-of-turn marker are read off the template itself by rendering a probe conversation
(no table of known templates): the header is what the generation prompt and a rendered assistant turn
have in common, the end marker is the special token that follows the turn's text. Each turn is then
found in the real rendering by scanning for them, starting where the rendering of the conversation
before the turn ends, so text in a user message can never pass for a turn.

Two ways to treat reasoning that a template drops (DeepSeek-R1-Distill drops every think block,
Qwen3 and QwQ drop them from earlier turns, most templates ignore `reasoning_content`):
  template  score what the template renders, and flag the row `content_dropped`;
  keep      score every turn's reasoning and content as given: the template's generation prompt at
            that point of the conversation, the reasoning as a think block, the content, the end marker.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Any, Sequence

from pipeline import errors
from pipeline.errors import RowError

KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "ipython"})
REASONING_MODES = ("template", "keep")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Templates for students that ship none (base models), by name: `students[i].chat_template: chatml`.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    # Positions q of response tokens; the logits at q - 1 predict them. Always 0 < q < len(input_ids).
    response_positions: list[int]
    truncated: bool
    # The template left out text of an assistant message (reasoning="template" only).
    content_dropped: bool = False


@dataclass(frozen=True)
class TurnMarkers:
    """How a template writes an assistant turn, read off the template by `turn_markers`."""

    header: str  # opens the turn: "<|im_start|>assistant\n"
    end: str  # closes it: "<|im_end|>"; "" when the template closes turns with whitespace only
    after_body: str  # everything written after a turn's body: "<|im_end|>\n"
    generation_prompt: str  # what add_generation_prompt appends: "<|im_start|>assistant\n<think>\n" (QwQ)


def load_chat_template(spec: str) -> str:
    """A built-in template's text by name, else the text of a .jinja file."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    with open(spec, encoding="utf-8") as f:
        return f.read()


def load_tokenizer(path: str, chat_template: str | None = None):
    """The student's tokenizer, with `chat_template` (see `load_chat_template`) instead of its own when set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template:
        tokenizer.chat_template = load_chat_template(chat_template)
    return tokenizer


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
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise RowError(
                errors.NON_STRING_REASONING, f"message {i} reasoning is {type(reasoning).__name__}, not a string"
            )
        if role == "assistant":
            if not content.strip() and not (reasoning or "").strip():
                raise RowError(errors.EMPTY_ASSISTANT_CONTENT, f"assistant message {i} is empty")
            n_assistant += 1
    if n_assistant == 0:
        raise RowError(errors.NO_ASSISTANT_TURN, "no assistant message")
    return messages


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message: its `reasoning_content`, else an inline think block
    (everything before the last `</think>`, the opening tag removed), else no reasoning."""
    content = message["content"]
    if message.get("reasoning_content"):
        return message["reasoning_content"], content
    if THINK_CLOSE not in content:
        return "", content
    reasoning, _, answer = content.rpartition(THINK_CLOSE)
    reasoning = reasoning.lstrip()
    return reasoning.removeprefix(THINK_OPEN), answer


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    # Templates read reasoning as `reasoning_content` (Qwen3) or `thinking` (gpt-oss): offer both.
    messages = [{**m, "thinking": m["reasoning_content"]} if m.get("reasoning_content") else m for m in messages]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises arbitrary exceptions (raise_exception(), TypeError, ...)
        raise RowError(errors.TEMPLATE_ERROR, f"chat template failed: {type(exc).__name__}: {exc}") from exc


PROBE_QUESTION, PROBE_REPLY = "Probe question 7", "Probe reply 9"
_MARKERS: dict[tuple[int, str], TurnMarkers] = {}


def turn_markers(tokenizer) -> TurnMarkers:
    """Read the assistant header and end-of-turn marker off the tokenizer's chat template (cached)."""
    key = (id(tokenizer), tokenizer.chat_template)
    if key not in _MARKERS:
        _MARKERS[key] = _probe_markers(tokenizer)
    return _MARKERS[key]


def _probe_markers(tokenizer) -> TurnMarkers:
    question = [{"role": "user", "content": PROBE_QUESTION}]
    before = _render(tokenizer, question, add_generation_prompt=False)
    prompted = _render(tokenizer, question, add_generation_prompt=True)
    answered = _render(tokenizer, [*question, {"role": "assistant", "content": PROBE_REPLY}], add_generation_prompt=False)
    if not (prompted.startswith(before) and answered.startswith(before)) or PROBE_REPLY not in answered[len(before) :]:
        raise RowError(errors.TEMPLATE_ERROR, "cannot read the assistant turn format off the chat template")
    generation_prompt = prompted[len(before) :]
    turn = answered[len(before) :]
    reply_at = turn.index(PROBE_REPLY)
    # Up to the generation prompt's first difference: QwQ's prompt also opens a think block, Qwen3's
    # rendered turn inserts an empty one; neither belongs to the header.
    header = os.path.commonprefix([generation_prompt, turn[:reply_at]]) or turn[:reply_at]
    if not header.strip():
        raise RowError(errors.TEMPLATE_ERROR, "the chat template writes no header before an assistant turn")
    after_body = turn[reply_at + len(PROBE_REPLY) :]
    special = [t for t in tokenizer.get_added_vocab() if t and after_body.startswith(t)]
    end = max(special, key=len) if special else after_body.strip()
    return TurnMarkers(header, end, after_body, generation_prompt)


def _prefix_length(tokenizer, messages: Sequence[dict], text: str) -> int:
    """Where the rendering of `messages` ends inside `text`, or 0 where it is not a prefix of it
    (templates that render earlier turns differently once more follow)."""
    if not messages:
        return 0
    try:
        prefix = _render(tokenizer, messages, add_generation_prompt=False)
    except RowError:
        return 0
    return len(prefix) if text.startswith(prefix) else 0


def _turn_spans(tokenizer, messages: Sequence[dict], text: str, markers: TurnMarkers) -> list[tuple[int, int, int]]:
    """(body start, body end, turn end) in `text` of every assistant turn of `messages`."""
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = text.find(markers.header, max(cursor, _prefix_length(tokenizer, messages[:i], text)))
        if start < 0:
            raise RowError(errors.TEMPLATE_ERROR, f"assistant message {i}: turn header {markers.header!r} not rendered")
        body_start = start + len(markers.header)
        if markers.end:
            body_end = text.find(markers.end, body_start)
            if body_end < 0:
                raise RowError(errors.TEMPLATE_ERROR, f"assistant message {i}: end of turn {markers.end!r} not rendered")
            turn_end = body_end + len(markers.end)
        else:  # whitespace closes turns: the turn ends where the next message's rendering starts
            turn_end = _prefix_length(tokenizer, messages[: i + 1], text) or len(text)
            body_end = turn_end - len(markers.after_body) if text[:turn_end].endswith(markers.after_body) else turn_end
            if body_end < body_start:
                raise RowError(errors.TEMPLATE_ERROR, f"assistant message {i}: turn not found in the rendering")
        spans.append((body_start, body_end, turn_end))
        cursor = turn_end
    return spans


def _dropped_text(messages: Sequence[dict], text: str, spans: Sequence[tuple[int, int, int]]) -> bool:
    """Whether some assistant message's reasoning or answer is missing from its rendered turn body."""
    assistant = [m for m in messages if m["role"] == "assistant"]
    for message, (body_start, body_end, _) in zip(assistant, spans):
        body = text[body_start:body_end]
        if any(piece.strip() not in body for piece in split_reasoning(message)):
            return True
    return False


def _kept_body(message: dict, opened_think: bool) -> str:
    """A turn body with the message's reasoning as a think block and its content, as given."""
    content = message["content"]
    if message.get("reasoning_content"):
        block = message["reasoning_content"].strip("\n") + f"\n{THINK_CLOSE}\n\n"
        return (block if opened_think else f"{THINK_OPEN}\n{block}") + content.lstrip("\n")
    if not opened_think:
        return content
    if content.lstrip().startswith(THINK_OPEN):  # the generation prompt already opened it
        return content.lstrip().removeprefix(THINK_OPEN).lstrip("\n")
    return content if THINK_CLOSE in content else f"\n{THINK_CLOSE}\n\n{content}"


def _kept_conversation(tokenizer, messages: Sequence[dict], markers: TurnMarkers) -> tuple[str, list[tuple[int, int]]]:
    """The conversation with every assistant turn written as the student would have generated it:
    the template's context and generation prompt, then the kept body, then the end-of-turn marker."""
    opened_think = THINK_OPEN in markers.generation_prompt[len(markers.header) :]
    text, spans = "", []
    assistant_indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for k, i in enumerate(assistant_indices):
        context = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else markers.generation_prompt
        if not context.endswith(markers.generation_prompt):
            raise RowError(errors.TEMPLATE_ERROR, f"assistant message {i}: the generation prompt differs from the probe's")
        if k:  # the template's rendering of the messages since the previous assistant turn
            context = context[_turn_spans(tokenizer, messages[:i], context, markers)[-1][2] :]
        body_start = len(text) + len(context) - len(markers.generation_prompt) + len(markers.header)
        text += context + _kept_body(messages[i], opened_think)
        spans.append((body_start, len(text)))
        text += markers.end or markers.after_body
    return text, spans


def encode_conversation(
    tokenizer, messages: Any, max_model_len: int | None = None, truncate: bool = True, reasoning: str = "template"
) -> EncodedConversation:
    """Encode `messages` with the tokenizer's chat template and find the response token positions.

    `reasoning`: "template" scores what the template renders (flagging dropped text), "keep" every
    turn's reasoning and content as given (see the module docstring). Rows longer than `max_model_len`
    keep the first `max_model_len` tokens and are flagged truncated, or raise RowError(too_long) when
    `truncate` is False.
    """
    if reasoning not in REASONING_MODES:
        raise ValueError(f"reasoning must be one of {REASONING_MODES}, got {reasoning!r}")
    messages = validate_messages(messages)
    markers = turn_markers(tokenizer)
    if reasoning == "keep":
        text, spans = _kept_conversation(tokenizer, messages, markers)
        content_dropped = False
    else:
        text = _render(tokenizer, messages, add_generation_prompt=False)
        turns = _turn_spans(tokenizer, messages, text, markers)
        spans = [(start, end) for start, end, _ in turns]
        content_dropped = _dropped_text(messages, text, turns)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    token_ends = [end for _, end in offsets]

    positions: list[int] = []
    for char_start, char_end in spans:
        # Offsets are non-decreasing, so bisect to the first token that ends inside the span; a token
        # that merges header text with the body's first characters carries body text and counts.
        q = bisect.bisect_right(token_ends, char_start)
        while q < len(input_ids) and offsets[q][0] < char_end:
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
    return EncodedConversation(input_ids, positions, truncated, content_dropped)
