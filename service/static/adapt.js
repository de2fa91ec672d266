// vss web page, adaptation panel: clip buffer counts, start/cancel a job (POST /v1/adapt), and follow
// its progress, losses, gate verdict and the version it published (GET /v1/adapt/{id}).
// Loaded after app.js (uses its $, setStatus, errorText, loadModels and loadClasses). Plain browser JavaScript.
"use strict";

const adapt = { job: null, timer: null };
const FINAL = ["published", "rejected", "failed", "cancelled"];

function adaptHeaders() {
  const key = $("adapt-key").value.trim();
  const headers = { "Content-Type": "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function loadBuffer() {
  try {
    const response = await fetch("/v1/clips");
    if (!response.ok) return;
    const b = await response.json();
    const mib = (b.bytes / 2 ** 20).toFixed(1);
    setStatus($("adapt-buffer"), `clip buffer: ${b.clips} clips (${b.train_clips} for training, `
      + `${b.heldout_clips} held out for the gate), ${b.frames} frames, ${mib} MiB`
      + (b.collect ? "" : " · collection is off on this server"));
  } catch (e) { /* the next refresh tries again */ }
}

function showJob(job) {
  adapt.job = job;
  $("adapt-details").hidden = false;
  $("adapt-job").textContent = `${job.id.slice(0, 8)} · ${job.request.method} · ${job.state}`;
  const last = job.losses && job.losses.length ? job.losses[job.losses.length - 1] : null;
  $("adapt-loss").textContent = last ? `${last.loss.toFixed(4)} (step ${last.step})` : "–";
  const gate = job.gate;
  $("adapt-gate").textContent = gate ? (gate.passed ? "passed" : "rejected") : "–";
  $("adapt-version").textContent = job.version ? `${job.version} (from ${job.parent})` : "–";
  const reasons = $("adapt-reasons");
  reasons.replaceChildren();
  for (const reason of (gate && gate.reasons) || []) {
    const li = document.createElement("li");
    li.textContent = reason;
    reasons.append(li);
  }
  const box = $("adapt-progress");
  box.hidden = false;
  box.querySelector(".bar").style.width = `${Math.round(100 * (job.progress || 0))}%`;
  box.querySelector(".label").textContent = job.stage ? `${job.stage} · ${job.step} / ${job.steps}` : job.state;
  const done = FINAL.includes(job.state);
  $("adapt-start").disabled = !done;
  $("adapt-cancel").disabled = done || job.cancel_requested;
  if (job.state === "failed") setStatus($("adapt-status"), `failed: ${job.error.message}`, true);
  else if (job.state === "published") setStatus($("adapt-status"), `published ${job.version}`);
  else if (done) setStatus($("adapt-status"), job.state);
  else setStatus($("adapt-status"), job.cancel_requested ? "cancelling …" : `${job.state} …`);
}

async function pollAdapt() {
  if (!adapt.job) return;
  try {
    const response = await fetch(`/v1/adapt/${adapt.job.id}`);
    if (!response.ok) throw new Error(await errorText(response));
    const job = await response.json();
    showJob(job);
    if (FINAL.includes(job.state)) {
      clearInterval(adapt.timer);
      adapt.timer = null;
      loadModels();
      loadBuffer();
      setTimeout(loadClasses, 1500);  // the header badge, once the servers have swapped
    }
  } catch (e) {
    setStatus($("adapt-status"), e.message, true);
  }
}

function follow(job) {
  showJob(job);
  clearInterval(adapt.timer);
  adapt.timer = setInterval(pollAdapt, 1000);
}

async function startAdapt(event) {
  event.preventDefault();
  const body = { method: $("adapt-method").value, steps: Number($("adapt-steps").value) };
  const lr = $("adapt-lr").value.trim();
  if (lr) body.lr = Number(lr);
  $("adapt-start").disabled = true;
  try {
    const response = await fetch("/v1/adapt", { method: "POST", headers: adaptHeaders(), body: JSON.stringify(body) });
    if (response.status !== 202) throw new Error(await errorText(response));
    follow(await response.json());
  } catch (e) {
    setStatus($("adapt-status"), e.message, true);
    $("adapt-start").disabled = false;
  }
}

async function cancelAdapt() {
  if (!adapt.job) return;
  const response = await fetch(`/v1/adapt/${adapt.job.id}/cancel`, { method: "POST", headers: adaptHeaders() });
  if (!response.ok) return setStatus($("adapt-status"), await errorText(response), true);
  showJob(await response.json());
}

async function resumeAdapt() {
  // Follow a job that is already running (started by another client or by the auto policy).
  try {
    const response = await fetch("/v1/adapt");
    if (!response.ok) return;
    const { jobs } = await response.json();
    if (jobs.length) (FINAL.includes(jobs[0].state) ? showJob : follow)(jobs[0]);
  } catch (e) { /* no adaptation routes */ }
}

$("adapt-form").addEventListener("submit", startAdapt);
$("adapt-cancel").addEventListener("click", cancelAdapt);
loadBuffer();
resumeAdapt();
setInterval(loadBuffer, 10000);
