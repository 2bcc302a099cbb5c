// The operator console's page: plain JavaScript, no library, nothing loaded from elsewhere.
// Screens are shown by the URL's hash (#live, #inspect, #teach, #models, #gallery); every call goes to
// /console/api/ with the session cookie, and every call that changes something carries the CSRF token.
"use strict";

const API = "api";
const session = { csrf: null, id: null };
const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name === "style") Object.assign(node.style, value);  // the CSSOM: the page's CSP refuses style attributes
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "string") return value;
  const number = Number(value);
  if (Math.abs(number) >= 10 ** digits) return Math.round(number).toLocaleString();
  const text = number.toPrecision(digits);
  return text.includes(".") && !text.includes("e") ? text.replace(/0+$/, "").replace(/\.$/, "") : text;
}
const count = (value) => (value === null || value === undefined ? "–" : Number(value).toLocaleString());
const when = (seconds) => new Date(seconds * 1000).toLocaleString();

let toastTimer = null;
function toast(message, bad = false) {
  const box = $("#toast");
  box.textContent = message;
  box.classList.toggle("bad", bad);
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, bad ? 7000 : 3500);
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, { method = "GET", json, body, query } = {}) {
  const headers = {};
  let payload = body;
  if (json !== undefined) { payload = JSON.stringify(json); headers["Content-Type"] = "application/json"; }
  if (method !== "GET") headers["X-Console-CSRF"] = session.csrf || "";
  const url = `${API}/${path}${query ? "?" + new URLSearchParams(query) : ""}`;
  const response = await fetch(url, { method, headers, body: payload, credentials: "same-origin" });
  if (response.status === 401 && path !== "login") { showLogin(); throw new ApiError(401, "log in first"); }
  const type = response.headers.get("Content-Type") || "";
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    if (type.includes("json")) message = (await response.json()).message || message;
    throw new ApiError(response.status, message);
  }
  return type.includes("json") ? response.json() : response;
}

function failed(error) {
  if (error instanceof ApiError && error.status === 401) return;
  toast(error.message || String(error), true);
}

// -- screens ---------------------------------------------------------------------------------------------------

const screens = {};
let current = null;

function show(name) {
  for (const view of $$(".view")) view.hidden = view.id !== `view-${name}`;
  for (const tab of $$("#tabs a")) tab.classList.toggle("active", tab.dataset.view === name);
  if (current && screens[current] && screens[current].leave) screens[current].leave();
  current = name;
  if (screens[name] && screens[name].enter) screens[name].enter();
}

function route() {
  const name = (location.hash || "#live").slice(1);
  show(screens[name] ? name : "live");
}

function showLogin() {
  if (screens[current] && screens[current].leave) screens[current].leave();
  current = "login";
  $("#tabs").hidden = true;
  $("#session").hidden = true;
  for (const view of $$(".view")) view.hidden = view.id !== "view-login";
  $("#login-key").focus();
}

async function start() {
  try {
    const response = await fetch(`${API}/session`, { credentials: "same-origin" });
    const answer = await response.json();
    if (response.status === 401) { showLogin(); return; }
    if (!response.ok) {
      for (const view of $$(".view")) view.hidden = view.id !== "view-refused";
      $("#refused-message").textContent = answer.message;
      return;
    }
    signedIn(answer);
  } catch (error) {
    failed(error);
  }
}

function signedIn(answer) {
  session.csrf = answer.csrf;
  session.id = answer.session;
  document.title = `${answer.project} · operator console`;
  $("#project-name").textContent = answer.project;
  $("#login-project").textContent = answer.project;
  $("#session-id").textContent = `session ${answer.session}`;
  $("#logout").hidden = !answer.logged_in_with_key;
  $("#live-fps").textContent = answer.live_fps;
  $("#tabs").hidden = false;
  $("#session").hidden = false;
  route();
}

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = $("#login-error");
  error.hidden = true;
  try {
    const answer = await api("login", { method: "POST", json: { key: $("#login-key").value } });
    $("#login-key").value = "";
    signedIn(answer);
  } catch (problem) {
    error.textContent = problem.message;
    error.hidden = false;
  }
});

$("#logout").addEventListener("click", async () => {
  try { await api("logout", { method: "POST" }); } catch (error) { failed(error); }
  session.csrf = null;
  showLogin();
});

window.addEventListener("hashchange", () => { if (current !== "login") route(); });

// -- shared drawing --------------------------------------------------------------------------------------------

function nodeBars(container, timings) {
  container.replaceChildren();
  const longest = Math.max(...timings.map(([, ms]) => ms), 0.001);
  for (const [node, ms] of timings) {
    const track = el("div", { class: "track" }, el("i", { style: { width: `${Math.max(2, (100 * ms) / longest)}%` } }));
    container.append(el("div", { class: "bar" }, el("span", { class: "name", title: node, text: node }), track,
      el("span", { class: "ms", text: `${fmt(ms)} ms` })));
  }
  if (!timings.length) container.append(el("span", { class: "muted", text: "no node ran" }));
}

