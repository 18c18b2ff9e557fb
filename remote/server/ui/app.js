// orch's page: a form over A1111's API, a queue, live progress, a gallery. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const c of children) node.append(c);
  return node;
};

// -- talking to the server ---------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, options = {}) {
  const init = { credentials: "same-origin", ...options, headers: { ...(options.headers || {}) } };
  if (init.body !== undefined && typeof init.body !== "string") {
    init.body = JSON.stringify(init.body);
    init.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (r.status === 401 || r.status === 403) signedOut(data && data.detail);
  if (!r.ok) throw new ApiError(r.status, (data && data.detail) || `${r.status} ${r.statusText}`);
  return data;
}

function signedOut(detail) {
  banner(`Not signed in (${detail || "refused"}). Run \`orch open\` for a fresh link.`);
}

function banner(text) {
  const b = $("banner");
  b.textContent = text;
  b.hidden = !text;
}

function showError(e) {
  $("form-error").textContent = e ? String(e.message || e) : "";
}

// -- tabs --------------------------------------------------------------------------------------

function showTab(name) {
  for (const b of document.querySelectorAll(".tab-button")) b.classList.toggle("on", b.dataset.tab === name);
  for (const s of document.querySelectorAll(".tab")) s.classList.toggle("on", s.id === `tab-${name}`);
  if (name === "gallery" && !gallery.loaded) gallery.reset();
}

// -- the form ----------------------------------------------------------------------------------

const NUMBER_FIELDS = ["steps", "cfg_scale", "width", "height", "seed", "n_iter", "batch_size", "denoising_strength",
  "hr_scale", "hr_second_pass_steps", "mask_blur", "inpaint_full_res_padding"];
const SAVED_FIELDS = ["prompt", "negative_prompt", "sampler", "scheduler", "model", "vae", "hr_upscaler", "resize_mode",
  "inpainting_fill", "inpaint_full_res", "hr_denoising", ...NUMBER_FIELDS];

