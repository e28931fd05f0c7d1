// linewatch console: one page, no build step. Live tiles from /api/live (server-sent events),
// alerts and review from the JSON API, the map with Leaflet (vendored under /static/vendor).
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const state = { config: null, streams: new Map(), alertsVersion: -1, eventId: null, map: null, mapLayers: [] };

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (err) { /* not JSON */ }
    throw new Error(detail);
  }
  return response.json();
}

const post = (path, body) => api(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: JSON.stringify(body) });
const when = (ts) => new Date(ts * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
const clock = (ts) => `${new Date(ts * 1000).toISOString().slice(11, 19)} UTC`;
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;",
  '"': "&quot;", "'": "&#39;" })[c]);

// ---- tabs ---------------------------------------------------------------------------------
function route() {
  const hash = location.hash.slice(1) || (state.config.live ? "live" : "alerts");  // an archive has no live view
  const [tab, id] = hash.split("/");
  const shown = tab === "event" ? "event" : tab;
  document.querySelectorAll(".tab").forEach((section) => { section.hidden = section.id !== `tab-${shown}`; });
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.tab === (tab === "event" ? "alerts" : tab)));
  if (tab === "alerts") loadAlerts();
  if (tab === "event") loadEvent(Number(id));
  if (tab === "map") showMap();
  if (tab === "compare") loadTopics();
}

// ---- live ---------------------------------------------------------------------------------
function tileOf(stream) {
  let view = state.streams.get(stream.id);
  if (view) return view;
  const element = document.createElement("div");
  element.className = "tile";
  element.dataset.stream = stream.name;
  element.dataset.state = "waiting";
  // no <img> until the first overlay has loaded: an image without one shows as broken
  element.innerHTML = `<h3><span class="name"></span><span class="score"></span></h3>
    <div class="frame"><p class="placeholder">waiting for the first frame…</p></div>
    <div class="numbers"><span class="threshold"></span><span class="fps"></span>
      <span class="lag" title="frames on the frames topic after the newest scored one (topic end minus position)"></span>
      <span class="latency" title="published by ingest → scored"></span><span class="ended"></span></div>
    <canvas width="760" height="180" data-points="0"></canvas>`;
  $(".name", element).textContent = stream.name;
  $("#tiles").appendChild(element);
  view = { element, points: [], tile: null, lastN: 0 };
  state.streams.set(stream.id, view);
  return view;
}

function showTile(view, stream) {
  const key = stream.tile, img = new Image();
  img.alt = "latest frame with its anomaly map";
  img.onload = () => { if (view.tile === key) $(".frame", view.element).replaceChildren(img); };
  img.src = `/api/streams/${stream.id}/tile.jpg?v=${encodeURIComponent(key)}`;
}

function showNumbers(view, stream) {
  const latest = stream.latest, ended = stream.ended;
  view.element.dataset.state = ended ? "ended" : latest ? "live" : "waiting";
  for (const name of ["fps", "lag", "latency"]) $(`.${name}`, view.element).hidden = Boolean(ended);
  const reason = ended && ended.reason !== "end" ? ` (${ended.reason})` : "";
  $(".ended", view.element).textContent = ended ? `ended ${clock(ended.at)}${reason}` : "";
  $(".fps", view.element).textContent = latest ? `${stream.fps.toFixed(1)} frames/s` : "";
  $(".lag", view.element).textContent = stream.lag == null ? "" : `lag ${stream.lag} frames`;
  $(".latency", view.element).textContent = latest ? `latency ${latest.latency_s.toFixed(2)} s` : "";
}

function onLive(update) {
  const stage = update.stage ? (typeof update.stage === "string" ? update.stage : update.stage.text) : "";
  $("#starting").textContent = stage;
  $("#starting").hidden = !stage;
  $("#status").textContent = stage ? "starting" : "live";
  $("#live-empty").hidden = update.streams.length > 0;
  for (const stream of update.streams) {
    const view = tileOf(stream);
    for (const point of stream.points) {  // point[0] numbers it: a reconnect never adds a point twice
      if (point[0] > view.lastN) { view.points.push(point); view.lastN = point[0]; }
    }
    const newest = view.points.length ? view.points[view.points.length - 1][2] : 0;
    while (view.points.length && view.points[0][2] < newest - update.history_s) view.points.shift();
    const latest = stream.latest;
    if (latest) {
      const score = $(".score", view.element);
      score.textContent = latest.score.toFixed(3);
      score.classList.toggle("bad", latest.anomalous);
      $(".threshold", view.element).textContent = `threshold ${latest.threshold.toFixed(3)}`;
    }
    showNumbers(view, stream);
    if (stream.tile && stream.tile !== view.tile) {
      view.tile = stream.tile;
      showTile(view, stream);
    }
    drawTimeline($("canvas", view.element), view.points.map((p) => [p[2], p[3], p[4], p[5]]));
  }
  if (update.alerts_version !== state.alertsVersion) {
    state.alertsVersion = update.alerts_version;
    if (!$("#tab-alerts").hidden) loadAlerts();
  }
}

