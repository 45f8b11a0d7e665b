"""The playground's image to image and hires fix (edge/playground/), in real headless Chromium
against `t2i up`, as tests/edge/test_playground.py runs the page (its browser fixture and
helpers): a picture uploaded from a file or taken from the last result, a mask painted on the
canvas with the mouse, the denoise slider, and hires fix.

What the page sends is read from a fetch() wrapper the test puts in the page; what comes back
is read from the page's own result. Without Chromium these tests skip, and FAIL under CI=true.
T2I_IMAGE_SCREENSHOT=PATH also writes a screenshot of the page with a painted mask to PATH.
"""

from __future__ import annotations

import base64
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from t2i.domain import RESIZE_MODES, UPSCALE_METHODS

from .test_playground import (  # noqa: F401 (browser: the fixture, shared with the text-to-image tests)
    STATE,
    browser,
    fill,
    open_page,
    options,
    page_errors,
    set_key,
    text,
    wait,
    write_screenshot,
)

SIZE = 64
STEPS = 2

RECORD_REQUESTS = """
// Every POST the page makes, as {url, body (parsed)}, then the real fetch().
window.sentRequests = [];
const realFetch = window.fetch;
window.fetch = (url, init) => {
  if (init && init.method === 'POST') window.sentRequests.push({url: String(url), body: JSON.parse(init.body)});
  return realFetch.call(window, url, init);
};
"""

RECORD_POINTER = """
// The mask canvas's pointerdown and pointerup, in its own pixels: where a stroke began and ended.
window.strokeEnds = [];
const canvas = document.getElementById('mask-canvas');
if (!window.recordingStrokes) for (const kind of ['pointerdown', 'pointerup']) {
  window.recordingStrokes = true;
  canvas.addEventListener(kind, (e) => {
    const r = canvas.getBoundingClientRect();
    window.strokeEnds.push({kind, x: (e.clientX - r.left) * canvas.width / r.width,
                            y: (e.clientY - r.top) * canvas.height / r.height,
                            brush: Number(document.getElementById('brush-size').value) * canvas.width / r.width});
  });
}
"""

RESULTS = """
return [...document.querySelectorAll('#images img.result')].map(
  (i) => ({done: i.complete && i.naturalWidth > 0, width: i.naturalWidth, height: i.naturalHeight, src: i.src}));
"""


def png(width: int, height: int) -> bytes:
    """A small picture with something in it: a color gradient."""
    picture = Image.new("RGB", (width, height))
    picture.putdata([(x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)])
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def ready(driver, edge) -> None:
    """The page, its key set and its models listed, recording what it sends."""
    open_page(driver, edge)
    set_key(driver, edge.demo_key)
    wait(driver, lambda d: options(d, "model"), what="the model list")
    fill(driver, "steps", STEPS)
    driver.execute_script(RECORD_REQUESTS)
    page_errors(driver)  # start from none


def upload(driver, path: Path, width: int, height: int) -> None:
    driver.find_element("id", "init-image").send_keys(str(path))
    wait(driver, lambda d: f"Picture {width}x{height}" in (text(d, "picture-status") or ""), what="the picture")
    assert driver.find_element("id", "picture-box").is_displayed()


def generate(driver) -> tuple[dict, list[dict]]:
    """Clicks Generate; the request the page sent and the images it shows once decoded."""
    before = driver.execute_script("return window.sentRequests.length")
    driver.find_element("id", "generate").click()
    wait(driver, lambda d: d.execute_script(STATE)["error"] or (
        (results := d.execute_script(RESULTS)) and all(r["done"] for r in results)), what="the images")
    assert not driver.execute_script(STATE)["error"], driver.execute_script(STATE)["error"]
    sent = driver.execute_script("return window.sentRequests")
    assert len(sent) == before + 1
    return sent[-1], driver.execute_script(RESULTS)


def result_base64(src: str) -> str:
    assert src.startswith("data:image/png;base64,"), src[:40]
    return src.split(",", 1)[1]


