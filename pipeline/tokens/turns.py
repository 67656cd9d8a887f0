"""A row's assistant turns in its rendering: read off the one rendering where the texts around each turn
check, else found with renders of the conversation before and up to it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline import errors
from pipeline.corpus.messages import split_reasoning
from pipeline.errors import RowError
from pipeline.tokens.markers import TurnMarkers, render


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
        prefix = render(tokenizer, messages, add_generation_prompt=False)
    except RowError:
        return 0
    prefix = prefix.removesuffix(markers.closer)
    return len(prefix) if text.startswith(prefix) else 0


def _prompted_length(tokenizer, messages: Sequence[dict], text: str) -> int:
    """Where the rendering of `messages` with the generation prompt ends inside `text`, or 0."""
    try:
        prompted = render(tokenizer, messages, add_generation_prompt=True)
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


def find_turns(tokenizer, messages: Sequence[dict], text: str, markers: TurnMarkers) -> list[Turn]:
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


def dropped_text(messages: Sequence[dict], text: str, turns: Sequence[Turn]) -> bool:
    """Whether some assistant message's reasoning or answer is missing from its rendered turn."""
    for turn in turns:
        body = "".join(text[start:end] for start, end in turn.bodies)
        for i in turn.messages:
            if any(piece.strip() not in body for piece in split_reasoning(messages[i])):
                return True
    return False
