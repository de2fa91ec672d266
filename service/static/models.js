// vss web page, model versions: the list with each version's provenance (method, parent, date,
// domains, gate verdict, per-domain routing state) from GET /v1/models, and a rollback button that activates the previous
// version (POST /v1/models/{version}/activate). Loaded after app.js. Plain browser JavaScript.
"use strict";

const models = { list: [], active: null, target: null };

function apiHeaders() {
  return { "Content-Type": "application/json", ...authHeader() };
}

function formatDate(text) {
  if (!text) return null;
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? text : `${date.toISOString().slice(0, 16).replace("T", " ")} UTC`;
}

function domainsOf(provenance) {
  const domains = provenance.domains || provenance.domain || (provenance.data && provenance.data.domains);
  if (!domains) return null;
  return Array.isArray(domains) ? domains.join(", ") : String(domains);
}

function domainLabel(version) {
  // " (fog)" when the version serving a stream is a per-domain version (GET /v1/models "domain"), else "".
  const m = models.list.find((v) => v.version === version);
  return m && m.domain ? ` (${m.domain.name || "domain"})` : "";
}

function routingText(m) {
  // The per-domain routing state of one version (service/routing.py): its domain, distance, routed/retired.
  if (!m.domain) return null;
  const d = m.domain;
  const parts = [`domain ${d.name || "unnamed"} (${d.clips} clips`];
  if (d.distance_to_base !== null && d.distance_to_base !== undefined) parts[0] += `, ${d.distance_to_base} from the base`;
  parts[0] += ")";
  if (m.retired) parts.push("retired");
  else if (m.routed) parts.push("routed here");
  else if (m.routable) parts.push("routable");
  return parts.join(" · ");
}

function provenanceText(m) {
  // One line: how this version was made (the registry's metadata), or why it cannot be read.
  if (m.error) return `unreadable: ${m.error}`;
  const p = m.provenance || {};
  const parts = [];
  if (p.method) parts.push(`method ${p.method}`);
  else if (p.source) parts.push(String(p.source).replace(/^adaptation\./, ""));
  parts.push(m.parent ? `from ${m.parent}` : "no parent");
  const date = formatDate(m.created || p.created);
  if (date) parts.push(date);
  const domains = domainsOf(p);
  if (domains) parts.push(`domains ${domains}`);
  if (p.gate) parts.push(`gate ${p.gate.passed ? "passed" : "rejected"}`);
  if (p.trigger) parts.push(`trigger ${p.trigger}`);
  const routing = routingText(m);
  if (routing) parts.push(routing);
  return parts.join(" · ");
}

function rollbackTarget(list, active) {
  // The active version's parent when the registry holds it, else the version before it.
  const index = list.findIndex((m) => m.version === active);
  if (index < 0) return null;
  const parent = list[index].parent;
  if (parent && list.some((m) => m.version === parent)) return parent;
  return index > 0 ? list[index - 1].version : null;
}

function renderModels(data) {
  models.list = data.versions || [];
  models.active = data.active;
  const ul = $("models");
  ul.replaceChildren();
  for (const m of models.list) {
    const li = document.createElement("li");
    li.dataset.version = m.version;
    li.classList.toggle("active", m.active);
    const name = document.createElement("span");
    name.className = "version";
    name.textContent = m.version;
    const detail = document.createElement("span");
    detail.className = "provenance";
    detail.textContent = provenanceText(m);
    li.append(name, detail);
    ul.append(li);
  }
  models.target = rollbackTarget(models.list, models.active);
  const button = $("rollback-button");
  button.hidden = !models.target;
  if (models.target) button.textContent = `Roll back to ${models.target}`;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    renderModels(await response.json());
  } catch (e) {
    setStatus($("models-status"), `model list unavailable (${e.message})`, true);
  }
}

async function rollback() {
  const target = models.target, from = models.active;
  if (!target) return;
  if (!window.confirm(`Activate ${target} instead of ${from}? Uploads and streams switch to it at their next frame.`)) {
    return setStatus($("models-status"), "rollback cancelled");
  }
  const button = $("rollback-button");
  button.disabled = true;
  setStatus($("models-status"), `activating ${target} …`);
  try {
    const response = await fetch(`/v1/models/${encodeURIComponent(target)}/activate`,
                                 { method: "POST", headers: apiHeaders() });
    if (!response.ok) throw new Error(await errorText(response));
    const serving = await response.json();
    setStatus($("models-status"), `rolled back: ${serving.version} is active and served (was ${from})`);
    $("active-version").textContent = serving.version;
  } catch (e) {
    setStatus($("models-status"), `rollback to ${target} failed: ${e.message}`, true);
  } finally {
    button.disabled = false;
    loadModels();
    loadClasses();
  }
}

$("rollback-button").addEventListener("click", rollback);
loadModels();
setInterval(loadModels, 15000);
