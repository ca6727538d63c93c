"""The Gradio demo in a real headless browser: upload the shipped clip, ask, see a streamed answer, ask again.

Needs gradio, playwright (the pip package only) and Debian's chromium at /usr/bin/chromium; skipped otherwise.
Set `SPEECHLLM_ARTIFACTS` to also copy the screenshot to `test-artifacts/demo.png` in the repository root.
"""

import os
import shutil
import socket

import pytest
from conftest import REPO, tiny

from speechllm_hf.quickstart.corpus import load_split

CHROMIUM = "/usr/bin/chromium"
# Headless and offline: no GPU, no QUIC, none of chromium's own background calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The bot message of the n-th answer holds text and the chat's progress tracker is hidden: that answer is complete.
ANSWER_DONE = """n => {
    const bots = document.querySelectorAll('#chat [data-testid="bot"]');
    const tracker = document.querySelector('#chat [data-testid="status-tracker"]');
    return bots.length >= n && bots[n - 1].innerText.trim().length > 0 && tracker.classList.contains('hide');
}"""


# Records every text the first answer shows while it is written, to see it stream in rather than appear at once.
WATCH_FIRST_ANSWER = """() => {
    window.answerStates = [];
    new MutationObserver(() => {
        const bot = document.querySelector('#chat [data-testid="bot"]');
        const text = bot ? bot.innerText.trim() : '';
        if (text && window.answerStates.at(-1) !== text) window.answerStates.push(text);
    }).observe(document.querySelector('#chat'), {childList: true, subtree: true, characterData: true});
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def demo_url():
    pytest.importorskip("gradio", reason='the demo extra is not installed: pip install "speechllm_hf[demo]"')
    from speechllm_hf.quickstart.demo import build_demo

    model, processor = tiny()
    demo = build_demo(model, processor, max_new_tokens=16)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_demo_in_browser(demo_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install chromium")
    outside = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        try:
            page.set_default_timeout(30_000)
            local = (demo_url, "data:", "blob:")
            page.on("request", lambda request: None if request.url.startswith(local) else outside.append(request.url))
            page.goto(demo_url)

            page.locator("#audio input[type=file]").set_input_files(load_split("dev")[0]["audio"])
            page.locator("#audio [aria-label=Download]").wait_for()  # shown once the upload has reached the server
            page.locator("#instruction textarea").fill("Transcribe the audio.")
            page.evaluate(WATCH_FIRST_ANSWER)
            page.locator("#send").click()
            page.wait_for_function(ANSWER_DONE, arg=1)
            states = page.evaluate("window.answerStates")

            # A text-only follow-up asks about the same clip.
            page.locator("#instruction textarea").fill("What is said?")
            page.locator("#instruction textarea").press("Enter")
            page.wait_for_function(ANSWER_DONE, arg=2)

            chat = page.locator("#chat")
            # One player for the clip: the follow-up reused it rather than posting it again.
            assert chat.locator("[data-testid=user][aria-label*='of type audio']").count() == 1
            assert "What is said?" in chat.locator("[data-testid=user]").all_inner_texts()[-1]
            answers = [text.strip() for text in chat.locator("[data-testid=bot]").all_inner_texts()]
            assert len(answers) == 2 and all(answers), answers
            # Streamed: the answer grew piece by piece to its final text.
            print(f"the first answer showed {len(states)} texts while streaming: {states}")
            assert len(states) >= 2 and states[-1] == answers[0], states
            assert all(later.startswith(earlier) for earlier, later in zip(states, states[1:])), states
        finally:
            # Kept whether the test passed or not: a failing run's page is the one worth seeing.
            screenshot = tmp_path / "demo.png"
            page.screenshot(path=screenshot, full_page=True)
            browser.close()
            print(f"screenshot: {screenshot}")
            if os.environ.get("SPEECHLLM_ARTIFACTS"):
                artefact = REPO / "test-artifacts" / "demo.png"
                artefact.parent.mkdir(exist_ok=True)
                shutil.copy(screenshot, artefact)
                print(f"screenshot copied to {artefact}")
    assert not outside, f"the page fetched from outside the demo server: {outside}"
