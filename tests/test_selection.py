"""Selection arms, token matching, truncated groups, training formats and the selection manifest: on
hand-made score tables without Ray, then the command on hand-committed scores and on a real run."""

import hashlib
import json
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs import select as select_job
from pipeline.corpus.records import content_hash
from pipeline.corpus.shapes import row_messages
from pipeline.corpus.storage import locate
from pipeline.decide.query import latest_scores
from pipeline.decide.selection import (
    dataset_info_entry,
    describe_selection,
    encode_rows,
    match_tokens,
    select_arm,
    to_messages,
    to_sharegpt,
    update_dataset_info,
    write_whole,
)
from pipeline.run.config import InputConfig, StorageConfig
from tests.conftest import REPO, write_jsonl
from tests.test_select_report import scored_output  # noqa: F401 (a fixture: one real scoring run)

# Two groups. Group a's RSR order (most suitable first): a1 a3 a2 a4 a0; group b's: b0 b2 b3 b1.
RSR = {"a0": 5, "a1": 1, "a2": 3, "a3": 2, "a4": 4, "b0": 10, "b1": 40, "b2": 20, "b3": 30}


def scores_table(**columns) -> pd.DataFrame:
    """One student's scores for RSR's rows: tokens 10 x the RSR, all correct, none truncated."""
    rows = [
        {
            "sample_id": sample_id,
            "student": "tiny",
            "problem_id": sample_id[0],
            "source": "teacher_x" if sample_id in ("a0", "b0") else "teacher_y",
            "rank_surprisal_ratio": float(rsr),
            "avg_rank_clip": float(rsr),
            "avg_surprisal": 1.0,
            "resp_token_length": 10 * rsr,
            "is_correct": True,
            "truncated": False,
            "run_id": "run-1" if sample_id.startswith("a") else "run-2",
            "scoring_fingerprint": "fp-1",
        }
        for sample_id, rsr in RSR.items()
    ]
    table = pd.DataFrame(rows)
    for column, values in columns.items():
        table[column] = table["sample_id"].map(values).fillna(table[column]) if isinstance(values, dict) else values
    return table


def chosen_ids(selection) -> list[str]:
    return list(selection.chosen["sample_id"])


def test_each_arm_chooses_its_rows_of_every_group():
    scores = scores_table()
    by_problem = ["problem_id"]
    # each group's first choices, then each group's second choices
    assert chosen_ids(select_arm(scores, "tiny", by_problem, top_k=2)) == ["a1", "b0", "a3", "b2"]
    assert chosen_ids(select_arm(scores, "tiny", by_problem, top_k=2, arm="highest")) == ["b1", "a0", "b3", "a4"]
    # a's median is a2, then a3 and a4 are as near: the more suitable a3; b's middle pair is b2, b3
    assert set(chosen_ids(select_arm(scores, "tiny", by_problem, top_k=1, arm="middle"))) == {"a2", "b2"}
    assert set(chosen_ids(select_arm(scores, "tiny", by_problem, top_k=2, arm="middle"))) == {"a2", "a3", "b2", "b3"}
    # 60% of 5 rows is 3, of 4 rows 2.4: 2
    assert set(chosen_ids(select_arm(scores, "tiny", by_problem, top_fraction=0.6))) == {"a1", "a3", "a2", "b0", "b2"}
    # without groups: one group of nine rows, the middle one is the fifth smallest (RSR 5: a0)
    assert chosen_ids(select_arm(scores, "tiny", top_k=3, arm="middle")) == ["a0", "a4", "b0"]


def test_lowest_is_the_most_suitable_end_by_the_metrics_direction():
    # top1_rate: higher is better, so the lowest arm takes the highest values
    scores = scores_table(top1_rate=scores_table()["rank_surprisal_ratio"] / 100)
    assert chosen_ids(select_arm(scores, "tiny", ["problem_id"], top_k=1, by="top1_rate")) == ["b1", "a0"]
    assert chosen_ids(select_arm(scores, "tiny", ["problem_id"], top_k=1, by="top1_rate", arm="highest")) == ["a1", "b0"]
    # an explicit direction reads the column in that order
    assert chosen_ids(select_arm(scores, "tiny", ["problem_id"], top_k=1, by="top1_rate", ascending=True)) == ["a1", "b0"]


