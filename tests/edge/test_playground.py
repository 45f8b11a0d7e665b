"""The playground page (edge/playground/) that the edge serves at GET /: how Envoy serves it,
and the page itself in real headless Chromium against `t2i up` — a generation with its live
progress, previews, images, seeds, charge and balance, a refused key, an error inside the
stream.

The browser is Debian's chromium and chromium-driver (`make install` installs them), driven by
Selenium with explicit paths, so nothing is downloaded. Without them these tests skip, and FAIL
under CI=true. T2I_WRITE_SCREENSHOT=1 also writes docs/playground.png from the finished page.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from t2i.edge.descriptor import write_descriptor
from t2i.edge.envoy_config import (
    CANONICAL,
    PLAYGROUND,
    PLAYGROUND_FILES,
    EdgeSettings,
    connection_manager,
    file_bodies,
    load_canonical,
    render,
)
from t2i.edge.launcher import envoy_binary
from t2i import validation
from t2i.sampling import SAMPLER_NAMES, SCHEDULER_NAMES

from .test_rest import assert_error_shape

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "playground.png"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless on a closed network: without the background-networking flags Chromium's own
# connections (updates, sync, QUIC probes) fail and slow everything down.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1100")
BAD_KEY = "ilx_not-a-real-key-000000000000000000000000"


def browser_unavailable(message: str) -> None:
    """testbed.backends.unavailable's rule: skip on a developer's machine, fail in CI."""
    message = f"{message}; `make install` installs selenium (the test extra) and Debian's chromium and chromium-driver"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        browser_unavailable(f"selenium is not installed ({error})")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            browser_unavailable(f"{path} is missing")
    options = Options()
    options.binary_location = CHROMIUM  # with the driver's path below: Selenium Manager never runs
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def base_url(edge) -> str:
    return f"http://127.0.0.1:{edge.http_port}"


def wait(driver, predicate, timeout: float = 30, what: str = "the page"):
    """predicate(driver)'s first truthy value, polled every 20 ms."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate(driver)
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; page status: {text(driver, 'status')!r}, "
                        f"error: {text(driver, 'error')!r}")
        time.sleep(0.02)


def text(driver, element_id: str) -> str:
    return driver.execute_script("const e = document.getElementById(arguments[0]); return e ? e.textContent : null;",
                                 element_id)


def fill(driver, element_id: str, value) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(str(value))


def set_key(driver, key: str) -> None:
    from selenium.webdriver.common.keys import Keys

    fill(driver, "api-key", key)
    driver.find_element("id", "api-key").send_keys(Keys.TAB)  # "change": remembered, models listed


def open_page(driver, edge) -> None:
    driver.get(base_url(edge) + "/")
    wait(driver, lambda d: options(d, "sampler"), what="the script")


def options(driver, select_id: str) -> list[str]:
    return driver.execute_script("return [...document.getElementById(arguments[0]).options].map(o => o.value)", select_id)


def validate(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)], check=False, capture_output=True,
                          text=True)


def page_errors(driver) -> list[dict]:
    """Console errors (a CSP violation, a failed load, an exception) since the last call."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


STATE = """
const bar = document.getElementById('progress');
const preview = document.getElementById('preview');
return {value: bar.value, max: bar.max,
        preview: document.getElementById('preview-box').hidden ? '' : (preview.getAttribute('src') || '').slice(0, 30),
        images: document.querySelectorAll('#images img.result').length,
        error: document.getElementById('error').hidden ? '' : document.getElementById('error').textContent};
