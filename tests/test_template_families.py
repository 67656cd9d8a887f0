"""Every chat-template family and every turn type, on GSM8K rows written as reasoning and agentic
trajectories: the real published templates in ../shared (ChatML, Llama-3, DeepSeek, Qwen3, and gpt-oss
harmony on its own tokenizer), plus [INST] (Mistral v3 / Tekken) and Phi-3.5 templates written here
from their published formats, on the Qwen3 tokenizer with their marker tokens added.

Needs ../shared; skips without it.
"""

import json

import pytest
import tokenizers
from transformers import AutoTokenizer

from pipeline import errors
from pipeline.corpus.messages import THINK_OPEN, split_reasoning
from pipeline.errors import RowError
from pipeline.tokens.markers import turn_markers
from pipeline.tokens.spans import encode_conversation
from pipeline.tokens.tokenizer import load_tokenizer
from tests.conftest import SHARED
from tests.test_templates import GSM8K, QWEN3, tokenizer_for

GPT_OSS = SHARED / "models" / "gpt-oss-tokenizer"
SMOLLM = SHARED / "models" / "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(
    not (QWEN3.exists() and GPT_OSS.exists() and GSM8K.exists()), reason="needs ../shared (Qwen3 and gpt-oss tokenizers, GSM8K)"
)

# Mistral's v3 / Tekken format (Mistral-Nemo, Magistral): no assistant header, the system prompt goes
# into the last user message, tool calls as [TOOL_CALLS] JSON, results as [TOOL_RESULTS].
MISTRAL_TEMPLATE = """
{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}{%- set loop_messages = messages[1:] %}
{%- else %}{%- set loop_messages = messages %}{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{{- bos_token }}
{%- for message in loop_messages %}
  {%- if message["role"] == "user" %}
    {%- if message == user_messages[-1] and system_message is defined %}{{- "[INST]" + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
    {%- else %}{{- "[INST]" + message["content"] + "[/INST]" }}{%- endif %}
  {%- elif message["role"] == "assistant" %}
    {%- if message.tool_calls %}{{- "[TOOL_CALLS][" }}
      {%- for call in message.tool_calls %}{{- '{"name": "' + call.function.name + '", "arguments": ' + call.function.arguments | tojson + ', "id": "' + call.id + '"}' }}{%- if not loop.last %}{{- ", " }}{%- endif %}{%- endfor %}
      {{- "]" + eos_token }}
    {%- else %}{{- message["content"] + eos_token }}{%- endif %}
  {%- elif message["role"] == "tool" %}{{- '[TOOL_RESULTS]{"content": ' + message.content | tojson + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
  {%- else %}{{- raise_exception("Only user, assistant and tool roles are supported") }}{%- endif %}
{%- endfor %}
"""
# Phi-3.5-mini-instruct's template: the render without a generation prompt ends with the eos token.
PHI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

FAMILIES = (
    "qwen3",
    "qwq-32b",
    "qwen2.5-instruct",
    "llama-3.1-instruct",
    "deepseek-r1-distill-qwen",
    "gpt-oss",
    "mistral",
    "phi-3.5",
)
KINDS = ("plain", "inline_think", "reasoning_content", "thinking", "multi_turn", "multi_turn_reasoning", "agentic")
# Where the template leaves out text of an assistant message in `template` mode: most ignore a reasoning
# field; Qwen3 and gpt-oss render it for the final turn only; DeepSeek keeps only what follows </think>.
FIELD_IGNORED = {"reasoning_content", "thinking", "multi_turn_reasoning"}
DROPPED = {
    "qwen3": {"multi_turn", "multi_turn_reasoning"},
    "qwq-32b": FIELD_IGNORED | {"multi_turn"},
    "qwen2.5-instruct": FIELD_IGNORED,
    "llama-3.1-instruct": FIELD_IGNORED,
    "deepseek-r1-distill-qwen": FIELD_IGNORED | {"inline_think", "multi_turn"},  # not after a tool result
    "gpt-oss": {"multi_turn_reasoning"},
    "mistral": FIELD_IGNORED,
    "phi-3.5": FIELD_IGNORED,
}
SYSTEM_TEXT = "SYSTEM-SENTINEL: show your work."
TOOL_RESULT = "TOOL-RESULT-SENTINEL 4242"