const form = {
  lastSeed: null,
  init: null, // data URL of the image img2img / inpaint starts from

  mode() { return document.querySelector("input[name=mode]:checked").value; },

  setMode(mode) {
    document.querySelector(`input[name=mode][value=${mode}]`).checked = true;
    this.modeChanged();
  },

  modeChanged() {
    const mode = this.mode();
    $("image-fields").hidden = mode === "txt2img";
    $("mask-tools").hidden = mode !== "inpaint" || !this.init;
    $("inpaint-options").hidden = mode !== "inpaint";
    $("mask").hidden = mode !== "inpaint";
    $("hires").hidden = mode !== "txt2img";
  },

  num(id) {
    const v = Number($(id).value);
    if ($(id).value === "" || !Number.isFinite(v)) throw new Error(`${$(id).closest("label").firstChild.textContent.trim()}: enter a number`);
    return v;
  },

  request() {
    const mode = this.mode();
    const r = {
      prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
      steps: this.num("steps"), cfg_scale: this.num("cfg_scale"), width: this.num("width"), height: this.num("height"),
      seed: this.num("seed"), sampler_name: $("sampler").value, scheduler: $("scheduler").value,
      n_iter: this.num("n_iter"), batch_size: this.num("batch_size"),
      override_settings: {}, override_settings_restore_afterwards: true,
    };
    if ($("model").value) r.override_settings.sd_model_checkpoint = $("model").value;
    if ($("cn_enabled").checked) r.alwayson_scripts = { controlnet: { args: [controlnet.unit()] } };
    if ($("vae").value !== "Automatic") r.override_settings.sd_vae = $("vae").value;
    if (mode === "txt2img") {
      if ($("enable_hr").checked) {
        Object.assign(r, { enable_hr: true, hr_upscaler: $("hr_upscaler").value, hr_scale: this.num("hr_scale"),
          hr_second_pass_steps: this.num("hr_second_pass_steps"), denoising_strength: this.num("hr_denoising") });
      }
      return { kind: "txt2img", request: r };
    }
    if (!this.init) throw new Error("img2img needs an image: drop one above, or use 'Send to img2img' on a gallery image");
    Object.assign(r, { init_images: [this.init], denoising_strength: this.num("denoising_strength"),
      resize_mode: Number($("resize_mode").value) });
    if (mode === "inpaint") {
      if (!mask.painted) throw new Error("inpaint: paint the area to repaint on the image first");
      Object.assign(r, { mask: mask.dataURL(), mask_blur: this.num("mask_blur"),
        inpainting_fill: Number($("inpainting_fill").value), inpaint_full_res: $("inpaint_full_res").value === "1",
        inpaint_full_res_padding: this.num("inpaint_full_res_padding") });
    }
    return { kind: "img2img", request: r };
  },

  // Fields as png-info names them (the server maps an infotext to request fields).
  apply(fields) {
    const set = (id, v) => { if (v !== undefined && v !== null && $(id)) $(id).value = v; };
    set("prompt", fields.prompt);
    set("negative_prompt", fields.negative_prompt ?? "");
    for (const k of ["steps", "cfg_scale", "width", "height", "seed", "mask_blur", "hr_scale", "hr_second_pass_steps"]) set(k, fields[k]);
    if (fields.denoising_strength !== undefined) {
      set("denoising_strength", fields.denoising_strength);
      set("hr_denoising", fields.denoising_strength);
    }
    selectMatching("sampler", fields.sampler_name);
    selectMatching("scheduler", fields.scheduler);
    selectMatching("model", fields.sd_model_checkpoint);
    selectMatching("vae", fields.sd_vae || "Automatic");
    if (fields.hr_upscaler) selectMatching("hr_upscaler", fields.hr_upscaler);
    $("enable_hr").checked = !!fields.enable_hr;
    $("hires").open = !!fields.enable_hr;
    this.save();
  },

  save() {
    const data = {};
    for (const id of SAVED_FIELDS) if ($(id)) data[id] = $(id).value;
    data.enable_hr = $("enable_hr").checked;
    try { localStorage.setItem("orch-form", JSON.stringify(data)); } catch (e) { /* private mode */ }
  },

  restore() {
    let data = null;
    try { data = JSON.parse(localStorage.getItem("orch-form") || "null"); } catch (e) { data = null; }
    if (!data) return;
    for (const id of SAVED_FIELDS) {
      if (data[id] === undefined || !$(id)) continue;
      if ($(id).tagName === "SELECT") selectMatching(id, data[id]); else $(id).value = data[id];
    }
    $("enable_hr").checked = !!data.enable_hr;
    $("hires").open = !!data.enable_hr;
  },

  async setInit(dataURL) {
    this.init = dataURL;
    const img = $("init-preview");
    await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = () => reject(new Error("not an image")); img.src = dataURL; });
    $("canvas-wrap").hidden = false;
    $("drop-hint").hidden = true;
    mask.reset(img.naturalWidth, img.naturalHeight);
    this.modeChanged();
  },

  clearInit() {
    this.init = null;
    $("init-preview").removeAttribute("src");
    $("canvas-wrap").hidden = true;
    $("drop-hint").hidden = false;
    mask.reset(1, 1);
    this.modeChanged();
  },
};

function selectMatching(id, value) {
  if (value === undefined || value === null || value === "") return;
  const select = $(id);
  const wanted = String(value).toLowerCase();
  const options = [...select.options];
  const hit = options.find((o) => o.value.toLowerCase() === wanted)
    || options.find((o) => o.textContent.toLowerCase() === wanted)
    || options.find((o) => (o.dataset.alt || "").toLowerCase().split("|").includes(wanted))
    || options.find((o) => o.value.toLowerCase().startsWith(wanted + " ") || o.value.toLowerCase().startsWith(wanted + "."));
  if (hit) select.value = hit.value;
}

function fillSelect(id, items, keep) {
  const select = $(id);
  const before = keep ? select.value : null;
  select.replaceChildren(...items.map(([value, label, alt]) => {
    const o = el("option", { value, textContent: label || value });
    if (alt) o.dataset.alt = alt;
    return o;
  }));
  if (before) selectMatching(id, before);
}

