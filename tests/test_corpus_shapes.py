"""Corpus shapes in one job: ShareGPT JSONL, prompt/response Parquet, compressed JSONL and JSON, and
reasoning fields; and students without a chat template."""

import bz2
import gzip
import json
import lzma
import shutil

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.corpus.records import content_hash
from pipeline.corpus.shapes import row_messages
from pipeline.run.config import ConfigError, InputConfig
from pipeline.run.job import run_job
from pipeline.scoring.student import ScoringOptions, Student
from pipeline.tokens.spans import encode_conversation
from tests.test_job import job_config

STATS = ["resp_token_length", "avg_rank_clip", "avg_surprisal", "rank_surprisal_ratio"]
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def with_reasoning(row: dict, i: int) -> dict:
    """Every other row's assistant turns think: half as `reasoning_content`, half as `thinking`."""
    if i % 2:
        return row
    field = "reasoning_content" if i % 4 == 0 else "thinking"
    messages = [
        {**m, field: f"Let me think about part {k}.\nIt is {i + k}."} if m["role"] == "assistant" else m
        for k, m in enumerate(row["messages"])
    ]
    return {**row, "messages": messages}


def as_sharegpt(row: dict) -> dict:
    conversations = [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in row["messages"]]
    return {k: v for k, v in row.items() if k != "messages"} | {"conversations": conversations}


def as_prompt_response(row: dict) -> dict:
    by_role = {m["role"]: m for m in row["messages"]}
    return {
        "id": row["id"], "problem_id": row["problem_id"], "source": row["source"],
        "system": by_role.get("system", {}).get("content"), "question": by_role["user"]["content"],
        "answer": by_role["assistant"]["content"],
        "reasoning": by_role["assistant"].get("reasoning_content") or by_role["assistant"].get("thinking"),
    }  # fmt: skip


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture(scope="module")
def shaped_corpus(tmp_path_factory, corpus):
    """The same trajectories in six shapes; returns (root, rows as messages by id, bad rows by id)."""
    root = tmp_path_factory.mktemp("shapes")
    rows = [with_reasoning(row, i) for i, row in enumerate(corpus[:30])]
    single_exchange = [r for r in rows if sum(m["role"] == "user" for m in r["messages"]) == 1]
    plain = [r for r in rows if r not in single_exchange]
    sharegpt = [as_sharegpt(r) for r in plain if not any("reasoning_content" in m or "thinking" in m for m in r["messages"])]
    sharegpt_ids = {r["id"] for r in sharegpt}
    compressed = [r for r in plain if r["id"] not in sharegpt_ids]

    bad = {
        "sharegpt-bad-from": {"id": "sharegpt-bad-from", "conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
        "sharegpt-bad-value": {"id": "sharegpt-bad-value", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}]},
        "bad-response": {"id": "bad-response", "question": "hi", "answer": 5},
        "bad-reasoning": {"id": "bad-reasoning", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "reasoning_content": ["a"]}]},
    }  # fmt: skip
    (root / "sharegpt.jsonl").write_bytes(jsonl_bytes([*sharegpt, bad["sharegpt-bad-from"], bad["sharegpt-bad-value"]]))
    prompt_response = [as_prompt_response(r) for r in single_exchange]
    pq.write_table(pa.Table.from_pylist(prompt_response), root / "prompt_response.parquet")
    (root / "bad.jsonl").write_bytes(jsonl_bytes([bad["bad-response"], bad["bad-reasoning"]]))
    quarter = len(compressed) // 4
    parts = [
        compressed[:quarter],
        compressed[quarter : 2 * quarter],
        compressed[2 * quarter : 3 * quarter],
        compressed[3 * quarter :],
    ]
    (root / "a.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(parts[0])))
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(parts[1])))
    (root / "c.jsonl.xz").write_bytes(lzma.compress(jsonl_bytes(parts[2])))
    (root / "d.json.bz2").write_bytes(bz2.compress(json.dumps(parts[3]).encode()))
    assert all(parts) and sharegpt and prompt_response
    agentic = agentic_rows(corpus[30:34])
    (root / "agentic.jsonl").write_bytes(jsonl_bytes(agentic))
    return root, {r["id"]: r for r in [*rows, *agentic]}, bad


