"""The teacher-selection report: one self-contained HTML page with, per student, the decision
(`pipeline.decide.teachers`: teachers on matched problems with bootstrap intervals, p_top1, pairwise win
probabilities, how many problems the choice needs, agreement with a reference ranking), the confounds
beside every metric (length, surprisal, correctness, trajectory flags), the RSR distribution of every
teacher, and the metrics side by side: teachers ranked by each and their Spearman correlations across
teachers and across trajectories."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.decide.decision import Decision, StudentDecision  # noqa: E402
from pipeline.decide.sequential import verdict_text  # noqa: E402
from pipeline.decide.teachers import DIRECTION, LENGTH, Settings  # noqa: E402
from pipeline.scoring.metrics import REGISTRY  # noqa: E402

# Per-trajectory column -> its dataset-level column in the teacher table, and whether a lower value
# marks a more suitable trajectory (more familiar to the student): from the metric registry.
METRICS = {m.column: (m.dataset_column, m.lower_is_better) for m in REGISTRY}


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _img(png: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


def _table(frame: pd.DataFrame, **options) -> str:
    """A table rounded for reading, in a box of its own that scrolls when it is wider than the page."""
    return f'<div class="scroll">{frame.to_html(float_format=lambda x: f"{x:.3f}", na_rep="", **options)}</div>'


def verdict_section(decision: StudentDecision) -> str:
    """The answer first: the verdict in words, and what the length-adjusted order says when it differs."""
    text = verdict_text(decision.student, decision.verdict)
    first_at_equal_length = str(decision.length_adjusted["teacher"].iloc[0])
    if first_at_equal_length != decision.verdict.teachers[decision.verdict.leader]:
        text += (
            f" At equal response length, {first_at_equal_length} would come first (see the length-adjusted table); "
            "the decision stays on RSR as the paper defines it."
        )
    return f'<p class="verdict">{html.escape(text)}</p>'


def _forest_png(decision: StudentDecision) -> str:
    """Each teacher's RSR with its 95% interval, most suitable on top."""
    table = decision.teachers
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(table) + 1.5), layout="constrained")
    y = range(len(table))
    errors = [table["rsr"] - table["rsr_ci_low"], table["rsr_ci_high"] - table["rsr"]]
    ax.errorbar(table["rsr"], y, xerr=errors, fmt="o", capsize=3)
    ax.set_yticks(list(y), labels=[str(t) for t in table["teacher"]])
    ax.invert_yaxis()
    ax.set(xlabel=f"dataset RSR with its 95% paired-bootstrap interval ({DIRECTION})", title=f"{decision.student}: teachers")
    return _png(fig)


def matching_summary(counts: dict, group_column: str) -> str:
    """What the decision compares on and what it leaves out, as HTML."""
    text = (
        f"{counts['n_problems_matched']} of {counts['n_problems']} problems ({html.escape(group_column)}) have a scored "
        f"trajectory from every one of the {len(counts['teachers'])} teachers; the decision uses only those "
        f"({counts['n_rows_matched']} rows). Left out: {counts['n_rows_unmatched']} rows"
    )
    by_teacher = ", ".join(f"{html.escape(t)}: {n}" for t, n in counts["unmatched_rows_by_teacher"].items())
    text += f" ({by_teacher})" if by_teacher else ""
    if counts["n_rows_without_teacher_or_problem"]:
        text += f", of which {counts['n_rows_without_teacher_or_problem']} without a teacher or problem"
    dropped = counts.get("dropped_truncated_groups")
    if dropped:
        text += f". Dropped before matching: {dropped['problems']} problems with a truncated trajectory ({dropped['rows']} rows)"
    return f"<p>{text}.</p>"