async function loadChoices() {
  const get = (p) => api(p).catch((e) => { showError(e); return []; });
  const [models, vaes, samplers, schedulers, loras, latent, upscalers, options] = await Promise.all([
    get("/sdapi/v1/sd-models"), get("/sdapi/v1/sd-vae"), get("/sdapi/v1/samplers"), get("/sdapi/v1/schedulers"),
    get("/sdapi/v1/loras"), get("/sdapi/v1/latent-upscale-modes"), get("/sdapi/v1/upscalers"), get("/sdapi/v1/options")]);
  fillSelect("model", models.map((m) => [m.title, m.model_name, [m.model_name, m.hash].filter(Boolean).join("|")]));
  if (options && options.sd_model_checkpoint) selectMatching("model", options.sd_model_checkpoint);
  fillSelect("vae", [["Automatic"], ["None"], ...vaes.map((v) => [v.model_name])]);
  fillSelect("sampler", samplers.map((s) => [s.name, s.name, (s.aliases || []).join("|")]));
  selectMatching("sampler", "Euler a");
  fillSelect("scheduler", schedulers.map((s) => [s.name, s.label, [s.label, ...(s.aliases || [])].join("|")]));
  selectMatching("scheduler", "automatic");
  fillSelect("hr_upscaler", [...latent.map((m) => [m.name]), ...upscalers.map((u) => [u.name])]);
  const chips = $("loras");
  chips.replaceChildren(...loras.map((l) => {
    const b = el("button", { type: "button", className: "chip", textContent: l.alias || l.name, title: `insert <lora:${l.name}:1>` });
    b.addEventListener("click", () => insertAtCaret($("prompt"), `<lora:${l.name}:1>`));
    return b;
  }));
  chips.hidden = loras.length === 0;
  form.restore();
}

function insertAtCaret(area, text) {
  const start = area.selectionStart ?? area.value.length;
  const end = area.selectionEnd ?? start;
  const before = area.value.slice(0, start);
  const pad = before && !/\s$/.test(before) ? " " : "";
  area.value = before + pad + text + area.value.slice(end);
  const at = start + pad.length + text.length;
  area.focus();
  area.setSelectionRange(at, at);
  form.save();
}

// -- the mask (inpainting) ---------------------------------------------------------------------

const mask = {
  painted: false,
  drawing: false,
  ctx: null,

  reset(w, h) {
    const c = $("mask");
    c.width = w;
    c.height = h;
    this.ctx = c.getContext("2d");
    this.painted = false;
  },

  point(e) {
    const c = $("mask");
    const r = c.getBoundingClientRect();
    return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height, c.width / r.width];
  },

  stroke(e, first) {
    const [x, y, scale] = this.point(e);
    const ctx = this.ctx;
    ctx.fillStyle = ctx.strokeStyle = "#fff";
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = Number($("brush").value) * scale;
    if (first || !this.last) {
      ctx.beginPath();
      ctx.arc(x, y, ctx.lineWidth / 2, 0, Math.PI * 2);
      ctx.fill();
    } else {
      ctx.beginPath();
      ctx.moveTo(this.last[0], this.last[1]);
      ctx.lineTo(x, y);
      ctx.stroke();
    }
    this.last = [x, y];
    this.painted = true;
  },

  invert() {
    const c = $("mask");
    const img = this.ctx.getImageData(0, 0, c.width, c.height);
    for (let i = 3; i < img.data.length; i += 4) {
      img.data[i] = 255 - img.data[i];
      img.data[i - 1] = img.data[i - 2] = img.data[i - 3] = 255;
    }
    this.ctx.putImageData(img, 0, 0);
    this.painted = true;
  },

  // White (repaint) on black, the size of the image: what A1111's `mask` takes.
  dataURL() {
    const c = $("mask");
    const out = el("canvas", { width: c.width, height: c.height });
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, c.width, c.height);
    ctx.drawImage(c, 0, 0);
    return out.toDataURL("image/png");
  },

  wire() {
    const c = $("mask");
    c.addEventListener("pointerdown", (e) => {
      this.drawing = true;
      this.last = null;
      c.setPointerCapture(e.pointerId);
      this.stroke(e, true);
      e.preventDefault();
    });
    c.addEventListener("pointermove", (e) => { if (this.drawing) this.stroke(e, false); });
    const end = () => { this.drawing = false; this.last = null; };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    $("mask-clear").addEventListener("click", () => { this.reset(c.width, c.height); });
    $("mask-invert").addEventListener("click", () => this.invert());
  },
};

// -- the queue and progress --------------------------------------------------------------------