"""


# --- what Envoy serves ---------------------------------------------------------------------------

def test_the_edge_serves_the_page_its_script_and_its_style(edge):
    served = (("/", "index.html", "text/html"), ("/playground.js", "playground.js", "text/javascript"),
              ("/playground.css", "playground.css", "text/css"))
    for path, name, content_type in served:
        reply = edge.request("GET", path)
        assert reply.status == 200, (path, reply.body[:300])
        assert reply.headers["content-type"] == f"{content_type}; charset=utf-8"
        assert reply.headers["x-content-type-options"] == "nosniff" and reply.headers["cache-control"] == "no-cache"
        assert reply.body == (PLAYGROUND / name).read_bytes()
    page = edge.request("GET", "/?from=bookmark")
    assert page.status == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    head = edge.request("HEAD", "/")
    assert head.status == 200 and head.body == b""
    # Only GET and HEAD: anything else at / is an unknown endpoint, in the API's error shape.
    assert_error_shape(edge.request("POST", "/", {"prompt": "x"}, {"content-type": "application/json"}), 404,
                       "NOT_FOUND", "no such endpoint: POST /")
    # ...and the API's own paths are not shadowed.
    assert edge.request("GET", "/model/list", headers={"x-illustrious-api-key": edge.demo_key}).status == 200


def test_t2i_up_prints_the_playground_url(edge):
    assert f"  playground:         http://localhost:{edge.http_port}/" in "".join(edge.stdout)


def test_the_local_copy_points_at_the_repository_files_and_notices_a_moved_one():
    bodies = file_bodies(render(EdgeSettings()))
    assert sorted(b["filename"] for b in bodies) == sorted(str(PLAYGROUND / name) for name in PLAYGROUND_FILES)
    canonical = load_canonical()
    file_bodies(canonical)[0]["filename"] = "/etc/envoy/elsewhere.html"
    with pytest.raises(ValueError, match="the files the routes serve"):
        render(EdgeSettings(), canonical)


def test_every_file_fits_envoys_direct_response_limit():
    limit = connection_manager(load_canonical())["route_config"]["max_direct_response_body_size_bytes"]
    for name in PLAYGROUND_FILES:
        size = (PLAYGROUND / name).stat().st_size
        # Room to grow before Envoy refuses the whole config.
        assert size <= limit // 2, f"edge/playground/{name} is {size} bytes; Envoy's limit is {limit}"
    pages = sorted(p.name for p in PLAYGROUND.iterdir() if p.suffix in (".html", ".js", ".css"))
    assert pages == sorted(PLAYGROUND_FILES), "a file the routes do not serve (or one missing)"


def test_envoy_validates_the_config_with_the_files_where_kubernetes_mounts_them(tmp_path):
    """/etc/envoy as the edge pod sees it: envoy.yaml, the descriptor and playground/ (the
    canonical file with only that folder moved)."""
    etc = tmp_path / "etc-envoy"
    write_descriptor(etc / "text_to_image.pb")
    (etc / "playground").mkdir()
    for name in PLAYGROUND_FILES:
        (etc / "playground" / name).write_bytes((PLAYGROUND / name).read_bytes())
    config = etc / "envoy.yaml"
    config.write_text(CANONICAL.read_text().replace("/etc/envoy/", f"{etc}/"))
    result = validate(config)
    assert result.returncode == 0 and "OK" in result.stdout + result.stderr, result.stderr[-2000:]
    (etc / "playground" / "playground.css").unlink()
    result = validate(config)
    assert result.returncode != 0 and "playground.css" in result.stdout + result.stderr


def test_the_page_loads_nothing_from_elsewhere():
    for name in PLAYGROUND_FILES:
        source = (PLAYGROUND / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", source, re.IGNORECASE), name
        assert "@import" not in source and "import(" not in source, name
    page = (PLAYGROUND / "index.html").read_text()
    assert re.findall(r'(?:src|href)="([^"]*)"', page) == ["data:,", "/playground.css", "/playground.js"]


# --- the page in a browser -----------------------------------------------------------------------

def test_a_generation_shows_progress_previews_images_seeds_charge_and_balance(browser, edge, ledger):
    open_page(browser, edge)
    assert options(browser, "sampler") == list(SAMPLER_NAMES)
    assert options(browser, "scheduler") == list(SCHEDULER_NAMES)
    # The form carries the API's limits (t2i.validation), so the browser refuses what the API would.
    field = "return [document.getElementById(arguments[0])[arguments[1]]]"
    assert browser.execute_script(field, "prompt", "maxLength")[0] == validation.MAX_PROMPT_CHARS
    assert browser.execute_script(field, "num-images", "max")[0] == str(validation.MAX_IMAGES)
    assert browser.execute_script(field, "width", "step")[0] == str(validation.SIZE_MULTIPLE)
    assert float(browser.execute_script(field, "cfg-scale", "max")[0]) == validation.MAX_CFG_SCALE
    set_key(browser, edge.demo_key)
    wait(browser, lambda d: options(d, "model"), what="the model list")
    assert browser.find_element("id", "model").get_attribute("value") == "1"
    assert "demo" in browser.find_element("css selector", "#model option").text
    # The key is remembered: a reload fills it in again.
    open_page(browser, edge)
    assert browser.find_element("id", "api-key").get_attribute("value") == edge.demo_key
    wait(browser, lambda d: options(d, "model"), what="the model list")

    fill(browser, "prompt", "masterpiece, best quality, 1girl, pink hair, cherry blossoms")
    fill(browser, "negative-prompt", "worst quality, lowres")
    for element_id, value in (("width", 256), ("height", 256), ("steps", 24), ("cfg-scale", 6.5), ("seed", -1),
                              ("num-images", 2)):
        fill(browser, element_id, value)
    assert browser.find_element("id", "previews").is_selected()
    before = ledger.find_key(edge.demo_key).balance
    # Progress and previews are throttled in wall-clock time: hold each of the first four UNet
    # forwards 0.55 s (over the 500 ms preview interval), so that the page has progress at
    # steps 1 to 4 and a preview to show however fast the machine computes them.
    edge.gate.close()
    pacer = threading.Thread(target=edge.gate.pace, args=(4, 0.55), daemon=True)
    pacer.start()
    try:
        browser.find_element("id", "generate").click()
        samples = []
        deadline = time.monotonic() + 120  # only guards against a hang
        while True:
            state = browser.execute_script(STATE)
            assert not state["error"], state["error"]
            samples.append(state)
            if state["images"] == 2:
                break
            assert time.monotonic() < deadline, samples[-1]
            time.sleep(0.02)
    finally:
        edge.gate.open()
        pacer.join(60)

    during = [s for s in samples if s["images"] == 0]
    values = [s["value"] for s in during]
    assert values == sorted(values), values  # the bar never goes back
    moving = sorted({v for v in values if 0 < v < 24})
    assert len(moving) >= 3, f"the progress bar was seen at {moving} only (samples: {len(samples)})"
    assert any(s["preview"].startswith("data:image/jpeg;base64,") for s in during), "no live preview was shown"
    final = samples[-1]
    assert final["value"] == final["max"] == 24

    wait(browser, lambda d: all(d.execute_script(
        "return [...document.querySelectorAll('#images img.result')].map(i => i.complete && i.naturalWidth > 0)")),
        what="the images to decode")
    images = browser.execute_script(
        "return [...document.querySelectorAll('#images img.result')].map(i => [i.naturalWidth, i.naturalHeight])")
    assert images == [[256, 256], [256, 256]]
    # Images of one request share its seed (one noise draw for the batch).
    seed = text(browser, "seeds")
    assert seed.isdigit(), seed
    captions = [e.text for e in browser.find_elements("css selector", "#images .seed")]
    assert captions == [f"seed {seed}, image 1 of 2", f"seed {seed}, image 2 of 2"]
    charge, balance = int(text(browser, "charge")), int(text(browser, "balance"))
    assert charge > 0 and balance == before - charge == ledger.find_key(edge.demo_key).balance
    assert browser.find_element("id", "summary").is_displayed()
    assert not page_errors(browser)  # no CSP violation, no failed load, no exception

    if os.environ.get("T2I_WRITE_SCREENSHOT") == "1":
        write_screenshot(browser, SCREENSHOT)

    # "use seed" sets up the same request again: that seed, the same number of images.
    browser.find_elements("css selector", "#images figcaption button")[1].click()
    assert browser.find_element("id", "seed").get_attribute("value") == seed
    assert browser.find_element("id", "num-images").get_attribute("value") == "2"


def write_screenshot(browser, path: Path) -> None:
    """The whole page, however tall (Chrome DevTools' captureBeyondViewport)."""
    import base64

    width, height = browser.execute_script(
        "return [document.documentElement.clientWidth, document.documentElement.scrollHeight]")
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
    })
    path.write_bytes(base64.b64decode(shot["data"]))


