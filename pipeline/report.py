"""The teacher-selection report: one self-contained HTML page with the ranked teacher table and the
RSR distribution of every teacher (source) under every student."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _distribution_png(scores: pd.DataFrame, student: str, teacher_column: str, order: list[str]) -> str:
    mine = scores[scores["student"] == student]
    values = [mine.loc[mine[teacher_column] == t, "rank_surprisal_ratio"].to_numpy() for t in order]
    fig, (hist, box) = plt.subplots(1, 2, figsize=(12, 0.5 * len(order) + 3))
    for teacher, v in zip(order, values):
        hist.hist(v, bins=30, histtype="step", linewidth=1.5, label=str(teacher))
    hist.set(title=f"{student}: rank_surprisal_ratio per trajectory", xlabel="RSR (lower = more suitable)", ylabel="trajectories")
    hist.legend(fontsize=8)
    box.boxplot(values, orientation="horizontal", tick_labels=[str(t) for t in order])
    box.invert_yaxis()  # best teacher on top
    box.set(title="by teacher, ranked", xlabel="RSR")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def render_report(scores: pd.DataFrame, teachers: pd.DataFrame, teacher_column: str = "source") -> str:
    sections = []
    for student, table in teachers.groupby("student", sort=True):
        order = table.sort_values("rank")[teacher_column].tolist()
        png = _distribution_png(scores, student, teacher_column, order)
        sections.append(
            f"<h2>{html.escape(str(student))}</h2>"
            + table.to_html(index=False, float_format=lambda x: f"{x:.4f}", classes="teachers")
            + f'<img alt="RSR distributions for {html.escape(str(student))}" src="data:image/png;base64,{png}">'
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>RSR teacher report</title>"
        "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} img{max-width:100%}</style></head><body>"
        "<h1>Teacher selection by Rank-Surprisal Ratio</h1>"
        f"<p>{len(scores)} scored trajectories. Dataset-level RSR = sum of avg_rank_clip / sum of avg_surprisal; "
        "a lower RSR means trajectories more suitable for the student (rank 1 = best teacher).</p>"
        + "".join(sections)
        + "</body></html>"
    )