const queue = {
  version: -1,
  seen: new Set(), // finished jobs already shown in Results
  first: true,
  timer: null,
  busy: false,
  sending: Promise.resolve(),

  async submit() {
    showError(null);
    let job;
    try {
      job = form.request();
    } catch (e) {
      showError(e);
      return;
    }
    form.save();
    // Jobs reach the server in the order they were asked for: each POST waits for the one
    // before (three quick clicks could otherwise land as A, C, B).
    const sent = this.sending.then(() => api("/ui/api/queue", { method: "POST", body: job }));
    this.sending = sent.catch(() => {});
    try {
      await sent;
    } catch (e) {
      showError(e);
      return;
    }
    this.poll(true);
  },

  async poll(now) {
    clearTimeout(this.timer);
    let snap = null;
    try {
      snap = await api("/ui/api/queue");
      banner("");
    } catch (e) {
      if (e.status !== 401 && e.status !== 403) banner(`The server does not answer (${e.message}); is the tunnel open? \`orch open\` reopens it.`);
    }
    if (snap) {
      if (snap.version !== this.version) this.render(snap);
      this.busy = !!snap.running || snap.waiting.length > 0;
      if (snap.running) await progress.update(snap.running); else progress.hide();
    }
    this.timer = setTimeout(() => this.poll(), this.busy ? 600 : 2500);
    return now;
  },

  render(snap) {
    this.version = snap.version;
    const list = $("queue");
    const items = [];
    if (snap.running) items.push(this.item(snap.running, "running"));
    snap.waiting.forEach((j, i) => items.push(this.item(j, "waiting", i, snap.waiting.length)));
    snap.finished.slice(0, 30).forEach((j) => items.push(this.item(j, "finished")));
    if (!items.length) items.push(el("li", { className: "muted empty", textContent: "Nothing queued. Generate adds a job here." }));
    list.replaceChildren(...items);
    // Newly finished jobs: their images go to Results (not the ones finished before the page loaded).
    let added = false;
    for (const j of [...snap.finished].reverse()) {
      if (this.seen.has(j.id)) continue;
      this.seen.add(j.id);
      if (this.first) continue;
      if (j.images.length) results.add(j.images);
      if (j.seeds.length) form.lastSeed = j.seeds[0];
      if (j.error) showError(j.error);
      if (j.images.length) gallery.stale = added = true;
    }
    if (added) refreshStatus();
    this.first = false;
  },

  item(job, where, index, count) {
    const li = el("li", { className: `job ${job.state}` });
    li.dataset.id = job.id;
    const title = el("div", { className: "job-title" },
      el("span", { className: "job-state", textContent: job.state }), " ",
      el("span", { className: "job-prompt", textContent: job.prompt || "(no prompt)" }));
    const meta = el("div", { className: "muted job-meta",
      textContent: `${job.kind} · ${job.width}×${job.height} · ${job.steps} steps · ${job.n_iter}×${job.batch_size}` +
        (job.note ? ` · ${job.note}` : "") + (job.error ? ` · ${job.error}` : "") });
    const buttons = el("div", { className: "job-buttons" });
    const button = (text, title, fn) => {
      const b = el("button", { type: "button", textContent: text, title });
      b.addEventListener("click", fn);
      buttons.append(b);
      return b;
    };
    if (where === "waiting") {
      button("↑", "Move up", () => this.move(job.id, index - 1)).disabled = index === 0;
      button("↓", "Move down", () => this.move(job.id, index + 1)).disabled = index === count - 1;
    }
    button("✕", where === "finished" ? "Clear" : where === "running" ? "Cancel (stops at the next step)" : "Cancel",
      () => this.cancel(job.id)).className = "cancel";
    li.append(title, meta, buttons);
    if (job.images.length) {
      const thumbs = el("div", { className: "job-images" });
      for (const id of job.images) thumbs.append(tile(id, job.images));
      li.append(thumbs);
    }
    if (job.warnings.length) li.append(el("div", { className: "muted warn", textContent: job.warnings.join("; ") }));
    return li;
  },

  async move(id, to) {
    try { await api(`/ui/api/queue/${id}/move`, { method: "POST", body: { to: Math.max(0, to) } }); } catch (e) { showError(e); }
    this.poll(true);
  },

  async cancel(id) {
    try { await api(`/ui/api/queue/${id}`, { method: "DELETE" }); } catch (e) { showError(e); }
    this.poll(true);
  },
};