def test_a_refused_key_shows_the_apis_error(browser, edge):
    open_page(browser, edge)
    set_key(browser, BAD_KEY)
    wait(browser, lambda d: "unknown API key" in (text(d, "models-status") or ""), what="the model list to be refused")
    assert "401 UNAUTHENTICATED" in text(browser, "models-status")
    fill(browser, "width", 64)
    fill(browser, "height", 64)
    fill(browser, "steps", 2)
    browser.find_element("id", "generate").click()
    message = wait(browser, lambda d: browser.execute_script(STATE)["error"], what="the error message")
    assert message.startswith("401 UNAUTHENTICATED: unknown API key (request id "), message
    assert browser.find_element("id", "error").is_displayed()
    assert browser.execute_script(STATE)["images"] == 0
    assert browser.find_element("id", "generate").is_enabled()
    # The failed calls themselves are console errors; nothing else is.
    errors = page_errors(browser)
    assert errors and all("401" in e["message"] for e in errors), errors
    set_key(browser, edge.demo_key)  # the next test's page starts with a working key


def test_stop_ends_the_generation_and_nothing_is_charged(browser, edge, ledger):
    open_page(browser, edge)
    wait(browser, lambda d: options(d, "model"), what="the model list")
    for element_id, value in (("width", 256), ("height", 256), ("steps", 150), ("num-images", 1)):
        fill(browser, element_id, value)
    before = ledger.find_key(edge.demo_key).balance
    with edge.gate:  # the generation is held in its first UNet forward until it was stopped
        browser.find_element("id", "generate").click()
        edge.gate.wait_held(rows=2)
        wait(browser, lambda d: d.find_element("id", "stop").is_enabled(), what="the stop button")
        browser.find_element("id", "stop").click()
        wait(browser, lambda d: (text(d, "status") or "").startswith("Stopped."), what="the stop")
    assert browser.execute_script(STATE)["images"] == 0 and not browser.execute_script(STATE)["error"]
    assert browser.find_element("id", "generate").is_enabled() and not browser.find_element("id", "stop").is_enabled()
    deadline = time.monotonic() + 60  # the release is queued, not awaited; this only guards against a hang
    while ledger.find_key(edge.demo_key).reserved and time.monotonic() < deadline:
        time.sleep(0.05)
    after = ledger.find_key(edge.demo_key)
    assert (after.balance, after.reserved) == (before, 0)