def decision_section(decision: StudentDecision, settings: Settings) -> str:
    """The teacher table, the pairwise win probabilities, the sample-size curve and the agreement."""
    n_problems = int(decision.teachers["n_problems"].iloc[0])
    parts = [
        f"<h3>Teachers on {n_problems} matched problems ({DIRECTION})</h3>",
        f"<p>rsr = sum of avg_rank_clip / sum of avg_surprisal over the teacher's matched trajectories; 95% interval "
        f"and p_top1 (share of resamples in which the teacher is the most suitable) from a paired bootstrap over "
        f"problems: {settings.n_resamples} resamples, seed {settings.seed}, the same problems for every teacher.</p>",
        _table(decision.teachers.drop(columns="student"), index=False, classes="teachers"),
        "<h3>At equal length</h3>",
        f"<p>effect = exp(b_teacher - mean b) from the fit log(RSR) ~ problem + teacher + log({LENGTH}) over the "
        "matched trajectories, with 95% intervals from the same problem resamples: below 1, the teacher's RSR is "
        "lower than the teachers' average at the same problem and length (more suitable). length_coefficient: how "
        "RSR grows with length (the elasticity).</p>",
        _table(decision.length_adjusted.drop(columns="student"), index=False, classes="length-adjusted"),
        f"<h3>Probability that the row's teacher is more suitable than the column's ({DIRECTION})</h3>",
        _table(decision.wins, classes="wins"),
        f"<h3>Problems the choice needs ({DIRECTION})</h3>",
    ]  # fmt: skip
    if decision.sample_size.empty:
        parts.append(f"<p>Too few matched problems for a curve (it starts at {settings.smallest_sample}).</p>")
    else:
        parts += [
            f"<p>Share of {settings.n_subsamples} seeded subsamples of n matched problems (without replacement) whose "
            f"most suitable teacher is {html.escape(str(decision.teachers['teacher'].iloc[0]))}, the choice on all "
            f"{n_problems} (the curve stops below {n_problems}, where it is 1 by construction).</p>",
            _table(decision.sample_size.drop(columns="student"), index=False, classes="sample-size"),
            _img(_sample_size_png(decision), f"sample-size curve for {decision.student}"),
        ]  # fmt: skip
    if decision.agreement is not None:
        agreement = decision.agreement
        rows = pd.DataFrame(
            {
                name: [agreement[name], agreement[f"{name}_ci_low"], agreement[f"{name}_ci_high"]]
                for name in ("kendall_tau", "spearman")
            },
            index=["all matched problems", "95% low", "95% high"],
        )
        missing = ", ".join(html.escape(t) for t in agreement["missing_from_reference"]) or "none"
        parts += [
            f"<h3>Agreement with the reference ranking ({DIRECTION})</h3>",
            f"<p>Correlation between the reference score (higher = better) and the RSR suitability order over "
            f"{len(agreement['teachers'])} teachers: positive = RSR orders them as the reference does. Teachers "
            f"without a reference score: {missing}.</p>",
            _table(rows, classes="agreement"),
        ]  # fmt: skip
    return "".join(parts)


def _sample_size_png(decision: StudentDecision) -> str:
    curve = decision.sample_size
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.plot(curve["n_problems"], curve["share_same_first"], marker="o")
    ax.set_xscale("log")
    ax.set_xticks(curve["n_problems"], labels=[str(n) for n in curve["n_problems"]], minor=False)
    ax.minorticks_off()
    ax.set(ylim=(0, 1.05), xlabel="matched problems in the subsample", ylabel="same first teacher as all problems",
           title=f"{decision.student}: problems the choice needs ({DIRECTION})")  # fmt: skip
    return _png(fig)


def confounds_section(decision: StudentDecision, teacher_column: str) -> str:
    """What each metric moves with besides suitability, and the flags the decision's trajectories carry."""
    parts = [
        f"<h3>Confounds beside each metric ({DIRECTION})</h3>",
        f"<p>Spearman correlation of each metric with the response length ({LENGTH}) and with avg_surprisal, "
        "across the matched trajectories and within problems (the mean over problems of at least 3 trajectories "
        "whose values vary; n_problems_within_* counts them). auc_correct: the probability that the metric rates "
        "a correct trajectory more suitable than an incorrect one (0.5 = no separation). A metric that mostly "
        "tracks length picks shorter targets, not better ones.</p>",
        _table(decision.confounds.drop(columns="student"), index=False, classes="confounds"),
        _img(_length_png(decision, teacher_column), f"RSR against length for {decision.student}"),
    ]
    if "degenerate" in decision.rows:
        reasons = pd.crosstab(decision.rows[teacher_column], decision.rows["degenerate"])
        if not reasons.empty:
            parts += ["<h3>Degenerate trajectories by reason</h3>", _table(reasons, classes="degenerate")]
    return "".join(parts)


def _length_png(decision: StudentDecision, teacher_column: str) -> str:
    rows = decision.rows
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for teacher, mine in rows.groupby(teacher_column, sort=True):
        ax.scatter(mine[LENGTH], mine["rank_surprisal_ratio"], s=12, alpha=0.6, label=str(teacher))
    ax.set_xscale("log")
    ax.set(xlabel=f"response tokens ({LENGTH})", ylabel=f"RSR ({DIRECTION})", title=f"{decision.student}: RSR against length")
    ax.legend(fontsize=8)
    return _png(fig)


