"""`tiderl view` in a real browser: Debian's Chromium driven by Playwright (no browser download). Shared by
tests/test_view_browser.py and the screenshots in docs/ (`python tests/view_pages.py RUN_DIR docs/`)."""

from __future__ import annotations

import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@contextmanager
def served(run_dir: Path) -> Iterator[str]:
    """`tiderl view RUN_DIR`'s server on a free local port, in a thread; yields the page's URL."""
    import uvicorn

    from rl.view.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(run_dir), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the view server did not start in 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def browser_page(width: int = 1400, height: int = 1000) -> Iterator:
    """A Playwright page in headless Debian Chromium that may only load the page itself: any request to another
    host fails the page (everything must be served locally); JavaScript errors are collected in `page.errors`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(f"page error: {e}"))
            page.on("console", lambda m: m.type == "error" and page.errors.append(f"console error: {m.text}"))

            def only_local(route) -> None:
                url = route.request.url
                if url.startswith(("file://", "http://127.0.0.1", "data:", "blob:")):
                    route.continue_()
                else:
                    page.errors.append(f"request to the network: {url}")
                    route.abort()

            page.route("**/*", only_local)
            yield page
        finally:
            browser.close()


def wait_for_charts(page, timeout_ms: int = 60000) -> None:
    page.wait_for_function("document.querySelectorAll('#charts .chart .main-svg').length >= 6", timeout=timeout_ms)


def open_sample_with_tokens(page, panel: str = "#panel-main") -> None:
    page.click("#tabs button[data-tab=samples]")
    page.wait_for_selector(f"{panel} .sample-list tbody tr")
    page.wait_for_selector(f"{panel} .token-view .tok")


def screenshots(url: str, out_dir: Path) -> list[Path]:
    """The three pages a newcomer sees first, as PNG files in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"view_{name}.png" for name in ("curves", "samples", "compare")]
    with browser_page() as page:
        page.goto(url)
        wait_for_charts(page)
        page.screenshot(path=str(paths[0]), full_page=True)
        open_sample_with_tokens(page)
        page.check("#panel-main input[data-filter=tokens]")  # the samples kept with their tokens
        rows = page.locator("#panel-main .sample-list tbody tr")
        rows.nth(min(1, rows.count() - 1)).click()  # the second: the other answer to the first kept prompt
        page.wait_for_selector("#panel-main .token-view .tok")
        page.locator("#panel-main .tok:not(.ctx)").last.click()
        page.screenshot(path=str(paths[1]), full_page=True)
        page.click("#tabs button[data-tab=compare]")
        page.wait_for_selector("#panel-right .token-view .tok")
        page.screenshot(path=str(paths[2]), full_page=True)
        if page.errors:
            raise RuntimeError("; ".join(page.errors))
    return paths


if __name__ == "__main__":
    with served(Path(sys.argv[1])) as page_url:
        for path in screenshots(page_url, Path(sys.argv[2])):
            print(path)