const progress = {
  async update(job) {
    let p;
    try { p = await api("/sdapi/v1/progress"); } catch (e) { return; }
    const box = $("progress");
    box.hidden = false;
    const s = p.state || {};
    const pct = Math.round((p.progress || 0) * 100);
    $("bar-fill").style.width = `${pct}%`;
    const eta = p.eta_relative ? ` · ETA ${p.eta_relative.toFixed(1)} s` : "";
    const elapsed = job.started ? ` · ${Math.max(0, Date.now() / 1000 - job.started).toFixed(1)} s` : "";
    $("progress-text").textContent = `${job.prompt.slice(0, 60) || job.kind}: step ${s.sampling_step || 0}/${s.sampling_steps || job.steps} (${pct}%)${elapsed}${eta}`;
    if (p.current_image) {
      const img = $("live-preview");
      img.src = `data:image/png;base64,${p.current_image}`;
      img.hidden = false;
    }
  },
  hide() {
    $("progress").hidden = true;
    $("live-preview").hidden = true;
  },
};

const results = {
  add(ids) {
    const box = $("results");
    for (const id of [...ids].reverse()) box.prepend(tile(id, ids));
    while (box.children.length > 48) box.lastChild.remove();
  },
};

// -- the gallery -------------------------------------------------------------------------------

function tile(id, list) {
  const a = el("a", { href: `/ui/api/images/${id}`, className: "tile", title: `image ${id}` });
  a.dataset.id = id;
  a.append(el("img", { src: `/ui/api/images/${id}/thumb`, loading: "lazy", alt: `image ${id}` }));
  a.addEventListener("click", (e) => { e.preventDefault(); viewer.open(id, list); });
  return a;
}

const gallery = {
  loaded: false,
  loading: false,
  stale: false,
  next: null,
  ids: [],
  query: "",

  async reset() {
    this.loaded = true;
    this.stale = false;
    this.next = null;
    this.ids = [];
    $("gallery").replaceChildren();
    await this.more(true);
  },

  async more(first) {
    if (this.loading || (!first && !this.next)) return;
    this.loading = true;
    $("gallery-more").textContent = "loading…";
    try {
      const q = new URLSearchParams({ limit: "60" });
      if (this.next) q.set("cursor", this.next);
      if (this.query) q.set("q", this.query);
      const page = await api(`/ui/api/gallery?${q}`);
      for (const item of page.items) {
        this.ids.push(item.id);
        const t = tile(item.id, this.ids);
        t.title = item.prompt;
        $("gallery").append(t);
      }
      this.next = page.next;
      $("gallery-total").textContent = `${page.total} image${page.total === 1 ? "" : "s"}`;
      $("gallery-more").textContent = page.next ? "" : (page.total ? "the end" : "No images yet: generate one.");
    } catch (e) {
      $("gallery-more").textContent = String(e.message);
    } finally {
      this.loading = false;
    }
  },
};

// -- the image viewer --------------------------------------------------------------------------

const viewer = {
  id: null,
  list: [],
  info: null,

  async open(id, list) {
    this.id = id;
    this.list = list || [id];
    const d = $("viewer");
    $("viewer-image").src = `/ui/api/images/${id}`;
    $("viewer-download").href = `/ui/api/images/${id}?download=1`;
    $("viewer-params").textContent = "…";
    if (!d.open) d.showModal();
    try {
      this.info = await api(`/ui/api/images/${id}/info`);
      if (this.id !== id) return;
      $("viewer-params").textContent = this.info.infotext || "(this image carries no parameters)";
    } catch (e) {
      $("viewer-params").textContent = String(e.message);
    }
  },

  step(delta) {
    const i = this.list.indexOf(this.id);
    const j = i + delta;
    if (i >= 0 && j >= 0 && j < this.list.length) this.open(this.list[j], this.list);
  },

  close() { $("viewer").close(); },
};

async function dataURLOf(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`cannot read the image (${r.status})`);
  return readFile(await r.blob());
}