// points: [time, score, threshold, anomalous]; the threshold dashed, anomalous runs shaded
function drawTimeline(canvas, points) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 6;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#fafafa";
  ctx.fillRect(0, 0, w, h);
  canvas.dataset.points = String(points.length);
  if (!points.length) return;
  const t0 = points[0][0], t1 = Math.max(points[points.length - 1][0], t0 + 1e-6);
  const top = Math.max(...points.map((p) => Math.max(p[1], p[2]))) * 1.1 || 1;
  const x = (t) => pad + (t - t0) / (t1 - t0) * (w - 2 * pad);
  const y = (v) => h - pad - v / top * (h - 2 * pad);
  const step = Math.max((w - 2 * pad) / Math.max(points.length - 1, 1), 1);
  ctx.fillStyle = "rgba(211, 47, 47, 0.22)";
  let runs = 0;
  for (let i = 0; i < points.length; i++) {
    if (!points[i][3]) continue;
    let j = i;
    while (j + 1 < points.length && points[j + 1][3]) j++;
    ctx.fillRect(x(points[i][0]) - step / 2, 0, x(points[j][0]) - x(points[i][0]) + step, h);
    runs++;
    i = j;
  }
  canvas.dataset.runs = String(runs);
  ctx.strokeStyle = "#d32f2f";
  ctx.setLineDash([6, 4]);
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[2])) : ctx.moveTo(x(p[0]), y(p[2]))));
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.strokeStyle = "#1565c0";
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
  ctx.stroke();
  ctx.lineWidth = 1;
}

function connectLive() {
  if (!state.config.live) {
    $("#status").textContent = "archive";
    $("#live-empty").textContent = "No live bus: this console shows the archive (start it with --bootstrap-servers for live streams).";
    return;
  }
  const source = new EventSource("/api/live");
  source.onmessage = (message) => onLive(JSON.parse(message.data));
  source.onerror = () => { $("#status").textContent = "reconnecting…"; };
}

// ---- alerts -------------------------------------------------------------------------------
async function loadAlerts() {
  const form = $("#alert-filter");
  const params = new URLSearchParams();
  for (const name of ["stream", "status"]) if (form[name].value) params.set(name, form[name].value);
  for (const name of ["since", "until"]) {
    if (form[name].value) params.set(name, String(Date.parse(form[name].value + "Z") / 1000));
  }
  const events = await api(`/api/events?${params}`);
  const streams = new Set(events.map((e) => e.stream));
  const select = form.stream;
  for (const stream of streams) {
    if (![...select.options].some((o) => o.value === stream)) select.add(new Option(stream, stream));
  }
  const body = $("#alerts tbody");
  body.innerHTML = "";
  for (const e of events) {
    const row = body.insertRow();
    row.dataset.eventId = e.event_id;
    row.innerHTML = `<td><span class="badge ${e.status}">${e.status}</span></td><td>${escapeHtml(e.stream)}</td>
      <td>${when(e.start_ts)}</td><td>${e.start_seq}..${e.end_seq}</td><td>${e.peak_score.toFixed(3)}</td>
      <td>${e.verdict ? `<span class="badge ${e.verdict}">${e.verdict.replace("_", " ")}</span>` : ""}
      ${escapeHtml(e.note || "")}</td>`;
    row.onclick = () => { location.hash = `event/${e.id}`; };
  }
  $("#alerts-empty").hidden = events.length > 0;
}