function decidedText(decided) {
  return decided.map((entry) => (entry.node ? `${entry.node} — ${entry.reason}` : entry.reason)).join("; ");
}

function setVerdict(box, verdict) {
  box.textContent = verdict ? "OK" : "NG";
  box.classList.toggle("ok", verdict);
  box.classList.toggle("ng", !verdict);
}

// -- live ------------------------------------------------------------------------------------------------------

const live = {
  source: null,
  last: null,

  enter() {
    if (this.source) return;
    this.source = new EventSource(`${API}/live`);
    this.source.addEventListener("frame", (event) => this.frame(JSON.parse(event.data)));
    this.source.addEventListener("stats", (event) => this.stats(JSON.parse(event.data)));
    this.source.onerror = () => { $("#ready-dot").classList.add("down"); };
  },

  leave() {
    if (this.source) this.source.close();
    this.source = null;
  },

  picture(frame) {
    return $("#heat-toggle").checked && frame.heat_image ? frame.heat_image : frame.image;
  },

  frame(frame, fromFilm = false) {
    this.last = frame;
    const image = $("#live-image");
    image.src = this.picture(frame);
    image.hidden = false;
    image.dataset.number = frame.number;
    image.dataset.time = frame.time;
    $("#live-box").style.aspectRatio = `${frame.frame.width} / ${frame.frame.height}`;
    $("#live-placeholder").hidden = true;
    $("#live-caption").textContent = `#${frame.number} · ${new Date(frame.time * 1000).toLocaleTimeString()}` +
      ` · ${frame.frame.width}×${frame.frame.height}` + (frame.data ? ` · data ${frame.data}` : "");
    setVerdict($("#verdict"), frame.verdict);
    const gauge = $("#gauge");
    gauge.hidden = frame.score === null || frame.threshold === null;
    if (!gauge.hidden) {
      const top = Math.max(frame.score, frame.threshold) * 1.25;
      $("#gauge-fill").style.width = `${Math.min(100, (100 * frame.score) / top)}%`;
      $("#gauge-fill").classList.toggle("ng", frame.score >= frame.threshold);
      $("#gauge-mark").style.left = `${(100 * frame.threshold) / top}%`;
      $("#score").textContent = fmt(frame.score, 4);
      $("#threshold").textContent = fmt(frame.threshold, 4);
    }
    $("#decided-by").textContent = decidedText(frame.decided_by);
    const rows = $("#rect-table tbody");
    rows.replaceChildren(...frame.rectangles.map((r) => el("tr", {},
      el("td", { text: r.label || "–" }), el("td", { text: `${r.x}, ${r.y}` }),
      el("td", { text: `${r.width} × ${r.height}` }), el("td", { text: fmt(r.score, 2) }))));
    $("#rect-count").textContent = frame.rectangles.length ? `${frame.rectangles.length}` : "none";
    nodeBars($("#node-times"), frame.timings);
    $("#node-total").textContent = `${fmt(frame.processing_ms)} ms in the flow`;
    if (!fromFilm) this.addToFilm(frame);
  },

  // One picture in, the oldest out: the browser decodes one image per frame, not ten.
  addToFilm(frame) {
    const strip = $("#filmstrip");
    strip.prepend(el("img", { src: frame.image, class: frame.verdict ? "ok" : "ng",
      title: `#${frame.number} ${frame.verdict ? "OK" : "NG"}`, onclick: () => this.frame(frame, true) }));
    while (strip.children.length > 10) strip.lastElementChild.remove();
  },

  stats(stats) {
    const minute = stats.minute, hour = stats.hour;
    $("#kpi-rate").textContent = minute.per_minute === null ? "–" : count(Math.round(minute.per_minute));
    $("#kpi-ok").textContent = count(minute.ok);
    $("#kpi-ng").textContent = count(minute.ng);
    $("#kpi-ngp").textContent = hour.ng_percent === null ? "–" : `${fmt(hour.ng_percent, 3)} %`;
    $("#kpi-latency").textContent = `${fmt(minute.p50_ms)} / ${fmt(minute.p99_ms)}`;
    $("#kpi-queue").textContent = `${stats.queued} · ${stats.in_flight}`;
    $("#kpi-queue-sub").textContent = `waiting (of ${stats.queue_limit}) · in flight`;
    $("#kpi-refused").textContent = count(hour.refused);
    const reasons = Object.entries(hour.refused_by_reason).map(([reason, n]) => `${reason} ${n}`).join(", ");
    $("#kpi-refused-sub").textContent = reasons || "last hour";
    for (const name of ["minute", "hour", "start"]) {
      const w = stats[name];
      const row = $(`#windows tr[data-window=${name}]`);
      row.replaceChildren(row.firstElementChild,
        el("td", { class: "ok", text: count(w.ok) }), el("td", { class: "ng", text: count(w.ng) }),
        el("td", { text: w.ng_percent === null ? "–" : fmt(w.ng_percent, 3) }),
        el("td", { text: w.per_minute === null ? "–" : fmt(w.per_minute, 4) }),
        el("td", { text: fmt(w.p50_ms) }), el("td", { text: fmt(w.p99_ms) }), el("td", { text: count(w.refused) }));
    }
    $("#ready-dot").classList.toggle("down", !stats.ready);
    $("#ready-text").textContent = stats.ready ? "Serving" : "Not ready";
  },
};
screens.live = live;
$("#heat-toggle").addEventListener("change", () => { if (live.last) $("#live-image").src = live.picture(live.last); });