def family_tokenizer(family: str):
    if family == "gpt-oss":
        return AutoTokenizer.from_pretrained(GPT_OSS)
    if family == "mistral":
        tokenizer = AutoTokenizer.from_pretrained(QWEN3)
        tokenizer.add_special_tokens({
            "bos_token": "<s>", "eos_token": "</s>",
            "additional_special_tokens": ["[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
        })  # fmt: skip
        tokenizer.chat_template = MISTRAL_TEMPLATE
        return tokenizer
    if family == "phi-3.5":
        tokenizer = AutoTokenizer.from_pretrained(QWEN3)
        tokenizer.add_special_tokens(
            {"eos_token": "<|endoftext|>", "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]}
        )
        tokenizer.chat_template = PHI_TEMPLATE
        return tokenizer
    return tokenizer_for(family)


def family_rows(n: int = 12) -> dict[str, list[list[dict]]]:
    """GSM8K answers split into reasoning (all lines but the last) and answer (the last line), as rows of
    each kind; multi-turn rows open with a system message, agentic rows call a calculator tool first."""
    with open(GSM8K) as f:
        exchanges = []
        for line in f:
            question, answer = (m["content"] for m in json.loads(line)["messages"])
            *steps, final = answer.strip().split("\n")
            if steps:
                exchanges.append((question, "\n".join(steps), final))
            if len(exchanges) == n + 1:
                break
    kinds = {kind: [] for kind in KINDS}
    system = {"role": "system", "content": SYSTEM_TEXT}
    for (question, reasoning, final), (question2, reasoning2, final2) in zip(exchanges, exchanges[1:]):
        user, user2 = {"role": "user", "content": question}, {"role": "user", "content": question2}
        inline = {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{final}"}
        inline2 = {"role": "assistant", "content": f"<think>\n{reasoning2}\n</think>\n\n{final2}"}
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": final[-12:]})},
        }
        kinds["plain"].append([user, {"role": "assistant", "content": f"{reasoning}\n{final}"}])
        kinds["inline_think"].append([user, inline])
        kinds["reasoning_content"].append([user, {"role": "assistant", "content": final, "reasoning_content": reasoning}])
        kinds["thinking"].append([user, {"role": "assistant", "content": final, "thinking": reasoning}])
        kinds["multi_turn"].append([system, user, inline, user2, inline2])
        kinds["multi_turn_reasoning"].append([
            user, {"role": "assistant", "content": final, "thinking": reasoning},
            user2, {"role": "assistant", "content": final2, "reasoning_content": reasoning2},
        ])  # fmt: skip
        kinds["agentic"].append([
            system, user, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "name": "calculator", "tool_call_id": "call_1", "content": TOOL_RESULT}, inline,
        ])  # fmt: skip
    return kinds


@pytest.fixture(scope="module")
def rows():
    return family_rows()


def scored_text(tokenizer, encoded) -> str:
    return tokenizer.decode([encoded.input_ids[q] for q in encoded.response_positions])


def assert_only_assistant_text_scored(messages, scored):
    for message in messages:
        if message["role"] in ("system", "user", "tool"):
            assert message["content"] not in scored


@pytest.mark.parametrize("family", FAMILIES)
def test_template_mode_scores_every_rendered_turn_of_every_family(family, rows):
    tokenizer = family_tokenizer(family)
    for kind in KINDS:
        for messages in rows[kind]:
            encoded = encode_conversation(tokenizer, messages)  # a reject raises
            scored = scored_text(tokenizer, encoded)
            rendered = tokenizer.decode(encoded.input_ids)
            for message in messages:
                if message["role"] == "assistant" and message["content"]:
                    assert split_reasoning(message)[1].strip() in scored, (family, kind)
                if message.get("tool_calls") and "calculator" in rendered:  # the call, where the template renders it
                    assert "calculator" in scored, (family, kind)
            assert_only_assistant_text_scored(messages, scored)
            assert encoded.content_dropped == (kind in DROPPED[family]), (family, kind)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_mode_scores_every_turns_reasoning_in_every_family(family, rows):
    tokenizer = family_tokenizer(family)
    for kind in KINDS:
        for messages in rows[kind]:
            encoded = encode_conversation(tokenizer, messages, reasoning="keep")
            scored = scored_text(tokenizer, encoded)
            assert not encoded.content_dropped, (family, kind)
            for message in messages:
                if message["role"] == "assistant":
                    for piece in split_reasoning(message):
                        assert piece.strip() in scored, (family, kind)
            assert_only_assistant_text_scored(messages, scored)


def test_harmony_bodies_are_every_message_of_the_turn_without_stop_tokens(rows):
    tokenizer = family_tokenizer("gpt-oss")
    markers = turn_markers(tokenizer)
    assert markers.header == "<|start|>assistant" and set(markers.ends) == {"<|return|>", "<|end|>", "<|call|>"}
    messages = rows["agentic"][0]
    encoded = encode_conversation(tokenizer, messages)
    scored = [tokenizer.decode(encoded.input_ids[q]) for q in encoded.response_positions]
    assert not {"<|start|>", "<|end|>", "<|return|>", "<|call|>"} & set(scored)  # headers and stop tokens excluded
    assert scored.count("<|channel|>") == 2  # the call (commentary) and the answer (final), channel tokens included
    assert "".join(scored).startswith(" to=functions.calculator<|channel|>commentary json<|message|>")


def test_harmony_keep_mode_puts_reasoning_in_the_analysis_channel(rows):
    tokenizer = family_tokenizer("gpt-oss")
    for kind in ("inline_think", "reasoning_content", "multi_turn", "agentic"):
        for messages in rows[kind]:
            encoded = encode_conversation(tokenizer, messages, reasoning="keep")
            scored = scored_text(tokenizer, encoded)
            assert THINK_OPEN not in scored and "</think>" not in scored
            for message in messages:
                if message["role"] == "assistant" and message["content"]:
                    reasoning, _ = split_reasoning(message)
                    assert f"<|channel|>analysis<|message|>{reasoning.strip()}" in scored
            text = tokenizer.decode(encoded.input_ids)
            # an earlier turn ends as the template ends turns that others follow, not with <|return|>
            assert text.count("<|return|>") == 1 and text.endswith("<|return|>")


def test_a_headerless_template_starts_the_body_after_the_user_turn(rows):
    tokenizer = family_tokenizer("mistral")
    markers = turn_markers(tokenizer)
    assert markers.header == "" and markers.opener == "[/INST]" and markers.end == "</s>"
    messages = rows["multi_turn"][0]  # the system prompt goes into the last user message: no stable prefix
    encoded = encode_conversation(tokenizer, messages)
    scored = scored_text(tokenizer, encoded)
    assert scored == "".join(m["content"] for m in messages if m["role"] == "assistant")


def test_phi_template_end_of_document_marker_is_not_a_turn(rows):
    tokenizer = family_tokenizer("phi-3.5")
    markers = turn_markers(tokenizer)
    assert (markers.header, markers.end, markers.closer) == ("<|assistant|>\n", "<|end|>", "<|endoftext|>")
    encoded = encode_conversation(tokenizer, rows["multi_turn"][0])
    assert "<|endoftext|>" not in scored_text(tokenizer, encoded)


def test_a_row_the_template_cannot_render_is_rejected_with_its_message(rows):
    tokenizer = family_tokenizer("gpt-oss")
    orphan_tool = [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(RowError) as info:
        encode_conversation(tokenizer, orphan_tool)
    assert info.value.reason == errors.TEMPLATE_ERROR and "no previous assistant message with a tool call" in info.value.detail


def test_content_parts_are_joined_and_other_parts_rejected():
    tokenizer = family_tokenizer("qwen2.5-instruct")
    parts = [{"type": "text", "text": "Six times seven "}, {"type": "text", "text": "is 42."}]
    joined = encode_conversation(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": parts}])
    plain = encode_conversation(
        tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Six times seven is 42."}]
    )
    assert joined == plain
    image = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "a"},
    ]
    with pytest.raises(RowError) as info:
        encode_conversation(tokenizer, image)
    assert info.value.reason == errors.UNSUPPORTED_CONTENT_PART


@pytest.mark.skipif(not SMOLLM.exists(), reason="needs ../shared/models/smollm2-135m-instruct")
@pytest.mark.parametrize("model", [SMOLLM, QWEN3, GPT_OSS])
def test_the_scored_ids_are_the_models_own_tokenizer_json(model):
    reference = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    tokenizer = load_tokenizer(str(model))
    for text in ["x\n\n3 apples", "Step 1:\n\n12 + 30 = 42\n\n\n7"]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text, add_special_tokens=False).ids
    for messages in family_rows(6)["inline_think"]:
        encoded = encode_conversation(tokenizer, messages)
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        assert encoded.input_ids == reference.encode(rendered, add_special_tokens=False).ids


@pytest.mark.skipif(not SMOLLM.exists(), reason="needs ../shared/models/smollm2-135m-instruct")
def test_the_plain_auto_tokenizer_of_smollm2_is_the_one_that_differs():
    """Why load_tokenizer checks: transformers' own class for SmolLM2 splits a newline pair."""
    reference = tokenizers.Tokenizer.from_file(str(SMOLLM / "tokenizer.json"))
    text = "x\n\n3 apples"
    auto = AutoTokenizer.from_pretrained(SMOLLM)(text, add_special_tokens=False)["input_ids"]
    assert auto != reference.encode(text, add_special_tokens=False).ids
