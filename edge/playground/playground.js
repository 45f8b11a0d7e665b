// The playground's logic: plain browser JavaScript, no build step, no dependencies. It calls the
// API on the origin that served it (Envoy serves this file at /playground.js, see edge/envoy.yaml):
//   GET  /model/list                     fills the model list (needs the key)
//   POST /text-to-image/generate/stream  server-sent events: queued, started, progress,
//                                        preview, then result or error
//   POST /image-to-image/generate/stream the same with a picture (initImage, denoise, and a
//                                        mask when one was painted)
// EventSource cannot POST, so the stream is read with fetch() and parsed here.
"use strict";

// The sampler and scheduler names the API accepts, in the documented order, the key header and
// the request limits: rendered by scripts/render.py from service/t2i/sampling/names.py,
// service/t2i/wire.py and service/t2i/validation.py
// (`make render`; `make proto-check` fails when this block is stale).
// BEGIN GENERATED: playground-names
const SAMPLERS = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp"];
const SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"];
const KEY_HEADER = "x-illustrious-api-key";
const LIMITS = {"promptChars": 3000, "images": 8, "cfgScale": 30.0, "sizeMultiple": 8};
const RESIZE_MODES = ["just-resize", "crop-and-resize", "resize-and-fill"];
const UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic"];
// END GENERATED: playground-names
const DEFAULT_SAMPLER = "euler_ancestral";
const DEFAULT_SCHEDULER = "karras";
const PICTURE_TYPES = ["image/png", "image/jpeg", "image/webp"]; // what initImage may be
const PICTURE_MAX_SHOWN_HEIGHT = 420; // CSS pixels; the canvases keep the picture's own pixels
const MASK_RGB = [194, 24, 91]; // painted strokes (the accent), shown at the mask canvas's CSS opacity
const MASK_COLOR = `rgb(${MASK_RGB.join(", ")})`;

const KEY_STORAGE = "t2i.playground.apiKey";
const PREVIEW_EVERY_STEPS = 2;

const $ = (id) => document.getElementById(id);
let models = [];
let controller = null; // the running generation's AbortController
// The picture to start from: {base64 (the file, as sent), dataUrl, width, height, name}, or null.
let picture = null;
let lastResult = null; // {base64, format} of image 1 of the last result
let stroke = null; // the mask stroke being painted: {pointerId, last: {x, y}}

// --- server-sent events ---------------------------------------------------------------------

// Calls onEvent(object) for each event's JSON (`data:` lines; a blank line ends an event) as
// the bytes arrive. Returns when the stream ends.
async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const separator = /\r\n\r\n|\n\n|\r\r/g;
  let buffer = "";
  let scanFrom = 0; // a result event can be megabytes: never rescan what was searched already
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(0), { stream: !done });
    separator.lastIndex = scanFrom;
    let match;
    while ((match = separator.exec(buffer)) !== null) {
      dispatch(buffer.slice(0, match.index), onEvent);
      buffer = buffer.slice(match.index + match[0].length);
      separator.lastIndex = 0;
    }
    scanFrom = Math.max(0, buffer.length - 3);
    if (done) {
      if (buffer.trim()) dispatch(buffer, onEvent);
      return;
    }
  }
}

function dispatch(block, onEvent) {
  const data = [];
  for (const line of block.split(/\r\n|\n|\r/)) {
    // Other fields (event:, id:, retry:) and comments (":") carry nothing this page needs.
    if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
  }
  if (!data.length) return;
  let event;
  try {
    event = JSON.parse(data.join("\n"));
  } catch (error) {
    throw new Error(`the API sent an event this page cannot read (${error.message})`);
  }
  onEvent(event);
}

// --- the API ----------------------------------------------------------------------------------

function apiKey() {
  return $("api-key").value.trim();
}

function keyHeaders(extra) {
  const headers = { ...extra };
  if (apiKey()) headers[KEY_HEADER] = apiKey(); // none: the API answers "missing API key"
  return headers;
}

