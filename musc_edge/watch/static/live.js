// The live page of musc-edge watch (docs/line.md, "Live page and metrics").
// Polls /api/status and /api/results?after=SEQ once a second (no build step, no CDN, no library).
// Every value from the server is written with textContent or an attribute, never as HTML: a file
// name is data, not markup. At 10 parts/s a poll brings ~10 results; the chart keeps the last
// CHART_POINTS and the grid the newest TILES, so the page does the same work at any rate.
"use strict";

const POLL_MS = 1000;
const TILES = 12;
const PAGE = 1000;          // results per request (the server's maximum)
const SVG = "http://www.w3.org/2000/svg";
const H = 240, PAD_L = 56, PAD_R = 12, PAD_T = 14, PAD_B = 22;

const state = { after: null, results: [], chartPoints: 300, tiles: new Map(), threshold: null };

function $(id) { return document.getElementById(id); }

function setText(id, text) { const el = $(id); if (el.textContent !== text) el.textContent = text; }

function fmtNum(x, digits) { return (typeof x === "number" && isFinite(x)) ? x.toFixed(digits) : "–"; }

function fmtSeconds(s) {
  if (typeof s !== "number") return "–";
  return s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s";
}

function badge(id, text, kind) {
  const el = $(id);
  el.textContent = text;
  el.className = "badge " + kind;
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store", credentials: "same-origin" });
  if (!r.ok) throw new Error(url.split("?")[0] + ": HTTP " + r.status);
  return r.json();
}

function renderStatus(st) {
  setText("model", (st.model || "model ?") + (st.weights ? " / " + st.weights : ""));
  setText("device", st.device || "device ?");
  setText("version", "musc-edge " + (st.version || ""));
  setText("scored", String(st.counts.scored));
  setText("anomalous", String(st.counts.anomalous));
  setText("skipped", String(st.counts.skipped));
  const e2e = st.latency_s.end_to_end;
  setText("latency", fmtSeconds(e2e.p50) + " / " + fmtSeconds(e2e.p95));
  const f = st.latency_s.features, sc = st.latency_s.scoring;
  setText("latency-stages", "features p50 " + fmtSeconds(f.p50) + " · scoring p50 " + fmtSeconds(sc.p50));
  const stream = Math.max(0, st.pool_size - st.references);
  $("fill-bar").style.width = Math.round(100 * st.window_fill) + "%";
  setText("fill", stream + " / " + st.window + " images (" + Math.round(100 * st.window_fill) + " %)");
  setText("refs", st.references + " · " + st.queue_length);
  badge("ready", st.ready ? "ready" : "warming up", st.ready ? "good" : "warn");
  state.threshold = (typeof st.threshold === "number") ? st.threshold : null;
  state.chartPoints = st.page_results || 300;
}

async function fetchResults(st) {
  if (state.after === null || (st.last_seq !== null && st.last_seq < state.after)) {
    // first poll, or results.jsonl was rotated: start from the last chartPoints results
    state.results = [];
    state.after = st.last_seq === null ? -1 : Math.max(-1, st.last_seq - state.chartPoints);
  }
  for (let page = 0; page < 5; page++) {
    const got = (await getJSON("/api/results?after=" + state.after + "&limit=" + PAGE)).results;
    if (got.length === 0) break;
    for (const r of got) state.results.push(r);
    state.after = got[got.length - 1].seq;
    if (got.length < PAGE) break;
  }
  if (state.results.length > state.chartPoints) state.results.splice(0, state.results.length - state.chartPoints);
}

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG, name);
  for (const k in attrs) el.setAttribute(k, String(attrs[k]));
  return el;
}