function readFile(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function sendTo(mode, fields, imageURL) {
  try {
    if (fields) form.apply(fields);
    form.setMode(mode);
    await form.setInit(imageURL.startsWith("data:") ? imageURL : await dataURLOf(imageURL));
    showTab("generate");
  } catch (e) {
    showError(e);
  }
}

// -- PNG info ----------------------------------------------------------------------------------

const pnginfo = {
  data: null,
  fields: null,

  async show(file) {
    try {
      this.data = await readFile(file);
      const info = await api("/ui/api/png-info", { method: "POST", body: { image: this.data } });
      this.fields = info.fields;
      $("png-image").src = this.data;
      $("png-text").textContent = info.infotext || "(this image carries no parameters)";
      $("png-result").hidden = false;
    } catch (e) {
      $("png-text").textContent = String(e.message);
      $("png-result").hidden = false;
    }
  },
};

// -- the header --------------------------------------------------------------------------------

async function refreshStatus() {
  try {
    const s = await api("/ui/api/status");
    const text = s.status === "ready" ? `${s.model || "no model"}${s.demo ? " (demo model: noise)" : ""} · ${s.device}`
      : s.status === "error" ? `error: ${s.error}` : `${s.status}…`;
    $("status").textContent = text;
    $("status").className = `status ${s.status}`;
    $("timeleft").textContent = s.time_left ? `auto-shutdown: ${s.time_left}` : "";
    $("gallery-count").textContent = s.images === null ? "(off)" : `(${s.images})`;
    if (s.status !== "ready" && s.status !== "error") setTimeout(refreshStatus, 2000);
  } catch (e) {
    $("status").textContent = "not connected";
  }
}

// -- ControlNet: one unit, its module and model from the extension's routes ---------------------

const controlnet = {
  image: null,  // data: URL of the control image

  async load() {
    const [mods, models] = await Promise.all([api("/controlnet/module_list"), api("/controlnet/model_list")]).catch((e) => [null, null]);
    if (!mods) return;
    fillSelect("cn_module", mods.module_list.map((m) => [m]), true);
    fillSelect("cn_model", models.model_list.map((m) => [m, m.split(" [")[0]]), true);
  },

  unit() {
    if (!this.image && form.mode() === "txt2img") throw new Error("ControlNet: choose a control image, or untick ControlNet");
    if (!$("cn_model").value) throw new Error("ControlNet: no model under models/ControlNet on the instance");
    const unit = { enabled: true, module: $("cn_module").value, model: $("cn_model").value, weight: form.num("cn_weight"),
      guidance_start: form.num("cn_start"), guidance_end: form.num("cn_end"), pixel_perfect: true };
    if (this.image) unit.image = this.image;  // none in img2img: the extension uses the init image
    return unit;
  },

  async setImage(url) {
    this.image = url;
    $("cn-image").src = url;
    $("cn-image").hidden = false;
    $("cn-map").hidden = true;
  },

  // The unit is pixel perfect (and Crop and Resize, the server's default): its processor resolution
  // is the image's short side scaled to cover width x height. The preview asks for the same, so
  // it shows the map the generation uses (the extension's preview does so too).
  async resolution(image) {
    const img = new Image();
    await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = () => reject(new Error("not an image")); img.src = image; });
    const w = form.num("width"), h = form.num("height");
    const x = Math.max(h / img.naturalHeight, w / img.naturalWidth) * Math.min(img.naturalHeight, img.naturalWidth);
    const r = Math.round(x);
    return Math.abs(x - Math.trunc(x)) === 0.5 && r % 2 ? r - 1 : r;  // Python's round(): half to even
  },

  async preview() {
    showError(null);
    const image = this.image || form.init;
    if (!image) return showError(new Error("ControlNet: choose a control image first"));
    try {
      const body = { controlnet_module: $("cn_module").value, controlnet_input_images: [image],
        controlnet_processor_res: await this.resolution(image) };
      const r = await api("/controlnet/detect", { method: "POST", body });
      $("cn-map").src = "data:image/png;base64," + r.images[0];
      $("cn-map").hidden = false;
    } catch (e) { showError(e); }
  },
};

// -- wiring ------------------------------------------------------------------------------------