// "401 UNAUTHENTICATED: unknown API key" from an error reply (the edge's one JSON shape:
// {"error": {"code", "status", "message", "requestId"}}), or what there is.
async function errorOf(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    if (error && error.message) return describe(error, error.requestId || response.headers.get("x-request-id"));
  } catch (_) {
    // not JSON: fall through
  }
  return `HTTP ${response.status}: ${text.slice(0, 300) || response.statusText}`;
}

function describe(error, requestId) {
  const head = [error.code, error.status].filter((x) => x !== undefined && x !== null && x !== "").join(" ");
  return (head ? `${head}: ` : "") + error.message + (requestId ? ` (request id ${requestId})` : "");
}

async function loadModels() {
  const status = $("models-status");
  if (!apiKey()) {
    status.textContent = "Enter an API key to list the models.";
    status.className = "hint";
    return;
  }
  status.textContent = "Listing the models...";
  status.className = "hint";
  try {
    const response = await fetch("/model/list", { headers: keyHeaders() });
    if (!response.ok) {
      // The previous list (if any) stays: the models did not change, the key did.
      status.textContent = `Could not list the models: ${await errorOf(response)}`;
      status.className = "hint failed";
      return;
    }
    models = (await response.json()).models || [];
  } catch (error) {
    status.textContent = `Could not reach the API: ${error.message}`;
    status.className = "hint failed";
    return;
  }
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...models.map((m) => new Option(`${m.id}: ${m.name}`, String(m.id))));
  if (models.some((m) => String(m.id) === previous)) select.value = previous;
  status.textContent = `${models.length} model${models.length === 1 ? "" : "s"}.`;
  status.className = "hint";
  showLimits();
}

function showLimits() {
  const model = models.find((m) => String(m.id) === $("model").value);
  if (!model) return;
  for (const id of ["width", "height"]) {
    $(id).min = model.minSize;
    $(id).max = model.maxSize;
  }
  $("steps").max = model.maxSteps;
  $("hires-steps").max = model.maxSteps;
  $("limits").textContent =
    `Model ${model.id}: width and height multiples of ${LIMITS.sizeMultiple} from ${model.minSize} to ${model.maxSize}, ` +
    `1 to ${model.maxSteps} steps, seed -1 for a random one.` +
    (model.demo ? " The demo model has random weights: its images are noise." : "");
}

function requestBody() {
  const number = (id) => Number($(id).value);
  const steps = number("steps");
  const seed = $("seed").value.trim();
  const body = {
    modelId: Number($("model").value),
    prompt: $("prompt").value,
    negativePrompt: $("negative-prompt").value,
    width: number("width"),
    height: number("height"),
    steps,
    cfgScale: number("cfg-scale"),
    // A string keeps seeds above 2^53 exact (int64 fields take JSON strings).
    seed: seed === "" ? "-1" : seed,
    samplerName: $("sampler").value,
    scheduler: $("scheduler").value,
    numImages: number("num-images"),
    previewEverySteps: $("previews").checked ? Math.max(1, Math.min(PREVIEW_EVERY_STEPS, steps)) : 0,
  };
  if (picture) {
    body.initImage = picture.base64;
    body.denoise = number("denoise");
    body.resizeMode = $("resize-mode").value;
    if ($("own-size").checked) {
      body.width = 0; // 0 x 0: the picture's own size, cropped to multiples of 8
      body.height = 0;
    }
    const mask = maskPng();
    if (mask) body.mask = mask;
  }
  if ($("hires-enabled").checked) {
    body.hiresFix = {
      scale: number("hires-scale"),
      upscaleMethod: $("hires-upscaler").value,
      steps: number("hires-steps"),
      denoise: number("hires-denoise"),
    };
  }
  return body;
}

// Steps of every pass together: what the progress events count.
function totalSteps(body) {
  return body.steps + (body.hiresFix ? body.hiresFix.steps || body.steps : 0);
}

// --- the picture and its mask ---------------------------------------------------------------

