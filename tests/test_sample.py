"""input.sample: a seeded sample of groups (problems every teacher answered) is scored, the rest counted
as sampled out; a rerun scores nothing new; a growing corpus scores only the groups that enter."""

from __future__ import annotations

import hashlib

from pipeline.decide.query import latest_scores
from pipeline.run.config import SampleConfig
from pipeline.run.job import run_job
from pipeline.run.survey import group_hash
from tests.conftest import start_ray, write_jsonl
from tests.test_job import job_config

SAMPLE = SampleConfig(by="problem_id", n=3, seed=5, shared_by="source")


def smallest_hashes(groups, n, seed=SAMPLE.seed):
    return set(sorted(groups, key=lambda group: hashlib.sha256(f"{seed}\x00{group}".encode()).hexdigest())[:n])


def run(tmp_path, rows, out, student):
    data = write_jsonl(tmp_path / "corpus.jsonl", rows)
    cfg = job_config(tmp_path, [str(data)], str(out), {"tiny": student})
    cfg.input.sample = SAMPLE
    counts = run_job(cfg).counts.to_pylist()[0]
    assert counts["read"] == counts["scored"] + counts["rejected"] + counts["skipped"] + counts["sampled_out"]
    assert counts["read"] + counts["unread"] == len(rows)
    return counts


def test_a_sample_of_shared_groups_is_scored_and_the_rest_counted(tmp_path, corpus, student_dirs):
    start_ray()
    lonely = {"id": "lonely", "problem_id": "only-teacher-0", "source": "teacher_0", "messages": corpus[0]["messages"]}
    rows = [*corpus, lonely]
    out = tmp_path / "out"
    chosen = smallest_hashes({row["problem_id"] for row in corpus}, SAMPLE.n)  # "only-teacher-0" is not eligible
    in_sample = [row for row in rows if row["problem_id"] in chosen]

    first = run(tmp_path, rows, out, student_dirs["chatml"])
    assert (first["scored"], first["sampled_out"]) == (len(in_sample), len(rows) - len(in_sample))
    assert set(latest_scores(str(out))["problem_id"]) == chosen

    again = run(tmp_path, rows, out, student_dirs["chatml"])  # the same sample (the file written again: read)
    assert (again["scored"], again["skipped"], again["sampled_out"]) == (0, len(in_sample), first["sampled_out"])

    # New problems answered by every teacher: only those that hash below the current n-th enter
    grown = rows + [
        {**corpus[p], "id": f"new-{p}-{t}", "problem_id": f"new-{p}", "source": f"teacher_{t}"}
        for p in range(12)
        for t in range(3)
    ]
    now = smallest_hashes({row["problem_id"] for row in grown if row["problem_id"] != "only-teacher-0"}, SAMPLE.n)
    entered = now - chosen
    assert entered, "the seed must let some new problem into the sample for this test to mean anything"
    third = run(tmp_path, grown, out, student_dirs["chatml"])
    assert third["scored"] == 3 * len(entered) and third["skipped"] == sum(row["problem_id"] in now & chosen for row in rows)
    assert third["sampled_out"] == len(grown) - sum(row["problem_id"] in now for row in grown)


def test_a_grown_sample_reads_only_the_unchanged_files_with_rows_it_left_out(tmp_path, corpus, student_dirs):
    """Files unchanged since the last run stay unread unless the sample now chooses groups whose rows
    that run sampled out."""
    start_ray()
    ranked = sorted({row["problem_id"] for row in corpus}, key=lambda group: group_hash(group, SAMPLE.seed))
    first, second, third = ranked[:3]
    rows_of = {group: [row for row in corpus if row["problem_id"] == group] for group in ranked[:3]}
    data = tmp_path / "data"
    write_jsonl(data / "a.jsonl", rows_of[first] + rows_of[third])
    write_jsonl(data / "b.jsonl", rows_of[second])
    out = tmp_path / "out"

    def sampled(n):
        cfg = job_config(tmp_path, [str(data)], str(out), {"tiny": student_dirs["chatml"]})
        cfg.input.sample = SampleConfig(by="problem_id", n=n, seed=SAMPLE.seed)
        return run_job(cfg).counts.to_pylist()[0]

    a_rows, b_rows = len(rows_of[first] + rows_of[third]), len(rows_of[second])
    one = sampled(1)  # `first` only: a's rows of `third` and all of b's are sampled out
    assert (one["read"], one["scored"], one["sampled_out"], one["unread"]) == (
        a_rows + b_rows,
        len(rows_of[first]),
        a_rows + b_rows - len(rows_of[first]),
        0,
    )
    two = sampled(2)  # b's rows of `second` were sampled out: b is read; a has no row of `second`
    assert (two["read"], two["scored"], two["unread"]) == (b_rows, b_rows, a_rows)
    assert set(latest_scores(str(out))["problem_id"]) == {first, second}
    again = sampled(2)
    assert (again["read"], again["unread"]) == (0, a_rows + b_rows)
