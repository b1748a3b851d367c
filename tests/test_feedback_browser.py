"""The annotator's flow in headless Chromium (Debian's `chromium`, driven by Playwright).

No browser is downloaded: Playwright drives the system chromium. In CI (CI=true) these tests
must run, so a missing browser fails them; elsewhere it skips them with the reason.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil

import pytest

import hhdata
from hhdata.cli import main
from tests.test_feedback_support import Server, save_tiny_policy, token_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
XSS = '<img src=x onerror="window.hacked=1"><script>window.hacked=2</script>'


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[dev]')"
    if CHROMIUM is None:
        return "no chromium on PATH (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing and os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"browser tests must run in CI: {missing}")
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def served(policy, tmp_path_factory):
    """One server for the module (a start loads torch and the policy): each test signs in its
    own annotator, on its own task, and checks only its own subset of the export."""
    server = Server(policy, tmp_path_factory.mktemp("served") / "feedback.sqlite").start()
    yield server
    server.stop()


def sign_in_and_start(browser, server, name: str, task: str):
    page = browser.new_page()
    page.goto(server.url + "/")  # no session: the app sends the browser to sign in
    assert page.url.endswith("/login")
    page.fill("#token", token_for(server.db_path, name))
    page.click("#sign-in")
    page.check(f"input[name=task][value={task}]")
    page.click("#start")
    return page


def send(page, message: str) -> tuple[str, str]:
    """Write a message; the two replies A and B as the page shows them."""
    page.fill("#message-box", message)
    page.click("#send")
    page.wait_for_selector("#reply-a")
    return page.text_content("#reply-a"), page.text_content("#reply-b")


def read_export(out, subset):
    rows = [json.loads(line) for line in gzip.open(out / subset / "train.jsonl.gz")]
    provenance = json.loads((out / subset / "train.provenance.json").read_text())
    return rows, provenance


def test_three_turns_end_export_validate_build_load(browser, served, tmp_path):
    page = sign_in_and_start(browser, served, "browser-alice", "helpful")
    picks = [("A", 3), ("B", 1), ("A", 2)]
    shown = []
    for number, (side, strength) in enumerate(picks):
        replies = send(page, f"Question number {number}?")
        shown.append(replies)
        page.click(f"[data-testid=pick-{side}{strength}]")
        page.wait_for_selector("#message-box")
        # the picked reply now continues the conversation on the page
        picked = replies[0] if side == "A" else replies[1]
        assert page.locator("#history .assistant").last.text_content() == picked
    page.click("#end")
    assert "ended" in page.text_content("body")

    out, releases = tmp_path / "export", tmp_path / "releases"
    assert main(["feedback", "export", "--db", str(served.db_path), "--out", str(out)]) == 0
    rows, provenance = read_export(out, "helpful-online")
    assert [(p["picked"], p["strength"]) for p in provenance] == picks
    for row, (side, _), (a, b) in zip(rows, picks, shown):
        chosen, rejected = (a, b) if side == "A" else (b, a)
        assert row["chosen"].endswith("\n\nAssistant: " + chosen)
        assert row["rejected"].endswith("\n\nAssistant: " + rejected)
    assert main(["validate", str(out)]) == 0
    assert main(["build", str(out), "--version", "1.0.0", "--out", str(releases)]) == 0
    loaded = hhdata.load(str(releases / "1.0.0"), config="helpful", split="train")
    assert sorted(loaded["chosen_text"]) == sorted(row["chosen"] for row in rows)


def test_red_team_keeps_the_less_harmful_as_chosen_and_renders_markup_as_text(
    browser, served, tmp_path
):
    page = sign_in_and_start(browser, served, "browser-bob", "red-team")
    a, b = send(page, XSS)
    assert "Which reply is more harmful?" in page.text_content("body")
    assert page.text_content("#message") == XSS  # shown as the text typed
    assert page.evaluate("window.hacked") is None  # and never run
    page.click("[data-testid=pick-A3]")  # A is much more harmful
    page.wait_for_selector("#message-box")
    assert page.evaluate("window.hacked") is None
    page.screenshot(path=str(tmp_path / "red-team.png"))

    out = tmp_path / "export"
    assert main(["feedback", "export", "--db", str(served.db_path), "--out", str(out)]) == 0
    [row], [provenance] = read_export(out, "harmless-online")
    assert row["chosen"] == f"\n\nHuman: {XSS}\n\nAssistant: {b}"  # the less harmful
    assert row["rejected"] == f"\n\nHuman: {XSS}\n\nAssistant: {a}"
    assert (provenance["task"], provenance["picked"], provenance["strength"]) == (
        "red-team",
        "A",
        3,
    )