// The first pass's size: the picture's own (each side cropped down to a multiple of 8) or the
// width and height fields.
function firstPassSize() {
  if (picture && $("own-size").checked) {
    const multiple = LIMITS.sizeMultiple;
    return [Math.floor(picture.width / multiple) * multiple, Math.floor(picture.height / multiple) * multiple];
  }
  return [Number($("width").value), Number($("height").value)];
}

// Python's round(): halves to even, as the API rounds the upscaled latent size.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function showSizes() {
  const [width, height] = firstPassSize();
  const ownSize = Boolean(picture) && $("own-size").checked;
  for (const id of ["width", "height"]) $(id).disabled = ownSize;
  $("resize-mode").disabled = ownSize;
  if (picture) {
    $("picture-status").textContent =
      `Picture ${picture.width}x${picture.height} (${picture.name}): image to image, ` +
      (ownSize ? `output ${width}x${height}` + (width !== picture.width || height !== picture.height ?
        ` (cropped about the middle to multiples of ${LIMITS.sizeMultiple})` : "") :
        `resized to ${width}x${height} (${$("resize-mode").value})`) + ".";
  }
  const enabled = $("hires-enabled").checked;
  for (const id of ["hires-scale", "hires-upscaler", "hires-steps", "hires-denoise"]) $(id).disabled = !enabled;
  const scale = Number($("hires-scale").value);
  const latent = LIMITS.sizeMultiple; // one latent pixel is 8 x 8 image pixels
  const up = (side) => roundHalfEven(Math.floor(side / latent) * scale) * latent;
  $("hires-size").textContent = !enabled ? "Off." :
    `${width}x${height}, upscaled to ${up(width)}x${up(height)} and denoised again: the images come out at that size.`;
}

function maskCanvas() {
  return $("mask-canvas");
}

// Sets (or with null removes) the picture: drawn on the picture canvas at its own pixels, with
// an empty mask canvas of the same size over it.
function setPicture(next) {
  picture = next;
  $("picture-box").hidden = !picture;
  $("remove-picture").disabled = !picture;
  if (!picture) {
    $("picture-status").textContent = "No picture: text to image.";
    $("picture-status").className = "hint";
    $("init-image").value = "";
  } else {
    const image = next.image;
    for (const canvas of [$("picture-canvas"), maskCanvas()]) {
      canvas.width = picture.width; // also clears it
      canvas.height = picture.height;
    }
    $("picture-canvas").getContext("2d").drawImage(image, 0, 0);
    $("picture-status").className = "hint";
    layoutPicture();
    showMaskStatus();
  }
  showSizes();
}

// The canvases' shown size: the column's width, at most PICTURE_MAX_SHOWN_HEIGHT tall (small
// pictures are scaled up, unsmoothed, so that there is room to paint).
function layoutPicture() {
  if (!picture) return;
  const room = ($("canvas-stack").parentElement.clientWidth || picture.width + 2) - 2; // less the border
  const scale = Math.min(room / picture.width, PICTURE_MAX_SHOWN_HEIGHT / picture.height);
  for (const canvas of [$("picture-canvas"), maskCanvas()]) {
    canvas.style.width = `${picture.width * scale}px`; // CSSOM: allowed by the page's CSP
    canvas.style.height = `${picture.height * scale}px`;
  }
}

// Reads a picture (a data: URL) into an <img>; resolves with it once decoded.
function decodePicture(dataUrl) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("this browser cannot read it as a picture"));
    image.src = dataUrl;
  });
}

async function loadPicture(dataUrl, name) {
  const image = await decodePicture(dataUrl);
  // naturalWidth/Height: after the EXIF orientation, as the API reads the file.
  setPicture({ base64: dataUrl.slice(dataUrl.indexOf(",") + 1), dataUrl, image, name,
               width: image.naturalWidth, height: image.naturalHeight });
}

function pictureFailed(message) {
  setPicture(null);
  $("picture-status").textContent = message;
  $("picture-status").className = "hint failed";
}