function renderChart() {
  const svg = $("trend");
  const W = Math.max(300, Math.round(svg.getBoundingClientRect().width) || 1000);  // 1 unit = 1 px: text unstretched
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  const pts = state.results.filter(r => typeof r.raw_score === "number");
  const nodes = [];
  const scores = pts.map(r => r.raw_score);
  if (state.threshold !== null) scores.push(state.threshold);
  let lo = scores.length ? Math.min(...scores) : 0, hi = scores.length ? Math.max(...scores) : 1;
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
  const x = i => PAD_L + (W - PAD_L - PAD_R) * (pts.length > 1 ? i / (pts.length - 1) : 0.5);
  const y = v => PAD_T + (H - PAD_T - PAD_B) * (1 - (v - lo) / (hi - lo));
  nodes.push(svgEl("line", { x1: PAD_L, y1: H - PAD_B, x2: W - PAD_R, y2: H - PAD_B, class: "axis" }));
  nodes.push(svgEl("line", { x1: PAD_L, y1: PAD_T, x2: PAD_L, y2: H - PAD_B, class: "axis" }));
  for (const v of [lo + pad, hi - pad]) {
    const t = svgEl("text", { x: 4, y: y(v) + 4 }); t.textContent = v.toFixed(3); nodes.push(t);
  }
  if (pts.length) {
    const d = pts.map((r, i) => x(i).toFixed(1) + "," + y(r.raw_score).toFixed(1)).join(" ");
    nodes.push(svgEl("polyline", { points: d, class: "series" }));
    pts.forEach((r, i) => {
      if (r.verdict === "anomalous") nodes.push(svgEl("circle", { cx: x(i), cy: y(r.raw_score), r: 4, class: "pt-bad" }));
    });
  }
  if (state.threshold !== null) {
    const ty = y(state.threshold);
    nodes.push(svgEl("line", { x1: PAD_L, y1: ty, x2: W - PAD_R, y2: ty, class: "threshold", id: "threshold-line" }));
    const t = svgEl("text", { x: W - PAD_R - 120, y: ty - 6 }); t.textContent = "threshold " + state.threshold.toFixed(3);
    nodes.push(t);
  }
  svg.replaceChildren(...nodes);
  svg.setAttribute("data-points", String(pts.length));
  setText("chart-note", pts.length ? "last " + pts.length + " results, seq " + pts[0].seq + "–" + pts[pts.length - 1].seq : "no results yet");
}

function makeTile(r) {
  const tile = document.createElement("figure");
  tile.className = "tile" + (r.verdict === "anomalous" ? " anomalous" : "");
  tile.dataset.seq = String(r.seq);
  const img = document.createElement("img");
  img.alt = "seq " + r.seq;
  img.decoding = "async";
  img.addEventListener("error", () => {
    const ph = document.createElement("div"); ph.className = "missing"; ph.textContent = "image gone";
    img.replaceWith(ph);
  });
  img.src = (r.heatmap ? "/heatmap/" : "/image/") + r.seq + "?thumb=1";
  const cap = document.createElement("figcaption");
  cap.className = "caption";
  const left = document.createElement("span"); left.textContent = "#" + r.seq + " · " + fmtNum(r.raw_score, 3);
  const verdict = document.createElement("span");
  verdict.className = "badge " + (r.verdict === "anomalous" ? "bad" : r.verdict === "good" ? "good" : "grey");
  verdict.textContent = r.verdict || "no threshold";
  cap.append(left, verdict);
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = (r.path || "").split("/").pop() + "  " + (r.scoring_time || "").slice(11, 23);
  name.title = r.path || "";
  tile.append(img, cap, name);
  return tile;
}

function renderTiles() {
  const grid = $("latest");
  const newest = state.results.slice(-TILES).reverse();
  const keep = new Set(newest.map(r => r.seq));
  for (const [seq, el] of state.tiles) if (!keep.has(seq)) { el.remove(); state.tiles.delete(seq); }
  const ordered = newest.map(r => {
    let el = state.tiles.get(r.seq);
    if (!el) { el = makeTile(r); state.tiles.set(r.seq, el); }
    return el;
  });
  // re-append in order only when it changed (moving nodes reloads nothing: images stay decoded)
  const current = Array.from(grid.children);
  if (current.length !== ordered.length || current.some((el, i) => el !== ordered[i])) grid.replaceChildren(...ordered);
}

async function poll() {
  try {
    const st = await getJSON("/api/status");
    renderStatus(st);
    await fetchResults(st);
    renderChart();
    renderTiles();
    badge("conn", "live", "good");
  } catch (err) {
    badge("conn", "disconnected", "bad");
    $("conn").title = String(err && err.message || err);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", poll);
