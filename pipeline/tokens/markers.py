"""A chat template's assistant turn format (`TurnMarkers`: header, end markers, lead-ins), read off
renders of probe conversations rather than a table of known templates, so any template that renders works."""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline import errors
from pipeline.errors import RowError


@dataclass(frozen=True)
class TurnMarkers:
    """How a template writes an assistant turn, read off the template by `turn_markers`."""

    header: str  # opens an assistant message: "<|im_start|>assistant\n"; "" for [INST] templates
    ends: tuple[str, ...]  # end-of-message markers, a final turn's first: ("<|im_end|>",); () when whitespace closes turns
    earlier_end: str  # the marker that ends a turn others follow: harmony's "<|end|>" where a final one gets "<|return|>"
    after_body: str  # everything a final turn's render writes after its body: "<|im_end|>\n"
    generation_prompt: str  # what add_generation_prompt appends: "<|im_start|>assistant\n<think>\n" (QwQ)
    closer: str  # what a render without a generation prompt appends at the very end: Phi's "<|endoftext|>"
    opener: str  # headerless templates: what ends the message before an assistant turn: " [/INST]"
    # From the end of a user message's or a tool result's text through the header of the assistant turn
    # after it, leading whitespace left out: {"user": "<|im_end|>\n<|im_start|>assistant\n", "tool": ...};
    # DeepSeek writes no header after a tool result: "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>".
    lead_ins: dict[str, str]
    rendered_per_message: int  # the most assistant messages it writes for one: harmony's analysis and final, 2
    renders_reasoning: bool  # a final assistant turn's reasoning field is rendered (Qwen3, gpt-oss)

    @property
    def end(self) -> str:
        """The marker that ends a final turn ("" when whitespace closes turns)."""
        return self.ends[0] if self.ends else ""


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    # Templates read reasoning as `reasoning_content` (Qwen3) or `thinking` (gpt-oss): offer both.
    messages = [{**m, "thinking": m["reasoning_content"]} if m.get("reasoning_content") else m for m in messages]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises arbitrary exceptions (raise_exception(), TypeError, ...)
        error = exc
    # A tool call's null content reaches the template as given (DeepSeek tests for none); a template that
    # fails on it (gpt-oss) gets an empty string instead.
    if any(m.get("content") is None for m in messages):
        try:
            empty = [{**m, "content": ""} if m.get("content") is None else m for m in messages]
            return tokenizer.apply_chat_template(empty, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception:
            pass
    raise RowError(errors.TEMPLATE_ERROR, f"chat template failed: {type(error).__name__}: {error}") from error


PROBE_QUESTION, PROBE_REPLY, PROBE_EARLIER_REPLY = "Probe question 7", "Probe reply 9", "Probe reply 8"
PROBE_REASONING, PROBE_ARGUMENT, PROBE_RESULT = "Probe reasoning 6", "Probe value 3", "Probe result 5"
# Held per tokenizer object, weakly: keyed by id(), a dead tokenizer's markers would go to a later one.
_MARKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def turn_markers(tokenizer) -> TurnMarkers:
    """Read the assistant turn format off the tokenizer's chat template (cached for its template and
    vocabulary size: a template set or tokens added later are read anew)."""
    markers = _MARKERS.setdefault(tokenizer, {})
    key = (tokenizer.chat_template, len(tokenizer))
    if key not in markers:
        markers[key] = _probe_markers(tokenizer)
    return markers[key]


def _special_tokens(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content]


def _marker_at(tokenizer, text: str, at: int) -> str | None:
    """The longest added token that starts at `text[at]`."""
    found = [t for t in tokenizer.get_added_vocab() if t and text.startswith(t, at)]
    return max(found, key=len) if found else None


def _optional_render(tokenizer, messages: list[dict]) -> str | None:
    """The rendering of a probe that a template may not support (tool calls, a second round)."""
    try:
        return render(tokenizer, messages, add_generation_prompt=False)
    except RowError:
        return None


def _end_after(tokenizer, messages: list[dict], text: str) -> str | None:
    """The added token right after `text` in the probe `messages`' rendering, if the template renders it."""
    rendered = _optional_render(tokenizer, messages)
    if rendered is None or text not in rendered:
        return None
    return _marker_at(tokenizer, rendered, rendered.index(text) + len(text))


def _tool_round(tokenizer, question: list[dict]) -> str | None:
    """The rendering of a tool call, its result and a reply, if the template renders tool calls."""
    arguments = json.dumps({"probe_argument": PROBE_ARGUMENT})  # OpenAI's shape: JSON text
    call = {"type": "function", "id": "probe_call", "function": {"name": "probe_tool", "arguments": arguments}}
    return _optional_render(tokenizer, [
        *question, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "name": "probe_tool", "tool_call_id": "probe_call", "content": PROBE_RESULT},
        {"role": "assistant", "content": PROBE_REPLY},
    ])  # fmt: skip