def set_range(driver, element_id: str, value) -> None:
    """A range input moved by the user: the value, then the input event."""
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input', {bubbles: true}));", element_id, str(value))


def stroke(driver, start: tuple[float, float], end: tuple[float, float]) -> dict:
    """Drags the mouse over the mask canvas from `start` to `end` (fractions of its width and
    height); returns where the page saw the stroke begin and end, in canvas pixels."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "mask-canvas")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    driver.execute_script(RECORD_POINTER)
    width, height = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", canvas)

    def offset(fraction: tuple[float, float]) -> tuple[int, int]:  # from the element's center
        return round((fraction[0] - 0.5) * width), round((fraction[1] - 0.5) * height)

    (x0, y0), (x1, y1) = offset(start), offset(end)
    ActionChains(driver).move_to_element_with_offset(canvas, x0, y0).click_and_hold() \
        .move_by_offset(x1 - x0, y1 - y0).release().perform()
    ends = driver.execute_script("return window.strokeEnds")
    assert [e["kind"] for e in ends] == ["pointerdown", "pointerup"], ends
    return {"start": (ends[0]["x"], ends[0]["y"]), "end": (ends[1]["x"], ends[1]["y"]), "brush": ends[0]["brush"]}


def distance(point: tuple[float, float], segment: dict) -> float:
    """From a point to the stroke's segment."""
    (ax, ay), (bx, by), (px, py) = segment["start"], segment["end"], point
    length = (bx - ax) ** 2 + (by - ay) ** 2
    t = 0.0 if length == 0 else max(0.0, min(1.0, ((px - ax) * (bx - ax) + (py - ay) * (by - ay)) / length))
    return math.hypot(px - (ax + t * (bx - ax)), py - (ay + t * (by - ay)))


def mask_of(body: dict) -> Image.Image:
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"])))
    assert mask.format == "PNG"
    pixels = np.asarray(mask.convert("RGBA"))
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all(), "gray levels"
    assert (pixels[..., 3] == 255).all(), "opaque"
    return mask.convert("L")


# --- image to image -------------------------------------------------------------------------------

def test_a_picture_is_sent_to_the_image_route_and_comes_back_at_its_size(browser, edge, tmp_path):
    ready(browser, edge)
    assert options(browser, "resize-mode") == list(RESIZE_MODES)
    assert not browser.find_element("id", "picture-box").is_displayed()
    assert not browser.find_element("id", "denoise").is_displayed()  # only with a picture
    assert not browser.find_element("id", "use-last").is_enabled()  # nothing generated yet
    picture = tmp_path / "start.png"
    picture.write_bytes(png(SIZE, SIZE))
    upload(browser, picture, SIZE, SIZE)
    # The picture is on the canvas at its own pixels, the mask canvas over it at the same size.
    assert browser.execute_script(
        "return ['picture-canvas', 'mask-canvas'].map(id => [document.getElementById(id).width,"
        " document.getElementById(id).height])") == [[SIZE, SIZE], [SIZE, SIZE]]
    assert browser.find_element("id", "denoise").is_displayed()
    assert browser.find_element("id", "denoise").get_attribute("value") == "0.6"
    assert text(browser, "denoise-value") == "0.6"
    set_range(browser, "denoise", 0.75)
    assert text(browser, "denoise-value") == "0.75"
    # Its own size by default: the width and height fields do not apply.
    assert not browser.find_element("id", "width").is_enabled()
    assert f"output {SIZE}x{SIZE}" in text(browser, "picture-status")

    sent, results = generate(browser)
    assert sent["url"].endswith("/image-to-image/generate/stream"), sent["url"]
    body = sent["body"]
    assert base64.b64decode(body["initImage"]) == picture.read_bytes()
    assert (body["width"], body["height"], body["denoise"], body["resizeMode"]) == (0, 0, 0.75, "just-resize")
    assert "mask" not in body and "hiresFix" not in body  # nothing painted, hires fix off
    assert [(r["width"], r["height"]) for r in results] == [(SIZE, SIZE)]
    assert text(browser, "status").startswith("Done in ")
    assert int(text(browser, "charge")) > 0
    assert not page_errors(browser)  # no CSP violation (canvas, FileReader, data: images), no exception

    # Removed: text to image again, at the width and height fields.
    browser.find_element("id", "remove-picture").click()
    assert not browser.find_element("id", "picture-box").is_displayed()
    assert browser.find_element("id", "width").is_enabled()
    assert text(browser, "picture-status") == "No picture: text to image."


