"""The reasoning modes and scopes a run may choose, and the character spans each scope scores; small, so
the config can check its choices without loading the tokenization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.corpus.messages import split_reasoning

if TYPE_CHECKING:
    from pipeline.tokens.turns import Turn

REASONING_MODES = ("template", "keep")
# Which tokens of each assistant turn are scored: its whole body as rendered (the official definition),
# the answer after the reasoning, only the reasoning, or the body without the tool calls it renders.
SCOPES = ("assistant", "final", "reasoning", "no_tool_calls")
DEFAULT_SCOPE = "assistant"


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
