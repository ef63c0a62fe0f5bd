"use strict";
// ClaudeFS admin UI: one page, hash routes (#/overview, #/users, ...), plain JS,
// no build step. Chart.js (vendor/chart.umd.min.js) draws the charts.
// Text from the server only ever reaches the page through textContent or
// data-* attributes, never innerHTML (file names are user-controlled).
//
// Contract with tests: when a view has loaded, body[data-loaded] = route name
// ("login" when the sign-in form is shown); on an error body[data-error] = the
// message. Both are cleared when a new load starts. Every table cell carries
// the server's raw value in data-value (absent for null).

const $ = (id) => document.getElementById(id);
const ROUTES = ["overview", "users", "dirs", "types", "stale", "search", "sql"];
const REPORT_LIMIT = 1000; // rows asked for per report; the tables show them all
const CHART_MAX = 25;      // bars / slices drawn; the rest is only in the table
const PALETTE = ["#2f6fde", "#e8793a", "#3aa76d", "#c9483f", "#8a5cc2", "#2aa3b8",
  "#d4a72c", "#d16aa8", "#6b7a8f", "#7cb342", "#5c6bc0", "#a1887f"];
const NODE_COLS = ["node_id", "health", "version", "shards_led", "shards", "segment_used_bytes",
  "segment_capacity_bytes", "log_disk_free_bytes", "problems", "metrics_url"];
const SHARD_COLS = ["shard", "leader", "ballot", "decided", "trimmed", "lag_max"];
const STALE = new Error("superseded");
const charts = {};
let seq = 0; // id of the newest load; answers to older loads are dropped
let signedIn = false;     // a load has succeeded since the last sign-in form
let justSignedIn = false; // the sign-in form was just accepted

// ---------- formatting ----------
function humanBytes(n) {
  if (n === null || n === undefined || !isFinite(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
  let v = Math.abs(n), i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  const s = i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0);
  return (n < 0 ? "-" : "") + s + " " + units[i];
}
const fmtNum = (v) => v.toLocaleString("en-US", { maximumFractionDigits: 3 });
const isBytesCol = (c) => c === "bytes" || c.endsWith("_bytes");
const isTimeCol = (c) => /(^|_)(mtime|atime|ctime|time|access|at)$/.test(c);
const isIdCol = (c) => /(^|_)(id|uid|gid|leader|shard)$/.test(c);

function fmtTime(v) { // epoch in s, ms, us or ns, guessed from the magnitude
  const a = Math.abs(v);
  const ms = a > 1e17 ? v / 1e6 : a > 1e14 ? v / 1e3 : a > 1e11 ? v : v * 1000;
  const d = new Date(ms);
  return isNaN(d) ? String(v) : d.toISOString().replace(".000Z", "Z");
}

// [text, css class] of one value in column `col`
function cellText(col, v) {
  if (v === null || v === undefined) return ["—", "null"];
  if (v === "") return ["(none)", "null"];
  if (typeof v === "number") {
    if (isBytesCol(col)) return [humanBytes(v), "num"];
    if (isTimeCol(col)) return [fmtTime(v), "time"];
    if (isIdCol(col)) return [String(v), "num"];
    return [fmtNum(v), "num"];
  }
  if (Array.isArray(v)) return [v.map((x) => (typeof x === "object" ? JSON.stringify(x) : String(x))).join("; "), ""];
  if (typeof v === "object") return [JSON.stringify(v), ""];
  return [String(v), ""];
}

// ---------- tables ----------
function renderTable(table, columns, rows) {
  const thead = document.createElement("thead");
  const hr = thead.insertRow();
  for (const c of columns) {
    const th = document.createElement("th");
    th.textContent = c;
    th.dataset.col = c;
    hr.appendChild(th);
  }
  const tbody = document.createElement("tbody");
  for (const r of rows) {
    const tr = tbody.insertRow();
    columns.forEach((c, i) => {
      const v = Array.isArray(r) ? r[i] : r[c];
      const td = tr.insertCell();
      const [text, cls] = cellText(c, v);
      td.textContent = text;
      if (cls) td.className = cls;
      if (c === "health" && ["ok", "degraded", "down"].includes(v)) td.classList.add("health-" + v);
      if (v !== null && v !== undefined) {
        td.dataset.value = typeof v === "object" ? JSON.stringify(v) : String(v);
      }
      if (typeof v === "number" && isBytesCol(c)) td.title = fmtNum(v) + " bytes";
    });
  }
  table.replaceChildren(thead, tbody);
}

// keys of a list of objects: `preferred` first (those present), then the others
function objColumns(rows, preferred) {
  const seen = new Set();
  for (const r of rows) for (const k of Object.keys(r || {})) seen.add(k);
  return preferred.filter((k) => seen.has(k)).concat([...seen].filter((k) => !preferred.includes(k)));
}

function facts(dl, items) { // items: [label, text, raw value?]
  dl.replaceChildren();
  for (const [label, text, value] of items) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = label;
    dd.textContent = text;
    if (value !== undefined && value !== null) dd.dataset.value = String(value);
    dl.append(dt, dd);
  }
}