// -- inspect ---------------------------------------------------------------------------------------------------

function dropzone(zone, onFiles) {
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    onFiles(Array.from(event.dataTransfer.files));
  });
}

const inspect = {
  async run(body, source, query) {
    $("#inspect-source").textContent = source;
    try {
      const answer = await api("inspect", { method: "POST", body, query });
      this.render(answer);
    } catch (error) { failed(error); }
  },

  render(answer) {
    $("#inspect-result").hidden = false;
    $("#inspect-drop").classList.add("compact");
    setVerdict($("#inspect-verdict"), answer.verdict);
    $("#inspect-score").textContent = answer.score === null ? "no score" :
      `${fmt(answer.score, 4)} / ${fmt(answer.threshold, 4)}`;
    $("#inspect-decided").textContent = decidedText(answer.decided_by);
    $("#inspect-time").textContent = `${fmt(answer.processing_ms)} ms`;
    $("#inspect-image").src = answer.image;
    $("#inspect-heat").hidden = !answer.heatmap;
    $("#inspect-noheat").hidden = Boolean(answer.heatmap);
    if (answer.heatmap) $("#inspect-heat").src = answer.heatmap;
    $("#inspect-rects tbody").replaceChildren(...answer.rectangles.map((r) => el("tr", {},
      el("td", { text: r.label || "–" }), el("td", { text: r.node }), el("td", { text: `${r.x}, ${r.y}` }),
      el("td", { text: `${r.width} × ${r.height}` }), el("td", { text: fmt(r.score, 2) }))));
    if (!answer.rectangles.length) {
      $("#inspect-rects tbody").append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "none" })));
    }
    nodeBars($("#inspect-times"), answer.timings);
    $("#inspect-context").textContent = JSON.stringify(answer.context, null, 2);
  },

  file(file) {
    if (file) this.run(file, file.name, { name: file.name });
  },
};
screens.inspect = inspect;
dropzone($("#inspect-drop"), (files) => inspect.file(files[0]));
$("#inspect-file").addEventListener("change", (event) => inspect.file(event.target.files[0]));

// -- teach -----------------------------------------------------------------------------------------------------

const STAGE_NAMES = { features: "Features of every view", bank: "Memory bank", discriminator: "Discriminator",
  threshold: "Threshold", save: "Model written", scores: "Scores of the images" };