async function onPictureFile() {
  const file = $("init-image").files[0];
  if (!file) return;
  if (!PICTURE_TYPES.includes(file.type)) {
    pictureFailed(`${file.name} is not a PNG, JPEG or WebP file (the API reads only those).`);
    return;
  }
  try {
    const dataUrl = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error || new Error("the file could not be read"));
      reader.readAsDataURL(file);
    });
    await loadPicture(dataUrl, file.name);
  } catch (error) {
    pictureFailed(`Could not use ${file.name}: ${error.message}.`);
  }
}

async function useLastResult() {
  if (!lastResult) return;
  try {
    await loadPicture(`data:image/${lastResult.format};base64,${lastResult.base64}`, "the last result");
    $("init-image").value = ""; // the file chosen before is no longer the picture
  } catch (error) {
    pictureFailed(`Could not use the last result: ${error.message}.`);
  }
}

// A pointer event's place in the mask canvas's own pixels, and canvas pixels per CSS pixel.
function canvasPoint(event) {
  const canvas = maskCanvas();
  const rect = canvas.getBoundingClientRect();
  const scale = canvas.width / rect.width;
  return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * (canvas.height / rect.height), scale };
}

// Paints (or erases) from the stroke's last point to this one; a dot where a stroke starts.
function paintTo(point) {
  const context = maskCanvas().getContext("2d");
  const width = Number($("brush-size").value) * point.scale; // the brush size is in CSS pixels
  context.globalCompositeOperation = $("brush-erase").checked ? "destination-out" : "source-over";
  context.strokeStyle = context.fillStyle = MASK_COLOR;
  context.lineWidth = width;
  context.lineCap = context.lineJoin = "round";
  context.beginPath();
  if (stroke.last) {
    context.moveTo(stroke.last.x, stroke.last.y);
    context.lineTo(point.x, point.y);
    context.stroke();
  } else {
    context.arc(point.x, point.y, width / 2, 0, 2 * Math.PI);
    context.fill();
  }
  stroke.last = point;
}

function onPointerDown(event) {
  if (!picture || event.button !== 0 || stroke) return;
  event.preventDefault();
  maskCanvas().setPointerCapture(event.pointerId);
  stroke = { pointerId: event.pointerId, last: null };
  paintTo(canvasPoint(event));
}

function onPointerMove(event) {
  if (!stroke || event.pointerId !== stroke.pointerId) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const each of events.length ? events : [event]) paintTo(canvasPoint(each));
}

function onPointerUp(event) {
  if (!stroke || event.pointerId !== stroke.pointerId) return;
  stroke = null;
  showMaskStatus();
}

// The mask's coverage (0 to 255) per pixel: how opaque the paint is there.
function maskCoverage() {
  const canvas = maskCanvas();
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const coverage = new Uint8ClampedArray(pixels.length / 4);
  for (let i = 0; i < coverage.length; i++) coverage[i] = pixels[i * 4 + 3];
  return coverage;
}

// The mask as the API takes it: a PNG (base64) at the picture's own size, white where painted,
// black elsewhere (gray at a stroke's soft edge); null when nothing is painted.
function maskPng() {
  if (!picture) return null;
  const coverage = maskCoverage();
  if (!coverage.some((c) => c > 0)) return null;
  const out = document.createElement("canvas");
  out.width = picture.width;
  out.height = picture.height;
  const context = out.getContext("2d");
  const image = context.createImageData(out.width, out.height);
  for (let i = 0; i < coverage.length; i++) {
    image.data.fill(coverage[i], i * 4, i * 4 + 3);
    image.data[i * 4 + 3] = 255;
  }
  context.putImageData(image, 0, 0);
  const url = out.toDataURL("image/png");
  return url.slice(url.indexOf(",") + 1);
}

function clearMask() {
  const canvas = maskCanvas();
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  showMaskStatus();
}

// Painted becomes unpainted and the other way round (an all-over mask: clear, then invert).
function invertMask() {
  const canvas = maskCanvas();
  const context = canvas.getContext("2d");
  const coverage = maskCoverage();
  const image = context.createImageData(canvas.width, canvas.height);
  for (let i = 0; i < coverage.length; i++) {
    image.data.set([...MASK_RGB, 255 - coverage[i]], i * 4);
  }
  context.putImageData(image, 0, 0);
  showMaskStatus();
}

