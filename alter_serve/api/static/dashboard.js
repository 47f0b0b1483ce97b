// alter-serve dashboard: reads the admin JSON API with the admin key and draws tables and inline SVG
// charts. No external code, no network beyond this origin. Every value from the API is inserted
// with textContent / setAttribute, never as HTML.
"use strict";

const KEY_STORAGE = "alter-serve-admin-key";
const REFRESH_MS = 15000;
const SVG_NS = "http://www.w3.org/2000/svg";
let adminKey = null;
let timer = null;

// ---- key handling -------------------------------------------------------------------------------

function keyFromFragment() {
  const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
  const key = params.get("key");
  if (key) {
    sessionStorage.setItem(KEY_STORAGE, key);
    // Take the key out of the address bar (and out of the history), now that it is stored.
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  return key || sessionStorage.getItem(KEY_STORAGE);
}

function askForKey(message) {
  document.getElementById("key-form").hidden = false;
  document.getElementById("content").hidden = true;
  setState("need-key", message || "an admin key is needed");
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  adminKey = null;
  askForKey("key forgotten");
}

// ---- API ----------------------------------------------------------------------------------------

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: "Bearer " + adminKey }, cache: "no-store" });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.status + " " + response.statusText;
    const error = new Error(path + ": " + message);
    error.status = response.status;
    throw error;
  }
  return body;
}

async function loadAll() {
  const [experiments, tenants, views] = await Promise.all([
    api("/admin/experiments"), api("/admin/tenants"), api("/admin/views")]);
  const reports = await Promise.all(experiments.data.map(
    (e) => api("/admin/experiments/" + encodeURIComponent(e.name) + "/results")));
  return { experiments: experiments.data, reports, tenants: tenants.data, views: views.data };
}

async function refresh() {
  if (!adminKey) { askForKey(); return; }
  try {
    const data = await loadAll();
    render(data);
    document.getElementById("error").hidden = true;
    setState("ready", "updated " + new Date().toLocaleTimeString() + " · " + data.experiments.length +
      " experiment(s), " + data.tenants.length + " tenant(s), " + data.views.length + " view(s)");
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      sessionStorage.removeItem(KEY_STORAGE);
      adminKey = null;
      askForKey("that key was refused: " + error.message);
    } else {
      showError(error.message);
    }
  }
}

function setState(state, text) {
  document.body.dataset.state = state;
  document.getElementById("status").textContent = text;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = false;
  setState("error", "error");
}

// ---- small DOM helpers ----------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (digits === undefined) digits = Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : 3;
  return value.toFixed(digits);
}

function fmtP(test) {
  if (!test) return "—";
  if (test.p_value === null) return test.note || "—";
  return "p=" + (test.p_value < 0.001 ? test.p_value.toExponential(1) : test.p_value.toFixed(3)) +
    " (" + test.test + ", Δ=" + fmt(test.difference) + ")";
}

function table(node, header, rows) {
  node.replaceChildren(el("thead", {}, el("tr", {}, header.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells))));
}

// ---- charts -----------------------------------------------------------------------------------------

// The 1, 2, 2.5 or 5 × 10^k at or above `raw`: readable axis ticks.
function niceStep(raw) {
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * power >= raw) return m * power;
  return 10 * power;
}