const teach = {
  state: null,
  timer: null,
  threshold: null,
  scale: null,

  enter() { this.refresh(); },
  leave() { clearTimeout(this.timer); this.timer = null; },

  async refresh() {
    clearTimeout(this.timer);
    try {
      const state = await api("teach");
      this.render(state);
      const busy = state.status === "training" || state.collecting;
      if (current === "teach" && busy) this.timer = setTimeout(() => this.refresh(), 400);
    } catch (error) { failed(error); }
  },

  thumbs(kind, names) {
    const box = $(`#thumbs-${kind}`);
    const have = new Map($$(".thumb", box).map((node) => [node.dataset.name, node]));
    const wanted = names.map((name) => have.get(name) || el("div", { class: "thumb", "data-name": name },
      el("img", { src: `${API}/teach/thumbnail?${new URLSearchParams({ set: kind, name })}`, alt: name, title: name,
        loading: "lazy" }),
      el("button", { title: "remove", text: "×", onclick: () => this.remove(kind, name) })));
    box.replaceChildren(...wanted);
    $(`#${kind}-count`).textContent = `${names.length} of ${this.state.max_images[kind]}`;
  },

  render(state) {
    const before = this.state;
    this.state = state;
    this.thumbs("good", state.images.good);
    this.thumbs("bad", state.images.bad);
    const select = $("#teach-model");
    const chosen = select.value;
    select.replaceChildren(...state.models.map((m) => el("option", { value: m.model,
      text: `${m.model} (node ${m.node}${m.current ? `, serving v${m.current}` : ""})` })));
    if (chosen) select.value = chosen;
    if (!state.models.length) $("#teach-model-note").textContent = "The flow has no anomaly@1 node to teach.";
    const model = state.models.find((m) => m.model === select.value);
    if (model) $("#teach-model-note").textContent = `Input ${model.size}×${model.size} px; a new version is added.`;
    const modes = $("#teach-mode");
    if (!modes.options.length) {
      modes.replaceChildren(...state.modes.map((m) => el("option", { value: m.mode, text: m.mode })));
      modes.value = state.mode;
    }
    const mode = state.modes.find((m) => m.mode === modes.value);
    $("#teach-mode-note").textContent = mode ? mode.note : "";
    const training = state.status === "training";
    $("#train").disabled = training || state.images.good.length < 2 || !state.models.length;
    $("#train").textContent = training ? "Training…" : (state.result ? "Train again" : "Train");
    $("#train-cancel").hidden = !training;
    const collecting = state.collecting;
    $("#collect-start").textContent = collecting ? "Stop" : "Collect";
    $("#collect-status").textContent = collecting ?
      `${collecting.written} of ${collecting.wanted} collected — send frames to the line` : "";
    this.progress(state);
    const error = $("#teach-error");
    error.hidden = !state.error;
    error.textContent = state.error || "";
    $("#teach-result").hidden = !state.result;
    const newResult = state.result && (!before || JSON.stringify(before.result) !== JSON.stringify(state.result));
    if (newResult) {
      this.threshold = state.result.threshold;
      this.showResult();
    }
    if (state.saved) {
      $("#save-status").textContent = `Version ${state.saved.version} of ${state.saved.model} serves ` +
        `(was ${state.saved.previous ?? "none"}). Roll back in Models & flow.`;
    } else if (state.result) {
      $("#save-status").textContent = "";
    }
    $("#teach-save").disabled = state.status !== "trained";
  },

  progress(state) {
    const bar = $("#progress");
    const done = new Map(state.stages_done.map(([stage, seconds]) => [stage, seconds]));
    const visible = state.status === "training" || state.stages_done.length > 0 || state.result;
    bar.hidden = !visible;
    bar.classList.toggle("done", state.status !== "training");
    let share = 0;
    for (const stage of state.stages) if (done.has(stage)) share += state.stage_shares[stage];
    if (state.status === "training" && state.stage) {
      // Within a stage, creep towards its end: the stages report when they start, not how far they are.
      share += state.stage_shares[state.stage] * (1 - Math.exp(-state.stage_elapsed / 2));
    }
    $("#progress-bar").style.width = `${Math.round(100 * (state.status === "training" ? share : 1))}%`;
    $("#stages").replaceChildren(...(visible ? state.stages : []).map((stage) => {
      const isCurrent = state.status === "training" && stage === state.stage;
      const seconds = done.has(stage) ? `${fmt(done.get(stage), 2)} s` :
        (isCurrent ? `${fmt(state.stage_elapsed, 2)} s` : "");
      return el("li", { class: done.has(stage) ? "done" : (isCurrent ? "current" : "") },
        el("span", { text: STAGE_NAMES[stage] || stage }), el("span", { text: seconds }));
    }));
    if (state.result && state.status !== "training") {
      $("#stages").append(el("li", { class: "done" }, el("span", { text: "Total" }),
        el("span", { text: `${fmt(state.result.seconds, 3)} s` })));
    }
  },

  async upload(kind, files) {
    const images = files.filter((file) => file.type.startsWith("image/") || /\.(png|jpe?g|bmp|tiff?|webp)$/i.test(file.name));
    let added = 0;
    for (const file of images) {
      try {
        await api("teach/images", { method: "POST", body: file, query: { set: kind, name: file.name } });
        added += 1;
      } catch (error) { failed(error); break; }
    }
    if (added) toast(`${added} ${kind} image(s) added`);
    this.refresh();
  },

  async remove(kind, name) {
    try { await api("teach/remove", { method: "POST", json: { set: kind, name } }); } catch (error) { failed(error); }
    this.refresh();
  },

  // Good images the threshold can be judged on ("unseen": left out of the bank, or held out of the discriminator's
  // training) and those the model learnt from ("trained on": shown with their verdict, never counted: their scores
  // say little about new parts). A result of before the modes has no flag: its scored images were the bank's
  // leave-one-out.
  items() {
    const result = this.state.result;
    return [...result.scores.good.map((s) => ({ ...s, set: "good", unseen: s.unseen ?? s.score !== null })),
      ...result.scores.bad.map((s) => ({ ...s, set: "bad", unseen: true }))];
  },

  // The good scores the calibrated threshold was fitted on.
  fitted() {
    const result = this.state.result;
    return result.scores.fitted ?? result.scores.good.filter((s) => s.score !== null).map((s) => s.score);
  },

  showResult() {
    const result = this.state.result;
    $("#threshold-input").value = fmt(this.threshold, 5);
    const metrics = result.metrics || {};
    const auroc = metrics.image_auroc !== undefined ? ` · image AUROC ${fmt(metrics.image_auroc, 4)}` : "";
    $("#teach-summary").textContent = `${result.images} good image(s) learnt in ${fmt(result.seconds, 3)} s ` +
      `(${result.mode || "bank"}) · calibrated threshold ${fmt(result.threshold, 4)} (${metrics.threshold_rule || ""})${auroc}`;
    $("#fitted-on").textContent = `The threshold is fitted on ${result.fitted_on || "the good images, each left out of the bank"}.`;
    const scored = $("#scored");
    const kind = (item) => (item.set === "bad" ? "defective" : (item.unseen ? "good · unseen" : "good · trained on"));
    scored.replaceChildren(...this.items().map((item) => el("div", { class: "scored-item", "data-name": item.name,
      "data-set": item.set, "data-score": item.score ?? "", "data-unseen": item.unseen ? "yes" : "no" },
      el("img", { src: `${API}/teach/thumbnail?${new URLSearchParams({ set: item.set, name: item.name })}`, alt: item.name,
        loading: "lazy" }),
      el("div", { class: "meta" }, el("span", { class: "name", title: item.name, text: item.name }),
        el("span", { class: "pill" })),
      el("div", { class: "meta" }, el("span", { class: "muted", text: kind(item) }),
        el("b", { text: item.score === null ? "–" : fmt(item.score, 4) })))));
    this.applyThreshold();
  },

  // Verdicts of the listed images at the chosen threshold: computed here, no call to the server.
  applyThreshold() {
    const threshold = this.threshold;
    const tally = { good: [0, 0], bad: [0, 0], trained: [0, 0] };
    for (const node of $$("#scored .scored-item")) {
      const pill = $(".pill", node);
      if (node.dataset.score === "") { pill.className = "pill none"; pill.textContent = "–"; continue; }
      const ng = Number(node.dataset.score) >= threshold;
      const trained = node.dataset.unseen === "no";
      pill.className = `pill ${ng ? "ng" : "ok"}${trained ? " trained" : ""}`;
      pill.textContent = ng ? "NG" : "OK";
      node.classList.toggle("flipped", (node.dataset.set === "good") === ng);
      tally[trained ? "trained" : node.dataset.set][ng ? 1 : 0] += 1;
    }
    const [goodOk, goodNg] = tally.good, [badOk, badNg] = tally.bad, [trainedOk, trainedNg] = tally.trained;
    $("#verdict-counts").replaceChildren(
      el("span", { text: `Good parts, unseen: ${goodOk} OK, ${goodNg} NG` }),
      ...(trainedOk + trainedNg ?
        [el("span", { text: `Trained on: ${trainedOk} OK, ${trainedNg} NG, not counted` })] : []),
      ...(badOk + badNg ? [el("span", { text: `Defective parts: ${badNg} NG, ${badOk} missed` })] : []));
    this.drawHistogram();
  },

  drawHistogram() {
    const canvas = $("#histogram");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 900, height = canvas.clientHeight || 260;
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    const g = canvas.getContext("2d");
    g.scale(ratio, ratio);
    const items = this.items().filter((item) => item.score !== null);
    // Bars: the good scores the threshold is fitted on, the defective parts, and (apart, grey) the images trained
    // on. Ticks under the axis: every listed image.
    const bars = [...this.fitted().map((score) => ({ set: "good", score })),
      ...items.filter((item) => item.set === "bad").map((item) => ({ set: "bad", score: item.score })),
      ...items.filter((item) => !item.unseen).map((item) => ({ set: "trained", score: item.score }))];
    const scores = bars.map((bar) => bar.score);
    const low = Math.min(0, ...scores), high = Math.max(...scores, this.state.result.threshold, this.threshold) * 1.12;
    const pad = { left: 44, right: 16, top: 14, bottom: 44 };
    const plotWidth = width - pad.left - pad.right, plotHeight = height - pad.top - pad.bottom;
    const x = (value) => pad.left + ((value - low) / (high - low)) * plotWidth;
    this.scale = { low, high, left: pad.left, width: plotWidth };
    canvas.dataset.low = low;
    canvas.dataset.high = high;
    canvas.dataset.left = pad.left;
    canvas.dataset.plotWidth = plotWidth;
    g.clearRect(0, 0, width, height);
    // The NG side of the threshold.
    g.fillStyle = "rgba(217, 45, 32, 0.06)";
    g.fillRect(x(this.threshold), pad.top, pad.left + plotWidth - x(this.threshold), plotHeight);
    const bins = 28, step = (high - low) / bins;
    const counts = { good: new Array(bins).fill(0), bad: new Array(bins).fill(0), trained: new Array(bins).fill(0) };
    for (const bar of bars) counts[bar.set][Math.min(bins - 1, Math.floor((bar.score - low) / step))] += 1;
    const tallest = Math.max(1, ...counts.good, ...counts.bad, ...counts.trained);
    const colours = { good: "rgba(18, 128, 92, 0.75)", bad: "rgba(217, 45, 32, 0.75)", trained: "rgba(102, 112, 133, 0.35)" };
    canvas.dataset.bars = JSON.stringify(Object.fromEntries(Object.entries(counts).map(([set, n]) => [set, n.reduce((a, b) => a + b, 0)])));
    for (const set of ["trained", "good", "bad"]) {
      g.fillStyle = colours[set];
      counts[set].forEach((n, i) => {
        if (!n) return;
        const barHeight = (n / tallest) * (plotHeight - 20);
        g.fillRect(x(low + i * step) + 1, pad.top + plotHeight - barHeight, plotWidth / bins - 2, barHeight);
      });
    }
    // Every image as a tick under the axis: few images, each one matters.
    for (const item of items) {
      g.fillStyle = colours[item.unseen ? item.set : "trained"];
      g.fillRect(x(item.score) - 1, pad.top + plotHeight + 4, 2, 10);
    }
    g.strokeStyle = "#c8cfdb";
    g.beginPath();
    g.moveTo(pad.left, pad.top + plotHeight + 0.5);
    g.lineTo(pad.left + plotWidth, pad.top + plotHeight + 0.5);
    g.stroke();
    g.fillStyle = "#667085";
    g.font = "12px system-ui, sans-serif";
    g.textAlign = "center";
    for (let i = 0; i <= 6; i += 1) {
      const value = low + ((high - low) * i) / 6;
      g.fillText(fmt(value, 3), x(value), height - 10);
    }
    g.textAlign = "left";
    g.fillText("images", 4, pad.top + 10);
    g.fillText("score", pad.left + plotWidth - 30, height - 24);
    // The threshold line, with its handle.
    const at = x(this.threshold);
    g.strokeStyle = "#18202b";
    g.lineWidth = 2;
    g.beginPath();
    g.moveTo(at, pad.top - 4);
    g.lineTo(at, pad.top + plotHeight);
    g.stroke();
    g.fillStyle = "#18202b";
    g.fillRect(at - 5, pad.top - 6, 10, 10);
    g.fillStyle = "#d92d20";
    g.fillText("NG →", Math.min(at + 8, pad.left + plotWidth - 34), pad.top + 14);
  },

  dragTo(clientX) {
    const canvas = $("#histogram");
    const box = canvas.getBoundingClientRect();
    const { low, high, left, width } = this.scale;
    const value = low + ((clientX - box.left - left) / width) * (high - low);
    this.threshold = Math.max(1e-4, Math.min(high, value));
    $("#threshold-input").value = fmt(this.threshold, 5);
    this.applyThreshold();
  },

  async save() {
    $("#teach-save").disabled = true;
    $("#save-status").textContent = "Saving and compiling the new version…";
    try {
      const answer = await api("teach/save", { method: "POST", json: { threshold: this.threshold } });
      toast(answer.message);
    } catch (error) { failed(error); }
    this.refresh();
  },
};
screens.teach = teach;

