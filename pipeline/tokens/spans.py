"""Response spans: which tokens of a chat-template encoding are the bodies of assistant turns. Reads a
template's turn format off probe renders (`turn_markers`) and finds the turns of canonical messages
(`pipeline.corpus.messages`) in their rendering (`encode_conversation`, `scope_spans`).
Modules: `markers.py` reads the turn format, `turns.py` finds a row's turns, `keep.py` renders keep mode, `scopes.py` the scopes.

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
from dataclasses import dataclass
from typing import Any

from pipeline import errors
from pipeline.corpus.messages import canonical_messages, validate_messages
from pipeline.errors import RowError
from pipeline.tokens.keep import kept_conversation
from pipeline.tokens.markers import render, turn_markers
from pipeline.tokens.scopes import DEFAULT_SCOPE, REASONING_MODES, SCOPES, scope_spans
from pipeline.tokens.turns import dropped_text, find_turns


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    # Positions q of response tokens; the logits at q - 1 predict them. Always 0 < q < len(input_ids).
    response_positions: list[int]
    truncated: bool
    # The template left out text of an assistant message.
    content_dropped: bool = False


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
        text, turns = kept_conversation(tokenizer, messages, markers)
    else:
        text = render(tokenizer, messages, add_generation_prompt=False)
        turns = find_turns(tokenizer, messages, text, markers)
    content_dropped = dropped_text(messages, text, turns)
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