FAKE_STREAM = """
// The stream as arbitrary chunks, cut inside lines and inside the blank line between events.
const text = arguments[0];
window.fetch = async (url, init) => {
  if (!String(url).endsWith('/stream')) return new Response('{"models": []}');
  const bytes = new TextEncoder().encode(text);
  const stream = new ReadableStream({
    start(controller) {
      for (let i = 0; i < bytes.length; i += 7) controller.enqueue(bytes.slice(i, i + 7));
      controller.close();
    },
  });
  return new Response(stream, {status: 200, headers: {'content-type': 'text/event-stream', 'x-request-id': 'fake-1'}});
};
"""


def test_an_error_inside_the_stream_is_shown(browser, edge):
    open_page(browser, edge)
    events = [{"queued": {"position": 1, "ahead": 0}}, {"started": {"queueSeconds": 0.01}},
              {"progress": {"step": 3, "totalSteps": 10, "evaluations": 3, "totalEvaluations": 10,
                            "elapsedSeconds": 0.3, "remainingSeconds": 0.7}},
              {"error": {"code": 500, "status": "INTERNAL", "message": "the engine failed: \"boom\""}}]
    # Both line ends servers use.
    stream = "".join(f"data: {json.dumps(e)}" + ("\r\n\r\n" if i % 2 else "\n\n") for i, e in enumerate(events))
    browser.execute_script(FAKE_STREAM, stream)
    browser.find_element("id", "generate").click()
    message = wait(browser, lambda d: browser.execute_script(STATE)["error"], what="the error message")
    assert message == '500 INTERNAL: the engine failed: "boom" (request id fake-1)'
    assert browser.execute_script(STATE)["value"] == 3 and text(browser, "status") == "Failed."