for (const kind of ["good", "bad"]) {
  dropzone($(`[data-drop=${kind}]`), (files) => teach.upload(kind, files));
  $(`[data-files=${kind}]`).addEventListener("change", (event) => teach.upload(kind, Array.from(event.target.files)));
  $(`[data-folder=${kind}]`).addEventListener("change", (event) => teach.upload(kind, Array.from(event.target.files)));
  $(`[data-clear=${kind}]`).addEventListener("click", () => teach.remove(kind, null));
}
$("#collect-start").addEventListener("click", async () => {
  try {
    if (teach.state && teach.state.collecting) await api("teach/collect/stop", { method: "POST" });
    else await api("teach/collect", { method: "POST", json: { set: "good", count: Number($("#collect-count").value) } });
  } catch (error) { failed(error); }
  teach.refresh();
});
$("#train").addEventListener("click", async () => {
  try {
    await api("teach/train", { method: "POST", json: { model: $("#teach-model").value, mode: $("#teach-mode").value } });
  } catch (error) { failed(error); }
  teach.refresh();
});
$("#teach-mode").addEventListener("change", () => { if (teach.state) teach.render(teach.state); });
$("#train-cancel").addEventListener("click", async () => {
  try { await api("teach/cancel", { method: "POST" }); } catch (error) { failed(error); }
  teach.refresh();
});
$("#teach-save").addEventListener("click", () => teach.save());
$("#threshold-input").addEventListener("input", (event) => {
  const value = Number(event.target.value);
  if (value > 0) { teach.threshold = value; teach.applyThreshold(); }
});
$("#threshold-reset").addEventListener("click", () => {
  teach.threshold = teach.state.result.threshold;
  $("#threshold-input").value = fmt(teach.threshold, 5);
  teach.applyThreshold();
});
{
  const canvas = $("#histogram");
  let dragging = false;
  canvas.addEventListener("pointerdown", (event) => {
    dragging = true;
    canvas.setPointerCapture(event.pointerId);
    teach.dragTo(event.clientX);
  });
  canvas.addEventListener("pointermove", (event) => { if (dragging) teach.dragTo(event.clientX); });
  canvas.addEventListener("pointerup", () => { dragging = false; });
  window.addEventListener("resize", () => { if (teach.state && teach.state.result && current === "teach") teach.drawHistogram(); });
}