// ---- one event ----------------------------------------------------------------------------
async function loadEvent(id) {
  state.eventId = id;
  const e = await api(`/api/events/${id}`);
  $("#event-title").textContent = `${e.event_id} (${e.status})`;
  for (const kind of ["overlay", "mask", "frame"]) {
    const img = $(`#event-${kind}`);
    img.src = e.peak.archived ? e.peak.images[kind] : "";
    img.alt = e.peak.archived ? `${kind} of frame ${e.peak_seq}` : "not in the archive";
  }
  drawTimeline($("#event-curve"), e.curve.map((p) => [p[1], p[2], p[3], p[4]]));
  const t = e.alert.telemetry || e.peak.telemetry || {};
  const facts = [["stream", e.stream], ["session", e.session || "—"], ["time", `${when(e.start_ts)} → ${when(e.end_ts)}`],
    ["frames", `${e.start_seq}..${e.end_seq} (${e.alert.frames.length} anomalous)`],
    ["peak", `${e.peak_score.toFixed(3)} at frame ${e.peak_seq} (threshold ${e.threshold.toFixed(3)})`],
    ["method", `${e.method}, ${e.class_name}`],
    ["position", t.latitude != null ? `${t.latitude.toFixed(6)}, ${t.longitude.toFixed(6)}` : "—"],
    ["altitude", t.altitude != null ? `${t.altitude.toFixed(1)} m` : "—"], ["drone clock", t.time || "—"]];
  $("#event-facts").innerHTML = facts.map(([k, v]) => `<tr><th>${k}</th><td>${escapeHtml(v)}</td></tr>`).join("");
  const form = $("#review");
  const review = e.review || {};
  form.querySelectorAll("input[name=verdict]").forEach((input) => { input.checked = input.value === review.verdict; });
  form.note.value = review.note || "";
  $("#review-saved").textContent = review.verdict ? `saved ${when(review.at)}` : "";
  for (const button of document.querySelectorAll("#feedback button")) {
    button.disabled = review.verdict !== "false_alarm" || !e.feedback_targets[button.dataset.target];
  }
  const fed = review.feedback;
  $("#feedback-result").textContent = fed ? `${fed.added.length} frame(s) added to ${fed.folder}` : "";
}

async function saveReview(event) {
  event.preventDefault();
  const form = $("#review");
  const checked = form.querySelector("input[name=verdict]:checked");
  try {
    await post(`/api/events/${state.eventId}/review`, { verdict: checked ? checked.value : null, note: form.note.value });
    await loadEvent(state.eventId);
  } catch (err) { $("#review-saved").textContent = `not saved: ${err.message}`; }
}

async function addFrames(target) {
  try {
    const result = await post(`/api/events/${state.eventId}/feedback`, { target });
    $("#feedback-result").textContent = `${result.added.length} frame(s) added to ${result.folder}`;
  } catch (err) { $("#feedback-result").textContent = `not added: ${err.message}`; }
}

// ---- map ----------------------------------------------------------------------------------
function plainMap() { $("#map").classList.add("plain"); }

async function showMap() {
  if (!state.map) {
    state.map = L.map("map", { zoomControl: true });
    if (state.config.tile_url) {
      const tiles = L.tileLayer(state.config.tile_url, { maxZoom: 19, attribution: state.config.tile_attribution });
      let loaded = false;
      tiles.on("tileload", () => { loaded = true; });
      tiles.on("tileerror", () => { if (!loaded) { state.map.removeLayer(tiles); plainMap(); } });
      tiles.addTo(state.map);
    } else {
      plainMap();
    }
  }
  const flights = await api("/api/flights");
  const select = $("#flight");
  const chosen = select.value;
  select.innerHTML = "";
  for (const f of flights) {
    select.add(new Option(`${f.stream} · ${when(f.first_ts)} (${f.points} points)`, String(f.id)));
  }
  if (chosen && flights.some((f) => String(f.id) === chosen)) select.value = chosen;
  $("#map-note").textContent = flights.length ? "" : "No flight with telemetry yet.";
  setTimeout(() => state.map.invalidateSize(), 0);
  if (flights.length) await drawFlight(Number(select.value));
  else state.map.setView([0, 0], 2);
}