function showMeta(route, d) {
  const n = d.rows.length;
  let s = `${fmtNum(n)} row${n === 1 ? "" : "s"}`;
  if (d.truncated) s += " (truncated: more rows match)";
  if (typeof d.elapsed_ms === "number") s += ` in ${d.elapsed_ms.toFixed(1)} ms`;
  $(route + "-meta").textContent = s;
  const note = $(route + "-note");
  note.textContent = d.note || "";
  note.hidden = !d.note;
}

// ---------- charts ----------
const shorten = (s, n) => (s.length > n ? "…" + s.slice(s.length - n + 1) : s);

function drawChart(id, type, labels, values, colors) {
  if (charts[id]) { charts[id].destroy(); delete charts[id]; }
  const canvas = $(id);
  if (!window.Chart || !canvas) return;
  const bar = type === "bar";
  if (bar) canvas.parentElement.style.height = Math.max(120, labels.length * 22 + 50) + "px";
  const total = values.reduce((a, b) => a + b, 0);
  charts[id] = new window.Chart(canvas, {
    type,
    data: {
      labels: labels.map((l) => shorten(l, 48)),
      datasets: [{
        data: values,
        backgroundColor: colors || (bar ? PALETTE[0] : labels.map((_, i) => PALETTE[i % PALETTE.length])),
        borderWidth: bar ? 0 : 1,
      }],
    },
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      indexAxis: bar ? "y" : "x",
      plugins: {
        legend: { display: !bar, position: "right" },
        tooltip: {
          callbacks: {
            title: (items) => (items.length ? labels[items[0].dataIndex] : ""),
            label: (c) => {
              const v = bar ? c.parsed.x : c.parsed;
              const pct = total ? ` (${((100 * v) / total).toFixed(1)}%)` : "";
              return `${humanBytes(v)} = ${fmtNum(v)} B${bar ? "" : pct}`;
            },
          },
        },
      },
      scales: bar ? { x: { ticks: { callback: (v) => humanBytes(v) } } } : {},
    },
  });
}

// chart of the first CHART_MAX rows: label column -> bytes
function rowsChart(id, type, rows, labelOf) {
  const top = rows.slice(0, CHART_MAX);
  const labels = top.map(labelOf);
  const values = top.map((r) => Number(r.bytes) || 0);
  if (type !== "bar" && rows.length > CHART_MAX) {
    labels.push("(other)");
    values.push(rows.slice(CHART_MAX).reduce((a, r) => a + (Number(r.bytes) || 0), 0));
  }
  drawChart(id, type, labels, values);
}

// ---------- server ----------
function setFreshness(ix) {
  const el = $("index-freshness");
  const lag = typeof ix.lag_seconds === "number" ? ix.lag_seconds.toFixed(1) : "?";
  el.textContent = `index as of ${ix.timestamp}, ${lag} s behind`;
  el.title = `generation ${ix.generation}, written ${ix.written_at}, ${ix.rows} rows`;
  el.classList.toggle("lagging", ix.lag_seconds > 300);
}

async function api(url, opts, my) {
  const res = await fetch(url, { credentials: "same-origin", ...opts });
  const text = await res.text();
  if (my !== seq) throw STALE;
  let data = null;
  try { data = JSON.parse(text); } catch (_) { /* not JSON */ }
  if (!res.ok) {
    let msg = (data && data.error) || `${res.status} ${res.statusText} ${text.slice(0, 200)}`.trim();
    if (res.status === 408) msg = "Cancelled (over the time limit): " + msg;
    const err = new Error(msg);
    err.status = res.status;
    throw err;
  }
  if (!data || typeof data !== "object") throw new Error(`${url}: the answer is not JSON`);
  if (data.index) setFreshness(data.index);
  return data;
}

function report(name, params, my) {
  const qs = new URLSearchParams({ limit: String(REPORT_LIMIT), ...params });
  return api(`api/reports/${name}?${qs}`, {}, my).then((d) => {
    d.rows = d.rows || [];
    d.columns = d.columns || objColumns(d.rows, []);
    return d;
  });
}

