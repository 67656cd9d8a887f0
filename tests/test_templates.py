"""Real published chat templates on GSM8K rows rewritten as reasoning trajectories.

Needs ../shared (the Qwen3 tokenizer, the templates, the GSM8K rows); skips without it.
"""

import json

import pytest
from transformers import AutoTokenizer

from pipeline.corpus.messages import split_reasoning
from pipeline.tokens.spans import encode_conversation
from tests.conftest import SHARED
from tests.reference import CHATML_MARKERS, LLAMA3_MARKERS, marker_ids, marker_positions

QWEN3 = SHARED / "models" / "qwen3-tokenizer"
TEMPLATES = SHARED / "templates"
GSM8K = SHARED / "data" / "gsm8k_multisource_300.jsonl"
pytestmark = pytest.mark.skipif(
    not (QWEN3.exists() and GSM8K.exists()), reason="needs ../shared (Qwen3 tokenizer, templates, GSM8K)"
)

DEEPSEEK_MARKERS = ("<｜Assistant｜>", "<｜end▁of▁sentence｜>")
# template -> (its marker tokens, absent from the Qwen3 vocabulary, added as special tokens; the official scan's markers)
TEMPLATE_SETUP = {
    "qwen3": ([], CHATML_MARKERS),
    "qwq-32b": ([], CHATML_MARKERS),
    "qwen2.5-instruct": ([], CHATML_MARKERS),
    "llama-3.1-instruct": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], LLAMA3_MARKERS),
    "deepseek-r1-distill-qwen": (["<｜User｜>", *DEEPSEEK_MARKERS], DEEPSEEK_MARKERS),
}
KINDS = ("plain", "inline_think", "reasoning_content", "multi_turn")
# Where each template leaves out text of an assistant message (from the templates' own documentation,
# ../shared/templates/README.md): Qwen3 and QwQ drop think blocks of earlier turns, QwQ and most others
# ignore reasoning_content, DeepSeek-R1-Distill keeps only the text after </think> in every turn.
DROPS = {
    "qwen3": {"multi_turn"},
    "qwq-32b": {"reasoning_content", "multi_turn"},
    "qwen2.5-instruct": {"reasoning_content"},
    "llama-3.1-instruct": {"reasoning_content"},
    "deepseek-r1-distill-qwen": {"inline_think", "reasoning_content", "multi_turn"},
}


def tokenizer_for(template: str):
    tokenizer = AutoTokenizer.from_pretrained(QWEN3)
    if template != "qwen3":
        tokenizer.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
    added, _ = TEMPLATE_SETUP[template]
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added})
    return tokenizer


def reasoning_rows(n: int = 40) -> dict[str, list[list[dict]]]:
    """GSM8K answers split into reasoning (all lines but the last) and answer (the last line), written as
    each kind of row: plain, an inline think block, a reasoning_content field, two exchanges each thinking."""
    with open(GSM8K) as f:
        rows = [json.loads(line) for line in f]
    exchanges = []
    for row in rows:
        question, answer = (m["content"] for m in row["messages"])
        *steps, final = answer.strip().split("\n")
        if steps:
            exchanges.append((question, "\n".join(steps), final))
        if len(exchanges) == n + 1:
            break

    def think(reasoning, final):
        return f"<think>\n{reasoning}\n</think>\n\n{final}"

    kinds = {kind: [] for kind in KINDS}
    for (question, reasoning, final), (next_question, next_reasoning, next_final) in zip(exchanges, exchanges[1:]):
        user = {"role": "user", "content": question}
        kinds["plain"].append([user, {"role": "assistant", "content": f"{reasoning}\n{final}"}])
        kinds["inline_think"].append([user, {"role": "assistant", "content": think(reasoning, final)}])
        kinds["reasoning_content"].append([user, {"role": "assistant", "content": final, "reasoning_content": reasoning}])
        kinds["multi_turn"].append([
            user, {"role": "assistant", "content": think(reasoning, final)},
            {"role": "user", "content": next_question}, {"role": "assistant", "content": think(next_reasoning, next_final)},
        ])  # fmt: skip
    return kinds