def test_a_painted_stroke_is_sent_as_a_mask_white_where_painted(browser, edge, tmp_path):
    ready(browser, edge)
    picture = tmp_path / "start.png"
    picture.write_bytes(png(SIZE, SIZE))
    upload(browser, picture, SIZE, SIZE)
    assert text(browser, "mask-status").startswith("No mask")
    set_range(browser, "brush-size", 48)
    assert text(browser, "brush-size-value") == "48 px"
    # A horizontal stroke across the middle.
    line = stroke(browser, (0.25, 0.5), (0.75, 0.5))
    radius = line["brush"] / 2
    assert radius > 2, line  # the brush is in screen pixels; the 64-pixel picture is shown larger
    assert text(browser, "mask-status").startswith("Mask: ")

    sent, results = generate(browser)
    assert sent["url"].endswith("/image-to-image/generate/stream")
    assert [(r["width"], r["height"]) for r in results] == [(SIZE, SIZE)]
    mask = mask_of(sent["body"])
    assert mask.size == (SIZE, SIZE)  # the picture's own size, not the canvas's shown size
    inside = outside = 0
    for y in range(SIZE):
        for x in range(SIZE):
            d = distance((x + 0.5, y + 0.5), line)
            value = mask.getpixel((x, y))
            if d < radius - 1:  # well inside the brush: white
                assert value == 255, ((x, y), value, d, line)
                inside += 1
            elif d > radius + 1:  # clear of it (a soft edge between): black
                assert value == 0, ((x, y), value, d, line)
                outside += 1
    assert inside > 50 and outside > 1000, (inside, outside)
    if os.environ.get("T2I_IMAGE_SCREENSHOT"):
        write_screenshot(browser, Path(os.environ["T2I_IMAGE_SCREENSHOT"]))

    # Erasing a vertical stroke through the middle unpaints it there and nowhere else.
    browser.find_element("id", "brush-erase").click()
    set_range(browser, "brush-size", 24)
    erased = stroke(browser, (0.5, 0.2), (0.5, 0.8))
    sent, _ = generate(browser)
    mask = mask_of(sent["body"])
    middle, left = (int(erased["start"][0]), SIZE // 2), (int(line["start"][0]) + 2, SIZE // 2)
    assert mask.getpixel(middle) == 0 and mask.getpixel(left) == 255, (middle, left, line, erased)

    # Cleared: no mask is sent; inverted from clear: all of it.
    browser.find_element("id", "clear-mask").click()
    assert text(browser, "mask-status").startswith("No mask")
    sent, _ = generate(browser)
    assert "mask" not in sent["body"] and sent["body"]["initImage"]
    browser.find_element("id", "invert-mask").click()
    sent, _ = generate(browser)
    assert (np.asarray(mask_of(sent["body"])) == 255).all()
    assert not page_errors(browser)


# --- hires fix and the last result -----------------------------------------------------------------

def test_hires_fix_gives_the_upscaled_size(browser, edge):
    ready(browser, edge)
    assert options(browser, "hires-upscaler") == list(UPSCALE_METHODS)
    assert not browser.find_element("id", "hires-scale").is_enabled()  # off until enabled
    fill(browser, "width", SIZE)
    fill(browser, "height", SIZE)
    browser.find_element("id", "hires-enabled").click()
    assert browser.find_element("id", "hires-scale").is_enabled()
    assert browser.find_element("id", "hires-scale").get_attribute("value") == "1.5"
    assert "upscaled to 96x96" in text(browser, "hires-size")

    sent, results = generate(browser)
    assert sent["url"].endswith("/text-to-image/generate/stream"), sent["url"]
    body = sent["body"]
    assert body["hiresFix"] == {"scale": 1.5, "upscaleMethod": "nearest-exact", "steps": 0, "denoise": 0.5}
    assert "initImage" not in body and "denoise" not in body
    assert [(r["width"], r["height"]) for r in results] == [(96, 96)]
    state = browser.execute_script(STATE)
    assert state["value"] == state["max"] == 2 * STEPS  # both passes' steps
    assert not page_errors(browser)


def test_use_the_last_result_sets_the_picture(browser, edge):
    ready(browser, edge)
    fill(browser, "width", SIZE)
    fill(browser, "height", SIZE + 8)  # not square: the picture keeps its orientation
    _, results = generate(browser)
    assert [(r["width"], r["height"]) for r in results] == [(SIZE, SIZE + 8)]
    last = result_base64(results[0]["src"])
    assert browser.find_element("id", "use-last").is_enabled()
    browser.find_element("id", "use-last").click()
    wait(browser, lambda d: f"Picture {SIZE}x{SIZE + 8}" in (text(d, "picture-status") or ""), what="the picture")
    assert browser.find_element("id", "picture-box").is_displayed()
    assert browser.execute_script(
        "const c = document.getElementById('mask-canvas'); return [c.width, c.height]") == [SIZE, SIZE + 8]

    sent, results = generate(browser)
    assert sent["url"].endswith("/image-to-image/generate/stream")
    assert sent["body"]["initImage"] == last and sent["body"]["denoise"] == 0.6
    assert [(r["width"], r["height"]) for r in results] == [(SIZE, SIZE + 8)]
    assert not page_errors(browser)


# --- errors ------------------------------------------------------------------------------------------

def test_the_apis_errors_and_unusable_files_are_shown(browser, edge, tmp_path):
    ready(browser, edge)
    picture = tmp_path / "start.png"
    picture.write_bytes(png(SIZE, SIZE))
    upload(browser, picture, SIZE, SIZE)
    # Another size than the picture's: the width and height fields, which the API judges.
    browser.find_element("id", "own-size").click()
    assert browser.find_element("id", "width").is_enabled() and browser.find_element("id", "resize-mode").is_enabled()
    browser.find_element("id", "resize-mode").send_keys("crop-and-resize")
    fill(browser, "width", 60)
    fill(browser, "height", SIZE)
    assert "resized to 60x64 (crop-and-resize)" in text(browser, "picture-status")
    browser.find_element("id", "generate").click()
    message = wait(browser, lambda d: d.execute_script(STATE)["error"], what="the error message")
    assert message.startswith("400 INVALID_ARGUMENT: invalid width 60: must be a multiple of 8"), message
    assert "(request id " in message and text(browser, "status") == "Failed."
    sent = browser.execute_script("return window.sentRequests")[-1]
    assert sent["url"].endswith("/image-to-image/generate/stream")
    assert sent["body"]["resizeMode"] == "crop-and-resize" and sent["body"]["width"] == 60

    # A file the API would refuse is refused here, and the picture is gone.
    gif = tmp_path / "moving.gif"
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    browser.find_element("id", "init-image").send_keys(str(gif))
    wait(browser, lambda d: "not a PNG, JPEG or WebP" in (text(d, "picture-status") or ""), what="the refusal")
    assert "failed" in browser.find_element("id", "picture-status").get_attribute("class")
    assert not browser.find_element("id", "picture-box").is_displayed()
    # The failed call is a console error; nothing else is.
    errors = page_errors(browser)
    assert errors and all("400" in e["message"] for e in errors), errors

