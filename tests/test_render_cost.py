"""Finding the turns of a long agentic row renders it a fixed number of times, not once or more per turn:
the cost grows with the row's length, not with its square (issue #28). Counted at `markers.render`, in every
module that calls it."""

import json

import pytest
from transformers import AutoTokenizer

from pipeline.tokens import keep, markers, spans
from pipeline.tokens import turns as turn_finding
from pipeline.tokens.markers import turn_markers
from pipeline.tokens.spans import encode_conversation
from tests.test_template_families import GPT_OSS, QWEN3, family_tokenizer

needs_shared = pytest.mark.skipif(not (QWEN3.exists() and GPT_OSS.exists()), reason="needs ../shared")


def agentic_row(turns: int) -> list[dict]:
    """A system prompt and a task, then `turns` tool calls each with its result, then the answer."""
    messages = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Add 37 two hundred times."}]
    for k in range(turns):
        arguments = json.dumps({"expression": f"{37 * k} + 37"})
        call = {"id": f"call_{k}", "type": "function", "function": {"name": "calculator", "arguments": arguments}}
        messages.append({"role": "assistant", "content": f"Step {k}.", "tool_calls": [call]})
        messages.append({"role": "tool", "name": "calculator", "tool_call_id": f"call_{k}", "content": f"result {37 * (k + 1)}"})
    messages.append({"role": "assistant", "content": f"<think>\nThat was {turns} steps.\n</think>\n\nIt is {37 * turns}."})
    return messages


def render_cost(monkeypatch, tokenizer, messages: list[dict], reasoning: str) -> tuple[int, int]:
    """(renders, messages rendered in all) of encoding `messages`, the template's probes not counted."""
    turn_markers(tokenizer)
    renders = []
    render = markers.render

    def counted(tokenizer, messages, add_generation_prompt):
        renders.append(len(messages))
        return render(tokenizer, messages, add_generation_prompt)

    callers = (markers, turn_finding, keep, spans)
    for module in callers:
        monkeypatch.setattr(module, "render", counted)
    encode_conversation(tokenizer, messages, reasoning=reasoning)
    for module in callers:
        monkeypatch.setattr(module, "render", render)
    return len(renders), sum(renders)


def tokenizer_of(family: str, student_dirs):
    return AutoTokenizer.from_pretrained(student_dirs["chatml"]) if family == "tiny chatml" else family_tokenizer(family)


@pytest.mark.parametrize(
    "family",
    [
        "tiny chatml",
        *(pytest.param(f, marks=needs_shared) for f in ("qwen3", "llama-3.1-instruct", "deepseek-r1-distill-qwen", "gpt-oss")),
    ],
)
def test_template_mode_renders_a_long_agentic_row_once(monkeypatch, student_dirs, family):
    tokenizer = tokenizer_of(family, student_dirs)
    (calls_100, rendered_100), (calls_200, rendered_200) = (
        render_cost(monkeypatch, tokenizer, agentic_row(turns), "template") for turns in (100, 200)
    )
    assert calls_100 == calls_200 == 1
    assert rendered_200 == len(agentic_row(200)) and rendered_200 < 2.1 * rendered_100


@pytest.mark.parametrize("family", ["tiny chatml", pytest.param("qwen3", marks=needs_shared)])
def test_keep_mode_renders_each_turn_once_as_the_last(monkeypatch, student_dirs, family):
    """Keep mode renders the conversation up to each turn (the template decides how a final turn
    looks): renders linear in the turns, messages rendered quadratic, but no more than that."""
    tokenizer = tokenizer_of(family, student_dirs)
    (calls_100, rendered_100), (calls_200, rendered_200) = (
        render_cost(monkeypatch, tokenizer, agentic_row(turns), "keep") for turns in (100, 200)
    )
    assert calls_100 <= 2 * 101 and calls_200 <= 2 * 201
    assert rendered_200 < 4.2 * rendered_100
