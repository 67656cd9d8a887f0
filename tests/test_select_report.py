"""Selection and the teacher report on real scored output."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import report
from jobs import select as select_job
from pipeline.decide.query import latest_scores
from pipeline.decide.selection import select_arm
from pipeline.run.job import run_job
from pipeline.scoring.aggregate import dataset_rsr
from tests.conftest import start_ray, write_jsonl
from tests.test_job import job_config


def select(scores: pd.DataFrame, student: str, **options) -> pd.DataFrame:
    return select_arm(scores, student, **options).chosen


def teacher_rsr(scores: pd.DataFrame) -> pd.Series:
    """Each teacher's dataset RSR over all its rows, by the scoring job's own summary code."""
    columns = ["student", "source", "resp_token_length", "avg_rank_clip", "avg_surprisal"]
    table = dataset_rsr(pa.Table.from_pandas(scores[columns], preserve_index=False), by=["student", "source"]).to_pandas()
    return table.set_index("source")["rsr"].sort_values()


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
    teachers = pd.read_csv(tmp_path / "report" / "teachers.csv")
    assert list(teachers.columns[:7]) == ["student", "teacher", "n_problems", "rsr", "rsr_ci_low", "rsr_ci_high", "p_top1"]
    # every teacher answered each of the 7 problems: RSR over all rows, as the scoring job's summaries have it
    expected = teacher_rsr(latest_scores(str(out)))
    assert list(teachers["teacher"]) == list(expected.index) and list(teachers["rank"]) == [1, 2, 3]
    assert teachers["rsr"].to_numpy() == pytest.approx(expected.to_numpy())
    assert set(teachers["n_problems"]) == {7} and teachers["p_top1"].sum() == pytest.approx(1.0)
    assert (teachers["rsr_ci_low"] <= teachers["rsr"]).all() and (teachers["rsr"] <= teachers["rsr_ci_high"]).all()
    matching = json.loads((tmp_path / "report" / "matching.json").read_text())["students"]["tiny"]
    assert matching["n_problems_matched"] == 7 and matching["n_rows_unmatched"] == 0 and matching["n_rows"] == 40
    sample_size = pd.read_csv(tmp_path / "report" / "sample_size.csv")
    assert sample_size.empty  # fewer than 10 problems: no subsample size below all of them
    confounds = pd.read_csv(tmp_path / "report" / "confounds.csv")
    assert {"rank_surprisal_ratio", "avg_surprisal", "avg_entropy", "top1_rate"} <= set(confounds["metric"])
    assert not (tmp_path / "report" / "agreement.json").exists()
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 4  # forest plot, RSR vs length, distributions, heatmaps
    assert html.index('class="verdict"') < html.index("<table")
    for heading in ["Teachers on 7 matched problems (lower RSR = more suitable)", "Probability that the row",
                    "Problems the choice needs", "Confounds beside each metric", "Teachers ranked by each metric"]:  # fmt: skip
        assert heading in html
    for teacher in teachers["teacher"]:
        assert f"<td>{teacher}</td>" in html


def test_report_agreement_with_a_reference_and_truncated_problems_dropped(scored_output, tmp_path):
    out, _ = scored_output
    scores = latest_scores(str(out))
    rsr = teacher_rsr(scores)
    reference = tmp_path / "reference.csv"
    pd.DataFrame({"teacher": rsr.index, "score": -rsr.to_numpy()}).to_csv(reference, index=False)  # RSR's own order
    assert report.main(["--scores", str(out), "--out", str(tmp_path / "report"), "--reference", str(reference),
                        "--drop-truncated-groups", "--bootstrap", "200", "--seed", "3"]) == 0  # fmt: skip
    agreement = json.loads((tmp_path / "report" / "agreement.json").read_text())["students"]["tiny"]
    assert agreement["kendall_tau"] == pytest.approx(1.0) and agreement["spearman"] == pytest.approx(1.0)
    truncated = scores.loc[scores["truncated"], "problem_id"]
    dropped = json.loads((tmp_path / "report" / "matching.json").read_text())["students"]["tiny"]["dropped_truncated_groups"]
    assert dropped == {"problems": truncated.nunique(), "rows": int(scores["problem_id"].isin(truncated).sum())}
    assert "Agreement with the reference ranking" in (tmp_path / "report" / "report.html").read_text()


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
