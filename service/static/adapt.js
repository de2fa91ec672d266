// vss web page, adaptation panel: start/cancel a job (POST /v1/adapt, validated here first), and follow
// its progress, loss plot, gate verdict with its metrics and the version it published (GET /v1/adapt/{id}).
// Loaded after app.js, plot.js and models.js (uses $, setStatus, errorText, loadBuffer, loadClasses,
// drawPlot, apiHeaders, loadModels). Plain browser JavaScript.
"use strict";

const adapt = { job: null, timer: null };
const FINAL = ["published", "rejected", "failed", "cancelled"];

function metricText(value) {
  if (Array.isArray(value)) return value.map(metricText).join(", ") || "none";
  if (value && typeof value === "object") {
    return Object.entries(value).map(([k, v]) => `${k} ${metricText(v)}`).join(" · ");
  }
  return typeof value === "number" ? formatNumber(value) : String(value);
}

function showMetrics(metrics) {
  // The gate's measurements (held-out clips: class shares, entropy, temporal consistency, agreement, mIoU).
  const table = $("adapt-metrics");
  table.replaceChildren();
  table.hidden = !metrics || !Object.keys(metrics).length;
  for (const [name, value] of Object.entries(metrics || {})) {
    const row = table.insertRow();
    row.insertCell().textContent = name.replaceAll("_", " ");
    row.insertCell().textContent = metricText(value);
  }
}

function showJob(job) {
  adapt.job = job;
  $("adapt-details").hidden = false;
  const domain = job.request.auto && job.request.auto.mode === "domain" ? job.request.auto.domain.name : null;
  $("adapt-job").textContent = [job.id.slice(0, 8), job.trigger === "auto" ? "automatic round" : null,
                                domain ? `domain ${domain}` : null, job.request.method, job.state]
    .filter(Boolean).join(" · ");
  const last = job.losses && job.losses.length ? job.losses[job.losses.length - 1] : null;
  $("adapt-loss").textContent = last ? `${last.loss.toFixed(4)} (step ${last.step})` : "–";
  const gate = job.gate;
  $("adapt-gate").textContent = gate ? (gate.passed ? "passed" : "rejected") : "–";
  showMetrics(gate && gate.metrics);
  if (job.losses && job.losses.length) {
    drawPlot($("adapt-plot"), "training loss over steps",
             [{ name: "loss", points: job.losses.map((l) => [l.step, l.loss]) }]);
  } else {
    $("adapt-plot").hidden = true;
  }
  $("adapt-version").textContent = job.version
    ? `${job.version} (from ${job.parent}${job.version && !job.activated ? "; not activated" : ""})` : "–";
  const reasons = $("adapt-reasons");
  reasons.replaceChildren();
  for (const reason of (gate && gate.reasons) || []) {
    const li = document.createElement("li");
    li.textContent = reason;
    reasons.append(li);
  }
  const box = $("adapt-progress");
  box.hidden = false;
  box.classList.toggle("failed", job.state === "failed" || job.state === "rejected");
  box.querySelector(".bar").style.width = `${Math.round(100 * (job.progress || 0))}%`;
  box.querySelector(".label").textContent = job.stage ? `${job.stage} · ${job.step} / ${job.steps}` : job.state;
  const done = FINAL.includes(job.state);
  $("adapt-start").disabled = !done;
  $("adapt-cancel").disabled = done || job.cancel_requested;
  const overridden = gate && gate.policy === "off" && !gate.passed ? " (the gate would have rejected it: gate off)" : "";
  if (job.state === "failed") setStatus($("adapt-status"), `failed: ${job.error.message}`, true);
  else if (job.state === "published" && overridden) setStatus($("adapt-status"), `published ${job.version}${overridden}`);
  else if (job.state === "published") setStatus($("adapt-status"), `published ${job.version}`);
  else if (job.state === "rejected") setStatus($("adapt-status"), "rejected by the gate (its reasons are below)");
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
  const body = { method: $("adapt-method").value };
  const steps = $("adapt-steps").value.trim(), lr = $("adapt-lr").value.trim();
  if (!/^[0-9]+$/.test(steps) || Number(steps) < 1) {
    return setStatus($("adapt-status"), `steps must be a whole number of at least 1, not "${steps}"`, true);
  }
  body.steps = Number(steps);
  if (lr) {
    const value = Number(lr);  // Number("abc") is NaN; Number("") would be 0
    if (!/^[-+0-9.eE]+$/.test(lr) || !Number.isFinite(value) || value <= 0) {
      return setStatus($("adapt-status"), `lr must be a positive number such as 0.001 or 1e-4, not "${lr}"`, true);
    }
    body.lr = value;
  }
  setStatus($("adapt-status"), "starting …");
  $("adapt-start").disabled = true;
  try {
    const response = await fetch("/v1/adapt", { method: "POST", headers: apiHeaders(), body: JSON.stringify(body) });
    if (response.status !== 202) throw new Error(await errorText(response));
    follow(await response.json());
  } catch (e) {
    setStatus($("adapt-status"), e.message, true);
    $("adapt-start").disabled = false;
  }
}

async function cancelAdapt() {
  if (!adapt.job) return;
  const response = await fetch(`/v1/adapt/${adapt.job.id}/cancel`, { method: "POST", headers: apiHeaders() });
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

async function watchAuto() {
  // Jobs started elsewhere (another client, the worker's automatic rounds) appear here as they start, and the
  // auto policy's last decision is shown (GET /v1/models/active → auto).
  try {
    const response = await fetch("/v1/models/active");
    const auto = response.ok ? (await response.json()).auto : null;
    $("adapt-auto").hidden = !(auto && auto.enabled);
    if (auto && auto.enabled) {
      const r = auto.rounds || {}, d = auto.decision || {};
      $("adapt-auto").textContent = `automatic rounds: ${d.reason || "waiting for the worker"} · ` +
        `${d.drifted || 0} drifted clip(s) · ${r.started || 0} started, ${r.published || 0} published, ` +
        `${r.rejected || 0} rejected`;
    }
    if (adapt.timer) return;  // following a job already
    const jobs = await fetch("/v1/adapt");
    if (!jobs.ok) return;
    const [newest] = (await jobs.json()).jobs;
    if (newest && (!adapt.job || newest.id !== adapt.job.id)) (FINAL.includes(newest.state) ? showJob : follow)(newest);
  } catch (e) { /* no adaptation routes, or the server is restarting */ }
}

$("adapt-form").addEventListener("submit", startAdapt);
$("adapt-cancel").addEventListener("click", cancelAdapt);
resumeAdapt();
setInterval(watchAuto, 3000);