// ---------- views ----------
const VIEWS = {
  async overview(p, my) {
    const d = await api("api/overview", {}, my);
    const c = d.cluster || {};
    const nodes = c.nodes || [], shards = c.shards || [], mounts = c.mounts || [];
    const h = $("cluster-health");
    h.textContent = c.healthy ? "healthy" : "not healthy";
    h.className = "big " + (c.healthy ? "health-ok" : "health-down");
    facts($("cluster-facts"), [
      ["cluster id", String(c.cluster_id ?? "—")],
      ["nodes up", `${c.nodes_up} / ${nodes.length}`, c.nodes_up],
      ["inodes", c.inodes == null ? "—" : fmtNum(c.inodes), c.inodes],
      ["shards", String(shards.length), shards.length],
      ["mounts", String(mounts.length), mounts.length],
    ]);
    const used = c.used_bytes || 0, cap = c.capacity_bytes || 0;
    drawChart("capacity-chart", "doughnut", ["used", "free"], [used, Math.max(0, cap - used)], [PALETTE[0], "#d5dae1"]);
    facts($("capacity-facts"), [
      ["used", humanBytes(used), used],
      ["capacity", humanBytes(cap), cap],
      ["free", humanBytes(Math.max(0, cap - used)), Math.max(0, cap - used)],
      ["used %", cap ? ((100 * used) / cap).toFixed(1) + " %" : "—"],
    ]);
    const ix = d.index || {};
    const pos = Object.entries(ix.positions || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
    facts($("index-facts"), [
      ["generation", String(ix.generation ?? "—"), ix.generation],
      ["as of", String(ix.timestamp ?? "—"), ix.timestamp],
      ["written at", String(ix.written_at ?? "—"), ix.written_at],
      ["lag", typeof ix.lag_seconds === "number" ? ix.lag_seconds.toFixed(1) + " s" : "—", ix.lag_seconds],
      ["rows", ix.rows == null ? "—" : fmtNum(ix.rows), ix.rows],
      ["log positions", pos || "—"],
    ]);
    renderTable($("nodes-table"), objColumns(nodes, NODE_COLS), nodes);
    renderTable($("shards-table"), objColumns(shards, SHARD_COLS), shards);
    const mrows = mounts.map((m) => (m && typeof m === "object" ? m : { mount: m }));
    renderTable($("mounts-table"), objColumns(mrows, []), mrows);
  },

  async users(p, my) {
    const d = await report("top-users", {}, my);
    renderTable($("users-table"), d.columns, d.rows);
    rowsChart("users-chart", "bar", d.rows, (r) => r.owner_name || `uid ${r.owner_uid}`);
    showMeta("users", d);
  },

  async dirs(p, my) {
    const depth = p.get("depth") || "2";
    $("dirs-depth").value = depth;
    const d = await report("top-dirs", { depth }, my);
    renderTable($("dirs-table"), d.columns, d.rows);
    rowsChart("dirs-chart", "bar", d.rows, (r) => String(r.dir ?? "(none)"));
    showMeta("dirs", d);
  },

  async types(p, my) {
    const d = await report("types", {}, my);
    renderTable($("types-table"), d.columns, d.rows);
    rowsChart("types-chart", "doughnut", d.rows, (r) => (r.file_type ? String(r.file_type) : "(none)"));
    showMeta("types", d);
  },

  async stale(p, my) {
    const days = p.get("days") || "180";
    $("stale-days").value = days;
    const d = await report("stale", { days }, my);
    renderTable($("stale-table"), d.columns, d.rows);
    showMeta("stale", d);
  },

  async search(p, my) {
    const pattern = p.get("pattern") || "";
    $("search-pattern").value = pattern;
    if (!pattern) {
      await api("api/overview", {}, my); // checks the session, sets the index freshness
      $("search-meta").textContent = "Enter a name pattern, e.g. *.h5 (* and ? match any characters).";
      $("search-table").replaceChildren();
      return;
    }
    const d = await report("find", { pattern }, my);
    renderTable($("search-table"), d.columns, d.rows);
    showMeta("search", d);
  },

  async sql(p, my) {
    updateCsvLink();
    await api("api/overview", {}, my); // checks the session, sets the index freshness
  },
};

function updateCsvLink() {
  $("sql-csv").href = "api/query?" + new URLSearchParams({ format: "csv", sql: $("sql-input").value });
}

async function runSql(my) {
  $("sql-error").hidden = true;
  $("sql-table").replaceChildren();
  $("sql-meta").textContent = "running…";
  $("sql-note").hidden = true;
  const limit = parseInt($("sql-limit").value, 10) || REPORT_LIMIT;
  const body = JSON.stringify({ sql: $("sql-input").value, format: "json", limit });
  const d = await api("api/query", { method: "POST", headers: { "Content-Type": "application/json" }, body }, my);
  d.rows = d.rows || [];
  renderTable($("sql-table"), d.columns || objColumns(d.rows, []), d.rows);
  showMeta("sql", d);
}

// ---------- navigation, loading, login ----------
function parseHash() {
  const h = location.hash.replace(/^#\/?/, "");
  const [name, query] = h.split("?", 2);
  return { name: ROUTES.includes(name) ? name : "overview", params: new URLSearchParams(query || "") };
}

function setHash(name, params) {
  const qs = new URLSearchParams(params).toString();
  const h = `#/${name}${qs ? "?" + qs : ""}`;
  if (location.hash === h) route(); else location.hash = h;
}

function showView(name) {
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== "view-" + name;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.route === name) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const login = name === "login";
  $("nav").hidden = login;
  $("logout-form").hidden = login;
}

function showError(route, msg) {
  document.body.dataset.error = msg;
  const el = route === "sql" ? $("sql-error") : $("error");
  el.textContent = msg;
  el.hidden = false;
  if (route === "sql") $("sql-meta").textContent = "";
}

// one load: stale answers are dropped, 401 shows the sign-in form
async function load(name, fn) {
  const my = ++seq;
  delete document.body.dataset.loaded;
  delete document.body.dataset.error;
  $("error").hidden = true;
  showView(name);
  try {
    await fn(my);
    if (my === seq) document.body.dataset.loaded = name;
    signedIn = true;
    justSignedIn = false;
  } catch (e) {
    if (e === STALE || my !== seq) return;
    if (e.status === 401) {
      showLogin(justSignedIn ? "Signed in, but the browser did not keep the session cookie."
        : signedIn ? `Session ended (${e.message}); sign in again.` : "");
    } else {
      showError(name, e.message || String(e));
    }
  }
}

function route() {
  const { name, params } = parseHash();
  document.title = `ClaudeFS admin: ${name}`;
  return load(name, (my) => VIEWS[name](params, my));
}

function clearData() {
  for (const id of Object.keys(charts)) { charts[id].destroy(); delete charts[id]; }
  for (const t of document.querySelectorAll("table.results")) t.replaceChildren();
  for (const el of document.querySelectorAll(".facts, .meta")) el.replaceChildren();
  for (const el of document.querySelectorAll(".error, .note")) el.hidden = true;
  $("cluster-health").textContent = "";
  $("index-freshness").textContent = "index: not loaded";
}

function showLogin(msg) {
  seq++; // drop answers still under way
  signedIn = justSignedIn = false;
  clearData();
  showView("login");
  $("login-error").textContent = msg || "";
  $("login-error").hidden = !msg;
  document.body.dataset.loaded = "login";
  $("login-token").focus();
}

async function login(ev) {
  ev.preventDefault();
  const err = $("login-error");
  err.hidden = true;
  delete document.body.dataset.error;
  delete document.body.dataset.loaded;
  let msg;
  try {
    const res = await fetch("login", {
      method: "POST", credentials: "same-origin", body: new URLSearchParams({ token: $("login-token").value }),
    });
    if (res.ok) {
      $("login-token").value = "";
      justSignedIn = true;
      route();
      return;
    }
    msg = res.status === 401 ? "Wrong token: sign-in refused." : `Sign-in failed: ${res.status} ${res.statusText}`;
  } catch (e) {
    msg = "Sign-in failed: " + e.message;
  }
  err.textContent = msg;
  err.hidden = false;
  document.body.dataset.error = msg;
  document.body.dataset.loaded = "login";
}

async function logout(ev) {
  ev.preventDefault();
  try { await fetch("logout", { method: "POST", credentials: "same-origin" }); } catch (_) { /* shown below anyway */ }
  showLogin();
}

function formParams(form) {
  return Object.fromEntries([...new FormData(form)].map(([k, v]) => [k, String(v).trim()]));
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout-form").addEventListener("submit", logout);
  for (const name of ["dirs", "stale", "search"]) {
    $(name + "-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      setHash(name, formParams(ev.target));
    });
  }
  $("dirs-depth").addEventListener("change", () => $("dirs-form").requestSubmit());
  $("sql-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    load("sql", runSql);
  });
  $("sql-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); $("sql-form").requestSubmit(); }
  });
  $("sql-input").addEventListener("input", updateCsvLink);
  window.addEventListener("hashchange", route);
  route();
});
