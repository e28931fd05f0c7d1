"""The console in a real browser: Debian's headless Chromium driven by Selenium through
chromium-driver, against a run of the demo clip on the embedded bus (the tiny model; threshold
0 so the random-weight model raises the clip's event for sure), then against `linewatch console`
restarted on the run's archive. Screenshots go to runs/test-artifacts/console/ (gitignored)."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import pytest

from linewatch.ingest.demo import write_demo_clip
from linewatch.pipeline.settings import load_settings

from helpers import Processes, wait_for

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "runs" / "test-artifacts" / "console"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000"]
UNREACHABLE_TILES = "http://127.0.0.1:9/{z}/{x}/{y}.png"  # the discard port: refused, so the map goes plain


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (scripts/test.sh installs them from Debian)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def seen(driver) -> str:
    """What the page shows, for a failure message."""
    return js(driver, "return JSON.stringify({status: document.getElementById('status').textContent, hash: location.hash,"
                      "tiles: [...document.querySelectorAll('.tile')].map(t => [t.dataset.stream,"
                      "t.querySelector('canvas').dataset.points])})")


def points(driver) -> int:
    return int(js(driver, "const c = document.querySelector('.tile[data-stream=\"drone-1\"] canvas');"
                          "return c ? Number(c.dataset.points) : 0;"))


def test_console_shows_a_demo_run_and_keeps_its_review(browser, tmp_path, monkeypatch):
    from linewatch.console.service import serve
    from linewatch.pipeline.embedded import run_embedded
    from linewatch.pipeline.wiring import policy_table
    from linewatch.workers.worker import ScoringWorker

    clip = write_demo_clip(tmp_path / "clip", seconds=6, fps=5, size=(320, 180), references=3)
    references = clip.references[0].parent
    out = tmp_path / "out"
    settings = load_settings(None, {
        "backbone": {"arch": "linewatch-tiny", "image_size": 64},
        "profile": {"threshold": 0.0, "references": str(references)},
        "worker": {"max_batch": 2, "max_wait_ms": 0},
        "alerts": {"policy": {"k": 3, "n": 10}},
        "console": {"port": 0, "tile_url": UNREACHABLE_TILES}})

    # The run waits after its first batch until the page shows it, so the test sees the timeline grow
    # from there whatever the machine's speed.
    release, real_finish, batches = threading.Event(), ScoringWorker.finish, []

    def finish(self, batch, producer):
        real_finish(self, batch, producer)
        batches.append(len(batch.records))
        if len(batches) == 1:
            release.wait(120)

    monkeypatch.setattr(ScoringWorker, "finish", finish)
    opened, errors = [], []

    def attach(bus, run_settings):
        opened.append(serve(run_settings, bus, policy_table(run_settings)))

    def run():
        try:
            run_embedded([str(clip.video)], settings, str(out), stream_ids=["drone-1"], progress=False, attach=attach)
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append(err)
            release.set()

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: opened or errors, 300, "the console to open")
        assert not errors, errors
        server = opened[0]
        browser.get(server.url)
        wait_for(lambda: points(browser) >= 1, 60, "the stream's tile and its first timeline points",
                 lambda: seen(browser))
        first = points(browser)
        shot(browser, "1-live-first-batch")
        release.set()
        wait_for(lambda: points(browser) > first, 120, "the timeline to grow", lambda: seen(browser))
        wait_for(lambda: points(browser) == clip.frame_count, 120, "every frame on the timeline", lambda: seen(browser))
        wait_for(lambda: js(browser, "const i = document.querySelector('.tile[data-stream=\"drone-1\"] img');"
                                     "return i.complete && i.naturalWidth > 0"), 30, "the latest frame's overlay")
        assert int(js(browser, "return Number(document.querySelector('.tile canvas').dataset.runs)")) >= 1  # shaded
        shot(browser, "2-live-whole-clip")
        runner.join(300)
        assert not runner.is_alive() and not errors, errors

        browser.find_element("css selector", "a[data-tab=alerts]").click()
        row = "#alerts tbody tr[data-event-id^='drone-1@']"
        texts = f"return [...document.querySelectorAll(\"{row}\")].map(r => r.textContent)"
        wait_for(lambda: len(found := js(browser, texts)) == 1 and "closed" in found[0], 30,
                 "the demo's event, closed, in the alert list")
        shot(browser, "3-alerts")
        browser.find_element("css selector", row).click()
        wait_for(lambda: js(browser, "const i = document.getElementById('event-overlay');"
                                     "return i.complete && i.naturalWidth > 0"), 30, "the peak frame's overlay")
        assert js(browser, "return document.getElementById('event-mask').naturalWidth") > 0
        browser.find_element("css selector", "input[name=verdict][value=false_alarm]").click()
        browser.find_element("css selector", "#review textarea").send_keys("glare on the insulator string")
        browser.find_element("css selector", "#review button[type=submit]").click()
        wait_for(lambda: browser.find_element("id", "review-saved").text.startswith("saved"), 30, "the review saved")
        before = {p.name for p in references.iterdir()}
        browser.find_element("css selector", "#feedback button[data-target=references]").click()
        wait_for(lambda: "added to" in browser.find_element("id", "feedback-result").text, 30, "frames added")
        added = {p.name for p in references.iterdir()} - before
        assert added and all(name.startswith("feedback-drone-1-") and name.endswith(".jpg") for name in added)
        shot(browser, "4-event-false-alarm")
    finally:
        release.set()
        for server in opened:
            server.stop()

    # A restarted console (the CLI, on the run's archive only) still knows the event and its review.
    processes = Processes(tmp_path)
    try:
        processes.start("console", "console", "--archive", str(out / "archive"), "--port", "0",
                        "--tile-url", UNREACHABLE_TILES, "--metrics-port", "off")
        processes.wait_for_line("console", "console at http://", 120)
        url = re.search(r"console at (http://\S+/)", processes.log("console")).group(1)
        browser.get(url + "#alerts")
        wait_for(lambda: "false alarm" in js(browser, f"const r = document.querySelector(\"{row}\");"
                                                      "return r ? r.textContent : ''"), 30,
                 "the review after a restart")
        assert "glare on the insulator string" in browser.find_element("css selector", row).text
        shot(browser, "5-alerts-after-restart")

        browser.get(url + "#map")
        wait_for(lambda: js(browser, "return document.querySelectorAll('path.flight-path').length") == 1, 30,
                 "the flight path")
        wait_for(lambda: js(browser, "return document.querySelectorAll('.leaflet-marker-icon').length") == 1, 30,
                 "the event's marker")
        wait_for(lambda: js(browser, "return document.getElementById('map').classList.contains('plain')"), 30,
                 "the plain background when no tiles load")
        shot(browser, "6-map")
    finally:
        processes.stop_all()
