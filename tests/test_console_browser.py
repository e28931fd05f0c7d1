"""The console in a real browser: Debian's headless Chromium driven by Selenium through
chromium-driver, against a run of the demo clip on the embedded bus (the tiny model; threshold
0 so the random-weight model raises the clip's event for sure), then against `linewatch console`
restarted on the run's archive; and the first things a new user sees: a Live tile before its
first frame and after its stream ended, an archive-only console (it opens on Alerts), Compare
on an embedded run. Screenshots go to runs/test-artifacts/console/ (gitignored)."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import pytest

from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import FrameRef, SessionEnd, encode
from linewatch.console.store import ConsoleStore
from linewatch.synthetic.demo import write_demo_clip
from linewatch.pipeline.settings import load_settings
from linewatch.sinks.events import AlertPolicy, AlertTracker
from linewatch.sinks.archive import Archive

from helpers import Processes, publish, score_msg, wait_for

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


def console_url(processes: Processes, *args: str) -> str:
    """`linewatch console ARGS` started as a process; its URL."""
    processes.start("console", "console", *args, "--port", "0", "--tile-url", UNREACHABLE_TILES, "--metrics-port", "off")
    processes.wait_for_line("console", "console at http://", 120)
    return re.search(r"console at (http://\S+/)", processes.log("console")).group(1)


def broken_images(driver) -> list[str]:
    """The <img> elements the page shows (displayed) that have no picture: a broken-image icon."""
    return js(driver, "return [...document.images].filter(i => i.getClientRects().length"
                      " && !(i.complete && i.naturalWidth > 0)).map(i => i.outerHTML)")


def write_archive_with_one_event(folder: Path) -> str:
    """An archive as a run leaves it: the frames as the archive sink writes them, and the event in
    the archive's index (``index.sqlite``) as a run that records its events does. Its event id."""
    archive, store = Archive(folder), ConsoleStore(folder / "index.sqlite")
    tracker, event_ids = AlertTracker(lambda stream: AlertPolicy(k=2, n=3)), set()
    try:
        for seq, bit in enumerate("0011110000"):
            score = score_msg(seq, 0.9 if bit == "1" else 0.1, stream="drone-1")
            score = score.model_copy(update={"frame": score.frame.model_copy(update={"session": "s1"})})
            archive.add(score)
            for alert in tracker.push(score):
                store.upsert_event(alert)
                event_ids.add(alert.event_id)
        for alert in tracker.end(SessionEnd(stream="drone-1", session="s1", frames=10, ts=5000.0)):
            store.upsert_event(alert)
    finally:
        archive.close()
        store.close()
    [event_id] = event_ids
    return event_id


def test_an_archive_only_console_opens_on_alerts_with_the_archived_event(browser, tmp_path):
    event_id = write_archive_with_one_event(tmp_path / "archive")
    processes = Processes(tmp_path)
    try:
        url = console_url(processes, "--archive", str(tmp_path / "archive"))
        browser.get(url)  # no #tab in the address: the console picks
        row = f"#alerts tbody tr[data-event-id='{event_id}']"
        wait_for(lambda: js(browser, f"return Boolean(document.querySelector(\"{row}\"))"), 30,
                 "the archived event in the alert list", lambda: seen(browser))
        assert js(browser, "return document.getElementById('tab-live').hidden "
                           "&& !document.getElementById('tab-alerts').hidden")
        assert browser.find_element("css selector", "nav a.active").text == "Alerts"
        assert "closed" in browser.find_element("css selector", row).text
        shot(browser, "7-archive-opens-on-alerts")
        browser.find_element("css selector", row).click()
        wait_for(lambda: js(browser, "const i = document.getElementById('event-overlay');"
                                     "return i.complete && i.naturalWidth > 0"), 30, "the event's overlay from the archive")
    finally:
        processes.stop_all()


