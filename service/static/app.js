// vss web page: upload a video (sync result or polled job), the class legend and the clip buffer
// counts. The live stream is in stream.js, model versions in models.js, adaptation in adapt.js.
// Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { classes: [], palette: [] };

function setStatus(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function authHeader() {
  // The page's API key field (in the adaptation panel): sent with uploads too, for servers that let
  // only authenticated clients feed the clip buffer.
  const key = $("adapt-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.error) return `${body.error.code}: ${body.error.message}`;
    if (body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

// ---- legend and clip buffer ------------------------------------------------------------------

function renderLegend(classes, palette, fractions, source) {
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
  $("legend-source").textContent = fractions
    ? `share of pixels in ${source || "the last result"}`
    : "share of pixels appears here after a JSON upload or while streaming";
}

function clearFractions() {
  if (state.classes.length) renderLegend(state.classes, state.palette);
}

async function loadClasses() {
  try {
    const response = await fetch("/v1/classes");
    if (!response.ok) return;
    const info = await response.json();
    $("active-version").textContent = info.model_version;
    if (!$("legend").querySelector(".fraction")) renderLegend(info.classes, info.palette);
  } catch (e) { /* the legend also arrives with the first stream message */ }
}

async function loadBuffer() {
  // GET /v1/clips: what uploads and streams have collected for adaptation so far.
  try {
    const response = await fetch("/v1/clips");
    if (!response.ok) return;
    const b = await response.json();
    const off = b.collect === false;
    state.collectMode = b.collect_mode || (off ? "off" : "all");
    for (const el of document.querySelectorAll(".buffer-count")) {
      el.textContent = off ? "(off on this server)" : `(buffer: ${b.clips} clips)`;
    }
    for (const id of ["upload-collect", "stream-collect"]) $(id).disabled = off;
    const mib = (b.bytes / 2 ** 20).toFixed(1);
    const mode = b.collect_mode === "authenticated" ? " · only clients with the API key feed it" : "";
    setStatus($("adapt-buffer"), `clip buffer: ${b.clips} clips (${b.train_clips} for training, `
      + `${b.heldout_clips} held out for the gate), ${b.frames} frames, ${mib} MiB`
      + (off ? " · collection is off on this server" : mode));
  } catch (e) { /* the next refresh tries again */ }
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

function showProgress(fraction, label, failed = false) {
  const box = $("upload-progress");
  box.hidden = false;
  box.classList.toggle("failed", failed);
  if (fraction != null) box.querySelector(".bar").style.width = `${Math.round(100 * fraction)}%`;
  box.querySelector(".label").textContent = label;
}

async function showResult(response, format, name) {
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
    for (const [cls, value] of Object.entries(fractions)) {
      const row = table.insertRow();
      row.insertCell().textContent = cls;
      row.insertCell().textContent = `${(100 * value).toFixed(1)}%`;
    }
    table.hidden = false;
    if (state.classes.length) renderLegend(state.classes, state.palette, fractions, name);
  }
}

async function pollJob(location, format, name) {
  for (;;) {
    const response = await fetch(location);
    if (!response.ok) throw new Error(await errorText(response));
    const job = await response.json();
    const eta = job.eta_s == null ? "" : `, about ${Math.ceil(job.eta_s)} s left`;
    showProgress(job.progress, `${job.frames_done} / ${job.frames_total} frames${eta}`);
    setStatus($("upload-status"), `job ${job.id.slice(0, 8)} ${job.state}`
      + (job.state === "running" ? ` · ${job.frames_done} / ${job.frames_total} frames` : ""));
    if (job.state === "failed") throw new Error(`${job.error.code}: ${job.error.message}`);
    if (job.state === "done") {
      const result = await fetch(`${location}/result`);
      if (!result.ok) throw new Error(await errorText(result));
      return showResult(result, format, name);
    }
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

async function upload(event) {
  event.preventDefault();
  const file = $("video-file").files[0];
  const status = $("upload-status");
  if (!file) return setStatus(status, "choose a video first", true);
  const format = $("upload-format").value;
  const collect = $("upload-collect").checked && !$("upload-collect").disabled;
  const form = new FormData();
  form.append("video", file);
  $("upload-button").disabled = true;
  $("result-video").hidden = true;
  $("result-stats").hidden = true;
  $("result-download").hidden = true;
  clearFractions();  // the previous result's shares are not this video's
  setStatus(status, `uploading ${file.name} …`);
  showProgress(0, "uploading …");
  try {
    const response = await fetch(`/v1/segment?format=${format}&collect=${collect}`, { method: "POST", body: form, headers: authHeader() });
    if (response.status === 202) {
      const job = await response.json();
      setStatus(status, `job ${job.id.slice(0, 8)} ${job.state || "queued"}`);
      await pollJob(response.headers.get("Location") || `/v1/jobs/${job.id}`, format, file.name);
    } else if (response.ok) {
      await showResult(response, format, file.name);
    } else {
      throw new Error(await errorText(response));
    }
    showProgress(1, "done");
    setStatus(status, `segmented ${file.name}` + (collect ? " · sampled clips go to the adaptation buffer" : ""));
  } catch (e) {
    showProgress(null, "failed", true);
    setStatus(status, e.message, true);
  } finally {
    $("upload-button").disabled = false;
    document.dispatchEvent(new Event("vss:collected"));
  }
}

// ---- start -------------------------------------------------------------------------------------

$("upload-form").addEventListener("submit", upload);
document.addEventListener("vss:collected", () => { setTimeout(loadBuffer, 500); setTimeout(loadBuffer, 3000); });
loadClasses();
loadBuffer();
showAdaptPanel();
setInterval(loadBuffer, 10000);
