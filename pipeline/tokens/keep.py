"""Keep mode (`scoring.reasoning: keep`): every assistant turn rendered as the student would have
generated it, reasoning and content as given, even where the template drops them."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline import errors
from pipeline.corpus.messages import THINK_CLOSE, THINK_OPEN, split_reasoning
from pipeline.errors import RowError
from pipeline.tokens.markers import TurnMarkers, render
from pipeline.tokens.turns import Turn, find_turns


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
        text = render(tokenizer, conversation, add_generation_prompt=False)
        turns = find_turns(tokenizer, conversation, text, markers)
        return text[: turns[-1].end], turns[-1].bodies, turns[-2].end if len(turns) > 1 else 0
    # The template's generation prompt at this point: after its header, what it writes (QwQ's `<think>\n`)
    # is part of the body, as in a rendered turn; a prompt without the header is context.
    context = render(tokenizer, messages[:i], add_generation_prompt=True) if i else markers.generation_prompt
    so_far = render(tokenizer, messages[:i], add_generation_prompt=False).removesuffix(markers.closer) if i else ""
    if not context.startswith(so_far):
        raise RowError(errors.TEMPLATE_ERROR, f"assistant message {i}: the generation prompt is not appended to the conversation")
    prompt = context[len(so_far) :]
    body_start = len(so_far) + len(markers.header) if prompt.startswith(markers.header) else len(context)
    previous_end = (
        find_turns(tokenizer, messages[:i], context, markers)[-1].end
        if any(m["role"] == "assistant" for m in messages[:i])
        else 0
    )
    opened_think = THINK_OPEN in context[body_start:]
    text = context + _kept_body(messages[i], opened_think)
    return text + (markers.end or markers.after_body), [(body_start, len(text))], previous_end


def kept_conversation(tokenizer, messages: Sequence[dict], markers: TurnMarkers) -> tuple[str, list[Turn]]:
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