def _tool_call_end(tokenizer, rendered: str | None, known_ends: list[str]) -> str | None:
    """The marker that ends a tool call in the `_tool_round` rendering: the first special token after its
    arguments, unless a known end marker comes first (the call then sits inside an ordinary turn, as in
    ChatML templates)."""
    if not rendered or PROBE_RESULT not in rendered or PROBE_ARGUMENT not in rendered[: rendered.index(PROBE_RESULT)]:
        return None
    result_at = rendered.index(PROBE_RESULT)
    after_call = rendered[rendered.rindex(PROBE_ARGUMENT, 0, result_at) : result_at]
    if any(marker in after_call for marker in known_ends):
        return None
    specials = sorted((after_call.find(t), t) for t in _special_tokens(tokenizer) if t in after_call)
    return specials[0][1] if specials else None


def _lead_in_after_tool(rendered: str | None, header: str) -> str | None:
    """What the `_tool_round` rendering writes from the tool result to the reply's body: through the
    header, or all of it where there is none. None where it names the probe's call (Mistral's
    `"call_id": "probe_call"}[/TOOL_RESULTS]`): that text differs from row to row."""
    result_at = rendered.find(PROBE_RESULT) if rendered else -1
    reply_at = rendered.find(PROBE_REPLY, result_at) if result_at >= 0 else -1
    if reply_at < 0:
        return None
    between = rendered[result_at + len(PROBE_RESULT) : reply_at]
    if header and header in between:
        return between[: between.index(header) + len(header)]
    return None if "probe_" in between else between


def _probe_markers(tokenizer) -> TurnMarkers:
    question = [{"role": "user", "content": PROBE_QUESTION}]
    before = render(tokenizer, question, add_generation_prompt=False)
    prompted = render(tokenizer, question, add_generation_prompt=True)
    answer = {"role": "assistant", "content": PROBE_REPLY}
    answered = render(tokenizer, [*question, answer], add_generation_prompt=False)
    # The conversation so far, without what a render that asks for no generation appends at the end.
    closer = next(
        (
            t
            for t in ["", *_special_tokens(tokenizer)]
            if before.endswith(t) and prompted.startswith(before[: len(before) - len(t)])
        ),
        None,
    )
    context = before[: len(before) - len(closer)] if closer is not None else None
    if context is None or not answered.startswith(context) or PROBE_REPLY not in answered[len(context) :]:
        raise RowError(errors.TEMPLATE_ERROR, "cannot read the assistant turn format off the chat template")
    generation_prompt = prompted[len(context) :]
    turn = answered[len(context) :]
    reply_at = turn.index(PROBE_REPLY)
    # Up to the generation prompt's first difference: QwQ's prompt also opens a think block, Qwen3's
    # rendered turn inserts an empty one; neither belongs to the header.
    header = os.path.commonprefix([generation_prompt, turn[:reply_at]]) or turn[:reply_at]
    after_question = context[context.rindex(PROBE_QUESTION) + len(PROBE_QUESTION) :] if PROBE_QUESTION in context else None
    opener = ""
    if not header.strip():  # no assistant header: the body follows what ends the previous message
        header = ""
        opener = after_question or ""
        if not opener.strip():
            raise RowError(errors.TEMPLATE_ERROR, "the chat template marks neither an assistant turn nor the end of a user turn")
    after_body = turn[reply_at + len(PROBE_REPLY) :]
    final_end = _marker_at(tokenizer, turn, reply_at + len(PROBE_REPLY))
    if final_end is None and after_body.strip():
        final_end = after_body.strip()
    reasoned = [*question, {**answer, "reasoning_content": PROBE_REASONING}]
    tool_round = _tool_round(tokenizer, question)
    ends, earlier_end = [], final_end or ""
    if final_end:  # else whitespace closes turns
        earlier_end = (
            _end_after(tokenizer, [*question, {**answer, "content": PROBE_EARLIER_REPLY}, *question, answer], PROBE_EARLIER_REPLY)
            or final_end
        )
        ends = [final_end, earlier_end, _end_after(tokenizer, reasoned, PROBE_REASONING)]
        ends.append(_tool_call_end(tokenizer, tool_round, [e for e in ends if e]))
    lead_ins = {
        "user": None if after_question is None else after_question + header,
        "tool": _lead_in_after_tool(tool_round, header),
    }
    rendered_reasoning = _optional_render(tokenizer, reasoned)
    return TurnMarkers(
        header=header,
        ends=tuple(dict.fromkeys(e for e in ends if e)),
        earlier_end=earlier_end,
        after_body=after_body,
        generation_prompt=generation_prompt,
        closer=closer,
        opener=opener,
        lead_ins={role: lead_in.lstrip() for role, lead_in in lead_ins.items() if lead_in and lead_in.strip()},
        rendered_per_message=max(1, rendered_reasoning.count(header, len(context))) if header and rendered_reasoning else 1,
        renders_reasoning=bool(rendered_reasoning and PROBE_REASONING in rendered_reasoning),
    )