function showMaskStatus() {
  const painted = maskCoverage().some((c) => c > 0);
  $("mask-status").textContent = painted
    ? "Mask: only the painted part is re-drawn (sent as mask)."
    : "No mask: denoise re-draws the whole picture. Paint to re-draw only there.";
}

// --- output -----------------------------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
}

function setProgress(step, total) {
  const bar = $("progress");
  if (total > 0) bar.max = total;
  if (step > bar.value) bar.value = step; // only forward: previews and progress interleave
}

function clearOutput() {
  $("error").hidden = true;
  $("error").textContent = "";
  $("summary").hidden = true;
  $("preview-box").hidden = true;
  $("preview").removeAttribute("src");
  $("images").replaceChildren();
  const bar = $("progress");
  bar.value = 0;
  bar.max = 1;
}

function showPreview(preview) {
  $("preview").src = `data:image/jpeg;base64,${preview.jpeg}`;
  $("preview-caption").textContent = `preview at step ${preview.step} (${preview.width}x${preview.height} latent pixels)`;
  $("preview-box").hidden = false;
}

function showResult(result, seconds) {
  const format = result.outputFormat || "png";
  const seeds = result.seeds || [];
  $("charge").textContent = result.stardustUsage;
  $("balance").textContent = result.stardustBalance;
  // Images of one request share its seed (one noise draw for the batch, as ComfyUI's batch_size):
  // image k comes back with the same seed and the same number of images.
  $("seeds").textContent = [...new Set(seeds)].join(", ");
  $("summary").hidden = false;
  $("preview-box").hidden = true;
  const count = (result.images || []).length;
  const figures = (result.images || []).map((image, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/${format};base64,${image}`;
    img.alt = `image ${i + 1}, seed ${seeds[i]}`;
    img.className = "result";
    const caption = document.createElement("figcaption");
    const seed = document.createElement("span");
    seed.className = "seed";
    seed.textContent = `seed ${seeds[i]}` + (count > 1 ? `, image ${i + 1} of ${count}` : "");
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "secondary small";
    reuse.textContent = "use seed";
    reuse.title = `Seed ${seeds[i]} with ${count} image${count === 1 ? "" : "s"} makes this image again`;
    reuse.addEventListener("click", () => {
      $("seed").value = seeds[i];
      $("num-images").value = count;
    });
    const save = document.createElement("a");
    save.href = img.src;
    save.download = `t2i-${seeds[i]}.${format}`;
    save.textContent = "save";
    caption.append(seed, " ", reuse, " ", save);
    figure.append(img, caption);
    return figure;
  });
  $("images").replaceChildren(...figures);
  if (count) {
    lastResult = { base64: result.images[0], format };
    $("use-last").disabled = false;
  }
  setStatus(`Done in ${seconds.toFixed(1)} s: ${figures.length} image${figures.length === 1 ? "" : "s"}.`);
}

// Applies one stream event; true once the stream's last event (result or error) arrived.
function onEvent(event, body, started, requestId) {
  if (event.queued) {
    setStatus(`Queued: position ${event.queued.position}, ${event.queued.ahead} ahead.`);
  } else if (event.started) {
    setStatus(`Started after ${Number(event.started.queueSeconds).toFixed(1)} s in the queue.`);
  } else if (event.progress) {
    const p = event.progress;
    setProgress(p.step, p.totalSteps);
    setStatus(`Step ${p.step} of ${p.totalSteps}, about ${Math.ceil(p.remainingSeconds)} s left.`);
  } else if (event.preview) {
    setProgress(event.preview.step, totalSteps(body));
    showPreview(event.preview);
  } else if (event.result) {
    setProgress(totalSteps(body), totalSteps(body));
    showResult(event.result, (performance.now() - started) / 1000);
    return true;
  } else if (event.error) {
    showError(describe(event.error, event.error.requestId || requestId));
    setStatus("Failed.");
    return true;
  }
  return false; // an event kind this page does not know: ignored
}

async function generate(submitEvent) {
  if (submitEvent) submitEvent.preventDefault();
  if (controller) return;
  const body = requestBody();
  const path = body.initImage ? "/image-to-image/generate/stream" : "/text-to-image/generate/stream";
  clearOutput();
  setStatus("Sending...");
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: keyHeaders({ "content-type": "application/json" }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      showError(await errorOf(response));
      setStatus("Failed.");
      return;
    }
    const requestId = response.headers.get("x-request-id");
    let finished = false;
    await readEvents(response.body, (event) => {
      finished = onEvent(event, body, started, requestId) || finished;
    });
    if (!finished) {
      showError("The stream ended before the result arrived (the connection was closed).");
      setStatus("Failed.");
    }
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("Stopped. A generation that does not finish is not charged.");
    } else {
      // TypeError: fetch() could not connect, or the connection broke during the stream.
      showError(error instanceof TypeError ? `The connection to the API failed: ${error.message}` : String(error.message));
      setStatus("Failed.");
    }
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

// --- wiring -----------------------------------------------------------------------------------

function fill(select, names, chosen) {
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  select.value = chosen;
}

function wirePicture() {
  $("init-image").addEventListener("change", onPictureFile);
  $("use-last").addEventListener("click", useLastResult);
  $("remove-picture").addEventListener("click", () => setPicture(null));
  const mask = maskCanvas();
  mask.addEventListener("pointerdown", onPointerDown);
  mask.addEventListener("pointermove", onPointerMove);
  mask.addEventListener("pointerup", onPointerUp);
  mask.addEventListener("pointercancel", onPointerUp);
  $("clear-mask").addEventListener("click", clearMask);
  $("invert-mask").addEventListener("click", invertMask);
  $("brush-size").addEventListener("input", (e) => {
    $("brush-size-value").textContent = `${e.target.value} px`;
  });
  $("denoise").addEventListener("input", (e) => {
    $("denoise-value").textContent = e.target.value;
  });
  for (const id of ["own-size", "resize-mode", "width", "height", "hires-enabled", "hires-scale"]) {
    $(id).addEventListener("input", showSizes);
    $(id).addEventListener("change", showSizes);
  }
  window.addEventListener("resize", layoutPicture);
  showSizes();
}

function start() {
  // The API's own limits (rendered above from t2i/validation.py) on the form's fields.
  for (const id of ["prompt", "negative-prompt"]) $(id).maxLength = LIMITS.promptChars;
  for (const id of ["width", "height"]) $(id).step = LIMITS.sizeMultiple;
  $("cfg-scale").max = LIMITS.cfgScale;
  $("num-images").max = LIMITS.images;
  fill($("sampler"), SAMPLERS, DEFAULT_SAMPLER);
  fill($("scheduler"), SCHEDULERS, DEFAULT_SCHEDULER);
  fill($("resize-mode"), RESIZE_MODES, RESIZE_MODES[0]);
  fill($("hires-upscaler"), UPSCALE_METHODS, UPSCALE_METHODS[0]);
  const key = $("api-key");
  try {
    key.value = localStorage.getItem(KEY_STORAGE) || "";
  } catch (_) {
    // storage disabled: the key is simply not remembered
  }
  key.addEventListener("change", () => {
    try {
      if (apiKey()) localStorage.setItem(KEY_STORAGE, apiKey());
      else localStorage.removeItem(KEY_STORAGE);
    } catch (_) {
      // not remembered
    }
    loadModels();
  });
  $("show-key").addEventListener("change", (e) => {
    key.type = e.target.checked ? "text" : "password";
  });
  $("forget-key").addEventListener("click", () => {
    key.value = "";
    key.dispatchEvent(new Event("change"));
  });
  $("reload-models").addEventListener("click", loadModels);
  $("model").addEventListener("change", showLimits);
  $("form").addEventListener("submit", generate);
  $("form").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e);
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  wirePicture();
  loadModels();
}

start();