async function drawFlight(id) {
  const flight = await api(`/api/flights/${id}`);
  state.mapLayers.forEach((layer) => state.map.removeLayer(layer));
  state.mapLayers = [];
  const path = flight.track.map((p) => [p[2], p[3]]);
  if (path.length) {
    const line = L.polyline(path, { color: "#1565c0", weight: 3, className: "flight-path" }).addTo(state.map);
    state.mapLayers.push(line);
    state.map.fitBounds(line.getBounds(), { padding: [30, 30], maxZoom: 18 });
  }
  for (const e of flight.events) {
    const t = e.alert.telemetry;
    if (!t || t.latitude == null) continue;
    const marker = L.marker([t.latitude, t.longitude], { title: e.event_id, alt: `alert ${e.event_id}` }).addTo(state.map);
    marker.bindPopup(`<a href="#event/${e.id}">${escapeHtml(e.event_id)}</a><br>peak ${e.peak_score.toFixed(3)} · ${e.status}`);
    state.mapLayers.push(marker);
  }
  $("#export-geojson").href = `/api/flights/${id}/alerts.geojson`;
  $("#export-kml").href = `/api/flights/${id}/alerts.kml`;
}

// ---- compare ------------------------------------------------------------------------------
// Why Compare has nothing to compare, and how to get a second result set.
function compareHow(offer) {
  if (!offer.bus) {
    return "This console reads no bus (only an archive): start it with --bootstrap-servers to compare the results "
      + "topics of a pipeline on Kafka.";
  }
  if (offer.topics.length > 1) return "";
  if (offer.bus === "embedded") {
    return `This is an embedded run (linewatch run): its scores are on an in-process bus that ends with the run, so `
      + `there is one result set (${offer.scores}) and nothing to compare it with. To get two, run the pipeline on `
      + "Kafka (deploy/compose.yaml, or linewatch ingest and linewatch worker with --bootstrap-servers), replay its "
      + "frames onto another topic with another method, threshold or references, and open Compare on a console of "
      + "that bus (linewatch console --bootstrap-servers …):";
  }
  return `One result set so far (${offer.scores}). Replay frames onto another topic with another method, threshold `
    + "or references, then open this tab again:";
}

async function loadTopics() {
  const form = $("#compare-form");
  const offer = await api("/api/topics");
  const topics = offer.topics;
  $("#compare-topics").textContent = topics.length ? `Results topics this console can read: ${topics.join(", ")}.` : "";
  const how = compareHow(offer);
  $("#compare-how").hidden = !how;
  $("#compare-how-text").textContent = how;
  $("#compare-command").textContent = offer.bus ? offer.replay : "";
  $("#compare-command").hidden = !offer.bus;
  form.hidden = topics.length < 2;
  if (form.hidden) { $("#compare-result").hidden = true; return; }
  for (const select of [form.a, form.b]) {
    const chosen = select.value;
    select.innerHTML = "";
    topics.forEach((t) => select.add(new Option(t, t)));
    if (topics.includes(chosen)) select.value = chosen;
  }
  if (topics.length > 1 && form.a.value === form.b.value) form.b.value = topics[1];
}

async function runCompare(event) {
  event.preventDefault();
  const form = $("#compare-form");
  $("#compare-note").textContent = "reading both topics…";
  try {
    const result = await api(`/api/compare?${new URLSearchParams({ a: form.a.value, b: form.b.value })}`);
    const item = (e) => `<li>${escapeHtml(e.stream)} frames ${e.start_seq}..${e.end_seq}, peak ${e.peak_score.toFixed(3)} (${escapeHtml(e.method)})</li>`;
    $("#compare-both").innerHTML = result.both.map((pair) => item(pair.a)).join("");
    $("#compare-a").innerHTML = result.only_a.map(item).join("");
    $("#compare-b").innerHTML = result.only_b.map(item).join("");
    $("#compare-note").textContent = `A (${result.a}) raised ${result.counts.a} event(s), B (${result.b}) `
      + `${result.counts.b}: ${result.both.length} of A's also in B`;
    $("#compare-result").hidden = false;
  } catch (err) { $("#compare-note").textContent = `cannot compare: ${err.message}`; }
}

// ---- start --------------------------------------------------------------------------------
async function start() {
  state.config = await api("/api/config");
  $("#alert-filter").addEventListener("submit", (event) => { event.preventDefault(); loadAlerts(); });
  $("#review").addEventListener("submit", saveReview);
  document.querySelectorAll("#feedback button").forEach((b) => b.addEventListener("click", () => addFrames(b.dataset.target)));
  $("#flight").addEventListener("change", (event) => drawFlight(Number(event.target.value)));
  $("#compare-form").addEventListener("submit", runCompare);
  window.addEventListener("hashchange", route);
  connectLive();
  route();
}

start().catch((err) => { $("#status").textContent = `cannot start: ${err.message}`; });
