"""Token scopes from the span mechanism: the answers, the reasoning, the bodies without tool calls, on
every template family the tests cover (real templates from ../shared) and on the tiny students' own."""

import pytest

from pipeline import errors
from pipeline.corpus.messages import split_reasoning
from pipeline.corpus.records import trajectory_flags
from pipeline.errors import RowError
from pipeline.run.job import check_students
from pipeline.run.schema import RowContract
from pipeline.run.settings import resolve_settings
from pipeline.tokens.spans import encode_conversation
from pipeline.tokens.tokenizer import load_tokenizer
from tests.test_job import job_config
from tests.test_template_families import FAMILIES, GPT_OSS, GSM8K, KINDS, QWEN3, family_rows, family_tokenizer, scored_text

needs_shared = pytest.mark.skipif(not (QWEN3.exists() and GPT_OSS.exists() and GSM8K.exists()), reason="needs ../shared")


@pytest.fixture(scope="module")
def rows():
    return family_rows(4)


def scored_in_scope(tokenizer, messages, scope):
    """The scored positions and text of `scope`, or None where the row has nothing in it (a reject)."""
    try:
        encoded = encode_conversation(tokenizer, messages, reasoning="keep", scope=scope)
    except RowError as exc:
        assert exc.reason == errors.EMPTY_SCOPE
        return None
    return set(encoded.response_positions), scored_text(tokenizer, encoded)


@needs_shared
@pytest.mark.parametrize("family", FAMILIES)
def test_each_scope_scores_its_part_of_every_turn_in_every_family(family, rows):
    tokenizer = family_tokenizer(family)
    for kind in KINDS:
        for messages in rows[kind]:
            whole = encode_conversation(tokenizer, messages, reasoning="keep")
            rendered = tokenizer.decode(whole.input_ids)
            parts = {scope: scored_in_scope(tokenizer, messages, scope) for scope in ("final", "reasoning", "no_tool_calls")}
            pieces = [[piece.strip() for piece in split_reasoning(m)] for m in messages if m["role"] == "assistant"]
            assert (parts["reasoning"] is None) == (not any(thought for thought, _ in pieces)), (family, kind)
            assert parts["final"] is not None and parts["no_tool_calls"] is not None, (family, kind)
            scored = {scope: part[1] if part else "" for scope, part in parts.items()}
            for part in filter(None, parts.values()):
                assert part[0] <= set(whole.response_positions), (family, kind)
            for thought, answer in pieces:
                if answer:
                    assert answer in scored["final"] and answer not in scored["reasoning"], (family, kind)
                    assert answer in scored["no_tool_calls"], (family, kind)
                if thought:
                    assert thought in scored["reasoning"] and thought not in scored["final"], (family, kind)
                    assert thought in scored["no_tool_calls"], (family, kind)
            if any(m.get("tool_calls") for m in messages) and "calculator" in rendered:
                assert "calculator" not in scored["no_tool_calls"] + scored["final"], (family, kind)


def student_settings(cfg, check):
    """The one student's fingerprinted settings, on a cluster without GPUs."""
    return resolve_settings(cfg, RowContract.of(cfg), [check], cluster_gpus=0).students[0].scoring


def test_scopes_on_a_tiny_students_template(student_dirs):
    tokenizer = load_tokenizer(str(student_dirs["chatml"]))
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\nUse the tool.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
        {"role": "assistant", "content": "It is 4.", "reasoning_content": "The tool said 4."},
    ]
    kept = {scope: scored_text(tokenizer, encode_conversation(tokenizer, messages, reasoning="keep", scope=scope))
            for scope in ("final", "reasoning", "no_tool_calls")}  # fmt: skip
    assert "Use the tool." in kept["final"] and "It is 4." in kept["final"] and "Add them" not in kept["final"]
    # A tool-calling turn is the template's own rendering, which here has no reasoning field.
    assert (
        "The tool said 4." in kept["reasoning"] and "It is 4" not in kept["reasoning"] and "Use the tool" not in kept["reasoning"]
    )
    assert "Use the tool." in kept["no_tool_calls"] and "It is 4." in kept["no_tool_calls"]
    # The built-in chatml template drops a reasoning field: in template mode the second turn has none.
    with pytest.raises(RowError) as rejected:
        encode_conversation(
            tokenizer, [messages[0], {"role": "assistant", "content": "4", "reasoning_content": "2+2"}], scope="reasoning"
        )
    assert rejected.value.reason == errors.EMPTY_SCOPE


def test_a_scope_enters_the_fingerprint_only_when_it_is_not_the_default(tmp_path, student_dirs, corpus_path):
    cfg = job_config(tmp_path, [str(corpus_path)], str(tmp_path / "out"), {"tiny": student_dirs["chatml"]})
    (check,) = check_students(cfg)
    default = student_settings(cfg, check)
    assert default.scope is None and "scope" not in default.as_dict()
    cfg.scoring.scope = "final"
    final = student_settings(cfg, check)
    assert final.as_dict()["scope"] == "final" and final.fingerprint != default.fingerprint


def test_trajectory_flags_name_degenerate_trajectories():
    user = {"role": "user", "content": "q"}
    answer = {"role": "assistant", "content": "a"}
    tool = {"role": "tool", "tool_call_id": "c", "content": "r"}

    def call(arguments):
        return {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c", "function": {"name": "run", "arguments": arguments}}],
        }

    assert trajectory_flags([user, answer]) == (1, None)
    assert trajectory_flags([user, call('{"cmd": "ls"}'), tool, call('{"cmd": "ls"}'), tool, answer]) == (3, "repeated_turn")
    assert trajectory_flags([user, call("  "), tool, answer]) == (2, "empty_tool_arguments")
    assert trajectory_flags([user, call({}), tool, answer])[1] == "empty_tool_arguments"
    thinking_only = {"role": "assistant", "content": "", "reasoning_content": "hmm"}
    assert trajectory_flags([user, thinking_only]) == (1, "reasoning_without_answer")
    assert (
        trajectory_flags([user, {"role": "assistant", "content": "<think>only thoughts</think>"}])[1]
        == "reasoning_without_answer"
    )
    # consecutive assistant messages are one turn
    assert trajectory_flags([user, answer, {"role": "assistant", "content": "b"}, user, answer]) == (2, None)