// A grouped bar chart: one group per category (arm), one bar per series; optional [low, high]
// whiskers per series value (confidence intervals).
function barChart({ title, categories, series, unit, yMax }) {
  const width = 360, height = 220, left = 48, right = 12, top = 30, bottom = 46;
  const plotW = width - left - right, plotH = height - top - bottom;
  const root = svg("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": title, "data-chart": title });
  root.append(svg("text", { x: 8, y: 18, class: "title" }, title + (unit ? " (" + unit + ")" : "")));
  const values = series.flatMap((s) => s.values.concat((s.intervals || []).map((i) => (i ? i[1] : null))))
    .filter((v) => v !== null && v !== undefined && isFinite(v));
  const top_ = yMax !== undefined ? yMax : Math.max(0, ...values);
  if (!values.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
    return root;
  }
  const step = niceStep(((top_ - Math.min(0, ...values)) || 1) / 4);
  const low_ = Math.floor(Math.min(0, ...values) / step) * step;
  const high_ = Math.max(low_ + step, Math.ceil(top_ / step) * step);
  const span = high_ - low_;
  const y = (v) => top + plotH - ((v - low_) / span) * plotH;
  const digits = Math.max(0, Math.min(3, -Math.floor(Math.log10(step))));
  for (let v = low_; v <= high_ + step / 2; v += step) {
    root.append(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: left - 4, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(digits)));
  }
  root.append(svg("line", { x1: left, x2: width - right, y1: y(0), y2: y(0), class: "axis" }));
  const groupW = plotW / Math.max(1, categories.length);
  const barW = Math.max(4, (groupW * 0.7) / Math.max(1, series.length));
  categories.forEach((category, c) => {
    const x0 = left + c * groupW + groupW * 0.15;
    series.forEach((s, k) => {
      const v = s.values[c];
      if (v === null || v === undefined) return;
      const x = x0 + k * barW;
      const bar = svg("rect", { x, width: barW - 1, y: Math.min(y(v), y(0)), height: Math.abs(y(0) - y(v)),
        class: "s" + (k % 6), "data-series": s.name, "data-category": category, "data-value": v });
      bar.append(svg("title", {}, s.name + " · " + category + ": " + fmt(v)));
      root.append(bar);
      const interval = s.intervals && s.intervals[c];
      if (interval && interval[0] !== null && interval[1] !== null) {
        const cx = x + (barW - 1) / 2;
        root.append(svg("line", { x1: cx, x2: cx, y1: y(interval[0]), y2: y(interval[1]), class: "whisker" }));
        for (const end of interval) {
          root.append(svg("line", { x1: cx - 3, x2: cx + 3, y1: y(end), y2: y(end), class: "whisker" }));
        }
      }
    });
    root.append(svg("text", { x: left + c * groupW + groupW / 2, y: top + plotH + 14, "text-anchor": "middle" }, category));
  });
  series.forEach((s, k) => {
    const x = left + k * 100;
    root.append(svg("rect", { x, y: height - 16, width: 10, height: 10, class: "s" + (k % 6) }));
    root.append(svg("text", { x: x + 14, y: height - 7 }, s.name));
  });
  return root;
}

function probeSeries(arms) {
  const names = new Set();
  for (const arm of arms) for (const key of Object.keys((arm.probe && arm.probe.metrics) || {})) names.add(key);
  const probabilities = [...names].filter((n) => n.endsWith("probability")).sort();
  const chosen = (probabilities.length ? probabilities : [...names].sort()).slice(0, 6);
  return chosen.map((name) => ({
    name: name.replace(/_probability$/, " p"),
    values: arms.map((a) => (a.probe && a.probe.metrics[name] !== undefined ? a.probe.metrics[name] : null)),
  }));
}

function experimentCharts(report) {
  const arms = report.arms;
  const names = arms.map((a) => a.arm);
  return el("div", { class: "charts" },
    barChart({ title: "Requests", categories: names, series: [
      { name: "requests", values: arms.map((a) => a.requests) },
      { name: "errors", values: arms.map((a) => a.errors) }] }),
    barChart({ title: "Latency", unit: "ms", categories: names, series: [
      { name: "p50", values: arms.map((a) => a.latency_ms.p50) },
      { name: "p95", values: arms.map((a) => a.latency_ms.p95) },
      { name: "TTFT p50", values: arms.map((a) => a.ttft_ms.p50) }] }),
    barChart({ title: "Feedback", unit: "mean, " + Math.round(report.confidence * 100) + "% CI", categories: names,
      series: [{ name: "rating", values: arms.map((a) => a.feedback.mean),
        intervals: arms.map((a) => [a.feedback.low, a.feedback.high]) }] }),
    barChart({ title: "Probe scores", categories: names, series: probeSeries(arms) }));
}

// ---- sections ---------------------------------------------------------------------------------------