function wire() {
  for (const b of document.querySelectorAll(".tab-button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", () => form.modeChanged());
  $("form").addEventListener("submit", (e) => { e.preventDefault(); queue.submit(); });
  $("form").addEventListener("change", () => form.save());
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); queue.submit(); } });
  $("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", { method: "POST" }).catch(showError));
  $("skip").addEventListener("click", () => api("/sdapi/v1/skip", { method: "POST" }).catch(showError));
  $("queue-clear").addEventListener("click", async () => { await api("/ui/api/queue", { method: "DELETE" }).catch(showError); queue.poll(true); });
  $("swap").addEventListener("click", () => { const w = $("width").value; $("width").value = $("height").value; $("height").value = w; form.save(); });
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; form.save(); });
  $("seed-last").addEventListener("click", () => { if (form.lastSeed !== null) $("seed").value = form.lastSeed; form.save(); });
  $("enable_hr").addEventListener("change", () => { $("hires").open = $("enable_hr").checked; });
  $("init-file").addEventListener("change", (e) => { if (e.target.files[0]) readFile(e.target.files[0]).then((u) => form.setInit(u)).catch(showError); });
  $("init-clear").addEventListener("click", () => form.clearInit());
  $("cn-file").addEventListener("change", (e) => { if (e.target.files[0]) readFile(e.target.files[0]).then((u) => controlnet.setImage(u)).catch(showError); });
  $("cn-preview").addEventListener("click", () => controlnet.preview());
  $("cn_enabled").addEventListener("change", () => { $("controlnet").open = $("cn_enabled").checked; });
  mask.wire();

  // Drops: on the image box, the image to start from; anywhere else, PNG info.
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (!file) return;
    if (e.target.closest && e.target.closest("#dropzone")) {
      readFile(file).then((u) => form.setInit(u)).catch(showError);
    } else {
      showTab("pnginfo");
      pnginfo.show(file);
    }
  });
  $("png-file").addEventListener("change", (e) => { if (e.target.files[0]) pnginfo.show(e.target.files[0]); });
  $("png-reuse").addEventListener("click", () => { if (pnginfo.fields) { form.apply(pnginfo.fields); form.setMode("txt2img"); showTab("generate"); } });
  $("png-img2img").addEventListener("click", () => pnginfo.data && sendTo("img2img", pnginfo.fields, pnginfo.data));
  $("png-inpaint").addEventListener("click", () => pnginfo.data && sendTo("inpaint", pnginfo.fields, pnginfo.data));

  $("search").addEventListener("input", () => {
    clearTimeout(gallery.searchTimer);
    gallery.searchTimer = setTimeout(() => { gallery.query = $("search").value.trim(); gallery.reset(); }, 250);
  });
  new IntersectionObserver((entries) => { if (entries.some((x) => x.isIntersecting) && gallery.loaded) gallery.more(false); })
    .observe($("gallery-more"));
  document.querySelector(".tab-button[data-tab=gallery]").addEventListener("click", () => { if (gallery.stale) gallery.reset(); });

  $("viewer-close").addEventListener("click", () => viewer.close());
  $("viewer-prev").addEventListener("click", () => viewer.step(-1));
  $("viewer-next").addEventListener("click", () => viewer.step(1));
  $("viewer").addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft") viewer.step(-1);
    if (e.key === "ArrowRight") viewer.step(1);
  });
  $("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) viewer.close(); });
  $("viewer-reuse").addEventListener("click", () => {
    if (!viewer.info) return;
    form.apply(viewer.info.fields);
    form.setMode(viewer.info.kind === "inpaint" || viewer.info.kind === "img2img" ? form.mode() : "txt2img");
    viewer.close();
    showTab("generate");
  });
  $("viewer-seed").addEventListener("click", () => {
    if (viewer.info && viewer.info.fields.seed !== undefined) { $("seed").value = viewer.info.fields.seed; form.save(); }
    viewer.close();
    showTab("generate");
  });
  $("viewer-img2img").addEventListener("click", () => { const id = viewer.id; viewer.close(); sendTo("img2img", viewer.info && viewer.info.fields, `/ui/api/images/${id}`); });
  $("viewer-inpaint").addEventListener("click", () => { const id = viewer.id; viewer.close(); sendTo("inpaint", viewer.info && viewer.info.fields, `/ui/api/images/${id}`); });
}

wire();
form.modeChanged();
loadChoices().then(() => form.modeChanged());
controlnet.load();
refreshStatus();
setInterval(refreshStatus, 30000);
queue.poll(true);