def metric_comparison(rows: pd.DataFrame, teachers: pd.DataFrame) -> str:
    """One student's metrics side by side, on the matched rows, as HTML with plots."""
    metrics = [m for m in METRICS if m in rows.columns]
    dataset = teachers.set_index("teacher")[[METRICS[m][0] for m in metrics]]
    dataset.columns = metrics
    ranked = pd.DataFrame({m: dataset[m].rank(ascending=METRICS[m][1], method="min").astype(int) for m in metrics})
    across_teachers = dataset.corr(method="spearman")
    across_trajectories = rows[metrics].corr(method="spearman")
    parts = [
        "<h3>Teachers ranked by each metric (1 = most suitable by the metric's own direction)</h3>",
        ranked.sort_values(metrics[0]).to_html(classes="ranks"),
        "<h3>Spearman correlation between metrics</h3>",
        "<p>across teachers (dataset-level values)</p>" + _table(across_teachers),
        "<p>across trajectories</p>" + _table(across_trajectories),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    for ax, (title, matrix) in zip(axes, [("across teachers", across_teachers), ("across trajectories", across_trajectories)]):
        image = ax.imshow(matrix.to_numpy(), vmin=-1, vmax=1, cmap="coolwarm")
        ax.set(title=f"Spearman, {title}", xticks=range(len(metrics)), yticks=range(len(metrics)))
        ax.set_xticklabels(metrics, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(metrics, fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8)
    parts.append(_img(_png(fig), "Spearman correlation heatmaps"))
    return "".join(parts)


def _distribution_png(decision: StudentDecision, teacher_column: str) -> str:
    order = decision.teachers["teacher"].tolist()
    rows = decision.rows
    values = [rows.loc[rows[teacher_column] == t, "rank_surprisal_ratio"].to_numpy() for t in order]
    fig, (hist, box) = plt.subplots(1, 2, figsize=(12, 0.5 * len(order) + 3), layout="constrained")
    for teacher, v in zip(order, values):
        hist.hist(v, bins=30, histtype="step", linewidth=1.5, label=str(teacher))
    hist.set(title=f"{decision.student}: rank_surprisal_ratio per trajectory", xlabel=f"RSR ({DIRECTION})", ylabel="trajectories")
    hist.legend(fontsize=8)
    box.boxplot(values, orientation="horizontal", tick_labels=[str(t) for t in order])
    box.invert_yaxis()  # best teacher on top
    box.set(title="by teacher, ranked", xlabel="RSR")
    return _png(fig)


def render_report(decision: Decision, n_scores: int) -> str:
    settings = decision.settings
    sections = []
    for student, counts in decision.matching.items():
        sections.append(f"<h2>{html.escape(student)}</h2>" + matching_summary(counts, settings.group_column))
        mine = next((s for s in decision.students if s.student == student), None)
        if mine is None:
            sections.append("<p>No problem has a trajectory from every teacher: nothing to decide on.</p>")
            continue
        sections += [
            verdict_section(mine),
            _img(_forest_png(mine), f"forest plot of the teachers' RSR for {student}"),
            decision_section(mine, settings),
            confounds_section(mine, settings.teacher_column),
            f"<h3>RSR per trajectory ({DIRECTION})</h3>",
            _img(_distribution_png(mine, settings.teacher_column), f"RSR distributions for {student}"),
            metric_comparison(mine.rows, mine.teachers),
        ]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>RSR teacher report</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse}"
        ".scroll{overflow-x:auto;max-width:100%;margin:1em 0} td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "img{max-width:100%} .verdict{font-size:1.2em;background:#eef5ff;border-left:4px solid #36c;padding:0.6em 1em}"
        "</style></head><body>"
        "<h1>Teacher selection by Rank-Surprisal Ratio</h1>"
        f"<p>{n_scores} scored trajectories; teachers are the values of {html.escape(settings.teacher_column)}, "
        f"problems those of {html.escape(settings.group_column)}. Dataset-level RSR = sum of avg_rank_clip / sum of "
        f"avg_surprisal over matched problems; {DIRECTION} (rank 1 = the most suitable teacher).</p>"
        + "".join(sections)
        + "</body></html>"
    )
