"""Response spans: which tokens of a chat-template encoding are the bodies of assistant turns. Reads a
template's turn format off probe renders (`turn_markers`) and finds the turns of canonical messages
(`pipeline.corpus.messages`) in their rendering (`encode_conversation`, `scope_spans`).

Definition (the official RSR code's marker scan, generalized): for every assistant turn, the response
tokens are what the student's chat template renders for that turn after each assistant message header
(`<|im_start|>assistant\n`, `<|start_header_id|>assistant<|end_header_id|>\n\n`, `<|start|>assistant`)
up to, not including, the marker that ends the message (`<|im_end|>`, `<|eot_id|>`; harmony's `<|end|>`,
`<|return|>`, `<|call|>`). That includes what the template itself writes into the turn: a think block
built from `reasoning_content`, an empty think block it inserts, harmony's channel tokens, a tool call.
A turn is a run of consecutive assistant messages; where the template writes one turn as several
messages (harmony: `analysis`, then `commentary` or `final`), every message is scored, its header and
its end marker are not. Templates with no assistant header (`[INST] ... [/INST]answer</s>`) start the
body where the preceding message's rendering ends.

Everything is read off the template itself by rendering probe conversations (no table of known
templates): the header is what the generation prompt and a rendered assistant turn have in common;
the end markers are the special tokens that follow a final reply, an earlier reply, reasoning and a
tool call; a document closer (Phi's `<|endoftext|>`) is what a render without a generation prompt
appends and the prompted render lacks; the lead-ins are what it writes from the end of a user message
or a tool result to the body of the reply. Each turn is then found in the one rendering of the
conversation, after the previous turn: its body starts at the lead-in right after the text of the
message before it, with no lead-in earlier, and ends at an end marker that the next message's text
follows. Where that cannot be checked (a text the template escapes, moves or leaves empty, a template
that closes turns with whitespace), the turn is searched after the rendering of the conversation
before it and up to where the rendering up to it ends, at the cost of rendering both. Either way text
in a user or tool message never passes for a turn; a row whose turns all check is rendered once.

Two ways to treat reasoning that a template drops (DeepSeek-R1-Distill drops every think block,
Qwen3 and QwQ drop them from earlier turns, most templates ignore `reasoning_content`):
  template  score what the template renders, and flag the row `content_dropped`;
  keep      score every turn's reasoning and content as given. Templates that render a final turn's
            reasoning field (Qwen3 `reasoning_content`, gpt-oss `thinking` as the analysis channel)
            render each turn that way, as the final turn of the conversation up to it; others get the
            template's generation prompt, the reasoning as a `<think>` block, the content, the end marker.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import errors
from pipeline.corpus.messages import THINK_CLOSE, THINK_OPEN, canonical_messages, split_reasoning, validate_messages
from pipeline.errors import RowError

REASONING_MODES = ("template", "keep")
# Which tokens of each assistant turn are scored: its whole body as rendered (the official definition),
# the answer after the reasoning, only the reasoning, or the body without the tool calls it renders.
SCOPES = ("assistant", "final", "reasoning", "no_tool_calls")
DEFAULT_SCOPE = "assistant"


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    # Positions q of response tokens; the logits at q - 1 predict them. Always 0 < q < len(input_ids).
    response_positions: list[int]
    truncated: bool
    # The template left out text of an assistant message.
    content_dropped: bool = False


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


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
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
        return _render(tokenizer, messages, add_generation_prompt=False)
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
    before = _render(tokenizer, question, add_generation_prompt=False)
    prompted = _render(tokenizer, question, add_generation_prompt=True)
    answer = {"role": "assistant", "content": PROBE_REPLY}
    answered = _render(tokenizer, [*question, answer], add_generation_prompt=False)
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


@dataclass(frozen=True)
class Turn:
    """A run of consecutive assistant messages as rendered: their bodies and where the turn ends."""

    messages: list[int]  # indices into the conversation
    bodies: list[tuple[int, int]]  # (start, end) in the rendering of every message body of the turn
    end: int  # just after its last end marker


_SPACE = re.compile(r"\s*")  # what str.strip() strips


def _next_end(text: str, start: int, ends: Sequence[str]) -> tuple[int, str] | None:
    found = [(at, marker) for marker in ends if (at := text.find(marker, start)) >= 0]
    return min(found, key=lambda f: (f[0], -len(f[1]))) if found else None


def _after_texts(text: str, messages: Sequence[dict], start: int) -> int | None:
    """Where the texts of `messages` end in `text`, each found after the one before from `start` (as
    templates strip it), or None where one is not there as given (a template that escapes or moves it)
    or is empty (nothing shows where it is rendered, if at all)."""
    for message in messages:
        piece = message["content"].strip()
        at = text.find(piece, start) if piece else -1
        if at < 0:
            return None
        start = at + len(piece)
    return start


def _scanned_turn(
    messages: Sequence[dict], run: list[int], first: int, text: str, cursor: int, markers: TurnMarkers
) -> Turn | None:
    """The turn of the assistant messages `run` read off `text` without rendering anything, or None
    where that is not sure. Its body starts right after what the template writes between the message
    before it and an assistant body (`markers.lead_ins`), which must follow the texts of the messages
    since the previous turn (`messages[first:run[0]]`) and be the first one after `cursor`; it ends at
    an end marker, goes on while the template writes another assistant message right after (no more of
    them than the run's messages can make), and the text of the message after it must follow."""
    i = run[0]
    lead_in = markers.lead_ins.get(messages[i - 1]["role"]) if i else None
    if not lead_in or not markers.ends:  # nothing to scan for, or whitespace closes turns
        return None
    after = _after_texts(text, messages[first:i], cursor)
    if after is None:
        return None
    at = _SPACE.match(text, after).end()
    if not text.startswith(lead_in, at) or text.find(lead_in, cursor) != at:
        return None
    body_start, bodies = at + len(lead_in), []
    while True:
        found = _next_end(text, body_start, markers.ends)
        if found is None:
            return None
        bodies.append((body_start, found[0]))
        turn_end = found[0] + len(found[1])
        resume = _SPACE.match(text, turn_end).end()
        if not markers.header or not text.startswith(markers.header, resume):
            break
        if len(bodies) == len(run) * markers.rendered_per_message:  # the next turn's: a message between rendered as nothing
            return None
        body_start = resume + len(markers.header)
    following = messages[run[-1] + 1 : run[-1] + 2]  # none after the last turn
    return Turn(run, bodies, turn_end) if _after_texts(text, following, turn_end) is not None else None


def _prefix_length(tokenizer, messages: Sequence[dict], text: str, markers: TurnMarkers) -> int:
    """Where the rendering of `messages` ends inside `text`, or 0 where it is not a prefix of it
    (templates that render earlier turns differently once more follow)."""
    if not messages:
        return 0
    try:
        prefix = _render(tokenizer, messages, add_generation_prompt=False)
    except RowError:
        return 0
    prefix = prefix.removesuffix(markers.closer)
    return len(prefix) if text.startswith(prefix) else 0


def _prompted_length(tokenizer, messages: Sequence[dict], text: str) -> int:
    """Where the rendering of `messages` with the generation prompt ends inside `text`, or 0."""
    try:
        prompted = _render(tokenizer, messages, add_generation_prompt=True)
    except RowError:
        return 0
    return len(prompted) if text.startswith(prompted) else 0


def _turn_start(tokenizer, messages: Sequence[dict], i: int, text: str, cursor: int, markers: TurnMarkers) -> int:
    """Where the body of the first message of the turn at message `i` starts: after its header; where
    the template writes no header for it, where the template's generation prompt at that point ends
    (DeepSeek after a tool result) or after what ends the message before it ([INST] templates)."""
    after_context = max(cursor, _prefix_length(tokenizer, messages[:i], text, markers))
    prompted_end = _prompted_length(tokenizer, messages[:i], text) if i else 0
    if markers.header:
        start = text.find(markers.header, after_context)
        if start >= 0 and (prompted_end <= cursor or start < prompted_end):
            return start + len(markers.header)
    if prompted_end > cursor:
        return prompted_end
    if not markers.header and (start := text.find(markers.opener, cursor)) >= 0:
        return start + len(markers.opener)
    raise RowError(errors.TEMPLATE_ERROR, f"assistant message {i}: the start of its turn is not rendered")


def _rendered_turn(tokenizer, messages: Sequence[dict], run: list[int], text: str, cursor: int, markers: TurnMarkers) -> Turn:
    """The turn of the assistant messages `run`, found with the renderings of the conversation before
    it and up to it (`_turn_start`)."""
    i = run[0]
    body_start = _turn_start(tokenizer, messages, i, text, cursor, markers)
    # The turn never runs past where the rendering of the conversation up to it ends (when that
    # rendering is a prefix): a template may write no end marker (DeepSeek's tool calls).
    bound = _prefix_length(tokenizer, messages[: run[-1] + 1], text, markers)
    if not markers.ends:  # whitespace closes turns: the turn ends where the next message's rendering starts
        turn_end = bound or len(text)
        body_end = turn_end - len(markers.after_body) if text.endswith(markers.after_body, 0, turn_end) else turn_end
        if body_end < body_start:
            raise RowError(errors.TEMPLATE_ERROR, f"assistant message {i}: turn not found in the rendering")
        return Turn(run, [(body_start, body_end)], turn_end)
    bodies = []
    while True:
        found = _next_end(text, body_start, markers.ends)
        if bound and (found is None or found[0] >= bound):
            bodies.append((body_start, bound))
            return Turn(run, bodies, bound)
        if found is None:
            raise RowError(errors.TEMPLATE_ERROR, f"assistant message {i}: no end of turn {list(markers.ends)} rendered")
        bodies.append((body_start, found[0]))
        turn_end = found[0] + len(found[1])
        # The turn goes on while the template writes another assistant message right after.
        resume = _SPACE.match(text, turn_end).end()
        if not markers.header or not text.startswith(markers.header, resume) or (bound and resume >= bound):
            return Turn(run, bodies, turn_end)
        body_start = resume + len(markers.header)


def _assistant_runs(messages: Sequence[dict]) -> list[list[int]]:
    """The indices of each run of consecutive assistant messages: one turn each."""
    runs: list[list[int]] = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return runs


def _turns(tokenizer, messages: Sequence[dict], text: str, markers: TurnMarkers) -> list[Turn]:
    """Every assistant turn of `messages` in `text`, each searched after the previous one: read off
    `text` alone where that is sure (`_scanned_turn`), else with renderings of the conversation up to
    it (`_rendered_turn`), which cost a render of everything before the turn."""
    turns, cursor, first = [], 0, 0
    for run in _assistant_runs(messages):
        turn = _scanned_turn(messages, run, first, text, cursor, markers)
        turn = turn or _rendered_turn(tokenizer, messages, run, text, cursor, markers)
        turns.append(turn)
        cursor, first = turn.end, run[-1] + 1
    return turns


def _dropped_text(messages: Sequence[dict], text: str, turns: Sequence[Turn]) -> bool:
    """Whether some assistant message's reasoning or answer is missing from its rendered turn."""
    for turn in turns:
        body = "".join(text[start:end] for start, end in turn.bodies)
        for i in turn.messages:
            if any(piece.strip() not in body for piece in split_reasoning(messages[i])):
                return True
    return False


def _kept_body(message: dict, opened_think: bool) -> str:
    """A turn body with the message's reasoning as a think block and its content, as given."""
    content = message["content"] or ""
    if message.get("reasoning_content"):
        block = message["reasoning_content"].strip("\n") + f"\n{THINK_CLOSE}\n\n"
        return (block if opened_think else f"{THINK_OPEN}\n{block}") + content.lstrip("\n")
    if not opened_think:
        return content
    if content.lstrip().startswith(THINK_OPEN):  # the generation prompt already opened it
        return content.lstrip().removeprefix(THINK_OPEN).lstrip("\n")
    return content if THINK_CLOSE in content else f"\n{THINK_CLOSE}\n\n{content}"


def _with_reasoning_field(message: dict) -> dict:
    """The message with an inline think block moved into its reasoning field."""
    reasoning, answer = split_reasoning(message)
    if not reasoning:
        return message
    return {**message, "content": answer.lstrip("\n"), "reasoning_content": reasoning.strip("\n")}


def _kept_turn(tokenizer, messages: Sequence[dict], i: int, markers: TurnMarkers) -> tuple[str, list[tuple[int, int]], int]:
    """The conversation up to assistant message `i` as the student would have generated turn `i`,
    the turn's bodies in it, and where the turn before it ends in it (0 for the first)."""
    follows_assistant = i > 0 and messages[i - 1]["role"] == "assistant"
    if (markers.renders_reasoning or messages[i].get("tool_calls")) and not follows_assistant:
        # The template's own rendering of the turn as the final one, reasoning in its reasoning field.
        conversation = [*messages[:i], _with_reasoning_field(messages[i])]
        text = _render(tokenizer, conversation, add_generation_prompt=False)
        turns = _turns(tokenizer, conversation, text, markers)
        return text[: turns[-1].end], turns[-1].bodies, turns[-2].end if len(turns) > 1 else 0
    # The template's generation prompt at this point: after its header, what it writes (QwQ's `<think>\n`)
    # is part of the body, as in a rendered turn; a prompt without the header is context.
    context = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else markers.generation_prompt
    so_far = _render(tokenizer, messages[:i], add_generation_prompt=False).removesuffix(markers.closer) if i else ""
    if not context.startswith(so_far):
        raise RowError(errors.TEMPLATE_ERROR, f"assistant message {i}: the generation prompt is not appended to the conversation")
    prompt = context[len(so_far) :]
    body_start = len(so_far) + len(markers.header) if prompt.startswith(markers.header) else len(context)
    previous_end = (
        _turns(tokenizer, messages[:i], context, markers)[-1].end if any(m["role"] == "assistant" for m in messages[:i]) else 0
    )
    opened_think = THINK_OPEN in context[body_start:]
    text = context + _kept_body(messages[i], opened_think)
    return text + (markers.end or markers.after_body), [(body_start, len(text))], previous_end


def _kept_conversation(tokenizer, messages: Sequence[dict], markers: TurnMarkers) -> tuple[str, list[Turn]]:
    """The conversation with every assistant message rendered as the student would have generated it
    (`_kept_turn`), each after the template's rendering of the messages since the previous one."""
    text, turns = "", []
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        turn_text, bodies, previous_end = _kept_turn(tokenizer, messages, i, markers)
        if i < last and markers.end and turn_text.endswith(markers.end):  # later turns follow it
            turn_text = turn_text.removesuffix(markers.end) + markers.earlier_end
        shift = len(text) - previous_end
        text += turn_text[previous_end:]
        turns.append(Turn([i], [(start + shift, end + shift) for start, end in bodies], len(text)))
    return text, turns


def _find(text: str, piece: str, start: int, end: int) -> tuple[int, int] | None:
    """Where the stripped `piece` is rendered in `text[start:end]`, or None (templates trim and strip)."""
    piece = piece.strip()
    at = text.find(piece, start, end) if piece else -1
    return (at, at + len(piece)) if at >= 0 else None


def scope_spans(messages: Sequence[dict], text: str, turns: Sequence[Turn], scope: str) -> list[tuple[int, int]]:
    """The character spans of `text` scored in `scope`, from the turn bodies: each assistant message's
    reasoning and answer are found in its turn's rendered bodies, in order (the same way for every
    template family). `final`: the answers; `reasoning`: the reasoning; `no_tool_calls`: the bodies cut
    where a tool-calling message's own text ends (what follows in its turn is the rendered call)."""
    if scope == DEFAULT_SCOPE:
        return [body for turn in turns for body in turn.bodies]
    spans = []
    for turn in turns:
        cursor, turn_end = turn.bodies[0][0], turn.bodies[-1][1]
        cut = None
        for i in turn.messages:
            thought, answer = split_reasoning(messages[i])
            if found_reasoning := _find(text, thought, cursor, turn_end):
                cursor = found_reasoning[1]
            if found_answer := _find(text, answer, cursor, turn_end):
                cursor = found_answer[1]
            wanted = {"final": [found_answer], "reasoning": [found_reasoning]}.get(scope, [])
            spans += [span for span in wanted if span]
            if scope == "no_tool_calls" and messages[i].get("tool_calls") and cut is None:
                cut = cursor if found_reasoning or found_answer else turn.bodies[0][0]
        if scope == "no_tool_calls":
            spans += turn.bodies if cut is None else [(start, min(end, cut)) for start, end in turn.bodies if start < cut]
    return spans


def encode_conversation(
    tokenizer,
    messages: Any,
    max_model_len: int | None = None,
    truncate: bool = True,
    reasoning: str = "template",
    scope: str = DEFAULT_SCOPE,
    *,
    canonical: bool = False,
) -> EncodedConversation:
    """Encode `messages` with the tokenizer's chat template and find the response token positions.

    `messages` may carry reasoning as `reasoning_content` or `thinking`, tool calls and tool results,
    and content as a list of text parts; they are made canonical and checked first (a RowError names a
    malformed one), unless `canonical` says they already are (`pipeline.corpus.records` does both when it
    parses a row, so the job need not repeat them per student). `reasoning`: "template" scores what
    the template renders, "keep" every turn's reasoning and content as given (see the module
    docstring); both flag text the template left out. Rows longer than `max_model_len` keep the first `max_model_len` tokens and are
    flagged truncated, or raise RowError(too_long) when `truncate` is False. `scope` chooses which
    tokens of each turn are scored (`scope_spans`); a row with none is a RowError(empty_scope).
    """
    if reasoning not in REASONING_MODES:
        raise ValueError(f"reasoning must be one of {REASONING_MODES}, got {reasoning!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not canonical:
        messages = validate_messages(canonical_messages(messages))
    markers = turn_markers(tokenizer)
    if reasoning == "keep":
        text, turns = _kept_conversation(tokenizer, messages, markers)
    else:
        text = _render(tokenizer, messages, add_generation_prompt=False)
        turns = _turns(tokenizer, messages, text, markers)
    content_dropped = _dropped_text(messages, text, turns)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    token_ends = [end for _, end in offsets]

    positions: list[int] = []
    for char_start, char_end in scope_spans(messages, text, turns, scope):
        # Offsets are non-decreasing, so bisect to the first token that ends inside the span; a token
        # that merges header text with the body's first characters carries body text and counts.
        q = bisect.bisect_right(token_ends, char_start)
        while q < len(input_ids) and offsets[q][0] < char_end:
            if q > 0 and (not positions or q > positions[-1]):
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
        if scope != DEFAULT_SCOPE:
            raise RowError(errors.EMPTY_SCOPE, f"no response tokens in scope {scope!r}{where}")
        raise RowError(errors.NO_RESPONSE_TOKENS, f"no response tokens{where}")
    return EncodedConversation(input_ids, positions, truncated, content_dropped)
