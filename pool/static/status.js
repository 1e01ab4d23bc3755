// The status page: polls /status.json and draws it. No library, no build step.
"use strict";

const REFRESH_MS = 2000;

function fmtInt(n) {
  return n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en-US");
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fillTable(id, rows, toCells, rowClass) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement("tr");
    const extra = rowClass ? rowClass(row) : null;
    if (extra) {
      for (const [key, value] of Object.entries(extra)) {
        if (key === "class") tr.className = value; else tr.dataset[key] = value;
      }
    }
    for (const td of toCells(row)) tr.appendChild(td);
    body.appendChild(tr);
  }
}

// A line chart of points [t, value] on a canvas, with the max value labelled.
function drawChart(id, points, color) {
  const canvas = document.getElementById(id);
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 22;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#e6e8ed";
  ctx.strokeRect(pad, 4, w - pad - 4, h - pad - 4);
  const values = points.filter(p => p[1] !== null && p[1] !== undefined);
  if (values.length === 0) return;
  const t0 = values[0][0], t1 = values[values.length - 1][0];
  const max = Math.max(1, ...values.map(p => p[1]));
  const x = t => pad + (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * (w - pad - 6);
  const y = v => h - pad - (v / max) * (h - pad - 10);
  ctx.strokeStyle = color;
  ctx.lineWidth = 2;
  ctx.beginPath();
  values.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
  ctx.stroke();
  ctx.fillStyle = "#6b7385";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(fmtInt(max), pad + 4, 16);
  ctx.fillText(fmtSeconds(t1 - t0) + " shown", w - 90, h - 6);
}

function render(s) {
  const healthy = s.healthy;
  const badge = document.getElementById("health");
  badge.textContent = healthy ? "healthy" : "unhealthy";
  badge.className = "badge " + (healthy ? "ok" : "bad");
  setText("updated", "updated " + new Date(s.refreshed_at * 1000).toLocaleTimeString());
  const problems = document.getElementById("problems");
  problems.replaceChildren(...s.problems.map(p => Object.assign(document.createElement("li"), {textContent: p})));

  setText("rate", fmtInt(s.rows_per_second));
  setText("backlog", fmtInt(s.backlog));
  setText("lag", fmtSeconds(s.lag_seconds));
  setText("dead", fmtInt(s.dead));
  setText("queue-depth", fmtInt(s.queue_depth));
  setText("pollers-live", s.pollers_live + " / " + s.pollers_expected);
  setText("acked-total", fmtInt(s.totals.acked));

  drawChart("chart-rate", s.history.map(p => [p.t, p.rows_per_second]), "#2f6fdb");
  drawChart("chart-backlog", s.history.map(p => [p.t, p.backlog]), "#d9822b");
  drawChart("chart-lag", s.history.map(p => [p.t, p.lag_seconds]), "#8a3ffc");

  fillTable("pollers", s.pollers, p => [
    cell("poller-" + p.worker, "text"),
    cell(p.pid === null ? "–" : String(p.pid)),
    Object.assign(cell(String(p.shards.length)), {title: p.shards.join(", ")}),
    cell(p.state, "text"),
    cell(fmtSeconds(p.heartbeat_age_seconds)),
    cell(fmtInt(p.rows_per_second)),
    cell(fmtInt(p.batch_size)),
    cell(fmtSeconds(p.poll_interval)),
    cell(fmtInt(p.acked)),
  ], p => ({worker: String(p.worker), class: p.live ? "" : "down"}));
  setText("host", s.host);
  fillTable("hosts", s.hosts, h => [cell(h.host, "text"), cell(String(h.pollers)), cell(String(h.shards))],
            h => ({host: h.host}));
  fillTable("shards", s.shards, r => [cell(String(r.shard)), cell(fmtInt(r.backlog)), cell(r.owner || "free", "text")],
            r => ({shard: String(r.shard)}));
  fillTable("dead-letters", s.dead_letters, d => [
    // Ids come as strings (a JSON number above 2^53 would be rounded): shown as they come.
    cell(d.id), cell(String(d.attempts)), cell(fmtSeconds(d.age_seconds)),
    cell(d.last_error || "", "text"),
  ], d => ({row: d.id}));
}

async function refresh() {
  try {
    const response = await fetch("/status.json", {cache: "no-store"});
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
    render(body);
  } catch (err) {
    const badge = document.getElementById("health");
    badge.textContent = "coordinator unreachable: " + err.message;
    badge.className = "badge bad";
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