// -- models and flow -------------------------------------------------------------------------------------------

const NODE_COLOURS = { "anomaly@1": "#2563eb", "classify@1": "#2563eb", "detect@1": "#2563eb", "segment@1": "#2563eb",
  "ocr@1": "#2563eb", "faces@1": "#2563eb", "demographics@1": "#2563eb", "identify@1": "#2563eb",
  "code@1": "#7c3aed", "evaluate@1": "#d97706" };

const models = {
  async enter() {
    try {
      const [answer, overview] = await Promise.all([api("models"), api("overview")]);
      this.render(answer.models);
      this.flow(overview.flow);
      $("#flow-sha").textContent = `flow sha256 ${overview.flow_sha256.slice(0, 12)}…`;
    } catch (error) { failed(error); }
  },

  render(list) {
    const cards = list.map((model) => {
      const rows = model.versions.slice().reverse().map((v) => {
        const serving = v.version === model.serving;
        return el("tr", { "data-version": v.version },
          el("td", {}, el("b", { text: `v${v.version}` })),
          el("td", {}, serving ? el("span", { class: "pill serving", text: "SERVING" }) : ""),
          el("td", { text: fmt(v.threshold, 4) }), el("td", { text: v.image_auroc === null || v.image_auroc === undefined ? "–" : fmt(v.image_auroc, 4) }),
          el("td", { text: v.images ?? "–" }), el("td", { text: v.date }),
          el("td", { class: "muted", text: v.threshold_rule || "" }),
          el("td", {}, serving ? "" : el("button", { text: "Serve", onclick: () => this.switch(model.model, v.version) })));
      });
      return el("div", { class: "card" },
        el("div", { class: "model-head" }, el("h2", { text: model.model }),
          el("span", { class: "muted", text: `serving v${model.serving ?? "–"} on ${model.device}` +
            (model.failed_version ? ` · v${model.failed_version} failed to load` : "") }),
          el("span", { class: "spacer" }),
          model.roll_back_to ? el("button", { text: `Roll back to v${model.roll_back_to}`,
            onclick: () => this.switch(model.model, model.roll_back_to) }) : ""),
        el("table", {}, el("thead", {}, el("tr", {}, ...["version", "", "threshold", "AUROC", "images", "trained",
          "threshold from", ""].map((h) => el("th", { text: h })))), el("tbody", {}, ...rows)));
    });
    if (!cards.length) cards.push(el("div", { class: "card muted", text: "This flow uses no stored model." }));
    $("#model-cards").replaceChildren(...cards);
  },

  async switch(model, version) {
    try {
      const answer = await api("models/switch", { method: "POST", json: { model, version } });
      toast(answer.message);
    } catch (error) { failed(error); }
    this.enter();
  },

  // Layers by longest path from the first nodes, left to right; edges as curves.
  flow(graph) {
    const level = {};
    const byId = Object.fromEntries(graph.nodes.map((n) => [n.id, n]));
    const visit = (id, depth) => {
      if ((level[id] ?? -1) >= depth) return;
      level[id] = depth;
      for (const next of byId[id].next) visit(next, depth + 1);
    };
    for (const root of graph.roots) visit(root, 0);
    const columns = [];
    for (const node of graph.nodes) (columns[level[node.id] ?? 0] ||= []).push(node);
    const W = 190, H = 58, GX = 70, GY = 26, M = 16;
    const rows = Math.max(...columns.map((c) => c.length));
    const width = M * 2 + columns.length * W + (columns.length - 1) * GX;
    const height = M * 2 + rows * H + (rows - 1) * GY;
    const place = {};
    columns.forEach((column, c) => column.forEach((node, r) => {
      const offset = ((rows - column.length) * (H + GY)) / 2;
      place[node.id] = { x: M + c * (W + GX), y: M + offset + r * (H + GY) };
    }));
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const defs = document.createElementNS(ns, "defs");
    defs.innerHTML = '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" ' +
      'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#94a3b8"/></marker>';
    svg.append(defs);
    for (const node of graph.nodes) {
      for (const next of node.next) {
        const a = place[node.id], b = place[next];
        const path = document.createElementNS(ns, "path");
        const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x - 2, y2 = b.y + H / 2;
        path.setAttribute("d", `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}`);
        path.setAttribute("class", "edge");
        path.setAttribute("marker-end", "url(#arrow)");
        svg.append(path);
      }
    }
    const tip = $("#flow-tip");
    for (const node of graph.nodes) {
      const { x, y } = place[node.id];
      const group = document.createElementNS(ns, "g");
      group.setAttribute("class", "node");
      group.setAttribute("data-node", node.id);
      group.setAttribute("transform", `translate(${x},${y})`);
      group.innerHTML = `<rect class="box" width="${W}" height="${H}" rx="8"/><rect class="band" x="1" y="6" width="4" height="${H - 12}" rx="2"/>` +
        `<text x="16" y="24"></text><text class="type" x="16" y="43"></text>`;
      group.querySelector(".band").setAttribute("fill", NODE_COLOURS[node.type] || "#64748b");
      const [name, type] = group.querySelectorAll("text");
      name.textContent = node.id;
      type.textContent = node.type + (node.settings.model ? ` · ${node.settings.model}` : "");
      group.addEventListener("mouseenter", () => {
        tip.textContent = `${node.id} (${node.type})\n` + (Object.keys(node.settings).length ?
          JSON.stringify(node.settings, null, 2) : "default settings");
        tip.hidden = false;
      });
      group.addEventListener("mousemove", (event) => {
        tip.style.left = `${event.clientX + 14}px`;
        tip.style.top = `${event.clientY + 14}px`;
      });
      group.addEventListener("mouseleave", () => { tip.hidden = true; });
      svg.append(group);
    }
    $("#flow").replaceChildren(svg);
  },
};
screens.models = models;

