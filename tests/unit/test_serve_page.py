"""The page at / in a real headless browser (the system's Chromium driven by Playwright): enter the token,
submit a fact, see it applied, ask the model in the "try it" panel (bare and through chat), search and
page the facts in force, withdraw a fact. SEQEDIT_SCREENSHOT=PATH saves the page with the fact applied
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
            # try it: the panel's answer is the API's greedy answer, bare and through the chat template
            import httpx

            ask = {"max_tokens": 16, "temperature": 0}
            h = {"Authorization": f"Bearer {WRITE_TOKEN}"}
            bare = httpx.post(base + "/v1/completions", json={**ask, "prompt": "Place 1 is located in"}, headers=h)
            page.fill("#try-text", "Place 1 is located in")
            page.click("[data-testid=ask]")
            expect(page.locator("#try-answer")).to_have_text(bare.json()["choices"][0]["text"], timeout=20_000)
            chat = httpx.post(base + "/v1/chat/completions", headers=h, json={
                **ask, "messages": [{"role": "user", "content": "Place 1 is located in what?"}]})
            page.fill("#try-text", "Place 1 is located in what?")
            page.check("#try-chat")
            page.click("[data-testid=ask]")
            expect(page.locator("#try-answer")).to_have_text(chat.json()["choices"][0]["message"]["content"],
                                                             timeout=20_000)
            # search the facts in force: only the match stays in the table
            page.fill("#fact-search", "river")
            page.wait_for_selector("#facts tr[data-fact-id=tower]", state="detached", timeout=10_000)
            assert page.locator("#facts tr[data-fact-id=river]").count() == 1
            expect(page.locator("#facts-range")).to_have_text("1–1 of 1 matching", timeout=10_000)
            if out := os.environ.get("SEQEDIT_SCREENSHOT"):
                page.screenshot(path=out, full_page=True)
            page.fill("#fact-search", "")
            page.wait_for_selector("#facts tr[data-fact-id=tower]", timeout=10_000)
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
