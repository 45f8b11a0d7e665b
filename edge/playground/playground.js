// The playground's logic: plain browser JavaScript, no build step, no dependencies. It calls the
// API on the origin that served it (Envoy serves this file at /playground.js, see edge/envoy.yaml):
//   GET  /model/list                     fills the model list (needs the key)
//   POST /text-to-image/generate/stream  server-sent events: queued, started, progress,
//                                        preview, then result or error
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
// END GENERATED: playground-names
const DEFAULT_SAMPLER = "euler_ancestral";
const DEFAULT_SCHEDULER = "karras";

const KEY_STORAGE = "t2i.playground.apiKey";
const PREVIEW_EVERY_STEPS = 2;

const $ = (id) => document.getElementById(id);
let models = [];
let controller = null; // the running generation's AbortController

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
  $("limits").textContent =
    `Model ${model.id}: width and height multiples of ${LIMITS.sizeMultiple} from ${model.minSize} to ${model.maxSize}, ` +
    `1 to ${model.maxSteps} steps, seed -1 for a random one.` +
    (model.demo ? " The demo model has random weights: its images are noise." : "");
}

function requestBody() {
  const number = (id) => Number($(id).value);
  const steps = number("steps");
  const seed = $("seed").value.trim();
  return {
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
    setProgress(event.preview.step, body.steps);
    showPreview(event.preview);
  } else if (event.result) {
    setProgress(body.steps, body.steps);
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
  clearOutput();
  setStatus("Sending...");
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  try {
    const response = await fetch("/text-to-image/generate/stream", {
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

function start() {
  // The API's own limits (rendered above from t2i/validation.py) on the form's fields.
  for (const id of ["prompt", "negative-prompt"]) $(id).maxLength = LIMITS.promptChars;
  for (const id of ["width", "height"]) $(id).step = LIMITS.sizeMultiple;
  $("cfg-scale").max = LIMITS.cfgScale;
  $("num-images").max = LIMITS.images;
  fill($("sampler"), SAMPLERS, DEFAULT_SAMPLER);
  fill($("scheduler"), SCHEDULERS, DEFAULT_SCHEDULER);
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
  loadModels();
}

start();
