"""The page at / in a real headless browser (the system's Chromium driven by Playwright): enter the token,
submit a fact, see it applied, withdraw it. SEQEDIT_SCREENSHOT=PATH saves the page with the fact applied
(docs/serve-page.png was made so)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import uvicorn
from serve_helpers import WRITE_TOKEN, fact, free_port, make_config, wait_http_ready

from seqedit.serve import create_app
from seqedit.testing import tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system's chromium (apt-get install chromium)")


def test_submit_see_applied_and_withdraw_in_a_browser(tmp_path: Path) -> None:
    api = pytest.importorskip("playwright.sync_api")
    sync_playwright, expect = api.sync_playwright, api.expect
    port = free_port()
    app = create_app(make_config(tmp_path, port=port, max_wait_s=0.05), load=lambda: tiny_model("llama"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(base, WRITE_TOKEN)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(base + "/")
            assert page.title().startswith("seqedit serve")
            page.fill("#token", WRITE_TOKEN)
            page.click("#token-form button")
            # locator assertions poll without evaluating a string in the page (its CSP rightly forbids eval)
            expect(page.locator("#status")).to_have_text("connected", timeout=20_000)
            for i, fact_id in ((1, "tower"), (2, "river")):
                f = fact(i)
                page.fill("#subject", f["subject"])
                page.fill("#prompt", f["prompt"])
                page.fill("#target", f["target"])
                page.fill("#fact-id", fact_id)
                page.click("[data-testid=submit]")
                page.wait_for_selector(f"#facts tr[data-fact-id={fact_id}]", timeout=30_000)  # applied
            assert page.locator("#edits .state-applied").count() == 2
            assert page.locator("#facts tr[data-fact-id=tower] td").nth(2).text_content() == "Town 1-0"
            if out := os.environ.get("SEQEDIT_SCREENSHOT"):
                page.screenshot(path=out, full_page=True)
            page.click("[data-testid=withdraw-tower]")
            page.wait_for_selector("#facts tr[data-fact-id=tower]", state="detached", timeout=20_000)
            assert page.locator("#facts tr[data-fact-id=river]").count() == 1
            assert "forgot tower" in page.locator("#msg").text_content()
            expect(page.locator("#laststep")).to_have_text("3", timeout=10_000)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()
