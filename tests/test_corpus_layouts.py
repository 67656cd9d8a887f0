"""Corpora as users hold them, in one job: OpenR1-style candidates (list columns), s1K-style teachers
in one row, an RSR_data-style tree with the teacher in the path, ShareGPT with a row-level system
prompt, and a Hugging Face `save_to_disk` folder; locally and through the S3 server on 127.0.0.1."""

import json
import os

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.corpus.records import content_hash
from pipeline.run.config import load_config
from pipeline.run.job import run_job
from pipeline.scoring.student import ScoringOptions, Student
from pipeline.tokens.spans import encode_conversation

STATS = ["avg_rank_clip", "avg_surprisal", "rank_surprisal_ratio"]
TEACHERS = ("deepseek", "gemini")


def exchanges(corpus, n):
    """(id, question, answer) of single-exchange rows without a system message."""
    found = []
    for row in corpus:
        if [m["role"] for m in row["messages"]] == ["user", "assistant"]:
            found.append((row["id"], row["messages"][0]["content"], row["messages"][1]["content"]))
    return found[:n]


def user(text):
    return {"role": "user", "content": text}


def assistant(text, reasoning=None):
    return {"role": "assistant", "content": text, **({"reasoning_content": reasoning} if reasoning else {})}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, corpus):
    """The five layouts under one root; returns (root, the input sources, expected messages by sample_id)."""
    root = tmp_path_factory.mktemp("layouts")
    pairs = exchanges(corpus, 12)
    expected = {}

    # OpenR1-Math: a prompt column and 3 candidates per row with aligned list columns; a Hub-style tree.
    openr1 = []
    for k, (_, question, answer) in enumerate(pairs[:4]):
        generations = [f"<think>\nStep {j}.\n</think>\n\n{answer} ({j})" for j in range(3)]
        correct = [j % 2 == 0 for j in range(3)][: 2 if k == 3 else 3]  # the last row's list is misaligned
        openr1.append({"uuid": f"r1-{k}", "problem": question, "generations": generations,
                       "correctness_math_verify": correct, "is_reasoning_complete": [True] * 3})  # fmt: skip
        if k < 3:
            expected.update({f"r1-{k}#{j}": [user(question), assistant(g)] for j, g in enumerate(generations)})
    (root / "openr1" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(openr1), root / "openr1" / "data" / "train-00000-of-00001.parquet")

    # s1K-1.1: two teachers' thinking and attempt columns in one row.
    s1k = []
    for k, (_, question, answer) in enumerate(pairs[4:7]):
        row = {"id": f"s1k-{k}", "question": question}
        for teacher in TEACHERS:
            row[f"{teacher}_thinking_trajectory"] = f"{teacher} thinks about {k}."
            row[f"{teacher}_attempt"] = f"{answer} says {teacher}"
            expected[f"s1k-{k}#{teacher}"] = [
                user(question),
                assistant(row[f"{teacher}_attempt"], row[f"{teacher}_thinking_trajectory"]),
            ]
        s1k.append(row)
    (root / "s1k").mkdir()
    pq.write_table(pa.Table.from_pylist(s1k), root / "s1k" / "train.parquet")

    # RSR_data: <teacher>/short-sys_5k_gen1.json, JSON arrays of {messages}, no ids.
    for k, teacher in enumerate(("qwq", "r1")):
        folder = root / "rsr_data" / teacher
        folder.mkdir(parents=True)
        rows = [{"messages": [user(q), assistant(a)]} for _, q, a in pairs[7 + k : 8 + k]]
        (folder / "short-sys_5k_gen1.json").write_text(json.dumps(rows))
        expected.update({f"{folder / 'short-sys_5k_gen1.json'}:{n}": row["messages"] for n, row in enumerate(rows, start=1)})

    # OpenThoughts / Bespoke-Stratos: ShareGPT conversations with a row-level system prompt.
    (root / "sharegpt").mkdir()
    with open(root / "sharegpt" / "train.jsonl", "w") as f:
        for rid, question, answer in pairs[9:10]:
            f.write(json.dumps({"id": f"st-{rid}", "system": "Think step by step.",
                                "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}]}) + "\n")  # fmt: skip
            expected[f"st-{rid}"] = [{"role": "system", "content": "Think step by step."}, user(question), assistant(answer)]

    # A Hugging Face save_to_disk folder: Arrow stream shards beside dataset_info.json and state.json.
    hf = root / "hf_dataset"
    hf.mkdir()
    table = pa.Table.from_pylist([{"id": f"hf-{rid}", "messages": [user(q), assistant(a)]} for rid, q, a in pairs[10:12]])
    with pa.ipc.new_stream(hf / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    (hf / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    expected.update({f"hf-{rid}": [user(q), assistant(a)] for rid, q, a in pairs[10:12]})

    sources = {
        "openr1": {"paths": [str(root / "openr1")], "id_field": "uuid", "prompt_field": "problem", "candidates_field": "generations",
                   "candidate_passthrough": ["correctness_math_verify", "is_reasoning_complete"]},
        "s1k": {"paths": [str(root / "s1k")], "prompt_field": "question",
                "response_groups": {t: {"response": f"{t}_attempt", "reasoning": f"{t}_thinking_trajectory"} for t in TEACHERS}},
        "rsr_data": {"paths": [str(root / "rsr_data")], "path_fields": {"teacher": "{teacher}/*.json"}},
        "sharegpt": {"paths": [str(root / "sharegpt")]},
        "hf": {"paths": [str(hf)]},
    }  # fmt: skip
    return root, sources, expected


def layout_config(tmp_path, sources: list[dict], output, student_dir, storage=None):
    config = {
        "input": {"sources": sources},
        "students": [{"name": "tiny", "path": str(student_dir), "dtype": "float32"}],
        "scoring": {"max_model_len": 4096, "batch_tokens": "2000"},
        "compute": {"cpus_per_actor": 0.5, "torch_threads": 1},
        "output": {"path": output, "partition_by": ["teacher"]},
        "storage": storage or {},
    }
    path = tmp_path / "layouts.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def expected_scores(student_dir, expected):
    student = Student.load(str(student_dir), dtype="float32", device="cpu", options=ScoringOptions())
    stats = student.score([encode_conversation(student.tokenizer, m) for m in expected.values()])
    return dict(zip(expected, stats))


def check_scores(scores, expected, want):
    assert sorted(scores["sample_id"]) == sorted(expected)
    for _, got in scores.iterrows():
        assert got["content_hash"] == content_hash(expected[got["sample_id"]])
        assert got["resp_token_length"] == want[got["sample_id"]]["resp_token_length"]
        for column in STATS:
            assert got[column] == pytest.approx(want[got["sample_id"]][column], abs=1e-6), (got["sample_id"], column)


def test_one_job_scores_every_layout_as_the_same_trajectories_given_as_messages(tmp_path, ray_runtime, student_dirs, layouts):
    root, sources, expected = layouts
    out = tmp_path / "out"
    cfg = layout_config(tmp_path, list(sources.values()), str(out), student_dirs["chatml"])
    [counts] = run_job(cfg).counts.to_pylist()
    # `read` counts trajectories: one per candidate and per teacher, and one for the misaligned row
    assert (counts["read"], counts["scored"], counts["rejected"], counts["skipped"]) == (len(expected) + 1, len(expected), 1, 0)

    scores = duckdb.sql(f"SELECT * FROM read_parquet('{out}/student=*/**/*.parquet', hive_partitioning=true)").df()
    check_scores(scores, expected, expected_scores(student_dirs["chatml"], expected))
    by_id = scores.set_index("sample_id")
    assert by_id.loc["r1-1#2", "candidate_index"] == 2 and bool(by_id.loc["r1-1#2", "correctness_math_verify"]) is True
    assert bool(by_id.loc["r1-1#1", "correctness_math_verify"]) is False
    assert by_id.loc["s1k-2#gemini", "teacher"] == "gemini"  # a teacher column from the groups ...
    rsr_rows = by_id[by_id.index.str.contains("rsr_data")]
    assert sorted(rsr_rows["teacher"]) == ["qwq", "r1"]  # ... and from the path, both usable in partition_by
    assert {p.name for p in (out / "student=tiny").iterdir()} >= {
        "teacher=qwq",
        "teacher=r1",
        "teacher=deepseek",
        "teacher=gemini",
    }
    rejects = duckdb.sql(f"SELECT sample_id, reject_reason FROM read_parquet('{out}/_rejects/**/*.parquet')").fetchall()
    assert rejects == [("r1-3", "misaligned_candidates")]

    for path in root.rglob("*.*"):  # touched, the files are read again ...
        os.utime(path)
    again = run_job(cfg)  # ... and a candidate's key is stable: an unchanged corpus is skipped whole
    [counts] = again.counts.to_pylist()
    assert (counts["scored"], counts["skipped"], counts["rejected"]) == (0, len(expected), 1)
    assert not [f for f in again.committed_files if f.startswith(("student=", "_rejects/"))]


def test_arrow_folders_and_path_fields_through_s3(tmp_path, ray_runtime, student_dirs, layouts, s3_endpoint):
    import s3fs

    root, sources, expected = layouts
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("layouts")
    for name in ("hf_dataset", "rsr_data"):
        fs.put(str(root / name), f"layouts/{name}", recursive=True)
    s3_sources = [
        {**sources["hf"], "paths": ["s3://layouts/hf_dataset"]},
        {**sources["rsr_data"], "paths": ["s3://layouts/rsr_data/"]},
    ]
    cfg = layout_config(tmp_path, s3_sources, "s3://layouts/out", student_dirs["chatml"], {"endpoint_url": s3_endpoint})
    [counts] = run_job(cfg).counts.to_pylist()
    local_ids = {k: v for k, v in expected.items() if k.startswith("hf-") or "rsr_data" in k}
    assert (counts["read"], counts["scored"], counts["rejected"]) == (len(local_ids), len(local_ids), 0)

    fetched = tmp_path / "fetched"
    fs.get("layouts/out/", str(fetched), recursive=True)
    scores = duckdb.sql(f"SELECT * FROM read_parquet('{fetched}/student=*/**/*.parquet', hive_partitioning=true)").df()
    want = expected_scores(student_dirs["chatml"], local_ids)
    scores["sample_id"] = [s.replace("s3://layouts/", f"{root}/") for s in scores["sample_id"]]  # fallback ids name the file
    check_scores(scores, local_ids, want)
    assert sorted(scores[scores["sample_id"].str.contains("rsr_data")]["teacher"]) == ["qwq", "r1"]


def test_selection_returns_the_selected_candidate_or_teacher(tmp_path, ray_runtime, student_dirs, layouts):
    from jobs import select as select_job

    root, sources, expected = layouts
    out = tmp_path / "out"
    cfg = layout_config(tmp_path, list(sources.values()), str(out), student_dirs["chatml"])
    run_job(cfg)
    target = tmp_path / "best.jsonl"
    args = [
        "--scores",
        str(out),
        "--student",
        "tiny",
        "--where",
        "teacher=gemini",
        "--top-k",
        "2",
        "--config",
        str(tmp_path / "layouts.yaml"),
    ]
    assert select_job.main([*args, "--out", str(target)]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:  # the original s1K row, with the gemini trajectory as its messages
        assert row["id"].startswith("s1k-") and row["messages"] == expected[f"{row['id']}#gemini"]
    target = tmp_path / "candidates.jsonl"
    assert (
        select_job.main([*args[:4], "--group-by", "candidate_index", "--top-k", "1", "--config", args[-1], "--out", str(target)])
        == 0
    )
    candidates = [row for row in map(json.loads, target.read_text().splitlines()) if "generations" in row]
    assert len(candidates) == 3  # the best of each candidate index, each with its candidate as messages
    for row in candidates:
        assert row["messages"] in [expected[f"{row['uuid']}#{k}"] for k in range(3)]
