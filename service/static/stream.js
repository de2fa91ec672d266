// vss web page, live stream: a webcam or a local video over WS /v1/stream with a live overlay.
// Each decoded video frame is sent at most once, as the video presents it (a file streams at its own
// frame rate); a close with 1012 (the server drains) reconnects after a short backoff and resumes.
// Loaded after app.js (uses $, state, setStatus, renderLegend, clearFractions). Plain browser JavaScript.
"use strict";

const RECONNECT_MS = [250, 500, 1000, 2000, 4000];
const stream = { ws: null, source: null, active: false, callback: null, timer: null, attempt: 0, retry: null };
const live = {};

function resetLive() {
  Object.assign(live, { sent: new Map(), inflight: 0, next: 0, meta: null, times: [], lastDropped: 0,
                        grab: live.grab || document.createElement("canvas") });
}

function resetCounters() {
  Object.assign(live, { frames: 0, skipped: 0, lastPresented: -1, lastMedia: 0, mediaSeconds: 0,
                        t0: performance.now(), history: [], reference: null, plotted: 0 });
}

function collecting() {
  // The `collect` config key: off when unticked, or when the server collects nothing anyway.
  return $("stream-collect").checked && !$("stream-collect").disabled;
}

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

function drift(fractions) {
  // Total variation distance between this frame's class shares and the stream's running mean.
  if (!live.reference) live.reference = { ...fractions };
  let tv = 0;
  for (const name of Object.keys(fractions)) {
    const ref = live.reference[name] || 0;
    tv += Math.abs(fractions[name] - ref);
    live.reference[name] = 0.95 * ref + 0.05 * fractions[name];
  }
  return tv / 2;
}

function plotLive(meta, now) {
  const t = (now - live.t0) / 1000;
  live.history.push([t, meta.latency_ms, meta.class_fractions ? drift(meta.class_fractions) : 0]);
  while (live.history.length && t - live.history[0][0] > 60) live.history.shift();
  if (now - live.plotted < 250) return;
  live.plotted = now;
  drawPlot($("live-plot"), "last 60 s", [
    { name: "latency", unit: " ms", points: live.history.map((p) => [p[0], p[1]]) },
    { name: "class drift", unit: "", points: live.history.map((p) => [p[0], p[2]]) },
  ]);
}

function drawOverlay(meta, mask) {
  const snapshot = live.sent.get(meta.frame);
  for (const key of live.sent.keys()) if (key <= meta.frame) live.sent.delete(key);
  const canvas = $("live-canvas");
  const ctx = canvas.getContext("2d");
  canvas.width = mask.width;  // the label map has the frame's size: the source's aspect ratio is kept
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
  $("stat-version").textContent = meta.model_version + domainLabel(meta.model_version) + (meta.keyframe ? " ◆" : "");
  $("stat-dropped").textContent = `${meta.dropped} on the server, ${live.skipped} skipped here`;
  $("active-version").textContent = meta.model_version;
  if (meta.class_fractions) renderLegend(state.classes, state.palette, meta.class_fractions, "the live stream");
  plotLive(meta, now);
}

async function sendFrame(ws) {
  const video = $("source-video");
  if (live.inflight >= 2) { live.skipped++; return; }  // the server is busy: skip, never queue
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
  const data = await blob.arrayBuffer();
  if (stream.ws === ws && ws.readyState === WebSocket.OPEN) { ws.send(data); live.frames++; }
}

function onVideoFrame(meta) {
  // Called once per frame the video presents; a frame already sent is never sent again.
  if (meta.presentedFrames === live.lastPresented) return;
  live.lastPresented = meta.presentedFrames;
  const media = meta.mediaTime;
  live.mediaSeconds += media >= live.lastMedia ? media - live.lastMedia : media;  // a loop restarts at 0
  live.lastMedia = media;
  const ws = stream.ws;
  const video = $("source-video");
  if (!ws || ws.readyState !== WebSocket.OPEN || !live.ready || video.readyState < 2 || !video.videoWidth) return;
  sendFrame(ws);
}

function watchFrames() {
  const video = $("source-video");
  if ("requestVideoFrameCallback" in video) {
    const next = () => {
      stream.callback = video.requestVideoFrameCallback((now, meta) => {
        if (!stream.active) return;
        next();
        onVideoFrame(meta);
      });
    };
    next();
  } else {  // no per-frame callback: send when the video's time moves on
    let count = 0, last = -1;
    stream.timer = setInterval(() => {
      if (video.currentTime === last) return;
      last = video.currentTime;
      onVideoFrame({ presentedFrames: ++count, mediaTime: last });
    }, 10);
  }
}

function scheduleReconnect(reason) {
  const delay = RECONNECT_MS[Math.min(stream.attempt, RECONNECT_MS.length - 1)];
  stream.attempt++;
  setStatus($("stream-status"), `${reason}; reconnecting in ${(delay / 1000).toFixed(2)} s (try ${stream.attempt}) …`);
  stream.retry = setTimeout(() => { stream.retry = null; if (stream.active) openSocket(); }, delay);
}

