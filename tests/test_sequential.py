"""The wave rule (pipeline.decide.sequential) and RSR at equal length (pipeline.decide.length), on per-problem
sums and score tables built here, without Ray."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.decide.decision import decide
from pipeline.decide.sequential import exchanges, false_decisions, look, look_at, subset, swapped, verdict_text
from pipeline.decide.teachers import ProblemSums, Settings, sample_sizes


def problem_sums(n_problems: int, shifts: list[float], seed: int) -> ProblemSums:
    """Per problem and teacher: rank and surprisal sums with a shared per-problem difficulty; teacher i's
    ranks raised by shifts[i] (a higher RSR: less suitable)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.gamma(4.0, 1.0, size=(n_problems, 1))
    surprisal = difficulty * rng.gamma(20.0, 0.05, size=(n_problems, len(shifts)))
    rank = surprisal * (3.0 + np.array(shifts)) * rng.gamma(20.0, 0.05, size=(n_problems, len(shifts)))
    return ProblemSums(rank, surprisal)


def test_a_clear_leader_is_decided_and_close_teachers_are_named_with_their_bound():
    sums = problem_sums(40, [0.0, 1.5, 1.5], seed=1)
    clear = look_at(sums, ["a", "b", "c"], confidence=0.95, n_looks=4, seed=0)
    assert clear.decided and clear.teachers[clear.leader] == "a" and clear.tied == [] and clear.bound is None
    assert clear.level == pytest.approx(0.05 / (3 * 4)) and clear.n_draws >= 20 / clear.level
    assert verdict_text("s", clear).startswith("s: decided on 40 problems: a is the most suitable teacher")

    close = look_at(subset(sums, slice(None), [1, 2]), ["b", "c"], confidence=0.95, n_looks=4, seed=0)
    assert not close.decided and len(close.tied) == 1
    leader, other = close.leader, close.tied[0]
    gap = abs(close.rsr[other] - close.rsr[leader])
    assert close.bound >= gap and np.isclose(close.bound, np.abs(close.difference_interval[other]).max())
    text = verdict_text("s", close)
    assert f"{close.teachers[leader]} leads" in text and close.teachers[other] in text and f"{close.bound:.3f} RSR" in text


def test_identical_teachers_are_never_decided():
    sums = problem_sums(30, [0.0], seed=2)
    twins = ProblemSums(np.repeat(sums.rank, 2, axis=1), np.repeat(sums.surprisal, 2, axis=1))
    result = look_at(twins, ["a", "b"], confidence=0.95, n_looks=1, seed=0)
    assert not result.decided and result.bound == 0.0


def test_swapping_labels_exchanges_the_teachers_on_the_chosen_problems():
    sums = problem_sums(5, [0.0, 1.0], seed=3)
    swap = np.array([True, False, True, False, False])
    flipped = swapped(sums, swap)
    assert np.array_equal(flipped.rank[swap], sums.rank[swap][:, ::-1])
    assert np.array_equal(flipped.surprisal[~swap], sums.surprisal[~swap])


def test_the_false_decision_rate_over_all_looks_stays_below_alpha_where_a_naive_rule_exceeds_it():
    sums = problem_sums(100, [0.0, 0.0], seed=4)
    sizes = sample_sizes(100, 10)  # 10, 20, 40, 80, 100: five looks
    n_swaps = 1000
    wrong = false_decisions(sums, sizes, confidence=0.95, seed=0, n_swaps=n_swaps)
    assert stats.binomtest(wrong, n_swaps).proportion_ci(0.95).high <= 0.05

    # The rule that stops as soon as a leader's P(top1) reaches 0.95, at any of the same looks.
    rng = np.random.default_rng(0)
    weights = {n: rng.multinomial(n, np.full(n, 1 / n), size=1000).astype(float) for n in sizes}
    unused = exchanges(100, 2, 0)  # the naive rule runs no test
    naive = 0
    for _ in range(n_swaps):
        labelled = swapped(sums, rng.random(sums.n_problems) < 0.5)
        naive += any(
            look(part := subset(labelled, slice(0, n)), ["a", "b"], part.rsr(weights[n]), unused[:, :n], 0.95, 1).p_top1.max()
            >= 0.95
            for n in sizes
        )
    assert stats.binomtest(naive, n_swaps).proportion_ci(0.95).low > 0.05


def length_scores(seed: int) -> pd.DataFrame:
    """Trajectories whose RSR grows with length, teacher t2 longer than the others."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(25):
        difficulty = rng.normal(0, 0.3)
        for t, (effect, mean_length) in enumerate([(0.0, 200), (0.1, 220), (-0.05, 600)]):
            for _ in range(rng.integers(1, 3)):
                length = int(rng.lognormal(np.log(mean_length), 0.4)) + 1
                rsr = np.exp(1.0 + difficulty + effect + 0.2 * np.log(length) + rng.normal(0, 0.1))
                rows.append({"source": f"t{t}", "problem_id": f"p{p:02d}", "resp_token_length": length,
                             "rank_surprisal_ratio": rsr, "avg_surprisal": 1.0, "avg_rank_clip": rsr})  # fmt: skip
    return pd.DataFrame(rows).assign(student="s")


def test_length_adjusted_effects_equal_an_independent_least_squares_fit():
    scores = length_scores(seed=5)
    table = decide(scores, Settings(n_resamples=200)).table("length_adjusted").set_index("teacher")

    # The fit with every problem's dummy in the design, no centring: log RSR ~ problem + teacher + log length.
    problems = pd.get_dummies(scores["problem_id"], dtype=float)
    teachers = pd.get_dummies(scores["source"], dtype=float).drop(columns="t0")
    design = np.column_stack([problems, teachers, np.log(scores["resp_token_length"])])
    coefficients = np.linalg.lstsq(design, np.log(scores["rank_surprisal_ratio"]), rcond=None)[0]
    b = np.concatenate([[0.0], coefficients[problems.shape[1] : -1]])
    expected = pd.Series(np.exp(b - b.mean()), index=["t0", "t1", "t2"])

    np.testing.assert_allclose(table.loc[expected.index, "effect"], expected, rtol=1e-6)
    np.testing.assert_allclose(table["length_coefficient"], coefficients[-1], rtol=1e-6)
    assert (table["effect_ci_low"] <= table["effect"]).all() and (table["effect"] <= table["effect_ci_high"]).all()
    assert list(table.index) == ["t2", "t0", "t1"]  # most suitable at equal length first
    # The raw ranking differs: t2 is long, and RSR grows with length.
    raw = decide(scores, Settings(n_resamples=200)).table("teachers")
    assert raw["teacher"].iloc[0] != "t2"
