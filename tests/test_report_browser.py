"""The teacher report as a reader sees it: report.html in headless Chromium (Debian's `chromium`, driven by
playwright) at 1280x900: nothing runs off the page sideways, every image loads, and each student's
section opens with a verdict that names its rank-1 teacher."""

import os
import shutil

import pytest

from jobs.report import write_report
from pipeline.decide.teachers import Settings
from tests.test_decide import random_scores
from tests.test_sequential import length_scores

CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it, and in CI this test runs)",
)


def test_the_report_fits_1280_pixels_loads_every_image_and_opens_with_each_verdict(tmp_path):
    import pandas as pd
    from playwright.sync_api import sync_playwright

    # Two students: one with a clear first teacher among many long-named ones, one with teachers it cannot separate.
    clear = random_scores(n_problems=40, n_teachers=8, seed=1, student="clear-student")
    clear["source"] = "a-teacher-with-a-long-model-name-" + clear["source"]
    close = length_scores(seed=2).assign(student="close-student")
    scores = pd.concat([clear, close], ignore_index=True)
    decision, _ = write_report(scores, Settings(n_resamples=200), tmp_path)
    first = {s.student: s.teachers["teacher"].iloc[0] for s in decision.students}

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((tmp_path / "report.html").as_uri())
        page.wait_for_load_state("load")
        page_width = page.evaluate("document.documentElement.scrollWidth")
        images = page.evaluate("[...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        sections = page.evaluate(
            "[...document.querySelectorAll('h2')].map(h => [h.textContent,"
            " h.nextElementSibling && h.nextElementSibling.nextElementSibling ? h.nextElementSibling.nextElementSibling.className : null])"
        )
        verdicts = page.locator(".verdict").all_inner_texts()
        browser.close()

    assert page_width <= 1280, f"the page is {page_width} px wide in a 1280 px window"
    assert images and all(loaded for _, loaded in images), [alt for alt, loaded in images if not loaded]
    # Each student's heading, its matching line, then its verdict.
    assert [(student, kind) for student, kind in sections] == [(s, "verdict") for s in sorted(first)]
    assert len(verdicts) == len(first)
    for verdict in verdicts:
        student = verdict.split(":")[0]
        assert first[student] in verdict, (student, first[student], verdict)