function openSocket() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stream`);
  stream.ws = ws;
  resetLive();
  live.ready = false;
  ws.binaryType = "arraybuffer";
  ws.onopen = () => ws.send(JSON.stringify({ format: "rle", collect: collecting() }));
  ws.onmessage = (event) => {
    if (stream.ws !== ws) return;
    if (typeof event.data === "string") {
      const msg = JSON.parse(event.data);
      if (msg.type === "ready") {
        renderLegend(msg.classes, msg.palette);
        const again = stream.attempt > 0 ? " (reconnected)" : "";
        stream.attempt = 0;
        stream.reconnected = stream.reconnected + (again ? 1 : 0);
        live.ready = true;
        setStatus($("stream-status"), `streaming to ${msg.model_version}${again}`
          + (!collecting() ? "" : state.collectMode === "authenticated"
            ? " · the buffer takes clips only from clients with the API key" : " · feeding the adaptation buffer"));
      } else if (msg.type === "error") {
        stream.lastError = msg.error;
        if (msg.error.code !== "draining") setStatus($("stream-status"), `${msg.error.code}: ${msg.error.message}`, true);
      } else {
        live.meta = msg;
      }
    } else if (live.meta) {
      live.inflight = Math.max(0, live.inflight - 1 - live.meta.dropped + live.lastDropped);
      live.lastDropped = live.meta.dropped;
      drawOverlay(live.meta, decodeRle(event.data));
      live.meta = null;
    }
  };
  ws.onclose = (event) => {
    if (stream.ws !== ws) return;  // a socket this page already left
    stream.ws = null;
    if (!stream.active) return;
    // 1012: the server drains (another replica takes the stream); while reconnecting, a refused
    // handshake (1006) is retried too, with a growing backoff.
    if (event.code === 1012 || (stream.attempt > 0 && event.code === 1006 && stream.attempt < 12)) {
      return scheduleReconnect(event.code === 1012 ? "the server is restarting (1012)" : "no server yet");
    }
    const clean = event.code === 1000 || event.code === 1005;
    setStatus($("stream-status"), clean ? "the server ended the stream"
      : `stream closed (${event.code}) ${event.reason}`, !clean && event.code !== 1001);
    endStream();
  };
}

async function startStream(kind) {
  stopStream();
  const video = $("source-video");
  try {
    if (kind === "webcam") {
      stream.source = await navigator.mediaDevices.getUserMedia({ video: { width: 640 }, audio: false });
      video.srcObject = stream.source;
    } else {
      video.srcObject = null;
      video.src = URL.createObjectURL(kind);
      video.loop = true;
    }
    await video.play();
  } catch (e) {
    return setStatus($("stream-status"), `cannot open the video source: ${e.message}`, true);
  }
  const canvas = $("live-canvas");  // the source's aspect ratio from the start
  canvas.width = video.videoWidth || canvas.width;
  canvas.height = video.videoHeight || canvas.height;
  clearFractions();
  resetCounters();
  Object.assign(stream, { active: true, attempt: 0, reconnected: 0, lastError: null });
  setStatus($("stream-status"), "connecting …");
  openSocket();
  watchFrames();
  $("stop-button").disabled = false;
}

function endStream() {
  stream.active = false;
  clearTimeout(stream.retry);
  clearInterval(stream.timer);
  const video = $("source-video");
  if (stream.callback != null && "cancelVideoFrameCallback" in video) video.cancelVideoFrameCallback(stream.callback);
  stream.callback = null;
  if (stream.source) stream.source.getTracks().forEach((t) => t.stop());
  stream.source = null;
  video.pause();
  $("stop-button").disabled = true;
  document.dispatchEvent(new Event("vss:collected"));
}

function stopStream() {
  if (!stream.active) return;
  const ws = stream.ws;
  stream.ws = null;  // nothing is sent on it any more
  endStream();
  if (ws && ws.readyState === WebSocket.OPEN) ws.close(1000);
  else if (ws && ws.readyState === WebSocket.CONNECTING) ws.onopen = () => ws.close(1000);
  setStatus($("stream-status"), `stopped after ${live.frames} frames`);
}

function drawPlaceholder() {
  const canvas = $("live-canvas");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#0d1117";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = "#8b95a8";
  ctx.font = "18px system-ui, sans-serif";
  ctx.textAlign = "center";
  ctx.fillText("start the webcam or choose a video to stream", canvas.width / 2, canvas.height / 2);
}

resetLive();
resetCounters();
$("webcam-button").addEventListener("click", () => startStream("webcam"));
$("stream-file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  e.target.value = "";  // choosing the same file again starts it again
  if (file) startStream(file);
});
$("stop-button").addEventListener("click", stopStream);
drawPlaceholder();
