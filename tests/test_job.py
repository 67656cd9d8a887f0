"""End to end on a real local Ray runtime: mixed JSONL/Parquet corpus, good and bad rows, two students."""

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.run.config import load_config
from pipeline.run.job import run_job
from pipeline.scoring.student import ScoringOptions, Student
from pipeline.tokens.spans import encode_conversation
from tests.conftest import write_jsonl

BAD_JSONL_LINES = {
    '{"id": "broken", "messages": [': "malformed_json",
    json.dumps({"id": "no-assistant", "messages": [{"role": "user", "content": "hi"}]}): "no_assistant_turn",
    json.dumps(
        {"id": "empty", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    ): "empty_assistant_content",
    json.dumps(
        {"id": "number", "messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}
    ): "non_string_content",
}


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, corpus):
    """Two directories: JSONL with bad lines and one row without an id; Parquet, one file of the wrong types."""
    root = tmp_path_factory.mktemp("mixed")
    first, second = corpus[:20], corpus[20:]
    no_id = {k: v for k, v in first[0].items() if k != "id"}
    write_jsonl(root / "a" / "part-1.jsonl", [*first[1:10], *BAD_JSONL_LINES, no_id, *first[10:]])
    (root / "b").mkdir()
    pq.write_table(pa.Table.from_pylist(second), root / "b" / "part-2.parquet")
    pq.write_table(pa.table({"id": ["typed"], "messages": ["not a list"]}), root / "b" / "bad-types.parquet")
    good = {**{row["id"]: row for row in first[1:] + second}, f"{root / 'a' / 'part-1.jsonl'}:14": no_id}
    return root, good


def job_config(tmp_path, inputs, output, students, extra=()):
    config = {
        "input": {"paths": inputs, "passthrough": ["problem_id", "source"]},
        "students": [{"name": name, "path": str(path), "dtype": "float32"} for name, path in students.items()],
        "scoring": {"max_model_len": 4096, "token_budget": 2048, "batch_tokens": "2000"},
        "compute": {"cpus_per_actor": 0.5, "torch_threads": 1},
        "output": {"path": output, "partition_by": ["source"]},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path, list(extra))


def core_scores(student_dir, rows):
    """The core library's numbers for `rows`, without Ray (loaded as the job loads it)."""
    student = Student.load(str(student_dir), dtype="float32", device="cpu", options=ScoringOptions())
    encoded = [encode_conversation(student.tokenizer, rows[k]["messages"]) for k in rows]
    return dict(zip(rows, student.score(encoded)))


def read_scores(output_dir):
    return duckdb.sql(
        f"SELECT * FROM read_parquet('{output_dir}/student=*/**/*.parquet', hive_partitioning=true)"
    ).to_arrow_table()


def test_mixed_corpus_two_students(ray_runtime, tmp_path, mixed_corpus, student_dirs):
    root, good = mixed_corpus
    students = {"tiny-chatml": student_dirs["chatml"], "tiny-llama3": student_dirs["llama3"]}
    out = tmp_path / "out"
    cfg = job_config(tmp_path, [str(root / "a"), str(root / "b")], str(out), students)
    result = run_job(cfg)

    n_bad = len(BAD_JSONL_LINES) + 1
    for row in result.counts.to_pylist():
        assert row == {"student": row["student"], "read": len(good) + n_bad, "scored": len(good),
                       "rejected": n_bad, "skipped": 0, "sampled_out": 0, "content_dropped": 0, "unread": 0}  # fmt: skip

    scores = read_scores(out)
    expected_columns = {"sample_id", "problem_id", "source", "student", "student_revision", "rank_clip",
                        "resp_token_length", "avg_rank_clip", "avg_surprisal", "rank_surprisal_ratio",
                        "truncated", "content_hash", "run_id", "scored_at"}  # fmt: skip
    assert expected_columns <= set(scores.column_names)
    assert scores.num_rows == 2 * len(good)
    for name, student_dir in students.items():
        mine = {r["sample_id"]: r for r in scores.to_pylist() if r["student"] == name}
        assert set(mine) == set(good)
        for sample_id, stats in core_scores(student_dir, good).items():
            row = mine[sample_id]
            assert row["resp_token_length"] == stats["resp_token_length"]
            assert row["source"] == good[sample_id]["source"] and row["run_id"] == result.run_id
            for column in ("avg_rank_clip", "avg_surprisal", "rank_surprisal_ratio"):
                assert abs(row[column] - stats[column]) <= 1e-5

    rejects = duckdb.sql(f"SELECT * FROM read_parquet('{out}/_rejects/**/*.parquet')").to_arrow_table().to_pylist()
    assert len(rejects) == 2 * n_bad
    reasons = {(r["source_file"].rsplit("/", 1)[-1], r["row_number"], r["reject_reason"]) for r in rejects}
    expected_reasons = {("part-1.jsonl", 10 + i, reason) for i, reason in enumerate(BAD_JSONL_LINES.values())}
    assert reasons == expected_reasons | {("bad-types.parquet", 1, "messages_not_a_list")}

    summary = duckdb.sql(f"SELECT * FROM read_parquet('{out}/_summary/**/by_partition.parquet')").to_arrow_table()
    assert sum(summary["n_trajectories"].to_pylist()) == 2 * len(good)


def test_scores_and_writes_through_s3(ray_runtime, tmp_path, corpus_path, student_dirs, s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("corpora")
    fs.put(str(corpus_path), "corpora/in/corpus.jsonl")
    cfg = job_config(
        tmp_path, ["s3://corpora/in/"], "s3://corpora/out", {"tiny": student_dirs["chatml"]},
        [f"storage.endpoint_url={s3_endpoint}"],
    )  # fmt: skip
    result = run_job(cfg)
    rows = corpus_path.read_text().splitlines()
    assert result.counts.to_pylist() == [
        {
            "student": "tiny",
            "read": len(rows),
            "scored": len(rows),
            "rejected": 0,
            "skipped": 0,
            "sampled_out": 0,
            "content_dropped": 0,
            "unread": 0,
        }
    ]
    assert fs.exists(f"corpora/out/_runs/{result.run_id}.json")
    assert not fs.exists(f"corpora/out/_staging/{result.run_id}")
    local = tmp_path / "fetched"
    fs.get("corpora/out/", str(local), recursive=True)
    scores = read_scores(local)
    assert scores.num_rows == len(rows) and set(scores["student"].to_pylist()) == {"tiny"}
    assert all(f.startswith("s3://corpora/in/") for f in scores["source_file"].to_pylist())