def test_random_arm_is_a_seeded_hash_of_the_sample_id():
    scores = scores_table()

    def draw(seed, sample_id):
        return hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8]

    for seed in (0, 1, 7):
        expected = {min(ids, key=lambda i: draw(seed, i)) for ids in (["a0", "a1", "a2", "a3", "a4"], ["b0", "b1", "b2", "b3"])}
        chosen = chosen_ids(select_arm(scores, "tiny", ["problem_id"], top_k=1, arm="random", seed=seed))
        assert set(chosen) == expected
        shuffled = scores.sample(frac=1, random_state=seed)  # the row order plays no part
        assert chosen_ids(select_arm(shuffled, "tiny", ["problem_id"], top_k=1, arm="random", seed=seed)) == chosen
    choices = {tuple(chosen_ids(select_arm(scores, "tiny", ["problem_id"], top_k=2, arm="random", seed=s))) for s in range(5)}
    assert len(choices) > 1


def test_where_and_truncated_groups():
    scores = scores_table(is_correct={"a1": False, "b1": False}, truncated={"b1": True})
    kept = select_arm(scores, "tiny", ["problem_id"], top_k=1, where={"is_correct": "TRUE"})
    assert chosen_ids(kept) == ["a3", "b0"] and kept.dropped_groups == 0
    # b1 is incorrect, but it was truncated: its whole group goes, whatever --where keeps
    dropped = select_arm(scores, "tiny", ["problem_id"], top_k=1, where={"is_correct": "true"}, drop_truncated_groups=True)
    assert chosen_ids(dropped) == ["a3"] and dropped.dropped_groups == 1
    assert set(dropped.pool["problem_id"]) == {"a"}
    with pytest.raises(ValueError, match="needs group_by"):
        select_arm(scores, "tiny", top_k=1, drop_truncated_groups=True)
    with pytest.raises(ValueError, match="the middle arm takes top_k or top_fraction"):
        select_arm(scores, "tiny", threshold=3.0, arm="middle")
    with pytest.raises(ValueError, match="no column 'task'"):
        select_arm(scores, "tiny", ["task"], top_k=1)


def test_matching_tokens_trims_the_last_choices_first():
    # lowest, 2 per group: a1 a3 b2 b0 = 10 + 20 + 200 + 100 = 330 tokens
    selection = select_arm(scores_table(), "tiny", ["problem_id"], top_k=2)
    trimmed, match = match_tokens(selection, 130)  # dropping b2 (the last choice) lands on 130
    assert chosen_ids(trimmed) == ["a1", "b0", "a3"]
    assert (match.action, match.rows_moved, match.tokens_before, match.tokens_after) == ("trim", 1, 330, 130)
    # 125: b2 leaves 130, then a3 would leave 110; 130 is nearer (5 off, within one row of 20 tokens)
    trimmed, match = match_tokens(selection, 125)
    assert chosen_ids(trimmed) == ["a1", "b0", "a3"] and match.tokens_after == 130
    unchanged, match = match_tokens(selection, 330)
    assert chosen_ids(unchanged) == chosen_ids(selection) and match.action == "none"


def test_matching_tokens_fills_with_each_groups_next_choice():
    # lowest, 1 per group: a1 b0 = 110 tokens; next choices in order: a3 (20), b2 (200), a2 (30), b3 (300)
    selection = select_arm(scores_table(), "tiny", ["problem_id"], top_k=1)
    filled, match = match_tokens(selection, 360)
    assert chosen_ids(filled) == ["a1", "b0", "a3", "b2", "a2"]
    assert (match.action, match.rows_moved, match.tokens_after) == ("fill", 3, 360)
    # 500: b3 would bring 660 (160 over), 360 is nearer (140 under, within one row of 300 tokens)
    assert match_tokens(selection, 500)[1].tokens_after == 360
    message = "cannot match 5,000 target tokens: this arm has 110, and adding every one of its 7 unchosen rows gives 1,150"
    with pytest.raises(ValueError, match=message):
        match_tokens(selection, 5000)