@pytest.fixture(scope="module")
def rows():
    return reasoning_rows()


@pytest.mark.parametrize("template", TEMPLATE_SETUP)
def test_template_mode_scores_what_the_official_marker_scan_scores(template, rows):
    tokenizer = tokenizer_for(template)
    head, end = marker_ids(tokenizer, TEMPLATE_SETUP[template][1])
    for kind in KINDS:
        for messages in rows[kind]:
            encoded = encode_conversation(tokenizer, messages)  # raises (a reject) on any row it cannot encode
            expected_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            assert encoded.input_ids == list(expected_ids), (template, kind)
            assert encoded.response_positions == marker_positions(encoded.input_ids, head, end), (template, kind)
            assert encoded.content_dropped == (kind in DROPS[template]), (template, kind)


def test_qwen3_plain_rows_score_the_inserted_empty_think_block(rows):
    tokenizer = tokenizer_for("qwen3")
    encoded = encode_conversation(tokenizer, rows["plain"][0])
    scored = tokenizer.decode([encoded.input_ids[q] for q in encoded.response_positions])
    assert scored.startswith("<think>\n\n</think>\n\n") and scored.endswith(rows["plain"][0][1]["content"])


@pytest.mark.parametrize("template", TEMPLATE_SETUP)
def test_keep_mode_scores_every_turns_reasoning_and_content(template, rows):
    tokenizer = tokenizer_for(template)
    for kind in KINDS:
        for messages in rows[kind]:
            encoded = encode_conversation(tokenizer, messages, reasoning="keep")
            assert not encoded.content_dropped
            scored = tokenizer.decode([encoded.input_ids[q] for q in encoded.response_positions])
            for message in messages:
                if message["role"] == "assistant":
                    reasoning, answer = split_reasoning(message)
                    assert answer.strip() in scored, (template, kind)
                    assert reasoning.strip() in scored, (template, kind)
            # one run of scored tokens per turn, each closed by the template's end-of-turn marker (not scored)
            positions = encoded.response_positions
            run_ends = [q for q, after in zip(positions, [*positions[1:], None]) if after != q + 1]
            assert len(run_ends) == sum(m["role"] == "assistant" for m in messages)
            _, (_, end) = TEMPLATE_SETUP[template]
            assert all(tokenizer.decode(encoded.input_ids[q + 1]) == end for q in run_ends)


@pytest.mark.parametrize("template", ["qwen2.5-instruct", "llama-3.1-instruct"])
def test_keep_equals_template_where_the_template_drops_nothing(template, rows):
    tokenizer = tokenizer_for(template)
    for kind in ("plain", "inline_think", "multi_turn"):
        for messages in rows[kind][:10]:
            kept = encode_conversation(tokenizer, messages, reasoning="keep")
            rendered = encode_conversation(tokenizer, messages)
            # the same tokens up to the last end-of-turn marker (the template may add a newline after it)
            assert kept.input_ids == rendered.input_ids[: len(kept.input_ids)]
            assert kept.response_positions == rendered.response_positions


def test_keep_mode_writes_the_reasoning_after_a_generation_prompt_that_opens_a_think_block(rows):
    """QwQ's and DeepSeek-R1-Distill's generation prompts end in `<think>\\n`: the kept turn continues it."""
    for template in ("qwq-32b", "deepseek-r1-distill-qwen"):
        tokenizer = tokenizer_for(template)
        messages = rows["reasoning_content"][0]
        text = tokenizer.decode(encode_conversation(tokenizer, messages, reasoning="keep").input_ids)
        reasoning, answer = split_reasoning(messages[1])
        assert text.count("<think>") == 1
        assert f"<think>\n{reasoning}\n</think>\n\n{answer}" in text
