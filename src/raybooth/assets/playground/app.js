// raybooth playground: a page over the public API (/v1/models, /v1/images/generations,
// /v1/images/edits). Plain JavaScript, no build step, no network beyond this server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "raybooth.apiKey"; // session storage only: gone when the tab closes
  const BUSY_RETRIES = 5; // 503 answers retried (after Retry-After) before giving up
  const TINT = [255, 45, 111]; // mask overlay colour (shown at half opacity)
  const ENDPOINTS = { "text-to-image": "/v1/images/generations", inpainting: "/v1/images/edits" };
  const FORMS = { "text-to-image": $("panel-generate"), inpainting: $("panel-inpaint") };

  // ---------------------------------------------------------------------------------------------
  // Talking to the API

  class Problem extends Error {
    // An error to show: `field` names the form field it belongs to (the API's error.field).
    constructor(message, { status = 0, code = "", field = null } = {}) {
      super(message);
      this.status = status;
      this.code = code;
      this.field = field;
    }
  }

  async function readProblem(resp) {
    let body = null;
    try {
      body = await resp.json();
    } catch (_) { /* not JSON */ }
    const err = body && typeof body === "object" ? body.error || body : {};
    let message = typeof err.message === "string" ? err.message : typeof err.detail === "string" ? err.detail : "";
    if (!message) message = `the server answered ${resp.status} ${resp.statusText}`.trim();
    // `field` is raybooth's name; `param` is the OpenAI Images API's. Either may be present.
    const field = err.field || err.param || null;
    return new Problem(message, { status: resp.status, code: err.code || err.type || "", field });
  }

  function retryAfterSeconds(resp) {
    const raw = resp.headers.get("Retry-After");
    let seconds = Number(raw);
    if (raw && !Number.isFinite(seconds)) seconds = (Date.parse(raw) - Date.now()) / 1000;
    if (!Number.isFinite(seconds)) seconds = 2;
    return Math.min(60, Math.max(1, Math.ceil(seconds)));
  }

  function sleep(ms, signal) {
    return new Promise((resolve, reject) => {
      if (signal && signal.aborted) return reject(new DOMException("cancelled", "AbortError"));
      const timer = setTimeout(resolve, ms);
      if (signal) {
        signal.addEventListener("abort", () => {
          clearTimeout(timer);
          reject(new DOMException("cancelled", "AbortError"));
        }, { once: true });
      }
    });
  }

  // fetch + JSON, with the API key, the 401 prompt and 503 retries. Throws Problem or AbortError.
  async function api(path, { method = "GET", body = null, signal = null, onBusy = null } = {}) {
    let busyTries = 0;
    for (let keyTries = 0; ;) {
      const headers = { Accept: "application/json" };
      if (body !== null) headers["Content-Type"] = "application/json";
      const key = sessionStorage.getItem(KEY_STORAGE);
      if (key) headers.Authorization = "Bearer " + key;
      let resp;
      try {
        resp = await fetch(path, { method, headers, body, signal });
      } catch (err) {
        if (err.name === "AbortError") throw err;
        throw new Problem(`could not reach the server (${err.message})`);
      }
      if (resp.ok) return resp.json();
      const problem = await readProblem(resp);
      if (resp.status === 401 && keyTries < 3) {
        keyTries += 1;
        if (key) sessionStorage.removeItem(KEY_STORAGE); // rejected: do not send it again
        showKeyState();
        const reason = key ? "The server did not accept that API key. Enter a valid key."
                           : "This server needs an API key.";
        if (await askForKey(reason)) continue;
        throw new Problem("an API key is needed: use “API key” at the top of the page", { status: 401 });
      }
      if (resp.status === 503 && busyTries < BUSY_RETRIES) {
        busyTries += 1;
        const wait = retryAfterSeconds(resp);
        if (onBusy) onBusy(wait, busyTries, problem);
        await sleep(wait * 1000, signal);
        continue;
      }
      if (resp.status === 503) {
        problem.message = `the server is busy (${problem.message}); try again in a moment`;
      }
      throw problem;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // API key dialog (one at a time; concurrent 401s wait for the same answer)

  let keyPrompt = null;

  function askForKey(reason) {
    if (keyPrompt) return keyPrompt;
    const dialog = $("key-dialog");
    $("key-reason").textContent = reason;
    $("key-input").value = "";
    keyPrompt = new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        const value = $("key-input").value.trim();
        keyPrompt = null;
        if (dialog.returnValue === "forget") {
          sessionStorage.removeItem(KEY_STORAGE);
        } else if (dialog.returnValue === "save" && value) {
          sessionStorage.setItem(KEY_STORAGE, value);
          showKeyState();
          return resolve(true);
        }
        showKeyState();
        resolve(false);
      }, { once: true });
    });
    dialog.returnValue = "";
    dialog.showModal();
    $("key-input").focus();
    return keyPrompt;
  }

  function showKeyState() {
    const set = Boolean(sessionStorage.getItem(KEY_STORAGE));
    $("key-button").textContent = set ? "API key (set)" : "API key";
  }

  $("key-button").addEventListener("click", async () => {
    const had = Boolean(sessionStorage.getItem(KEY_STORAGE));
    if (await askForKey(had ? "Replace or forget the API key for this tab." : "Set the API key for this tab.")) {
      loadModels();
    }
  });

  // ---------------------------------------------------------------------------------------------
  // Server settings and the model list

  async function loadConfig() {
    let config = {};
    try {
      config = await api("/playground/config.json");
    } catch (_) { /* older server: the inputs keep their HTML defaults */ }
    const limits = config.limits || {};
    const defaults = config.defaults || {};
    for (const form of Object.values(FORMS)) {
      const scheduler = form.elements.scheduler;
      scheduler.replaceChildren(...(config.schedulers || [defaults.scheduler || "ddim"]).map((name) => new Option(name, name)));
      if (defaults.scheduler) scheduler.value = defaults.scheduler;
      if (defaults.steps) form.elements.steps.value = defaults.steps;
      if (defaults.guidance_scale !== undefined) form.elements.guidance_scale.value = defaults.guidance_scale;
      if (limits.max_steps) form.elements.steps.max = limits.max_steps;
      if (limits.max_guidance_scale) form.elements.guidance_scale.max = limits.max_guidance_scale;
      if (limits.max_images) form.elements.n.max = limits.max_images;
      for (const side of ["width", "height"]) {
        if (limits.max_side && form.elements[side]) form.elements[side].max = limits.max_side;
      }
    }
    const mlflow = config.mlflow_ui_url;
    if (typeof mlflow === "string" && /^https?:\/\//i.test(mlflow)) {
      $("mlflow-link").href = mlflow;
      $("mlflow-link").hidden = false;
    }
  }

  async function loadModels() {
    let cards;
    try {
      cards = (await api("/v1/models")).data || [];
    } catch (err) {
      for (const form of Object.values(FORMS)) {
        form.elements.model.replaceChildren(new Option("(server default)", ""));
        showProblem(form, new Problem(`could not list the models: ${err.message}`, { field: "model" }));
      }
      return;
    }
    for (const [task, form] of Object.entries(FORMS)) {
      const select = form.elements.model;
      const previous = select.value;
      const mine = cards.filter((c) => c.task === task);
      const groups = [["Models", mine.filter((c) => c.kind !== "subject")], ["Subjects", mine.filter((c) => c.kind === "subject")]];
      const children = [];
      for (const [label, list] of groups) {
        if (!list.length) continue;
        const group = document.createElement("optgroup");
        group.label = label;
        for (const card of list) {
          const text = card.kind === "subject" ? `${card.id} (subject on ${card.base_model})` : card.id;
          group.append(new Option(text, card.id));
        }
        children.push(group);
      }
      if (!children.length) children.push(new Option(`(no ${task} model on this server)`, ""));
      select.replaceChildren(...children);
      if (mine.some((c) => c.id === previous)) select.value = previous;
      clearFieldError(select);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Errors next to their fields

  // API field names that this page shows under another control (OpenAI-style names included).
  const FIELD_ALIASES = { size: "width", "image[]": "image" };

  function controlFor(form, field) {
    if (!field) return null;
    field = String(field);
    const names = [field, field.replace(/^body\./, ""), field.split(".").pop(), field.split(".")[0]];
    names.push(...names.map((name) => FIELD_ALIASES[name]).filter(Boolean));
    for (const name of names) {
      const el = form.elements[name];
      if (el && el.id) return el; // (radio groups have no id: seed-mode)
      const slot = form.querySelector(`#${form.id === "panel-generate" ? "gen" : "inp"}-${CSS.escape(name)}-error`);
      if (slot) return slot;
    }
    return null;
  }

  function errorSlot(control) {
    if (control.classList.contains("field-error")) return control;
    const id = `${control.id}-error`;
    let slot = document.getElementById(id);
    if (!slot) {
      slot = document.createElement("p");
      slot.className = "field-error";
      slot.id = id;
      const anchor = control.closest(".field, fieldset") || control;
      anchor.append(slot);
    }
    const described = new Set((control.getAttribute("aria-describedby") || "").split(/\s+/).filter(Boolean));
    described.add(id);
    control.setAttribute("aria-describedby", [...described].join(" "));
    return slot;
  }

  function showProblem(form, problem) {
    const control = controlFor(form, problem.field);
    if (control) {
      errorSlot(control).textContent = problem.message;
      // A fixed error slot (the mask's) belongs to the control it describes.
      const target = control.classList.contains("field-error")
        ? form.querySelector(`[aria-describedby~="${control.id}"]`) : control;
      if (target) {
        if (target === control) target.setAttribute("aria-invalid", "true");
        const panel = target.closest("[role=tabpanel]");
        if (panel && !panel.hidden) target.focus();
      }
      return;
    }
    const where = problem.field ? `${problem.field}: ` : "";
    form.querySelector(".form-error").textContent = where + problem.message;
  }

  function clearFieldError(control) {
    if (control.classList.contains("field-error")) {
      control.textContent = "";
      return;
    }
    control.removeAttribute("aria-invalid");
    const slot = document.getElementById(`${control.id}-error`);
    if (slot) slot.textContent = "";
  }

  function clearErrors(form) {
    form.querySelector(".form-error").textContent = "";
    form.querySelectorAll(".field-error").forEach((slot) => { slot.textContent = ""; });
    form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  }

  for (const form of Object.values(FORMS)) {
    form.addEventListener("input", (event) => {
      if (event.target.id) clearFieldError(event.target);
    });
  }

  // ---------------------------------------------------------------------------------------------
  // Building a request from a form

  function numberField(form, name, body, { integer = false } = {}) {
    const el = form.elements[name];
    if (!el) return;
    const raw = el.value.trim();
    if (raw === "") {
      // An input of type=number reports "" for text it cannot read: say so rather than drop it.
      if (el.validity && el.validity.badInput) {
        throw new Problem(`${el.labels[0].textContent.toLowerCase()} must be a number`, { field: name });
      }
      return;
    }
    const value = Number(raw);
    body[name] = integer && Number.isInteger(value) ? Math.trunc(value) : value;
  }

  const SEED_SLOT = "\u0000seed\u0000";

  // The seed as text: seeds reach 2^63, beyond what a JavaScript number holds exactly.
  function seedText(form) {
    const mode = form.querySelector("input[name=seed-mode]:checked").value;
    if (mode !== "fixed") return null;
    const raw = form.elements.seed.value.trim();
    if (!raw) throw new Problem("enter a seed, or choose Random", { field: "seed" });
    return raw;
  }

  function serialise(body, seed) {
    if (seed === null) return JSON.stringify(body);
    if (!/^-?\d+$/.test(seed)) return JSON.stringify({ ...body, seed: Number(seed) });
    return JSON.stringify({ ...body, seed: SEED_SLOT }).replace(JSON.stringify(SEED_SLOT), seed);
  }

  async function buildBody(form, task) {
    const els = form.elements;
    const body = { prompt: els.prompt.value };
    if (els.negative_prompt.value.trim()) body.negative_prompt = els.negative_prompt.value;
    if (els.model.value) body.model = els.model.value;
    numberField(form, "n", body, { integer: true });
    numberField(form, "steps", body, { integer: true });
    numberField(form, "guidance_scale", body);
    if (els.scheduler.value) body.scheduler = els.scheduler.value;
    if (task === "text-to-image") {
      numberField(form, "width", body, { integer: true });
      numberField(form, "height", body, { integer: true });
    } else {
      numberField(form, "strength", body);
      numberField(form, "mask_blur", body);
      numberField(form, "crop_margin", body, { integer: true });
      if (!painter.source) throw new Problem("choose an image to edit first", { field: "image" });
      if (!painter.hasMask()) throw new Problem("paint over the area to repaint first", { field: "mask" });
      body.image = await blobToDataUrl(painter.source);
      body.mask = await blobToDataUrl(await painter.maskPng());
    }
    const seed = seedText(form);
    return { json: serialise(body, seed), seed, prompt: body.prompt };
  }

  function blobToDataUrl(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  function base64ToBlob(b64, type = "image/png") {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type });
  }

  // ---------------------------------------------------------------------------------------------
  // Running a request: busy state, elapsed time, cancel

  const running = {}; // task -> AbortController

  function setBusy(form, task, controller) {
    running[task] = controller;
    const submit = form.querySelector("button[type=submit]");
    const cancel = form.querySelector("button.cancel");
    const status = form.querySelector(".status");
    const verb = task === "inpainting" ? "Inpainting" : "Generating";
    const started = performance.now();
    let note = "";
    submit.disabled = true;
    submit.setAttribute("aria-busy", "true");
    form.setAttribute("aria-busy", "true");
    cancel.disabled = false;
    status.classList.add("busy");
    const tick = () => {
      status.textContent = `${verb}… ${((performance.now() - started) / 1000).toFixed(1)} s${note}`;
    };
    tick();
    const timer = setInterval(tick, 100);
    return {
      note(text) { note = text; tick(); },
      done(text) {
        clearInterval(timer);
        delete running[task];
        const hadFocus = document.activeElement === cancel;
        submit.disabled = false;
        submit.removeAttribute("aria-busy");
        form.removeAttribute("aria-busy");
        cancel.disabled = true;
        status.classList.remove("busy");
        status.textContent = text;
        if (hadFocus) submit.focus();
      },
      seconds() { return (performance.now() - started) / 1000; },
    };
  }

  async function run(task) {
    const form = FORMS[task];
    if (running[task]) return;
    clearErrors(form);
    let request;
    try {
      request = await buildBody(form, task);
    } catch (err) {
      if (!(err instanceof Problem)) throw err;
      showProblem(form, err);
      return;
    }
    const controller = new AbortController();
    const busy = setBusy(form, task, controller);
    try {
      const data = await api(ENDPOINTS[task], {
        method: "POST", body: request.json, signal: controller.signal,
        onBusy: (wait, attempt) => busy.note(` — the server is busy; retrying in ${wait} s (try ${attempt} of ${BUSY_RETRIES})`),
      });
      addResults(task, request, data);
      const count = (data.data || []).length;
      busy.done(`${count} image${count === 1 ? "" : "s"} in ${busy.seconds().toFixed(1)} s`);
    } catch (err) {
      if (err.name === "AbortError") {
        busy.done("Cancelled");
        return;
      }
      busy.done("Failed");
      if (err instanceof Problem) showProblem(form, err);
      else showProblem(form, new Problem(String(err)));
    }
  }

  for (const [task, form] of Object.entries(FORMS)) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      run(task);
    });
    form.querySelector("button.cancel").addEventListener("click", () => {
      if (running[task]) running[task].abort();
    });
    // Ctrl/Cmd+Enter in a text area sends the form.
    form.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        run(task);
      }
    });
    // Typing a seed means "use this seed".
    form.elements.seed.addEventListener("input", () => {
      form.querySelector("input[name=seed-mode][value=fixed]").checked = true;
    });
  }

  // ---------------------------------------------------------------------------------------------
  // Results

  const gallery = $("gallery");
  const template = $("result-template");
  const objectUrls = [];

  function addResults(task, request, data) {
    const params = data.parameters || {};
    const items = data.data || [];
    const cards = items.map((item, k) => {
      // Image k used seed + k; compute it exactly when we chose the seed.
      const seed = request.seed !== null && /^\d+$/.test(request.seed)
        ? (BigInt(request.seed) + BigInt(k)).toString() : String(item.seed);
      const blob = base64ToBlob(item.b64_json);
      const url = URL.createObjectURL(blob);
      objectUrls.push(url);
      const node = template.content.firstElementChild.cloneNode(true);
      node.dataset.seed = seed;
      node.dataset.task = task;
      node.dataset.model = data.model || "";
      const what = task === "inpainting" ? "Inpainted" : "Generated";
      const img = node.querySelector("img");
      img.src = url;
      img.alt = `${what} image, seed ${seed}: ${request.prompt}`;
      node.querySelector(".seed-label").textContent = `Seed ${seed}`;
      const has = (v) => v !== undefined && v !== null;
      const bits = [
        data.model,
        has(params.steps) && `${params.steps} steps`,
        has(params.guidance_scale) && `guidance ${params.guidance_scale}`,
        params.scheduler,
        has(params.width) && has(params.height) && `${params.width}×${params.height}`,
        task === "inpainting" && has(params.strength) && `strength ${params.strength}`,
        data.timings && typeof data.timings.total_s === "number" && `${data.timings.total_s.toFixed(2)} s`,
      ];
      node.querySelector(".params").textContent = `${request.prompt} — ${bits.filter(Boolean).join(" · ")}`;
      const download = node.querySelector("a.download");
      download.href = url;
      download.download = `raybooth-${data.model || "image"}-${seed}.png`;
      download.setAttribute("aria-label", `Download seed ${seed}`);
      const reuse = node.querySelector("button.reuse");
      reuse.setAttribute("aria-label", `Reuse seed ${seed}`);
      reuse.addEventListener("click", () => reuseSeed(task, seed));
      const inpaint = node.querySelector("button.to-inpaint");
      inpaint.setAttribute("aria-label", `Inpaint this (seed ${seed})`);
      inpaint.addEventListener("click", () => inpaintThis(blob, request.prompt));
      return node;
    });
    gallery.prepend(...cards);
    $("results-empty").hidden = gallery.children.length > 0;
  }

  function reuseSeed(task, seed) {
    const form = FORMS[task];
    selectTab(task === "inpainting" ? "tab-inpaint" : "tab-generate");
    form.querySelector("input[name=seed-mode][value=fixed]").checked = true;
    form.elements.seed.value = seed;
    clearFieldError(form.elements.seed);
    form.elements.seed.focus();
  }

  function inpaintThis(blob, prompt) {
    selectTab("tab-inpaint");
    const form = FORMS.inpainting;
    if (!form.elements.prompt.value.trim()) form.elements.prompt.value = prompt;
    clearErrors(form);
    painter.load(blob).then(() => $("inp-mask-canvas").focus());
  }

  $("clear-results").addEventListener("click", () => {
    gallery.replaceChildren();
    objectUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
    $("results-empty").hidden = false;
  });

  // ---------------------------------------------------------------------------------------------
  // Tabs (arrow keys move between them, as in the WAI-ARIA tabs pattern)

  const tabs = [...document.querySelectorAll("[role=tab]")];

  function selectTab(id) {
    for (const tab of tabs) {
      const on = tab.id === id;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      $(tab.getAttribute("aria-controls")).hidden = !on;
    }
    if (id === "tab-inpaint") painter.layout();
  }

  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab.id));
    tab.addEventListener("keydown", (event) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
      if (next === undefined) return;
      event.preventDefault();
      const target = tabs[(next + tabs.length) % tabs.length];
      selectTab(target.id);
      target.focus();
    });
  }

  // ---------------------------------------------------------------------------------------------
  // The mask painter: the image on one canvas, the mask on a canvas above it (at the image's own
  // resolution), tinted and half transparent. Painted = white in the mask = repainted.

  const painter = (() => {
    const stack = $("canvas-stack");
    const imageCanvas = $("inp-image-canvas");
    const maskCanvas = $("inp-mask-canvas");
    const cursor = $("brush-cursor");
    const brush = $("inp-brush");
    const ctx = maskCanvas.getContext("2d");
    // The mask itself: one byte per image pixel, 1 = repaint. The overlay canvas only shows it,
    // so what is seen is exactly what is sent (no anti-aliased edge to guess about).
    let bits = new Uint8Array(0);
    let overlay = null; // ImageData of the overlay canvas
    let width = 0;
    let height = 0;
    let drawing = false;
    let last = null;
    let keyPos = null; // keyboard brush position, in image pixels
    const self = { source: null };
    stack.classList.add("no-image");

    const erasing = () => document.querySelector("input[name=tool]:checked").value === "eraser";
    const scale = () => width / (maskCanvas.getBoundingClientRect().width || width || 1);
    const radius = () => Math.max(0.5, (Number(brush.value) / 2) * scale());

    function toImage(event) {
      const rect = maskCanvas.getBoundingClientRect();
      return { x: (event.clientX - rect.left) * scale(), y: (event.clientY - rect.top) * scale() };
    }

    // Show the pixels of a box of the mask on the overlay.
    function render(x0 = 0, y0 = 0, x1 = width, y1 = height) {
      const px = overlay.data;
      for (let y = y0; y < y1; y++) {
        for (let x = x0; x < x1; x++) {
          const i = y * width + x;
          const o = i * 4;
          px[o] = TINT[0]; px[o + 1] = TINT[1]; px[o + 2] = TINT[2]; px[o + 3] = bits[i] ? 255 : 0;
        }
      }
      ctx.putImageData(overlay, 0, 0, x0, y0, x1 - x0, y1 - y0);
    }

    // A round dab: every pixel whose centre lies within the brush.
    function dab(at, value) {
      const r = radius();
      const x0 = Math.max(0, Math.floor(at.x - r)), x1 = Math.min(width, Math.ceil(at.x + r) + 1);
      const y0 = Math.max(0, Math.floor(at.y - r)), y1 = Math.min(height, Math.ceil(at.y + r) + 1);
      for (let y = y0; y < y1; y++) {
        for (let x = x0; x < x1; x++) {
          const dx = x + 0.5 - at.x, dy = y + 0.5 - at.y;
          if (dx * dx + dy * dy <= r * r) bits[y * width + x] = value;
        }
      }
      return [x0, y0, x1, y1];
    }

    function stroke(from, to) {
      const value = erasing() ? 0 : 1;
      const points = [to];
      if (from) {
        const gap = Math.max(0.5, radius() / 3);
        const steps = Math.ceil(Math.hypot(to.x - from.x, to.y - from.y) / gap);
        for (let s = 1; s < steps; s++) {
          points.push({ x: from.x + ((to.x - from.x) * s) / steps, y: from.y + ((to.y - from.y) * s) / steps });
        }
      }
      let box = [width, height, 0, 0];
      for (const p of points) {
        const [x0, y0, x1, y1] = dab(p, value);
        box = [Math.min(box[0], x0), Math.min(box[1], y0), Math.max(box[2], x1), Math.max(box[3], y1)];
      }
      if (box[2] > box[0] && box[3] > box[1]) render(...box);
    }

    function showCursor(pos) {
      if (!pos) { cursor.hidden = true; return; }
      const s = scale();
      const d = Number(brush.value);
      cursor.hidden = false;
      cursor.style.left = `${pos.x / s}px`;
      cursor.style.top = `${pos.y / s}px`;
      cursor.style.width = cursor.style.height = `${d}px`;
    }

    maskCanvas.addEventListener("pointerdown", (event) => {
      if (!self.source || event.button !== 0) return;
      event.preventDefault();
      maskCanvas.setPointerCapture(event.pointerId);
      drawing = true;
      last = toImage(event);
      stroke(null, last);
      clearFieldError($("inp-mask-error"));
    });
    maskCanvas.addEventListener("pointermove", (event) => {
      if (!self.source) return;
      const pos = toImage(event);
      showCursor(pos);
      if (!drawing) return;
      stroke(last, pos);
      last = pos;
    });
    const stop = () => {
      drawing = false;
      last = null;
    };
    maskCanvas.addEventListener("pointerup", stop);
    maskCanvas.addEventListener("pointercancel", stop);
    maskCanvas.addEventListener("pointerleave", () => { if (!drawing) showCursor(null); });

    // Keyboard: arrows move the brush (Shift: further), Space/Enter paints, [ and ] resize.
    maskCanvas.addEventListener("focus", () => {
      if (!self.source) return;
      keyPos = keyPos || { x: width / 2, y: height / 2 };
      showCursor(keyPos);
    });
    maskCanvas.addEventListener("blur", () => showCursor(null));
    maskCanvas.addEventListener("keydown", (event) => {
      if (!self.source) return;
      const step = Math.max(1, radius()) * (event.shiftKey ? 2 : 0.5);
      const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
      keyPos = keyPos || { x: width / 2, y: height / 2 };
      if (moves[event.key]) {
        const [dx, dy] = moves[event.key];
        keyPos = { x: Math.min(width, Math.max(0, keyPos.x + dx)), y: Math.min(height, Math.max(0, keyPos.y + dy)) };
      } else if (event.key === " " || event.key === "Enter") {
        stroke(null, keyPos);
        clearFieldError($("inp-mask-error"));
      } else if (event.key === "[" || event.key === "]") {
        brush.value = Number(brush.value) + (event.key === "]" ? 4 : -4);
      } else {
        return;
      }
      event.preventDefault();
      showCursor(keyPos);
    });
    brush.addEventListener("input", () => { if (keyPos && document.activeElement === maskCanvas) showCursor(keyPos); });

    $("inp-clear").addEventListener("click", () => {
      if (!self.source) return;
      bits.fill(0);
      render();
    });
    $("inp-invert").addEventListener("click", () => {
      if (!self.source) return;
      for (let i = 0; i < bits.length; i++) bits[i] ^= 1;
      render();
    });

    self.layout = () => {
      if (self.source) stack.style.aspectRatio = `${width} / ${height}`;
    };

    self.load = async (blob) => {
      let bitmap;
      try {
        bitmap = await createImageBitmap(blob);
      } catch (_) {
        throw new Problem("that file is not an image this browser can read", { field: "image" });
      }
      self.source = blob; // sent as it is: pixels outside the mask come back unchanged
      width = bitmap.width;
      height = bitmap.height;
      for (const canvas of [imageCanvas, maskCanvas]) {
        canvas.width = width;
        canvas.height = height;
      }
      imageCanvas.getContext("2d").drawImage(bitmap, 0, 0);
      bits = new Uint8Array(width * height);
      overlay = ctx.createImageData(width, height);
      render();
      keyPos = null;
      stack.classList.remove("no-image");
      self.layout();
    };

    self.hasMask = () => bits.includes(1);

    // White where painted, black elsewhere, at the image's size.
    self.maskPng = () => {
      const out = document.createElement("canvas");
      out.width = width;
      out.height = height;
      const octx = out.getContext("2d");
      const img = octx.createImageData(width, height);
      for (let i = 0; i < bits.length; i++) {
        const v = bits[i] ? 255 : 0;
        img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = v;
        img.data[4 * i + 3] = 255;
      }
      octx.putImageData(img, 0, 0);
      return new Promise((resolve) => out.toBlob(resolve, "image/png"));
    };

    return self;
  })();

  $("inp-upload").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    const form = FORMS.inpainting;
    clearErrors(form);
    if (!file) return;
    try {
      await painter.load(file);
    } catch (err) {
      showProblem(form, err instanceof Problem ? err : new Problem(String(err), { field: "image" }));
    }
  });

  // ---------------------------------------------------------------------------------------------

  showKeyState();
  loadConfig().then(loadModels);
})();