def test_matching_tokens_within_a_tenth_of_a_percent():
    scores = pd.DataFrame(
        {
            "sample_id": ["x0", "x1"],
            "student": "tiny",
            "rank_surprisal_ratio": [1.0, 2.0],
            "resp_token_length": [100_050, 120],
        }
    )
    selection = select_arm(scores, "tiny", top_k=1)
    assert match_tokens(selection, 100_000)[1].action == "none"  # 50 off, 0.1% is 100
    filled, match = match_tokens(selection, 100_170)  # 120 short: x1 fills it exactly
    assert chosen_ids(filled) == ["x0", "x1"] and match.tokens_after == 100_170
    kept, match = match_tokens(selection, 99_900)  # 150 over, but dropping x0 would be 99,900 off
    assert chosen_ids(kept) == ["x0"] and (match.action, match.tokens_after) == ("none", 100_050)


def test_training_formats_put_reasoning_inline():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sum 2 and 3."},
        {"role": "assistant", "content": "", "reasoning_content": "\nUse the tool.\n",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "content": "5", "tool_call_id": "c1"},
        {"role": "assistant", "content": "\n5", "reasoning_content": "It said 5."},
    ]  # fmt: skip
    assert to_sharegpt("s1", messages) == {
        "id": "s1",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Sum 2 and 3."},
            {
                "from": "function_call",
                "value": '<think>\nUse the tool.\n</think>\n\n{"name": "add", "arguments": {"a": 2, "b": 3}}',
            },
            {"from": "observation", "value": "5"},
            {"from": "gpt", "value": "<think>\nIt said 5.\n</think>\n\n5"},
        ],
    }
    converted = to_messages("s1", messages)
    assert converted["id"] == "s1"
    assert converted["messages"][2] == {"role": "assistant", "content": "<think>\nUse the tool.\n</think>\n\n",
                                        "tool_calls": messages[2]["tool_calls"]}  # fmt: skip
    assert converted["messages"][3] == {"role": "tool", "content": "5", "tool_call_id": "c1"}
    assert converted["messages"][4] == {"role": "assistant", "content": "<think>\nIt said 5.\n</think>\n\n5"}
    with pytest.raises(ValueError, match="s2: an assistant message holds text and a tool call"):
        to_sharegpt("s2", [{**messages[2], "content": "Let me add."}])


def test_dataset_info_entries_and_updates(tmp_path):
    assert dataset_info_entry("arm.jsonl", "sharegpt", []) == {
        "file_name": "arm.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations"},
    }
    chat = [{"id": "s1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    assert dataset_info_entry("arm.jsonl", "messages", chat)["tags"] == {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
    }
    tool = [{"id": "s2", "messages": [{"role": "tool", "content": "5"}]}]
    with pytest.raises(ValueError, match="s2 has tool turns"):
        dataset_info_entry("arm.jsonl", "messages", tool)
    with pytest.raises(ValueError, match="needs --format sharegpt or messages"):
        dataset_info_entry("arm.jsonl", "rows", chat)
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"theirs": {"file_name": "t.json"}}))
    update_dataset_info(locate(str(info), StorageConfig()), "low", {"file_name": "low.jsonl"})
    update_dataset_info(locate(str(info), StorageConfig()), "low", {"file_name": "low2.jsonl"})
    assert json.loads(info.read_text()) == {"theirs": {"file_name": "t.json"}, "low": {"file_name": "low2.jsonl"}}


def test_output_bytes_and_their_sha256(tmp_path):
    rows = [{"id": "s1", "messages": [{"role": "user", "content": "é"}]}]
    target = tmp_path / "deep" / "arm.jsonl"
    digest = write_whole(locate(str(target), StorageConfig()), encode_rows(rows, parquet=False))
    assert target.read_text(encoding="utf-8") == '{"id": "s1", "messages": [{"role": "user", "content": "é"}]}\n'
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest()
    target = tmp_path / "arm.parquet"
    digest = write_whole(locate(str(target), StorageConfig()), encode_rows(rows, parquet=True))
    assert pq.read_table(target).to_pylist() == rows and digest == hashlib.sha256(target.read_bytes()).hexdigest()


def test_describe_selection_counts_rows_tokens_teachers_and_runs():
    chosen = select_arm(scores_table(scoring_fingerprint={"b0": "fp-2"}), "tiny", ["problem_id"], top_k=2).chosen
    assert describe_selection(chosen, ["problem_id"], "source") == {
        "rows": 4,
        "groups": 2,
        "target_tokens": 330,  # a1 10, a3 20, b0 100, b2 200
        "teacher_column": "source",
        "teachers": {"teacher_x": {"rows": 1, "tokens": 100}, "teacher_y": {"rows": 3, "tokens": 230}},
        "run_ids": ["run-1", "run-2"],
        "scoring_fingerprints": ["fp-1", "fp-2"],
    }
    assert describe_selection(chosen, None, None)["groups"] is None