def test_compare_on_an_embedded_run_explains_how_to_get_two_result_sets(browser):
    from linewatch.console.service import serve

    # what `linewatch run --console` opens: the console on the run's in-process bus
    server = serve(load_settings(None, {"console": {"port": 0, "tile_url": UNREACHABLE_TILES}}), MemoryBus(),
                   lambda stream: AlertPolicy(k=2, n=3))
    try:
        browser.get(server.url + "#compare")
        how = "return document.getElementById('compare-how').hidden ? '' : document.getElementById('compare-how').innerText"
        wait_for(lambda: js(browser, how), 30, "Compare's explanation", lambda: seen(browser))
        text = js(browser, how)
        assert "embedded run" in text and "one result set (linewatch.scores)" in text and "replay" in text
        assert "linewatch replay --bootstrap-servers" in text and "--results-topic linewatch.replay." in text
        assert "linewatch.scores" in browser.find_element("id", "compare-topics").text
        assert "two results topics" in browser.find_element("css selector", "#tab-compare .about").text
        # nothing to pick, no empty result boxes
        assert not browser.find_element("id", "compare-form").is_displayed()
        assert not browser.find_element("id", "compare-result").is_displayed()
        shot(browser, "8-compare-embedded")
    finally:
        server.stop()


def test_a_live_tile_waits_for_its_first_frame_without_a_broken_image_and_says_when_it_ended(browser):
    """The page from the start of a run: start-up's stage, a tile whose frame is published but not
    yet scored (a placeholder, never a broken image), its first overlay, its end."""
    from linewatch.console.service import serve

    bus = MemoryBus()
    server = serve(load_settings(None, {"console": {"port": 0, "tile_url": UNREACHABLE_TILES}}), bus)
    tile = ".tile[data-stream='drone-1']"
    try:
        # a process still starting (start-up's stages) says so, as `run --console` does before the model is ready
        stage = {"stage": "calibrating", "step": 3, "steps": 4, "text": "starting: calibrating (3/4)"}
        server.console.live.stage = lambda: stage
        browser.get(server.url)
        wait_for(lambda: browser.find_element("id", "starting").text == stage["text"], 30, "the start-up stage",
                 lambda: seen(browser))
        assert browser.find_element("id", "status").text == "starting" and broken_images(browser) == []
        server.console.live.stage = lambda: None
        wait_for(lambda: browser.find_element("id", "status").text == "live", 30, "the live stream", lambda: seen(browser))
        assert not browser.find_element("id", "starting").is_displayed() and broken_images(browser) == []
        publish(bus, "drone-1", 0)  # ingest published the first frame; the worker has not scored it yet
        wait_for(lambda: js(browser, f"return Boolean(document.querySelector(\"{tile}\"))"), 30, "the stream's tile")
        assert broken_images(browser) == []
        assert browser.find_element("css selector", f"{tile} .placeholder").text == "waiting for the first frame…"
        shot(browser, "9-live-waiting-for-the-first-frame")

        score = score_msg(0, 0.9, stream="drone-1", ts=1000.0)  # its frame JPEG goes with it (anomalous)
        score = score.model_copy(update={"frame_ref": FrameRef(topic=bus.topics.frames, partition=0, offset=0)})
        bus.producer().send(bus.topics.scores, encode(score), key=b"drone-1")
        wait_for(lambda: js(browser, f"const i = document.querySelector(\"{tile} img\");"
                                     "return Boolean(i && i.naturalWidth > 0)"), 30, "the first overlay")
        assert broken_images(browser) == [] and not js(browser, f"return document.querySelector(\"{tile} .placeholder\")")
        assert browser.find_element("css selector", f"{tile} .lag").text == "lag 0 frames"
        shot(browser, "10-live-first-overlay")

        bus.producer().send(bus.topics.scores, encode(SessionEnd(stream="drone-1", frames=1, ts=1000.0)),
                            key=b"drone-1", timestamp_ms=1_800_000_000_000)  # 2027-01-15T08:00:00Z
        wait_for(lambda: js(browser, f"return document.querySelector(\"{tile}\").dataset.state") == "ended", 30,
                 "the stream's end")
        numbers = browser.find_element("css selector", f"{tile} .numbers").text
        assert "ended 08:00:00 UTC" in numbers and "frames/s" not in numbers and "lag" not in numbers
        shot(browser, "11-live-ended")
    finally:
        server.stop()