// -- gallery ---------------------------------------------------------------------------------------------------

const gallery = {
  selected: new Set(),
  oldest: null,

  enter() { this.load(false); },

  query(more) {
    const query = { limit: 60 };
    const node = $("#filter-node").value, verdict = $("#filter-verdict").value;
    const since = $("#filter-since").value, until = $("#filter-until").value;
    if (node) query.node = node;
    if (verdict) query.verdict = verdict;
    if (since) query.since = new Date(since).getTime() / 1000;
    if (until) query.until = new Date(until).getTime() / 1000;
    if (more && this.oldest) query.before = this.oldest;
    return query;
  },

  async load(more) {
    try {
      const answer = await api("gallery", { query: this.query(more) });
      const nodes = $("#filter-node");
      const chosen = nodes.value;
      nodes.replaceChildren(el("option", { value: "", text: "any" }),
        ...answer.nodes.map((n) => el("option", { value: n, text: n })));
      nodes.value = chosen;
      const cards = answer.entries.map((entry) => this.card(entry));
      if (more) $("#gallery").append(...cards);
      else { $("#gallery").replaceChildren(...cards); this.selected.clear(); }
      if (!more && !cards.length) {
        $("#gallery").append(el("div", { class: "card muted", text: "No frames match. NG frames are kept here as the line sends them." }));
      }
      this.oldest = answer.entries.length ? answer.entries[answer.entries.length - 1].id : this.oldest;
      $("#gallery-more").hidden = !answer.more;
      const megabytes = (answer.bytes / 1048576).toFixed(1);
      $("#gallery-summary").textContent = `${answer.matching} matching of ${answer.total} kept · ${megabytes} MB ` +
        `of ${answer.max_megabytes} MB, at most ${answer.max_frames} frames` +
        (answer.dropped ? ` · ${answer.dropped} not kept (over ${answer.max_per_second} a second, or the disk busy)` : "");
      this.updateDownload();
    } catch (error) { failed(error); }
  },

  card(entry) {
    const box = el("input", { type: "checkbox", title: "select" });
    const card = el("div", { class: "shot", "data-id": entry.id },
      el("img", { src: `${API}/gallery/${entry.id}/preview`, alt: entry.id, loading: "lazy",
        onclick: () => this.inspect(entry) }),
      el("span", { class: `pill ${entry.verdict ? "ok" : "ng"}`, text: entry.verdict ? "OK" : "NG" }), box,
      el("div", { class: "meta" },
        el("div", { class: "row" }, el("b", { text: when(entry.time) }),
          el("button", { class: "link", text: "Inspect", onclick: () => this.inspect(entry) })),
        el("span", { class: "muted", text: decidedText(entry.decided_by) }),
        entry.reason !== "ng" ? el("span", { class: "muted", text: entry.reason === "save" ? "kept: save set by a hook" : "kept: OK sample" }) : null));
    box.addEventListener("change", () => {
      if (box.checked) this.selected.add(entry.id); else this.selected.delete(entry.id);
      card.classList.toggle("selected", box.checked);
      this.updateDownload();
    });
    return card;
  },

  updateDownload() {
    $("#download").disabled = this.selected.size === 0;
    $("#download").textContent = `Download selected (${this.selected.size}) as zip`;
  },

  inspect(entry) {
    location.hash = "#inspect";
    inspect.run(undefined, `gallery ${when(entry.time)}`, { gallery: entry.id });
  },

  async download() {
    try {
      const response = await api("gallery/zip", { method: "POST", json: { ids: Array.from(this.selected) } });
      const blob = await response.blob();
      const name = (response.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
      const link = el("a", { href: URL.createObjectURL(blob), download: name ? name[1] : "gallery.zip" });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    } catch (error) { failed(error); }
  },
};
screens.gallery = gallery;
$("#filter-apply").addEventListener("click", () => gallery.load(false));
$("#gallery-more").addEventListener("click", () => gallery.load(true));
$("#download").addEventListener("click", () => gallery.download());
$("#select-all").addEventListener("click", () => {
  for (const box of $$("#gallery .shot input[type=checkbox]")) {
    if (!box.checked) { box.checked = true; box.dispatchEvent(new Event("change")); }
  }
});

start();
