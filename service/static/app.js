// vss web page: upload a video (sync result or polled job), stream a webcam or a local file over
// WS /v1/stream with a live overlay, list the model versions. Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { classes: [], palette: [], ws: null, source: null, timer: null };

function setStatus(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.error) return `${body.error.code}: ${body.error.message}`;
    if (body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

// ---- legend and model versions ---------------------------------------------------------------

function renderLegend(classes, palette, fractions) {
  state.classes = classes;
  state.palette = palette;
  const ul = $("legend");
  ul.replaceChildren();
  classes.forEach((name, i) => {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = `rgb(${palette[i].join(",")})`;
    li.append(sw, document.createTextNode(name));
    if (fractions && name in fractions) {
      const f = document.createElement("span");
      f.className = "fraction";
      f.textContent = `${(100 * fractions[name]).toFixed(1)}%`;
      li.append(f);
    }
    ul.append(li);
  });
}

function normalizeModels(data) {
  const list = Array.isArray(data) ? data : (data.models || data.versions || data.items || []);
  const active = Array.isArray(data) ? null : (data.active || data.active_version || null);
  return list.map((m) => {
    if (typeof m === "string") return { version: m, active: m === active };
    const version = m.version || m.name || m.id;
    return { version, active: m.active === true || version === active, parent: m.parent || (m.meta && m.meta.parent) };
  });
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    const models = normalizeModels(await response.json());
    const ul = $("models");
    ul.replaceChildren();
    for (const m of models) {
      const li = document.createElement("li");
      li.textContent = m.version + (m.parent ? `  (from ${m.parent})` : "");
      li.classList.toggle("active", m.active);
      ul.append(li);
    }
  } catch (e) {
    $("models").textContent = `model list unavailable (${e.message})`;
  }
}

async function loadClasses() {
  try {
    const response = await fetch("/v1/classes");
    if (!response.ok) return;
    const info = await response.json();
    $("active-version").textContent = info.model_version;
    renderLegend(info.classes, info.palette);
  } catch (e) { /* the legend also arrives with the first stream message */ }
}

async function showAdaptPanel() {
  try {
    const response = await fetch("/openapi.json");
    if (!response.ok) return;
    const spec = await response.json();
    if (spec.paths && spec.paths["/v1/adapt"]) $("adapt-panel").hidden = false;
  } catch (e) { /* no OpenAPI: keep the panel hidden */ }
}

// ---- upload -------------------------------------------------------------------------------------

function showProgress(fraction, label) {
  const box = $("upload-progress");
  box.hidden = false;
  box.querySelector(".bar").style.width = `${Math.round(100 * fraction)}%`;
  box.querySelector(".label").textContent = label;
}

async function showResult(response, format) {
  const version = response.headers.get("X-Model-Version");
  if (version) $("active-version").textContent = version;
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = $("result-download");
  link.href = url;
  link.download = `segmentation.${format}`;
  link.hidden = false;
  if (format === "mp4") {
    const video = $("result-video");
    video.src = url;
    video.hidden = false;
    video.play().catch(() => {});
  } else if (format === "json") {
    const doc = JSON.parse(await blob.text());
    const fractions = (doc.summary && doc.summary.class_fractions) || {};
    const table = $("result-stats");
    table.replaceChildren();
    for (const [name, value] of Object.entries(fractions)) {
      const row = table.insertRow();
      row.insertCell().textContent = name;
      row.insertCell().textContent = `${(100 * value).toFixed(1)}%`;
    }
    table.hidden = false;
    if (state.classes.length) renderLegend(state.classes, state.palette, fractions);
  }
}

