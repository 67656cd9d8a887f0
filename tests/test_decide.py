"""The decision layer (pipeline.decide.teachers and .decision) on small hand-built score tables, without Ray."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline.decide.decision import decide
from pipeline.decide.teachers import (
    Settings,
    agreement,
    confounds,
    correctness,
    kendall_tau_b,
    match_problems,
    problem_sums,
    sample_sizes,
    spearman,
    suitability_auc,
    within_group_spearman,
)
from tests.conftest import REPO


def scores(rows: list[tuple], student: str = "s") -> pd.DataFrame:
    """Score rows from (source, problem_id, avg_rank_clip, avg_surprisal); RSR and a length filled in."""
    frame = pd.DataFrame(rows, columns=["source", "problem_id", "avg_rank_clip", "avg_surprisal"])
    frame["rank_surprisal_ratio"] = frame["avg_rank_clip"] / frame["avg_surprisal"]
    frame["resp_token_length"] = np.arange(len(frame)) + 10
    return frame.assign(student=student)


def random_scores(n_problems: int, n_teachers: int, seed: int, student: str = "s") -> pd.DataFrame:
    """1-3 trajectories per (problem, teacher), teacher i a little worse (higher rank) than i - 1."""
    rng = np.random.default_rng(seed)
    rows = [
        (f"t{t}", f"p{p:03d}", rng.gamma(2.0) + 0.2 * t, rng.gamma(2.0) + 0.5)
        for p in range(n_problems)
        for t in range(n_teachers)
        for _ in range(rng.integers(1, 4))
    ]
    return scores(rows, student)


# Teacher c lacks p4; a answers p1 twice; one row of b has no problem. Matched: p1, p2, p3.
MATCHING = scores(
    [
        ("a", "p1", 2.0, 1.0), ("a", "p1", 4.0, 2.0), ("a", "p2", 3.0, 3.0), ("a", "p3", 1.0, 2.0), ("a", "p4", 5.0, 1.0),
        ("b", "p1", 2.0, 2.0), ("b", "p2", 1.0, 1.0), ("b", "p3", 6.0, 2.0), ("b", "p4", 2.0, 2.0), ("b", None, 9.0, 1.0),
        ("c", "p1", 1.0, 1.0), ("c", "p2", 2.0, 1.0), ("c", "p3", 3.0, 3.0),
    ]
)  # fmt: skip


def test_rsr_on_matched_problems_only_with_unmatched_rows_counted():
    decision = decide(MATCHING, Settings(n_resamples=20))
    table = decision.students[0].teachers.set_index("teacher")
    # a: (2 + 4 + 3 + 1) / (1 + 2 + 3 + 2); b: (2 + 1 + 6) / (2 + 1 + 2); c: (1 + 2 + 3) / (1 + 1 + 3)
    assert table["rsr"].to_dict() == pytest.approx({"a": 10 / 8, "b": 9 / 5, "c": 6 / 5})
    matched = MATCHING[MATCHING["problem_id"].isin(["p1", "p2", "p3"])].groupby("source")
    direct = matched["avg_rank_clip"].sum() / matched["avg_surprisal"].sum()
    assert table["rsr"].to_dict() == pytest.approx(direct.to_dict())
    assert list(table.index) == ["c", "a", "b"] and list(table["rank"]) == [1, 2, 3]  # lower RSR = more suitable
    assert table["n_trajectories"].to_dict() == {"a": 4, "b": 3, "c": 3}
    assert table["n_rows_unmatched"].to_dict() == {"a": 1, "b": 2, "c": 0}
    assert set(table["n_problems"]) == {3}
    assert decision.matching["s"] == {
        "teachers": ["a", "b", "c"],
        "n_problems": 4,
        "n_problems_matched": 3,
        "n_rows": 13,
        "n_rows_matched": 10,
        "n_rows_unmatched": 3,
        "n_rows_without_teacher_or_problem": 1,
        "unmatched_rows_by_teacher": {"a": 1, "b": 2},
    }


def test_matching_is_per_student():
    other = scores([("a", "p1", 1.0, 1.0), ("a", "p9", 1.0, 1.0), ("b", "p9", 2.0, 1.0)], student="t")
    decision = decide(pd.concat([MATCHING, other], ignore_index=True), Settings(n_resamples=20))
    assert decision.matching["t"]["n_problems_matched"] == 1 and decision.matching["t"]["teachers"] == ["a", "b"]
    assert decision.matching["s"]["n_problems_matched"] == 3
    teachers = decision.table("teachers")
    assert teachers.loc[teachers["student"] == "t", "rsr"].tolist() == pytest.approx([1.0, 2.0])  # p9 only


def test_a_student_without_matched_problems_has_counts_but_no_decision():
    lonely = scores([("a", "p1", 1.0, 1.0), ("b", "p2", 1.0, 1.0)], student="t")
    decision = decide(pd.concat([MATCHING, lonely], ignore_index=True), Settings(n_resamples=20))
    assert [s.student for s in decision.students] == ["s"]
    assert decision.matching["t"]["n_problems_matched"] == 0 and decision.matching["t"]["n_rows_unmatched"] == 2


def test_paired_bootstrap_matches_a_plain_loop_over_resampled_problems():
    frame = random_scores(n_problems=8, n_teachers=3, seed=1)
    settings = Settings(n_resamples=200, seed=7)
    table = decide(frame, settings).students[0].teachers.set_index("teacher").sort_index()

    rng = np.random.default_rng(7)
    problems = sorted(frame["problem_id"].unique())
    expected = []
    for _ in range(200):
        drawn = rng.integers(0, len(problems), size=len(problems))
        resample = pd.concat([frame[frame["problem_id"] == problems[i]] for i in drawn])
        by_teacher = resample.groupby("source")
        expected.append((by_teacher["avg_rank_clip"].sum() / by_teacher["avg_surprisal"].sum()).sort_index().to_numpy())
    expected = np.array(expected)
    low, high = np.percentile(expected, [2.5, 97.5], axis=0)
    assert table["rsr_ci_low"].to_numpy() == pytest.approx(low)
    assert table["rsr_ci_high"].to_numpy() == pytest.approx(high)
    assert table["p_top1"].to_numpy() == pytest.approx(np.bincount(expected.argmin(axis=1), minlength=3) / 200)


def test_p_top1_sums_to_one_per_student_and_win_probabilities_pair_up():
    frame = pd.concat([random_scores(12, 4, seed=2, student="x"), random_scores(9, 3, seed=3, student="y")])
    decision = decide(frame, Settings(n_resamples=300))
    assert decision.table("teachers").groupby("student")["p_top1"].sum().to_dict() == pytest.approx({"x": 1.0, "y": 1.0})
    wins = decision.students[0].wins.to_numpy()
    off_diagonal = ~np.eye(4, dtype=bool)
    assert (wins + wins.T)[off_diagonal] == pytest.approx(np.ones(12))  # no ties between continuous RSRs
    assert np.isnan(np.diag(wins)).all()


def test_kendall_tau_b_and_spearman_on_hand_computed_values():
    # one discordant pair of six: (5 - 1) / 6
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # ties: 4 concordant, 0 discordant, 5 pairs untied in x and 5 in y: 4 / sqrt(5 * 5)
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
    # average ranks [1, 2.5, 2.5, 4] and [1, 2, 3.5, 3.5]: 3.75 / sqrt(4.5 * 4.5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(3.75 / 4.5)
    assert kendall_tau_b([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert np.isnan(kendall_tau_b([1, 2, 3], [5, 5, 5])) and np.isnan(spearman([1, 2, 3], [5, 5, 5]))
    assert spearman([1, 2, np.nan, 3], [1, 2, 9, 3]) == pytest.approx(1.0)  # the pair with a missing value left out


def test_agreement_with_a_reference_is_positive_when_rsr_orders_teachers_as_it_does():
    # RSR on the matched problems: c 1.2 < a 1.25 < b 1.8, so the suitability order is c, a, b.
    reference = pd.DataFrame({"teacher": ["a", "b", "c", "zz"], "score": [0.9, 0.5, 0.9, 1.0]})
    result = decide(MATCHING, Settings(n_resamples=50), reference).students[0].agreement
    assert result["teachers"] == ["a", "b", "c"] and result["missing_from_reference"] == []
    # tie between a and c in the reference: 2 concordant pairs, 2 untied in the reference, 3 in RSR
    assert result["kendall_tau"] == pytest.approx(2 / np.sqrt(6))
    # reference ranks [2.5, 1, 2.5], suitability ranks [2, 1, 3]: 1.5 / sqrt(1.5 * 2)
    assert result["spearman"] == pytest.approx(1.5 / np.sqrt(3))
    assert result["kendall_tau_ci_low"] <= result["kendall_tau_ci_high"]


def test_agreement_intervals_come_from_the_same_resamples():
    reference = pd.Series({"a": 3.0, "b": 2.0, "c": 1.0})  # a best
    point = np.array([1.0, 2.0, 3.0])
    # suitability orders a > b > c (tau 1), c > b > a (-1), a > c > b (2 concordant, 1 discordant: 1 / 3)
    resampled = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    result = agreement(reference, ["a", "b", "c"], point, resampled)
    assert result["kendall_tau"] == pytest.approx(1.0)
    # percentiles of [-1, 1/3, 1]: 2.5% at 0.05 of the way from -1 to 1/3, 97.5% at 0.95 from 1/3 to 1
    assert result["kendall_tau_ci_low"] == pytest.approx(-1 + 0.05 * 4 / 3)
    assert result["kendall_tau_ci_high"] == pytest.approx(1 / 3 + 0.95 * 2 / 3)


def test_agreement_with_one_known_teacher_is_empty():
    result = agreement(pd.Series({"a": 1.0}), ["a", "b"], np.array([1.0, 2.0]), np.array([[1.0, 2.0]]))
    assert result["missing_from_reference"] == ["b"]
    assert result["kendall_tau"] is None and result["spearman_ci_low"] is None


def test_sample_size_curve_doubles_and_stops_below_all_problems():
    assert sample_sizes(80, 10) == [10, 20, 40, 80]
    assert sample_sizes(25, 10) == [10, 20, 25]
    assert sample_sizes(6, 10) == [6]
    curve = decide(random_scores(25, 3, seed=4), Settings(n_resamples=20, n_subsamples=50)).students[0].sample_size
    assert curve["n_problems"].tolist() == [10, 20]  # at all 25 the share is 1 by construction: no row
    assert ((curve["share_same_first"] >= 0) & (curve["share_same_first"] <= 1)).all()


def test_a_teacher_best_on_every_problem_is_first_in_every_subsample():
    rows = [(t, f"p{p:02d}", 1.0 + t_index, 1.0) for p in range(30) for t_index, t in enumerate("abc")]
    curve = decide(scores(rows), Settings(n_resamples=20, n_subsamples=20)).students[0].sample_size
    assert curve["share_same_first"].tolist() == [1.0, 1.0]


def test_problem_sums_add_every_trajectory_of_a_teacher_on_a_problem():
    matched = match_problems(MATCHING[MATCHING["student"] == "s"], "source", "problem_id")
    sums = problem_sums(matched, "source", "problem_id")
    assert matched.problems == ["p1", "p2", "p3"] and matched.teachers == ["a", "b", "c"]
    assert sums.rank[0].tolist() == [6.0, 2.0, 1.0] and sums.surprisal[0].tolist() == [3.0, 2.0, 1.0]  # p1
    # p2 drawn twice, p1 never: a (3 + 3 + 1) / (3 + 3 + 2)
    assert sums.rsr(np.array([0.0, 2.0, 1.0]))[0] == pytest.approx(7 / 8)


def test_within_problem_spearman_averages_problems_of_three_or_more_varying_trajectories():
    # A: rho 1. B: ranks [1, 2, 3, 4] against [1, 3, 2, 4], rho 4 / 5. C: two rows. D: a constant metric.
    metric = [1, 2, 3, 11, 12, 13, 14, 1, 2, 5, 5, 5]
    length = [10, 20, 30, 1, 3, 2, 4, 1, 2, 1, 2, 3]
    groups = ["A"] * 3 + ["B"] * 4 + ["C"] * 2 + ["D"] * 3
    rows = pd.DataFrame({"rank_surprisal_ratio": metric, "resp_token_length": length, "problem_id": groups})
    rows["avg_surprisal"] = 1.0
    assert within_group_spearman(rows["rank_surprisal_ratio"], rows["resp_token_length"], rows["problem_id"]) == (
        pytest.approx(0.9),
        2,
    )
    table = confounds("s", rows, Settings(correct_column=None)).set_index("metric")
    assert table.loc["rank_surprisal_ratio", "spearman_length_within_problems"] == pytest.approx(0.9)
    assert table.loc["rank_surprisal_ratio", "n_problems_within_length"] == 2
    assert table.loc["rank_surprisal_ratio", "n_problems_within_surprisal"] == 0  # a constant avg_surprisal
    # across A and B alone the longer problem has the lower metric: 1 - 6 * 86 / (7 * 48)
    ab = rows[rows["problem_id"].isin(["A", "B"])]
    assert spearman(ab["rank_surprisal_ratio"], ab["resp_token_length"]) == pytest.approx(1 - 6 * 86 / (7 * 48))
    assert "auc_correct" not in table


def test_confounds_auc_leaves_rows_without_a_correctness_value_out():
    rows = scores([("a", "p1", 1.0, 1.0), ("a", "p1", 2.0, 1.0), ("b", "p1", 3.0, 1.0), ("b", "p1", 4.0, 1.0)])
    rows["is_correct"] = [True, None, False, "true"]  # correct: RSR 1 and 4; incorrect: RSR 3
    table = confounds("s", rows, Settings()).set_index("metric")
    assert table.loc["rank_surprisal_ratio", "auc_correct"] == pytest.approx(0.5)  # 1 beats 3, 4 loses to 3
    assert correctness(rows["is_correct"]).to_dict() == {0: True, 2: False, 3: True}


def test_suitability_auc_on_known_values():
    correct = pd.Series([True, True, False, False])
    assert suitability_auc(pd.Series([1.0, 2.0, 3.0, 4.0]), correct, lower_is_better=True) == 1.0
    assert suitability_auc(pd.Series([1.0, 2.0, 3.0, 4.0]), correct, lower_is_better=False) == 0.0
    assert suitability_auc(pd.Series([1.0, 1.0, 1.0, 1.0]), correct, lower_is_better=True) == 0.5
    assert suitability_auc(pd.Series([1.0, 3.0, 2.0, 4.0]), correct, lower_is_better=True) == 0.75


def test_flags_per_teacher_where_present():
    frame = MATCHING.assign(
        truncated=[False, True, False, False, False, False, False, True, False, False, False, False, False],
        degenerate=[None, "empty_turns", None, None, None, None, "loop", "loop", None, None, None, None, None],
        assistant_turns=[1, 2, 3, 4, 9, 1, 1, 1, 1, 1, 5, 5, 5],
    )
    table = decide(frame, Settings(n_resamples=20)).students[0].teachers.set_index("teacher")
    # over each teacher's matched rows: a p1, p1, p2, p3; b p1, p2, p3; c p1, p2, p3
    assert table["share_truncated"].to_dict() == pytest.approx({"a": 1 / 4, "b": 1 / 3, "c": 0.0})
    assert table["share_degenerate"].to_dict() == pytest.approx({"a": 1 / 4, "b": 2 / 3, "c": 0.0})
    assert table["mean_assistant_turns"].to_dict() == pytest.approx({"a": 2.5, "b": 1.0, "c": 5.0})
    plain = decide(MATCHING, Settings(n_resamples=20)).students[0].teachers
    assert list(plain.columns[:7]) == ["student", "teacher", "n_problems", "rsr", "rsr_ci_low", "rsr_ci_high", "p_top1"]
    assert not {"share_truncated", "share_degenerate", "mean_assistant_turns"} & set(plain.columns)


def test_drop_truncated_groups_drops_the_whole_problem_before_matching():
    frame = MATCHING.assign(truncated=[r == 2 for r in range(len(MATCHING))])  # a's p2
    decision = decide(frame, Settings(n_resamples=20, drop_truncated_groups=True))
    counts = decision.matching["s"]
    assert counts["dropped_truncated_groups"] == {"problems": 1, "rows": 3}  # p2 of a, b and c
    assert counts["n_problems_matched"] == 2
    # a: (2 + 4 + 1) / (1 + 2 + 2) on p1 and p3
    assert decision.students[0].teachers.set_index("teacher").loc["a", "rsr"] == pytest.approx(7 / 5)
    assert "dropped_truncated_groups" not in decide(frame, Settings(n_resamples=20)).matching["s"]


def test_the_report_and_decide_jobs_import_without_torch_or_ray():
    # jobs.decide imports Ray only once its config is checked; the report reads Parquet with pyarrow alone.
    check = ("import sys, jobs.report, jobs.decide, pipeline.decide.decision; "
             "assert not {'torch', 'ray'} & set(sys.modules), {'torch', 'ray'} & set(sys.modules)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