function armRow(arm) {
  const cmp = arm.vs_control;
  const sig = (test) => el("td", { class: test && test.significant ? "significant" : null }, fmtP(test));
  const probe = arm.probe
    ? Object.entries(arm.probe.metrics).map(([k, v]) => k + "=" + fmt(v)).join(", ") +
      " (n=" + arm.probe.samples + (arm.probe.stale ? ", stale: the view changed since" : "") + ")"
    : "—";
  return [
    el("td", {}, arm.arm, arm.control ? " (control)" : ""),
    el("td", {}, arm.view || "(removed)"),
    el("td", { class: "num" }, fmt(arm.weight)),
    el("td", { class: "num" }, arm.requests),
    el("td", { class: "num" }, arm.errors + " (" + fmt(arm.error_rate.mean) + " [" + fmt(arm.error_rate.low) + ", " +
      fmt(arm.error_rate.high) + "])"),
    el("td", { class: "num" }, fmt(arm.latency_ms.p50) + " / " + fmt(arm.latency_ms.p95)),
    el("td", { class: "num" }, fmt(arm.ttft_ms.p50) + " / " + fmt(arm.ttft_ms.p95)),
    el("td", { class: "num" }, arm.prompt_tokens + " / " + arm.completion_tokens),
    el("td", { class: "num" }, fmt(arm.feedback.mean) + " [" + fmt(arm.feedback.low) + ", " + fmt(arm.feedback.high) +
      "] n=" + arm.feedback.n),
    cmp ? sig(cmp.feedback) : el("td", {}, "—"),
    cmp ? sig(cmp.errors) : el("td", {}, "—"),
    el("td", { class: arm.probe && arm.probe.stale ? "stale" : null }, probe),
  ];
}

function experimentCard(experiment, report) {
  const armTable = el("table", { class: "arms" });
  table(armTable, ["arm", "view", "weight", "requests", "errors (rate [CI])", "latency p50 / p95 ms",
    "TTFT p50 / p95 ms", "tokens in / out", "feedback mean [CI]", "feedback vs control", "errors vs control",
    "probe"], report.arms.map(armRow));
  return el("div", { class: "experiment", "data-experiment": experiment.name },
    el("h3", {}, experiment.name, el("span", { class: "badge " + experiment.status }, experiment.status)),
    el("div", { class: "muted" }, "model name '" + experiment.alias + "' for " + experiment.tenants.join(", ") +
      " · control arm " + experiment.control_arm + " · sticky " + experiment.sticky),
    experimentCharts(report), armTable);
}

function limitsText(limits) {
  const parts = [];
  if (limits.max_concurrent) parts.push(limits.max_concurrent + " concurrent");
  if (limits.tokens_per_minute) parts.push(limits.tokens_per_minute + " tokens/min");
  if (limits.max_tokens_cap) parts.push("max_tokens ≤ " + limits.max_tokens_cap);
  return parts.length ? parts.join(", ") : "unlimited";
}

function render(data) {
  const box = document.getElementById("experiments");
  box.replaceChildren(...(data.experiments.length
    ? data.experiments.map((e, i) => experimentCard(e, data.reports[i]))
    : [el("p", { class: "muted" }, "No experiments yet.")]));
  table(document.getElementById("tenants"), ["tenant", "views", "limits", "state"], data.tenants.map((t) => [
    el("td", {}, t.name),
    el("td", {}, t.views.map((v, i) => [i ? ", " : "", el("span", { class: v === t.default_view ? "default-view" : null,
      title: v === t.default_view ? "default view" : null }, v)])),
    el("td", {}, limitsText(t.limits)),
    el("td", {}, t.disabled ? "disabled" : "active"),
  ]));
  table(document.getElementById("views"), ["view", "bundle", "heads", "version", "loaded"], data.views.map((v) => [
    el("td", {}, v.name),
    el("td", {}, v.bundle || "—"),
    el("td", {}, v.bundle ? JSON.stringify({ retain: v.spec.retain, forget: v.spec.forget }) : "base model"),
    el("td", {}, v.content_hash ? v.content_hash.slice(0, 12) : "base"),
    el("td", {}, v.loaded ? "yes" : "no"),
  ]));
  document.getElementById("key-form").hidden = true;
  document.getElementById("content").hidden = false;
}

// ---- start ------------------------------------------------------------------------------------------

function start() {
  adminKey = keyFromFragment();
  document.getElementById("refresh").addEventListener("click", refresh);
  document.getElementById("forget-key").addEventListener("click", forgetKey);
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    adminKey = document.getElementById("key-input").value.trim();
    if (adminKey) sessionStorage.setItem(KEY_STORAGE, adminKey);
    refresh();
  });
  const auto = document.getElementById("auto-refresh");
  const schedule = () => {
    if (timer) clearInterval(timer);
    timer = auto.checked ? setInterval(refresh, REFRESH_MS) : null;
  };
  auto.addEventListener("change", schedule);
  schedule();
  refresh();
}

document.addEventListener("DOMContentLoaded", start);