async function pollJob(location, format) {
  for (;;) {
    const response = await fetch(location);
    if (!response.ok) throw new Error(await errorText(response));
    const job = await response.json();
    const eta = job.eta_s == null ? "" : `, about ${Math.ceil(job.eta_s)} s left`;
    showProgress(job.progress, `${job.frames_done} / ${job.frames_total} frames${eta}`);
    if (job.state === "failed") throw new Error(`${job.error.code}: ${job.error.message}`);
    if (job.state === "done") {
      const result = await fetch(`${location}/result`);
      if (!result.ok) throw new Error(await errorText(result));
      return showResult(result, format);
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function upload(event) {
  event.preventDefault();
  const file = $("video-file").files[0];
  const status = $("upload-status");
  if (!file) return setStatus(status, "choose a video first", true);
  const format = $("upload-format").value;
  const form = new FormData();
  form.append("video", file);
  $("upload-button").disabled = true;
  $("result-video").hidden = true;
  $("result-stats").hidden = true;
  $("result-download").hidden = true;
  setStatus(status, `uploading ${file.name} …`);
  showProgress(0, "segmenting …");
  try {
    const response = await fetch(`/v1/segment?format=${format}`, { method: "POST", body: form });
    if (response.status === 202) {
      const job = await response.json();
      setStatus(status, `job ${job.id.slice(0, 8)} queued`);
      await pollJob(response.headers.get("Location") || `/v1/jobs/${job.id}`, format);
    } else if (response.ok) {
      await showResult(response, format);
    } else {
      throw new Error(await errorText(response));
    }
    showProgress(1, "done");
    setStatus(status, `segmented ${file.name}`);
  } catch (e) {
    setStatus(status, e.message, true);
  } finally {
    $("upload-button").disabled = false;
  }
}

// ---- live stream ---------------------------------------------------------------------------------

function decodeRle(buffer) {
  // "RLE1", uint32 height, uint32 width, uint32 runs, runs x uint32 lengths, runs x uint8 values.
  const view = new DataView(buffer);
  const height = view.getUint32(4, true), width = view.getUint32(8, true), runs = view.getUint32(12, true);
  const lengths = new Uint32Array(buffer, 16, runs);
  const values = new Uint8Array(buffer, 16 + 4 * runs, runs);
  const labels = new Uint8Array(height * width);
  let at = 0;
  for (let r = 0; r < runs; r++) { labels.fill(values[r], at, at + lengths[r]); at += lengths[r]; }
  return { labels, width, height };
}

const live = { sent: new Map(), inflight: 0, next: 0, meta: null, times: [], grab: document.createElement("canvas") };

function drawOverlay(meta, mask) {
  const snapshot = live.sent.get(meta.frame);
  for (const key of live.sent.keys()) if (key <= meta.frame) live.sent.delete(key);
  const canvas = $("live-canvas");
  const ctx = canvas.getContext("2d");
  canvas.width = mask.width;
  canvas.height = mask.height;
  if (snapshot) ctx.drawImage(snapshot.image, 0, 0, mask.width, mask.height);
  const alpha = Math.round(2.55 * $("alpha").value);
  const image = new ImageData(mask.width, mask.height);
  const px = image.data;
  for (let i = 0; i < mask.labels.length; i++) {
    const colour = state.palette[mask.labels[i]] || [0, 0, 0];
    px[4 * i] = colour[0]; px[4 * i + 1] = colour[1]; px[4 * i + 2] = colour[2]; px[4 * i + 3] = alpha;
  }
  const layer = document.createElement("canvas");
  layer.width = mask.width;
  layer.height = mask.height;
  layer.getContext("2d").putImageData(image, 0, 0);
  ctx.drawImage(layer, 0, 0);
  const now = performance.now();
  live.times.push(now);
  while (live.times.length > 1 && now - live.times[0] > 2000) live.times.shift();
  const span = (now - live.times[0]) / 1000;
  $("stat-fps").textContent = span > 0 ? ((live.times.length - 1) / span).toFixed(1) : "–";
  const rtt = snapshot ? ` · rtt ${Math.round(now - snapshot.t)} ms` : "";
  $("stat-latency").textContent = `${Math.round(meta.latency_ms)} ms${rtt}`;
  $("stat-version").textContent = meta.model_version + (meta.keyframe ? " ◆" : "");
  $("stat-dropped").textContent = meta.dropped;
  $("active-version").textContent = meta.model_version;
  if (meta.class_fractions) renderLegend(state.classes, state.palette, meta.class_fractions);
}

async function pump() {
  const video = $("source-video");
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN || live.inflight >= 2) return;
  if (video.readyState < 2 || video.ended || !video.videoWidth) return;
  const scale = Math.min(1, 640 / video.videoWidth);
  const grab = live.grab;
  grab.width = Math.round(video.videoWidth * scale);
  grab.height = Math.round(video.videoHeight * scale);
  grab.getContext("2d").drawImage(video, 0, 0, grab.width, grab.height);
  live.inflight++;
  const index = live.next++;
  const image = await createImageBitmap(grab);
  live.sent.set(index, { image, t: performance.now() });
  const blob = await new Promise((resolve) => grab.toBlob(resolve, "image/jpeg", 0.85));
  if (ws.readyState === WebSocket.OPEN) ws.send(await blob.arrayBuffer());
}

function openSocket() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stream`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => ws.send(JSON.stringify({ format: "rle", collect: true }));
  ws.onmessage = (event) => {
    if (typeof event.data === "string") {
      const msg = JSON.parse(event.data);
      if (msg.type === "ready") {
        renderLegend(msg.classes, msg.palette);
        setStatus($("stream-status"), `streaming to ${msg.model_version}`);
        state.timer = setInterval(pump, 15);
      } else if (msg.type === "error") {
        setStatus($("stream-status"), `${msg.error.code}: ${msg.error.message}`, true);
      } else {
        live.meta = msg;
      }
    } else if (live.meta) {
      live.inflight = Math.max(0, live.inflight - 1 - live.meta.dropped + (live.lastDropped || 0));
      live.lastDropped = live.meta.dropped;
      drawOverlay(live.meta, decodeRle(event.data));
      live.meta = null;
    }
  };
  ws.onclose = (event) => {
    if (event.code !== 1000 && event.code !== 1005) {
      setStatus($("stream-status"), `stream closed (${event.code}) ${event.reason}`, event.code !== 1001);
    }
    stopStream(false);
  };
  return ws;
}

async function startStream(kind) {
  stopStream(true);
  const video = $("source-video");
  try {
    if (kind === "webcam") {
      state.source = await navigator.mediaDevices.getUserMedia({ video: { width: 640 }, audio: false });
      video.srcObject = state.source;
    } else {
      video.srcObject = null;
      video.src = URL.createObjectURL(kind);
      video.loop = true;
    }
    await video.play();
  } catch (e) {
    return setStatus($("stream-status"), `cannot open the video source: ${e.message}`, true);
  }
  Object.assign(live, { sent: new Map(), inflight: 0, next: 0, meta: null, times: [], lastDropped: 0 });
  state.ws = openSocket();
  $("stop-button").disabled = false;
}

function stopStream(closeSocket) {
  clearInterval(state.timer);
  state.timer = null;
  if (closeSocket && state.ws) state.ws.close(1000);
  state.ws = null;
  if (state.source) state.source.getTracks().forEach((t) => t.stop());
  state.source = null;
  $("source-video").pause();
  $("stop-button").disabled = true;
}

function drawPlaceholder() {
  const canvas = $("live-canvas");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#0d1117";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = "#8b95a8";
  ctx.font = "16px system-ui, sans-serif";
  ctx.textAlign = "center";
  ctx.fillText("start the webcam or choose a video to stream", canvas.width / 2, canvas.height / 2);
}

// ---- start -------------------------------------------------------------------------------------

$("upload-form").addEventListener("submit", upload);
$("webcam-button").addEventListener("click", () => startStream("webcam"));
$("stream-file").addEventListener("change", (e) => e.target.files[0] && startStream(e.target.files[0]));
$("stop-button").addEventListener("click", () => stopStream(true));
drawPlaceholder();
loadClasses();
loadModels();
showAdaptPanel();
setInterval(loadModels, 15000);
