"""The teacher-selection report: one self-contained HTML page with, per student, the ranked teacher
table, the RSR distribution of every teacher (source), and the metrics side by side: teachers ranked by
each, their Spearman correlations across teachers and across trajectories and, with a correctness
column, how well each separates correct from incorrect trajectories (AUC)."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.metrics import REGISTRY  # noqa: E402

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


def suitability_auc(values: pd.Series, correct: pd.Series, lower_is_better: bool) -> float:
    """The probability that the metric rates a correct trajectory more suitable than an incorrect one
    (ties count half): 0.5 is no separation."""
    ranks = (-values if lower_is_better else values).rank()  # average ranks for ties
    n_correct, n_incorrect = int(correct.sum()), int((~correct).sum())
    if not n_correct or not n_incorrect:
        return float("nan")
    return float((ranks[correct].sum() - n_correct * (n_correct + 1) / 2) / (n_correct * n_incorrect))


def metric_comparison(mine: pd.DataFrame, teachers: pd.DataFrame, teacher_column: str, correct_column: str | None) -> str:
    """One student's metrics side by side, as HTML with plots."""
    metrics = [m for m in METRICS if m in mine.columns]
    dataset = teachers.set_index(teacher_column)[[METRICS[m][0] for m in metrics]]
    dataset.columns = metrics
    ranked = pd.DataFrame({m: dataset[m].rank(ascending=METRICS[m][1], method="min").astype(int) for m in metrics})
    across_teachers = dataset.corr(method="spearman")
    across_trajectories = mine[metrics].corr(method="spearman")
    parts = [
        "<h3>Teachers ranked by each metric (1 = most suitable)</h3>",
        ranked.sort_values(metrics[0]).to_html(classes="ranks"),
        "<h3>Spearman correlation between metrics</h3>",
        "<p>across teachers (dataset-level values)</p>" + across_teachers.to_html(float_format=lambda x: f"{x:.3f}"),
        "<p>across trajectories</p>" + across_trajectories.to_html(float_format=lambda x: f"{x:.3f}"),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    for ax, (title, matrix) in zip(axes, [("across teachers", across_teachers), ("across trajectories", across_trajectories)]):
        image = ax.imshow(matrix.to_numpy(), vmin=-1, vmax=1, cmap="coolwarm")
        ax.set(title=f"Spearman, {title}", xticks=range(len(metrics)), yticks=range(len(metrics)))
        ax.set_xticklabels(metrics, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(metrics, fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8)
    parts.append(_img(_png(fig), "Spearman correlation heatmaps"))
    if correct_column and correct_column in mine.columns:
        correct = mine[correct_column].astype(str).str.lower().isin(["true", "1"])
        aucs = pd.Series({m: suitability_auc(mine[m], correct, METRICS[m][1]) for m in metrics}, name="AUC")
        parts += [
            f"<h3>Separation of correct from incorrect trajectories ({html.escape(correct_column)})</h3>",
            f"<p>AUC: the probability that the metric rates a correct trajectory more suitable than an incorrect one "
            f"({int(correct.sum())} correct, {int((~correct).sum())} incorrect; 0.5 = no separation).</p>",
            aucs.to_frame().to_html(float_format=lambda x: f"{x:.3f}"),
        ]  # fmt: skip
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(metrics) + 1.5), layout="constrained")
        ax.barh(metrics, aucs.to_numpy())
        ax.axvline(0.5, color="grey", linestyle="--")
        ax.set(xlim=(0, 1), xlabel="AUC (correct vs incorrect)", title="separation of correct trajectories")
        ax.invert_yaxis()
        parts.append(_img(_png(fig), "AUC per metric"))
    return "".join(parts)


def _distribution_png(scores: pd.DataFrame, student: str, teacher_column: str, order: list[str]) -> str:
    mine = scores[scores["student"] == student]
    values = [mine.loc[mine[teacher_column] == t, "rank_surprisal_ratio"].to_numpy() for t in order]
    fig, (hist, box) = plt.subplots(1, 2, figsize=(12, 0.5 * len(order) + 3), layout="constrained")
    for teacher, v in zip(order, values):
        hist.hist(v, bins=30, histtype="step", linewidth=1.5, label=str(teacher))
    hist.set(title=f"{student}: rank_surprisal_ratio per trajectory", xlabel="RSR (lower = more suitable)", ylabel="trajectories")
    hist.legend(fontsize=8)
    box.boxplot(values, orientation="horizontal", tick_labels=[str(t) for t in order])
    box.invert_yaxis()  # best teacher on top
    box.set(title="by teacher, ranked", xlabel="RSR")
    return _png(fig)


def render_report(
    scores: pd.DataFrame, teachers: pd.DataFrame, teacher_column: str = "source", correct_column: str | None = "is_correct"
) -> str:
    sections = []
    for student, table in teachers.groupby("student", sort=True):
        order = table.sort_values("rank")[teacher_column].tolist()
        png = _distribution_png(scores, student, teacher_column, order)
        sections.append(
            f"<h2>{html.escape(str(student))}</h2>"
            + table.to_html(index=False, float_format=lambda x: f"{x:.4f}", classes="teachers")
            + _img(png, f"RSR distributions for {student}")
            + metric_comparison(scores[scores["student"] == student], table, teacher_column, correct_column)
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>RSR teacher report</title>"
        "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} img{max-width:100%}"
        "</style></head><body>"
        "<h1>Teacher selection by Rank-Surprisal Ratio</h1>"
        f"<p>{len(scores)} scored trajectories. Dataset-level RSR = sum of avg_rank_clip / sum of avg_surprisal; "
        "a lower RSR means trajectories more suitable for the student (rank 1 = best teacher).</p>"
        + "".join(sections)
        + "</body></html>"
    )
