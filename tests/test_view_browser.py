"""`tiderl view` in a real headless browser (Debian's Chromium, driven by Playwright) on a real run directory: the
page loads with nothing from the network, the charts draw, a filter and the token view work, two steps sit side by
side, the page follows a run that is still going, and the exported file works with no server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_view import _records
from tests.view_pages import browser_page, chromium_path, open_sample_with_tokens, served, wait_for_charts

pytestmark = [
    pytest.mark.skipif(
        chromium_path() is None,
        reason="no Chromium: `make setup` installs Debian's chromium when run as root (apt-get install chromium)",
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _view_extra() -> None:
    for name in ("playwright", "plotly", "starlette", "uvicorn"):
        pytest.importorskip(name, reason=f"{name} is missing: pip install -e '.[dev]' (the view extra and playwright)")


def test_page_in_a_browser_follows_a_running_job(view_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(view_run, run)
    metrics = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(metrics[:2]))  # the job as it was after step 2
    (run / "trajectories" / "step_000003.jsonl").unlink()
    with served(run) as url, browser_page() as page:
        page.goto(url)
        wait_for_charts(page)
        assert page.locator("#status").inner_text().startswith("● live: step 2 of 3")
        # every curve drew its lines (reward, mismatch, length, tools, truncation, step time)
        for chart in ("reward", "mismatch", "length", "tools", "truncation", "time"):
            assert page.locator(f"#chart-{chart} .main-svg .trace").count() >= 1, chart

        open_sample_with_tokens(page)
        records = _records(run, 2)
        rows = page.locator("#panel-main .sample-list tbody tr")
        assert rows.count() == len(records)
        page.select_option("#panel-main select[data-filter=correct]", "no")
        assert rows.count() == sum(not r["correct"] for r in records)
        page.fill("#panel-main input[data-filter=reward-min]", "100")
        assert rows.count() == 0
        page.fill("#panel-main input[data-filter=reward-min]", "")
        page.select_option("#panel-main select[data-filter=correct]", "any")
        page.select_option("#panel-main select[data-filter=truncated]", "yes")
        assert rows.count() == sum(r["status"] == "truncated" for r in records)
        page.select_option("#panel-main select[data-filter=truncated]", "any")

        # the token view: every token drawn, policy tokens colored, a click shows the token's numbers
        shown = page.locator("#panel-main .sample-list tr.selected td").first.inner_text()
        record = next(r for r in records if r["sample_id"] == shown)
        assert page.locator("#panel-main .tokens .tok").count() == len(record["tokens"]["text"])
        policy = page.locator("#panel-main .tokens .tok:not(.ctx)")
        assert policy.count() == sum(record["tokens"]["policy"])
        assert "rgb" in policy.first.get_attribute("style")
        assert page.locator("#panel-main .tokens .tok.cut-mask").count() == sum(
            p and not m for p, m in zip(record["tokens"]["policy"], record["tokens"]["token_mask"], strict=True)
        )
        policy.first.click()
        info = page.locator("#panel-main .token-info").inner_text()
        assert "rollout logprob" in info and "learner logprob" in info and "|Δ logp|" in info
        page.select_option("#panel-main .token-view select", "advantage")
        assert "advantage: red < 0" in page.locator("#panel-main .token-view .legend").inner_text()

        # the job goes on: step 3 appears without a reload (the page polls), and the panels follow it
        (run / "metrics.jsonl").write_text("".join(metrics))
        shutil.copy(view_run / "trajectories" / "step_000003.jsonl", run / "trajectories")
        page.wait_for_function("document.querySelector('#status').innerText.startsWith('finished · step 3 of 3')")
        page.wait_for_function("document.querySelector('#panel-main .step-stats').innerText.startsWith('step 3:')")

        # two steps side by side: the first on the left, the newest on the right
        page.click("#tabs button[data-tab=compare]")
        page.wait_for_selector("#panel-right .token-view .tok")
        assert page.locator("#panel-left .step-stats").inner_text().startswith("step 1:")
        assert page.locator("#panel-right .step-stats").inner_text().startswith("step 3:")
        page.click("#tabs button[data-tab=config]")
        assert "samples_per_step: 8" in page.locator("#config").inner_text()
        assert page.errors == []


def test_exported_file_works_without_a_server(view_run: Path, tmp_path: Path) -> None:
    from rl.view.data import snapshot
    from rl.view.page import render_page

    out = tmp_path / "run.html"
    out.write_text(render_page(snapshot(view_run)))
    with browser_page() as page:
        page.goto(out.as_uri())
        wait_for_charts(page)
        assert page.locator("#status").inner_text().startswith("snapshot of")
        open_sample_with_tokens(page)
        assert page.locator("#panel-main .sample-list tbody tr").count() == len(_records(view_run, 3))
        assert page.errors == []
