// vss web page: a small line plot on a <canvas> (no libraries). Each series has its own y scale
// (its minimum .. maximum) and a legend entry with its latest value and range; x is shared.
"use strict";

const PLOT_COLOURS = ["#3559e0", "#e0752d", "#2f9e55"];

function drawPlot(canvas, title, series) {
  // series: [{ name, unit, points: [[x, y], ...] }]
  canvas.hidden = false;
  const ratio = window.devicePixelRatio || 1;
  const cssWidth = canvas.clientWidth || canvas.width;
  const cssHeight = canvas.clientHeight || canvas.height;
  canvas.width = Math.round(cssWidth * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, cssWidth, cssHeight);
  const pad = { left: 8, right: 8, top: 20, bottom: 8 };
  const w = cssWidth - pad.left - pad.right, h = cssHeight - pad.top - pad.bottom;
  ctx.strokeStyle = "#e3e6ec";
  ctx.lineWidth = 1;
  ctx.strokeRect(pad.left + 0.5, pad.top + 0.5, w, h);
  const all = series.flatMap((s) => s.points);
  if (!all.length) return;
  const x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  const xspan = x1 - x0 || 1;
  ctx.font = "12px system-ui, sans-serif";
  ctx.textBaseline = "top";
  ctx.fillStyle = "#1d2433";
  ctx.fillText(title, pad.left, 3);
  let legendX = pad.left + ctx.measureText(title).width + 14;
  series.forEach((s, k) => {
    if (!s.points.length) return;
    const colour = PLOT_COLOURS[k % PLOT_COLOURS.length];
    const ys = s.points.map((p) => p[1]);
    let ymin = Math.min(...ys), ymax = Math.max(...ys);
    if (ymax - ymin < 1e-9 * Math.max(1, Math.abs(ymax))) {  // a flat series: draw it mid-height
      const margin = 0.5 * Math.abs(ymax) || 0.5;
      ymin -= margin;
      ymax += margin;
    }
    ctx.strokeStyle = colour;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    s.points.forEach(([x, y], i) => {
      const px = pad.left + (w * (x - x0)) / xspan;
      const py = pad.top + h - (h * (y - ymin)) / (ymax - ymin);
      if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
    });
    ctx.stroke();
    const last = ys[ys.length - 1];
    const low = Math.min(...ys), high = Math.max(...ys);
    let digits = 3;  // enough significant digits that a small range does not read "1.88–1.88"
    while (digits < 6 && low !== high && Number(low.toPrecision(digits)) === Number(high.toPrecision(digits))) digits++;
    const fmt = (v) => (digits > 3 ? String(Number(v.toPrecision(digits))) : formatNumber(v));
    const label = `${s.name} ${fmt(last)}${s.unit || ""} (range ${fmt(low)}–${fmt(high)})`;
    ctx.fillStyle = colour;
    ctx.fillText(label, legendX, 3);
    legendX += ctx.measureText(label).width + 14;
  });
}

function formatNumber(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return String(value);
  const size = Math.abs(value);
  if (Number.isInteger(value) || size >= 100) return String(Math.round(value));
  return size >= 10 ? value.toFixed(1) : String(Number(value.toPrecision(3)));
}