def commit_scores(root, scores: pd.DataFrame) -> str:
    """A scoring output as a run commits it: a score file under student=, listed by a run manifest."""
    (root / "student=tiny").mkdir(parents=True)
    scores.drop(columns="student").to_parquet(root / "student=tiny" / "part-0.parquet", index=False)
    (root / "_runs").mkdir()
    (root / "_runs" / "run-1.json").write_text(json.dumps({"run_id": "run-1", "files": ["student=tiny/part-0.parquet"]}))
    return str(root)


@pytest.fixture
def committed(tmp_path):
    """RSR's rows as a ShareGPT corpus (the b rows with reasoning inline) and their committed scores."""
    corpus = []
    for sample_id in RSR:
        answer = (
            f"<think>\nthink {sample_id}\n</think>\n\nanswer {sample_id}" if sample_id.startswith("b") else f"answer {sample_id}"
        )
        conversation = [{"from": "human", "value": f"question {sample_id[0]}"}, {"from": "gpt", "value": answer}]
        corpus.append({"id": sample_id, "conversations": conversation})
    path = write_jsonl(tmp_path / "corpus.jsonl", corpus)
    scores = scores_table()
    messages = [row_messages(row, InputConfig(paths=[])) for row in corpus]
    scores["content_hash"] = [content_hash(m) for m in messages]
    scores["source_file"], scores["row_number"] = str(path), range(1, len(corpus) + 1)
    scores["scored_at"] = pd.Timestamp("2025-01-01", tz="UTC")
    return commit_scores(tmp_path / "out", scores), {row["id"]: row for row in corpus}


