// peftkit board: a list of runs, a run page, a compare page. Plain JS, no dependencies, charts in SVG.
"use strict";
const POLL_MS = 2000;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#d97706", "#0891b2", "#db2777", "#4b5563"];
const view = document.getElementById("view");
let timer = null;
let generation = 0;  // a view change makes the previous view's pending polls harmless

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = (x, d = 4) => (typeof x === "number" ? (Math.abs(x) >= 1000 ? x.toFixed(0) : +x.toPrecision(d)) : "–");
const enc = (id) => id.split("/").map(encodeURIComponent).join("/");

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function badge(status) { return `<span class="badge ${esc(status)}" data-status="${esc(status)}">${esc(status)}</span>`; }
function bar(pct, big) { return `<div class="bar${big ? " big" : ""}"><div style="width:${Math.max(0, Math.min(100, pct || 0))}%"></div></div>`; }

// ---- charts ---------------------------------------------------------------------------------
function thin(points, max = 1500) {  // keep every k-th point (and the last): 10,000 lines draw as fast as 1,500
  if (points.length <= max) return points;
  const k = Math.ceil(points.length / max), out = points.filter((_, i) => i % k === 0);
  if (out[out.length - 1] !== points[points.length - 1]) out.push(points[points.length - 1]);
  return out;
}
function smooth(points, weight = 0.9) {  // the exponential moving average TensorBoard shows, debiased
  let last = 0, n = 0;
  return points.map(([x, y]) => { n++; last = last * weight + (1 - weight) * y; return [x, last / (1 - Math.pow(weight, n))]; });
}
function chart(series, {title = "", logY = false} = {}) {
  const W = 600, H = 230, L = 52, R = 10, T = 10, B = 24;
  const all = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!logY || y > 0));
  const legend = `<div class="legend">${series.map((s) => `<span><i style="background:${s.color}"></i>${esc(s.name)}</span>`).join("")}</div>`;
  if (!all.length) return `<h3>${esc(title)}</h3><p class="muted">no data yet</p>`;
  const f = logY ? Math.log10 : (y) => y;
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => f(p[1]))), Math.max(...all.map((p) => f(p[1])))];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), py = (y) => T + (1 - (f(y) - y0) / (y1 - y0)) * (H - T - B);
  const ticks = [0, 0.5, 1].map((t) => y0 + t * (y1 - y0));
  const grid = ticks.map((v) => `<line x1="${L}" x2="${W - R}" y1="${py(logY ? 10 ** v : v)}" y2="${py(logY ? 10 ** v : v)}" stroke="#eee"/>` +
    `<text x="${L - 4}" y="${py(logY ? 10 ** v : v) + 3}" text-anchor="end">${fmt(logY ? 10 ** v : v, 3)}</text>`).join("");
  const paths = series.map((s) => {
    const pts = thin(s.points.filter(([x, y]) => Number.isFinite(y) && (!logY || y > 0)));
    if (!pts.length) return "";
    const d = pts.map(([x, y], i) => `${i ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join("");
    const dots = pts.length < 40 && s.dots ? pts.map(([x, y]) => `<circle cx="${px(x)}" cy="${py(y)}" r="2.5" fill="${s.color}"/>`).join("") : "";
    return `<path d="${d}" fill="none" stroke="${s.color}" stroke-width="${s.width || 1.5}" opacity="${s.opacity || 1}" data-series="${esc(s.name)}" data-points="${s.points.length}"/>${dots}`;
  }).join("");
  const axis = `<text x="${L}" y="${H - 6}">${fmt(x0)}</text><text x="${W - R}" y="${H - 6}" text-anchor="end">step ${fmt(x1)}</text>`;
  return `<h3>${esc(title)}</h3><svg class="chart" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">${grid}${paths}${axis}</svg>${legend}`;
}
// Keys every log line has; any other number in a "log" line is a stage's own metric (dpo's rewards/*, kto's kl,
// grpo's rewards/<function>, kl, completion_length, clip_ratio ...), charted grouped by the part before "/".
const BASE_KEYS = new Set(["v", "current_steps", "total_steps", "loss", "eval_loss", "reward", "learning_rate", "grad_norm",
  "epoch", "percentage", "elapsed_seconds", "remaining_seconds", "peak_memory_mb", "time", "world_size", "pid",
  "tokens_seen", "real_tokens_seen", "supervised_tokens_seen", "tokens_per_second"]);
function stageGroups(lines) {
  const groups = new Map();
  for (const l of lines) {
    if (l.event !== "log") continue;
    for (const [k, v] of Object.entries(l)) {
      if (BASE_KEYS.has(k) || typeof v !== "number") continue;
      const group = k.includes("/") ? k.split("/")[0] : k;
      if (!groups.has(group)) groups.set(group, new Set());
      groups.get(group).add(k);
    }
  }
  return [...groups].map(([group, keys]) => ({group, keys: [...keys]}));
}
const pointsOf = (lines, key, event) => lines.filter((l) => (!event || l.event === event) && typeof l[key] === "number").map((l) => [l.current_steps, l[key]]);

// ---- runs list ------------------------------------------------------------------------------
async function showRuns(gen) {
  view.innerHTML = `<div class="card"><h3>Start a run</h3><div class="row">
      <select id="config"></select><input id="overrides" type="text" placeholder="overrides, e.g. train.max_steps=50">
      <button id="start" class="primary">Start</button><span id="start-msg"></span></div></div>
    <div class="row" style="margin:.5em 0"><button id="compare" disabled>Compare selected</button><span class="muted">select two or more runs</span></div>
    <table id="runs"><thead><tr><th></th><th>run</th><th>status</th><th>progress</th><th>steps</th><th>elapsed / ETA</th>
    <th>last loss</th><th>best eval loss</th><th>tokens/s</th><th>updated</th></tr></thead><tbody></tbody></table>`;
  api("api/configs").then(({configs}) => {
    document.getElementById("config").innerHTML = configs.map((c) => `<option>${esc(c)}</option>`).join("");
  }).catch(() => {});
  const selected = new Set();
  const compare = document.getElementById("compare");
  compare.onclick = () => { location.hash = `#/compare/${[...selected].map(encodeURIComponent).join(",")}`; };
  document.getElementById("start").onclick = async () => {
    const msg = document.getElementById("start-msg");
    const overrides = document.getElementById("overrides").value.split(/\s+/).filter(Boolean);
    try {
      const {id} = await api("api/runs", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({config: document.getElementById("config").value, overrides})});
      location.hash = `#/run/${enc(id)}`;
    } catch (e) { msg.innerHTML = `<span class="error">${esc(e.message)}</span>`; }
  };
  const tbody = view.querySelector("#runs tbody");
  tbody.onchange = (e) => {
    if (e.target.type !== "checkbox") return;
    e.target.checked ? selected.add(e.target.value) : selected.delete(e.target.value);
    compare.disabled = selected.size < 2;
  };
  const refresh = async () => {
    const {runs_dir, runs} = await api("api/runs");
    if (gen !== generation) return;
    document.getElementById("runs-dir").textContent = runs_dir;
    tbody.innerHTML = runs.map((r) => `<tr data-run="${esc(r.id)}">
      <td><input type="checkbox" value="${esc(r.id)}" ${selected.has(r.id) ? "checked" : ""}></td>
      <td><a href="#/run/${enc(r.id)}">${esc(r.id)}</a></td><td>${badge(r.status)}</td><td>${bar(r.percentage)}</td>
      <td class="num">${r.current_steps} / ${r.total_steps}</td>
      <td class="num">${esc(r.elapsed_time || "–")} / ${esc(r.remaining_time || "–")}</td>
      <td class="num">${fmt(r.last_loss)}</td><td class="num">${fmt(r.best_eval_loss)}</td>
      <td class="num">${fmt(r.tokens_per_second)}</td>
      <td class="muted">${r.updated ? new Date(r.updated * 1000).toLocaleString() : "–"}</td></tr>`).join("")
      || `<tr><td colspan="10" class="muted">no run yet under ${esc(runs_dir)}</td></tr>`;
  };
  await refresh();
  timer = setInterval(() => refresh().catch(() => {}), POLL_MS);
}

// ---- one run --------------------------------------------------------------------------------
function highlight(example) {  // the data report marks supervised spans as [[...]]
  return esc(example || "").replace(/\[\[([\s\S]*?)\]\]/g, "<mark>$1</mark>");
}
function dataReport(r) {
  if (!r) return `<p class="muted">no data_report.json</p>`;
  const rows = (r.datasets || []).map((d) => `<tr><td>${esc(d.path)}</td><td>${esc(d.format)}</td><td class="num">${d.records}</td>
    <td class="num">${d.examples}</td><td class="num">${d.truncated}</td><td>${esc(Object.entries(d.drops || {}).map(([k, v]) => `${k}: ${v.count}`).join("; ") || "–")}</td></tr>`).join("");
  const pack = r.packing ? `<p>packing: ${r.packing.rows} rows, efficiency <b>${fmt(100 * (r.packing.efficiency || 0), 3)}%</b></p>` : "";
  return `<table><thead><tr><th>file</th><th>format</th><th>records</th><th>examples</th><th>truncated</th><th>dropped</th></tr></thead>
    <tbody>${rows}</tbody></table>
    <p>${r.examples ?? "–"} examples, ${r.tokens ?? "–"} tokens, ${fmt(100 * (r.supervised_fraction || 0), 3)}% supervised (mask ${esc(r.mask)}), cutoff_len ${r.cutoff_len}</p>
    ${pack}<h3>Example (supervised spans highlighted)</h3><pre id="example">${highlight(r.example)}</pre>`;
}
function filesCard(id, files, summary) {
  const link = (n) => `<a href="api/runs/${enc(id)}/files/${encodeURIComponent(n)}">${esc(n)}</a>`;
  const plot = files.plot ? `<p>${link(files.plot)}</p><img src="api/runs/${enc(id)}/files/${files.plot}" style="max-width:100%" alt="training loss">` : "";
  const model = files.model.map((f) => `<tr><td>${link(f.name)}</td><td class="num">${(f.bytes / 1024).toFixed(1)} KiB</td></tr>`).join("");
  const before = (summary && summary.metrics_before) || {}, after = (summary && summary.metrics_after) || {};
  const keys = [...new Set([...Object.keys(before), ...Object.keys(after)])].filter((k) => typeof (after[k] ?? before[k]) === "number");
  const metrics = keys.length ? `<h3>Evaluation</h3><table id="metrics"><thead><tr><th>metric</th><th>before training</th><th>after</th></tr></thead><tbody>
    ${keys.map((k) => `<tr><td>${esc(k)}</td><td class="num">${fmt(before[k])}</td><td class="num"><b>${fmt(after[k])}</b></td></tr>`).join("")}</tbody></table>` : "";
  return `${plot}${metrics}<h3>Results</h3><p>${files.results.map(link).join(" · ") || '<span class="muted">none yet</span>'}</p>
    <h3>Saved model</h3><table><tbody>${model || '<tr><td class="muted">nothing saved yet</td></tr>'}</tbody></table>
    <p class="muted">checkpoints: ${esc(files.checkpoints.join(", ") || "none")}</p>`;
}
async function showRun(id, gen) {
  let lines = [], next = 0, fileId = null;
  view.innerHTML = `<div class="row"><h2 style="margin:.3em 0">${esc(id)}</h2><span id="status"></span>
      <button id="stop">Stop</button><button id="resume">Resume</button><span id="control-msg"></span></div>
    <div class="card"><div class="row"><span id="steps" class="num"></span><span id="times" class="muted"></span></div>
      <div id="progress" style="margin-top:.4em"></div><p id="message" class="error"></p></div>
    <div class="grid"><div class="card" id="loss-chart"></div><div class="card" id="eval-chart"></div>
      <div class="card" id="lr-chart"></div><div class="card" id="speed-chart"></div></div>
    <div class="grid" id="stage-charts"></div>
    <div class="grid"><div class="card" id="files"></div><div class="card"><h3>config.yaml</h3><pre id="config"></pre></div></div>
    <div class="card"><h3>Data</h3><div id="data"></div></div><div class="card" id="console-card" hidden><h3>Console</h3><pre id="console"></pre></div>`;
  const $ = (s) => document.getElementById(s);
  const control = (verb) => async () => {
    try {
      await api(`api/runs/${enc(id)}/${verb}`, {method: "POST"});
      $("control-msg").textContent = verb === "stop" ? "stopping: saving a checkpoint…" : "resuming…";
      $("control-msg").dataset.until = verb === "stop" ? "stopped" : "running";  // cleared when the run gets there
    }
    catch (e) { $("control-msg").innerHTML = `<span class="error">${esc(e.message)}</span>`; }
  };
  $("stop").onclick = control("stop");
  $("resume").onclick = control("resume");
  const drawCharts = () => {
    const loss = pointsOf(lines, "loss", "log");
    $("loss-chart").innerHTML = chart([{name: "loss", points: loss, color: "#93c5fd", width: 1},
      {name: "loss (smoothed)", points: smooth(loss), color: COLORS[0], width: 2},
      {name: "eval loss", points: pointsOf(lines, "eval_loss", "eval"), color: COLORS[1], dots: true}], {title: "Loss"});
    const evalKeys = [...new Set(lines.filter((l) => l.event === "eval").flatMap((l) => Object.keys(l)))]
      .filter((k) => k.startsWith("eval_") && !/loss|runtime|per_second|steps_per/.test(k));
    $("eval-chart").innerHTML = chart(evalKeys.map((k, i) => ({name: k, points: pointsOf(lines, k, "eval"), color: COLORS[(i + 2) % COLORS.length], dots: true}))
      .concat(pointsOf(lines, "reward", "log").length ? [{name: "reward", points: pointsOf(lines, "reward", "log"), color: COLORS[0]}] : []), {title: "Eval metrics / reward"});
    $("lr-chart").innerHTML = chart([{name: "learning rate", points: pointsOf(lines, "learning_rate", "log"), color: COLORS[3]}], {title: "Learning rate"});
    $("speed-chart").innerHTML = chart([{name: "tokens/s", points: pointsOf(lines, "tokens_per_second"), color: COLORS[2]}], {title: "Real tokens / s"})
      + `<p class="muted">peak memory: <span id="memory">${fmt(Math.max(0, ...lines.map((l) => l.peak_memory_mb || 0)))}</span> MB</p>`;
    $("stage-charts").innerHTML = stageGroups(lines).map(({group, keys}) => `<div class="card stage-chart">${
      chart(keys.map((k, i) => ({name: k, points: pointsOf(lines, k, "log"), color: COLORS[i % COLORS.length]})), {title: group})}</div>`).join("");
  };
  const refreshLog = async () => {
    const r = await api(`api/runs/${enc(id)}/log?since=${next}`);
    if (gen !== generation) return;
    if (r.file !== fileId && next !== 0) { fileId = r.file; next = 0; lines = []; return refreshLog(); }  // rewritten
    fileId = r.file;
    if (r.since === 0 && next !== 0) lines = [];
    if (r.lines.length || next === 0) { lines = lines.concat(r.lines); next = r.next; drawCharts(); }
  };
  const refreshRun = async () => {
    const r = await api(`api/runs/${enc(id)}`);
    if (gen !== generation) return;
    $("status").innerHTML = badge(r.status);
    if ($("control-msg").dataset.until === r.status || (r.status === "finished" && $("control-msg").dataset.until)) {
      $("control-msg").textContent = ""; delete $("control-msg").dataset.until;
    }
    $("stop").disabled = !["running", "starting"].includes(r.status);
    $("resume").disabled = !r.resumable;
    $("steps").textContent = `step ${r.current_steps} / ${r.total_steps} (${fmt(r.percentage, 3)}%)`;
    $("times").textContent = `elapsed ${r.elapsed_time || "–"} · remaining ${r.remaining_time || "–"}` +
      (r.skipped_lines ? ` · ${r.skipped_lines} unreadable log line(s) skipped` : "");
    $("progress").innerHTML = bar(r.percentage, true);
    $("message").textContent = r.message || "";
    if ($("config").textContent !== (r.config || "")) $("config").textContent = r.config || "(no config.yaml)";
    const data = dataReport(r.data_report);
    if ($("data").dataset.html !== data) { $("data").innerHTML = data; $("data").dataset.html = data; }
    const files = filesCard(id, r.files, r.summary);
    if ($("files").dataset.html !== files) { $("files").innerHTML = files; $("files").dataset.html = files; }
    $("console-card").hidden = !r.console;
    $("console").textContent = r.console || "";
  };
  const started = performance.now();
  await Promise.all([refreshRun(), refreshLog()]).catch((e) => { view.innerHTML = `<p class="error">${esc(e.message)}</p>`; });
  window.peftkitRenderedMs = performance.now() - started;  // read by benchmarks/board_render.py
  timer = setInterval(() => { refreshLog().catch(() => {}); refreshRun().catch(() => {}); }, POLL_MS);
}

// ---- compare --------------------------------------------------------------------------------
async function showCompare(ids, gen) {
  const query = ids.map((i) => `ids=${encodeURIComponent(i)}`).join("&");
  const [{config_diff}, ...logs] = await Promise.all([api(`api/compare?${query}`), ...ids.map((i) => api(`api/runs/${enc(i)}/log`))]);
  if (gen !== generation) return;
  const series = ids.flatMap((id, i) => [
    {name: `${id} (smoothed)`, points: smooth(pointsOf(logs[i].lines, "loss", "log")), color: COLORS[i % COLORS.length], width: 2},
    {name: `${id} eval`, points: pointsOf(logs[i].lines, "eval_loss", "eval"), color: COLORS[i % COLORS.length], dots: true, opacity: 0.6}]);
  const rows = Object.entries(config_diff).map(([k, vs]) => `<tr><td>${esc(k)}</td>${vs.map((v) => `<td>${esc(JSON.stringify(v))}</td>`).join("")}</tr>`).join("");
  view.innerHTML = `<h2>Compare</h2><div class="card" id="compare-chart">${chart(series, {title: "Loss"})}</div>
    <div class="card"><h3>Config keys that differ</h3><table id="diff"><thead><tr><th>key</th>${ids.map((i) => `<th><a href="#/run/${enc(i)}">${esc(i)}</a></th>`).join("")}</tr></thead>
    <tbody>${rows || `<tr><td colspan="${ids.length + 1}" class="muted">the configs are identical</td></tr>`}</tbody></table></div>`;
}

// ---- routing --------------------------------------------------------------------------------
function route() {
  clearInterval(timer);
  const gen = ++generation;
  const hash = decodeURIComponent(location.hash.slice(1) || "/");
  const fail = (e) => { if (gen === generation) view.innerHTML = `<p class="error">${esc(e.message)}</p>`; };
  if (hash.startsWith("/run/")) showRun(hash.slice(5), gen).catch(fail);
  else if (hash.startsWith("/compare/")) showCompare(location.hash.slice(10).split(",").map(decodeURIComponent), gen).catch(fail);
  else showRuns(gen).catch(fail);
}
window.addEventListener("hashchange", route);
route();
