"""A corpus of bad rows of every kind we know: each is scored or quarantined with its own reason,
the job never dies, and read = scored + rejected."""

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run.job import run_job
from tests.test_job import job_config

USER = {"role": "user", "content": "What is two plus two?"}


def good(row_id, answer="Two plus two is four.", **extra):
    return {"id": row_id, "source": "t", "messages": [USER, {"role": "assistant", "content": answer}], **extra}


def line(obj) -> bytes:
    return json.dumps(obj).encode()


# (line bytes, expected outcome): "scored" or a reject reason
JSONL_ROWS = [
    (b"\xef\xbb\xbf" + line(good("bom")), "scored"),
    (b'{"id": "cut", "messages": [', "malformed_json"),
    (b"", "blank_line"),
    (b"   \t", "blank_line"),
    (b'{"id": "latin1", "messages": "caf\xe9"}', "bad_encoding"),
    (b"[1, 2, 3]", "not_an_object"),
    (line({"id": "no-messages"}), "missing_messages"),
    (line({"id": "str-messages", "messages": "hello"}), "messages_not_a_list"),
    (line({"id": "dict-messages", "messages": {"role": "user"}}), "messages_not_a_list"),
    (line({"id": "no-role", "messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}), "bad_message"),
    (line({"id": "wizard", "messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}), "unknown_role"),
    (line({"id": "null", "messages": [USER, {"role": "assistant", "content": None}]}), "non_string_content"),
    (line({"id": "number", "messages": [USER, {"role": "assistant", "content": 42}]}), "non_string_content"),
    (line({"id": "parts", "messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}),
     "scored"),  # text parts are joined
    (line({"id": "image", "messages": [USER, {"role": "assistant", "content": [{"type": "image_url", "image_url": {}}]}]}),
     "unsupported_content_part"),
    (line({"id": "text-part", "messages": [USER, {"role": "assistant", "content": [{"type": "text"}]}]}),
     "non_string_content"),
    (line({"id": "no-assistant", "messages": [USER]}), "no_assistant_turn"),
    (line({"id": "empty", "messages": [USER, {"role": "assistant", "content": " \n"}]}), "empty_assistant_content"),
    (line(good("very-long", "The answer is four. " * 4000)), "scored"),  # ~20k tokens > max_model_len: truncated
    (line(good("bom", "A different answer with the same id.")), "duplicate_id"),
    (line(good("huge-line", notes="x" * 25_000_000)), "scored"),  # one 25 MB line
    (line(good("crlf")) + b"\r", "scored"),
    (b'{"id": "no-newline-at-end", "messa', "malformed_json"),  # a truncated last line
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "rows.jsonl").write_bytes(b"\n".join(raw for raw, _ in JSONL_ROWS))
    pq.write_table(pa.table({"id": ["typed-1", "typed-2"], "messages": [1, 2]}), root / "wrong-types.parquet")
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    (root / "empty.jsonl").write_bytes(b"")
    (root / "array.json").write_text(json.dumps([good("array-1"), good("array-2")]))
    expected = {("rows.jsonl", n): outcome for n, (_, outcome) in enumerate(JSONL_ROWS, start=1)}
    expected |= {("wrong-types.parquet", 1): "messages_not_a_list", ("wrong-types.parquet", 2): "messages_not_a_list",
                 ("corrupt.parquet", 0): "unreadable_file", ("empty.jsonl", 0): "empty_file",
                 ("array.json", 1): "scored", ("array.json", 2): "scored"}  # fmt: skip
    return root, expected


def outcomes(out) -> dict:
    scores = duckdb.sql(f"SELECT source_file, row_number, truncated FROM read_parquet('{out}/student=*/**/*.parquet')")
    rejects = duckdb.sql(
        f"SELECT source_file, row_number, reject_reason, reject_detail FROM read_parquet('{out}/_rejects/**/*.parquet')"
    )
    found = {}
    for source_file, row_number, _ in scores.fetchall():
        found[(source_file.rsplit("/", 1)[-1], row_number)] = "scored"
    for source_file, row_number, reason, detail in rejects.fetchall():
        key = (source_file.rsplit("/", 1)[-1], row_number)
        assert key not in found, f"{key} both scored and rejected"
        assert detail, f"{key} has no detail"
        found[key] = reason
    return found


def test_every_bad_row_is_scored_or_quarantined(ray_runtime, tmp_path, bad_corpus, student_dirs):
    root, expected = bad_corpus
    out = tmp_path / "out"
    cfg = job_config(tmp_path, [str(root)], str(out), {"tiny": student_dirs["chatml"]}, ["scoring.max_model_len=512"])
    result = run_job(cfg)
    assert outcomes(out) == expected
    assert len(set(expected.values()) - {"scored"}) >= 14
    [counts] = result.counts.to_pylist()
    n_scored = sum(v == "scored" for v in expected.values())
    assert counts == {"student": "tiny", "read": len(expected), "scored": n_scored,
                      "rejected": len(expected) - n_scored, "skipped": 0, "sampled_out": 0, "content_dropped": 0, "unread": 0}  # fmt: skip
    truncated = duckdb.sql(f"SELECT sample_id FROM read_parquet('{out}/student=*/**/*.parquet') WHERE truncated").fetchall()
    assert truncated == [("very-long",)]


def test_rows_longer_than_max_model_len_can_be_rejected(ray_runtime, tmp_path, bad_corpus, student_dirs):
    root, expected = bad_corpus
    out = tmp_path / "out"
    overrides = ["scoring.max_model_len=512", "scoring.on_too_long=reject"]
    cfg = job_config(tmp_path, [str(root / "rows.jsonl")], str(out), {"tiny": student_dirs["chatml"]}, overrides)
    run_job(cfg)
    very_long = next(n for n, (raw, _) in enumerate(JSONL_ROWS, start=1) if b'"very-long"' in raw)
    assert outcomes(out)[("rows.jsonl", very_long)] == "too_long"


def test_a_corpus_of_only_bad_rows_completes_with_every_row_quarantined(ray_runtime, tmp_path, student_dirs):
    """Rows without messages, and a folder of .json objects without messages (dataset_info.json and
    state.json, as a Hugging Face save_to_disk folder holds beside shards that are missing here)."""
    root = tmp_path / "bad-only"
    (root / "meta").mkdir(parents=True)
    (root / "rows.jsonl").write_bytes(line({"id": "a", "x": 1}) + b"\n" + line({"id": "b", "x": 2}))
    (root / "meta" / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (root / "meta" / "state.json").write_text(json.dumps({"_data_files": []}))
    out = tmp_path / "out"
    [counts] = run_job(job_config(tmp_path, [str(root)], str(out), {"tiny": student_dirs["chatml"]})).counts.to_pylist()
    assert (counts["read"], counts["scored"], counts["rejected"]) == (4, 0, 4)
    rejects = duckdb.sql(f"SELECT reject_reason FROM read_parquet('{out}/_rejects/**/*.parquet')").fetchall()
    assert rejects == [("missing_messages",)] * 4 and not list(out.glob("student=*"))


def test_files_and_blocks_of_only_bad_rows_among_good_ones(ray_runtime, tmp_path, student_dirs):
    """A file of only bad rows among good files, and a file whose first 1,024-row block is all bad and
    whose second starts with bad rows: blocks with no valid row keep their columns and flow through."""
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "a-good.jsonl").write_bytes(b"\n".join(line(good(f"g{k}")) for k in range(3)))
    (root / "b-bad.jsonl").write_bytes(b"\n".join(line({"id": f"x{k}", "x": k}) for k in range(3)))
    boundary = [line({"id": f"y{k}"}) for k in range(1100)] + [line(good(f"h{k}")) for k in range(4)]
    (root / "c-boundary.jsonl").write_bytes(b"\n".join(boundary))
    out = tmp_path / "out"
    [counts] = run_job(job_config(tmp_path, [str(root)], str(out), {"tiny": student_dirs["chatml"]})).counts.to_pylist()
    assert (counts["read"], counts["scored"], counts["rejected"]) == (3 + 3 + 1104, 7, 1103)
    found = outcomes(out)
    assert [found[("c-boundary.jsonl", n)] for n in (1, 1024, 1025, 1100, 1101, 1104)] == ["missing_messages"] * 4 + [
        "scored"
    ] * 2
    assert {found[("b-bad.jsonl", n)] for n in (1, 2, 3)} == {"missing_messages"}