def test_the_command_writes_an_arm_its_manifest_and_dataset_info(committed, tmp_path, capsys):
    out, corpus = committed
    high = tmp_path / "sft" / "high.jsonl"
    argv = ["--scores", out, "--student", "tiny", "--group-by", "problem_id", "--top-k", "1", "--arm", "highest",
            "--format", "sharegpt", "--dataset-info", "rsr_high", "--out", str(high)]  # fmt: skip
    assert select_job.main(argv) == 0
    rows = [json.loads(line) for line in high.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["b1", "a0"]
    assert rows[0]["conversations"] == corpus["b1"]["conversations"]  # reasoning stays inline as given
    manifest = json.loads((tmp_path / "sft" / "high.jsonl.manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(high.read_bytes()).hexdigest()
    assert manifest["argv"] == argv
    assert {k: manifest[k] for k in ("student", "arm", "seed", "rows", "groups", "target_tokens", "format")} == {
        "student": "tiny", "arm": "highest", "seed": 0, "rows": 2, "groups": 2, "target_tokens": 450, "format": "sharegpt",
    }  # fmt: skip
    assert manifest["teachers"] == {"teacher_x": {"rows": 1, "tokens": 50}, "teacher_y": {"rows": 1, "tokens": 400}}
    assert (manifest["run_ids"], manifest["scoring_fingerprints"]) == (["run-1", "run-2"], ["fp-1"])
    assert json.loads((tmp_path / "sft" / "dataset_info.json").read_text()) == {
        "rsr_high": {"file_name": "high.jsonl", "formatting": "sharegpt", "columns": {"messages": "conversations"}}
    }

    # the lowest arm (a1 10 + b0 100 tokens) filled towards the highest arm's 450 with the next choices:
    # a3 20, b2 200, a2 30 (360); b3's 300 would overshoot to 660, further off than 360
    low = tmp_path / "sft" / "low.jsonl"
    argv = ["--scores", out, "--student", "tiny", "--group-by", "problem_id", "--top-k", "1",
            "--match-tokens", f"{high}.manifest.json", "--format", "messages", "--dataset-info", "rsr_low", "--out", str(low)]  # fmt: skip
    assert select_job.main(argv) == 0
    rows = [json.loads(line) for line in low.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a1", "b0", "a3", "b2", "a2"]
    assert rows[1]["messages"] == [{"role": "user", "content": "question b"},
                                   {"role": "assistant", "content": "<think>\nthink b0\n</think>\n\nanswer b0"}]  # fmt: skip
    manifest = json.loads((tmp_path / "sft" / "low.jsonl.manifest.json").read_text())
    assert (manifest["rows"], manifest["groups"], manifest["target_tokens"]) == (5, 2, 360)
    assert manifest["match_tokens"] == {"manifest": f"{high}.manifest.json", "action": "fill", "rows_moved": 3, "tokens_before": 110,
                                        "tokens_after": 360, "target_tokens": 450, "tolerance_tokens": 0.45}  # fmt: skip
    assert "matched tokens: added 3 rows: 110 -> 360 target tokens (other arm 450, difference -90" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "sft" / "dataset_info.json").read_text())) == {"rsr_high", "rsr_low"}


def test_the_command_refuses_what_it_cannot_do(committed, tmp_path, capsys):
    out, _ = committed
    base = ["--scores", out, "--student", "tiny", "--group-by", "problem_id", "--top-k", "1"]
    manifest = tmp_path / "big.manifest.json"
    manifest.write_text(json.dumps({"student": "tiny", "target_tokens": 10_000}))
    assert select_job.main([*base, "--match-tokens", str(manifest), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "error: cannot match 10,000 target tokens: this arm has 110" in capsys.readouterr().err
    assert select_job.main([*base, "--dataset-info", "x", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "needs --format sharegpt or messages" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "x.jsonl.manifest.json").exists()


def test_the_command_writes_beside_an_s3_output(committed, s3_endpoint):
    import s3fs

    out, _ = committed
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("arms")
    base = ["--scores", out, "--student", "tiny", "--group-by", "problem_id", "--top-k", "1", "--format", "sharegpt",
            "--endpoint-url", s3_endpoint]  # fmt: skip
    assert select_job.main([*base, "--arm", "highest", "--dataset-info", "high", "--out", "s3://arms/sft/high.parquet"]) == 0
    assert select_job.main([*base, "--match-tokens", "s3://arms/sft/high.parquet.manifest.json", "--dataset-info", "low",
                            "--out", "s3://arms/sft/low.parquet"]) == 0  # fmt: skip
    high = json.loads(fs.cat_file("arms/sft/high.parquet.manifest.json"))
    assert high["sha256"] == hashlib.sha256(fs.cat_file("arms/sft/high.parquet")).hexdigest()
    low = json.loads(fs.cat_file("arms/sft/low.parquet.manifest.json"))
    assert (low["target_tokens"], low["match_tokens"]["target_tokens"]) == (360, 450)
    assert json.loads(fs.cat_file("arms/sft/dataset_info.json"))["low"]["file_name"] == "low.parquet"


def test_importing_the_select_job_leaves_torch_and_ray_out():
    code = "import sys, jobs.select; print(bool({'torch', 'ray'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_arms_on_a_real_run(scored_output, tmp_path):  # noqa: F811
    out, corpus = scored_output
    scores = latest_scores(str(out))
    middle = tmp_path / "middle.jsonl"
    assert select_job.main(["--scores", str(out), "--student", "tiny", "--group-by", "problem_id", "--top-k", "1",
                            "--arm", "middle", "--format", "messages", "--out", str(middle)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in middle.read_text().splitlines()]
    # the median of each problem's RSR (the lower-RSR one of two middle rows)
    expected = set()
    for _, group in scores.sort_values(["rank_surprisal_ratio", "sample_id"]).groupby("problem_id"):
        expected.add(group["sample_id"].iloc[(len(group) - 1) // 2])
    assert {r["id"] for r in rows} == expected
    for row in rows:
        assert row["messages"] == corpus[row["id"]]["messages"]
    manifest = json.loads(middle.with_name("middle.jsonl.manifest.json").read_text())
    chosen = scores[scores["sample_id"].isin(expected)]
    assert manifest["target_tokens"] == chosen["resp_token_length"].sum() and manifest["groups"] == 7
    assert (
        manifest["run_ids"] == sorted(set(chosen["run_id"]))
        and manifest["sha256"] == hashlib.sha256(middle.read_bytes()).hexdigest()
    )
    assert sum(t["rows"] for t in manifest["teachers"].values()) == 7
