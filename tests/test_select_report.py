"""Selection and the teacher report on real scored output."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs import report
from jobs import select as select_job
from pipeline.job import run_job
from pipeline.query import latest_scores, select, teacher_table
from pipeline.report import suitability_auc
from tests.conftest import start_ray, write_jsonl
from tests.test_job import job_config


@pytest.fixture(scope="module")
def scored_output(tmp_path_factory, corpus, student_dirs):
    start_ray()
    tmp = tmp_path_factory.mktemp("scored")
    data = write_jsonl(tmp / "corpus.jsonl", corpus)
    cfg = job_config(tmp, [str(data)], str(tmp / "out"), {"tiny": student_dirs["chatml"]}, ["scoring.metrics=all"])
    run_job(cfg)
    return tmp / "out", {row["id"]: row for row in corpus}


def test_select_top_k_per_group_writes_the_original_rows(scored_output, tmp_path):
    out, corpus = scored_output
    scores = latest_scores(str(out))
    target = tmp_path / "selected.jsonl"
    assert select_job.main(["--scores", str(out), "--student", "tiny", "--group-by", "problem_id",
                            "--top-k", "1", "--out", str(target)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    best = scores.sort_values("rank_surprisal_ratio").groupby("problem_id").head(1)
    assert sorted(r["id"] for r in rows) == sorted(best["sample_id"])
    for row in rows:
        assert row["messages"] == corpus[row["id"]]["messages"] and row["rsr"]["student"] == "tiny"

    target = tmp_path / "worst.parquet"
    assert select_job.main(["--scores", str(out), "--student", "tiny", "--top-fraction", "0.25",
                            "--direction", "descending", "--out", str(target)]) == 0  # fmt: skip
    worst = pq.read_table(target).to_pylist()
    assert len(worst) == 10
    assert min(r["rsr"]["rank_surprisal_ratio"] for r in worst) >= scores["rank_surprisal_ratio"].quantile(0.7)


def test_select_threshold_and_errors(scored_output):
    out, _ = scored_output
    scores = latest_scores(str(out))
    median = scores["rank_surprisal_ratio"].median()
    chosen = select(scores, "tiny", threshold=median)
    assert len(chosen) == (scores["rank_surprisal_ratio"] <= median).sum()
    with pytest.raises(ValueError, match="exactly one"):
        select(scores, "tiny", top_k=1, threshold=1.0)
    with pytest.raises(ValueError, match="no scores for student"):
        select(scores, "nobody", top_k=1)


def test_report_ranks_teachers_and_embeds_plots(scored_output, tmp_path):
    out, _ = scored_output
    assert report.main(["--scores", str(out), "--out", str(tmp_path / "report")]) == 0
    teachers = teacher_table(latest_scores(str(out)))
    assert list(teachers["rank"]) == [1, 2, 3] and teachers["rsr"].is_monotonic_increasing
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 2  # RSR distributions, Spearman heatmaps
    assert "Teachers ranked by each metric" in html and "Spearman correlation between metrics" in html
    assert "avg_entropy" in html and "top1_rate" in html
    for teacher in teachers["source"]:
        assert f"<td>{teacher}</td>" in html
    assert (tmp_path / "report" / "teachers.csv").read_text().splitlines()[0].startswith("student,source,rank")


def test_select_by_a_metric_among_filtered_rows(scored_output, tmp_path):
    out, _ = scored_output
    scores = latest_scores(str(out))
    assert {"avg_entropy", "top1_rate", "avg_rank", "avg_log_prob_std"} <= set(scores.columns)
    target = tmp_path / "by-entropy.jsonl"
    assert select_job.main(["--scores", str(out), "--student", "tiny", "--by", "avg_entropy", "--where", "source=teacher_1",
                            "--top-k", "3", "--out", str(target)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    expected = scores[scores["source"] == "teacher_1"].nsmallest(3, "avg_entropy")
    assert [r["id"] for r in rows] == list(expected["sample_id"])
    assert all(r["source"] == "teacher_1" and "avg_entropy" in r["rsr"] for r in rows)
    with pytest.raises(ValueError, match="no column 'nope'"):
        select(scores, "tiny", top_k=1, by="nope")


def test_suitability_auc_on_known_values():
    correct = pd.Series([True, True, False, False])
    assert suitability_auc(pd.Series([1.0, 2.0, 3.0, 4.0]), correct, lower_is_better=True) == 1.0
    assert suitability_auc(pd.Series([1.0, 2.0, 3.0, 4.0]), correct, lower_is_better=False) == 0.0
    assert suitability_auc(pd.Series([1.0, 1.0, 1.0, 1.0]), correct, lower_is_better=True) == 0.5
    assert suitability_auc(pd.Series([1.0, 3.0, 2.0, 4.0]), correct, lower_is_better=True) == 0.75