def agentic_rows(rows: list[dict]) -> list[dict]:
    """Tool-calling trajectories (a call with null content, its result, the answer) and content parts."""
    shaped = []
    for k, row in enumerate(rows):
        user, *_, answer = row["messages"]
        call = {
            "id": f"call_{k}",
            "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"q": user["content"][:20]})},
        }
        if k % 2:
            messages = [{"role": "user", "content": [{"type": "text", "text": user["content"]}]},
                        {"role": "assistant", "content": [{"type": "text", "text": part} for part in answer["content"].split(" ")]}]  # fmt: skip
        else:
            messages = [user, {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "name": "lookup", "tool_call_id": f"call_{k}", "content": "a result"}, answer]  # fmt: skip
        shaped.append({**row, "id": f"agentic-{k}", "messages": messages})
    return shaped


def test_the_content_hash_covers_tool_calls(corpus):
    [row] = agentic_rows(corpus[:1])
    messages = row_messages(row, InputConfig(paths=["-"]))
    assert messages[1]["tool_calls"] and messages[2]["tool_call_id"] == "call_0"
    without_call = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
    assert content_hash(messages) != content_hash(without_call)


def test_one_job_scores_every_shape_as_the_same_rows_given_as_messages(tmp_path, ray_runtime, student_dirs, shaped_corpus):
    root, rows, bad = shaped_corpus
    out = tmp_path / "out"
    fields = [
        "input.prompt_field=question",
        "input.response_field=answer",
        "input.reasoning_field=reasoning",
        "input.system_field=system",
    ]
    cfg = job_config(tmp_path, [str(root)], str(out), {"tiny": student_dirs["chatml"]}, fields)
    result = run_job(cfg)
    [counts] = result.counts.to_pylist()
    n_thinking = sum(any("reasoning_content" in m or "thinking" in m for m in r["messages"]) for r in rows.values())
    assert counts == {"student": "tiny", "read": len(rows) + len(bad), "scored": len(rows), "rejected": len(bad),
                      "skipped": 0, "sampled_out": 0, "content_dropped": n_thinking, "unread": 0}  # the ChatML template ignores reasoning  # fmt: skip

    scores = duckdb.sql(f"SELECT * FROM read_parquet('{out}/student=*/**/*.parquet', hive_partitioning=true)").df()
    assert sorted(scores["sample_id"]) == sorted(rows)
    messages_cfg = InputConfig(paths=["-"])
    student = Student.load(str(student_dirs["chatml"]), dtype="float32", device="cpu", options=ScoringOptions())
    as_messages = {k: row_messages(row, messages_cfg) for k, row in rows.items()}
    expected = dict(zip(rows, student.score([encode_conversation(student.tokenizer, m) for m in as_messages.values()])))
    for _, got in scores.iterrows():
        want = expected[got["sample_id"]]
        assert got["content_hash"] == content_hash(as_messages[got["sample_id"]])
        assert got["resp_token_length"] == want["resp_token_length"]
        for column in STATS[1:]:
            assert got[column] == pytest.approx(want[column], abs=1e-5), (got["sample_id"], column)

    rejects = duckdb.sql(f"SELECT sample_id, reject_reason FROM read_parquet('{out}/_rejects/**/*.parquet')").fetchall()
    assert dict(rejects) == {
        "sharegpt-bad-from": "unknown_role",
        "sharegpt-bad-value": "non_string_content",
        "bad-response": "bad_response",
        "bad-reasoning": "non_string_reasoning",
    }


def test_student_without_chat_template_is_a_config_error_until_one_is_given(tmp_path, ray_runtime, student_dirs, corpus_path):
    base = tmp_path / "base-model"
    shutil.copytree(student_dirs["chatml"], base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    cfg = job_config(tmp_path, [str(corpus_path)], str(tmp_path / "out"), {"base": base})
    with pytest.raises(ConfigError, match=r"students\.0 \(base\).*no chat template.*students\.0\.chat_template"):
        run_job(cfg)
    assert not (tmp_path / "out").exists()  # failed before any work

    cfg = job_config(tmp_path, [str(corpus_path)], str(tmp_path / "out"), {"base": base}, ["students.0.chat_template=chatml"])
    [counts] = run_job(cfg).counts.to_pylist()
    assert counts["scored"] == counts["read"] > 0
