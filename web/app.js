// pumpwatch serve: the live page. State arrives over server-sent events (/api/events):
// a full snapshot, then what changed. The list is virtual: only the rows on screen exist
// in the DOM (a fixed pool, rebound on scroll), each with one small uPlot chart, so the
// page stays fast with thousands of clients. Renders are batched to one per frame.
"use strict";
(function () {
  const ROW_H = 48;
  const HIST_S = 3600;
  const SEV = { CRITICAL: 3, WARNING: 2, UNKNOWN: 1, OK: 0 };
  const $ = (id) => document.getElementById(id);
  const list = $("list");
  const spacer = $("spacer");

  const entities = new Map(); // key "kind:name" -> status (+ _ver)
  const hist = new Map(); // key -> {t: [], f: [], e: []}
  const pending = new Set(); // keys whose history is being fetched
  const pool = [];
  let order = [];
  let total = null;
  let totalHist = { t: [], f: [], e: [] };
  let totalPlot = null;
  let dirtySort = true;
  let frame = 0;
  const stats = { events: 0, applyMs: 0, renderMs: 0, maxApplyMs: 0, maxRenderMs: 0 };
  window.__pw = stats;
  let pump = null;
  // What the page holds, for the tests (what an account was told, and nothing more).
  window.__pwState = () => ({ pump, total, entities: [...entities.values()] });

  // A pair (one client's transfers of one source's products) is known by its label,
  // "cfs on radar"; a removal carries name and source only.
  const nameOf = (e) => (e.kind === "pair" ? e.label || e.name + " on " + e.source : e.name);
  const keyOf = (e) => e.kind + ":" + nameOf(e);

  function si(x, unit) {
    if (!isFinite(x)) return "–";
    const a = Math.abs(x);
    const p = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (const [v, s] of p) if (a >= v) return (x / v).toFixed(a / v >= 100 ? 0 : 1) + " " + s + unit;
    if (a === 0) return "0" + (unit ? " " + unit : "");
    return (a >= 100 ? x.toFixed(0) : a >= 1 ? x.toFixed(2) : x.toFixed(3)) + (unit ? " " + unit : "");
  }
  function ago(unix) {
    if (unix == null) return "never";
    const s = Math.max(0, Date.now() / 1000 - unix);
    if (s < 60) return s.toFixed(0) + " s ago";
    if (s < 3600) return (s / 60).toFixed(0) + " min ago";
    if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
    return (s / 86400).toFixed(1) + " d ago";
  }
  const count = (n) => Number(n).toLocaleString("en-US");

  function sparkOpts(w, h) {
    return {
      width: w, height: h, pxAlign: false,
      cursor: { show: false }, select: { show: false }, legend: { show: false },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max, 1e-9) * 1.1] } },
      axes: [{ show: false }, { show: false }],
      series: [{}, { stroke: "#1b873f", fill: "rgba(27,135,63,0.15)", width: 1, points: { show: false } },
        { stroke: "#c81e1e", width: 1, points: { show: false } }],
    };
  }

  function push(h, p) {
    if (!p || (h.t.length && h.t[h.t.length - 1] >= p.t)) return;
    h.t.push(p.t); h.f.push(p.files_per_s); h.e.push(p.errors_per_s);
    let cut = 0;
    while (cut < h.t.length && h.t[cut] < p.t - HIST_S) cut++;
    if (cut) { h.t.splice(0, cut); h.f.splice(0, cut); h.e.splice(0, cut); }
  }

  // ---- events -------------------------------------------------------------------
  function apply(d) {
    const t0 = performance.now();
    if (d.full) { entities.clear(); }
    for (const e of d.entities) {
      const k = keyOf(e);
      const old = entities.get(k);
      e._ver = old ? old._ver + 1 : 1;
      entities.set(k, e);
      const h = hist.get(k);
      if (h) push(h, e.point);
    }
    for (const r of d.removed) { const k = keyOf(r); entities.delete(k); hist.delete(k); }
    if (d.full) for (const k of hist.keys()) if (!entities.has(k)) hist.delete(k);
    total = d.total;
    pump = d.pump;
    if (totalHist.loaded) push(totalHist, total.point);
    const ps = $("pump-state");
    ps.textContent = d.pump.state; ps.className = "badge " + d.pump.state;
    $("pump-text").textContent = d.pump.text;
    $("view").textContent = d.pump.view;
    dirtySort = true;
    stats.events++;
    stats.applyMs = performance.now() - t0;
    stats.maxApplyMs = Math.max(stats.maxApplyMs, stats.applyMs);
    schedule();
  }

  function connect() {
    const es = new EventSource("/api/events");
    es.addEventListener("open", () => { $("conn").textContent = "live"; $("conn").className = "conn live"; });
    es.addEventListener("error", () => { $("conn").textContent = "reconnecting…"; $("conn").className = "conn"; });
    es.addEventListener("status", (ev) => apply(JSON.parse(ev.data)));
  }

  // ---- list ---------------------------------------------------------------------
  function rebuildOrder() {
    const q = $("filter").value.trim().toLowerCase();
    const kind = $("kind").value;
    const sort = $("sort").value;
    let nc = 0, ns = 0;
    const v = [];
    for (const [k, e] of entities) {
      if (e.kind === "client") nc++; else if (e.kind === "source") ns++;
      if (kind === "all" ? e.kind === "pair" : e.kind !== kind) continue;
      if (q && !nameOf(e).toLowerCase().includes(q)) continue;
      v.push(e);
    }
    const byName = (a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : a.kind < b.kind ? -1 : 1);
    const cmp = {
      state: (a, b) => SEV[b.state] - SEV[a.state] || byName(a, b),
      name: byName,
      files: (a, b) => b.files_per_s - a.files_per_s || byName(a, b),
      errors: (a, b) => b.errors_per_s - a.errors_per_s || byName(a, b),
      since: (a, b) => (a.last_good_unix ?? -1) - (b.last_good_unix ?? -1) || byName(a, b),
    }[sort];
    v.sort(cmp);
    order = v.map(keyOf);
    $("count-clients").textContent = count(nc);
    $("count-sources").textContent = count(ns);
    $("word-clients").textContent = nc === 1 ? "client" : "clients";
    $("word-sources").textContent = ns === 1 ? "source" : "sources";
    $("count-shown").textContent = count(order.length);
  }

  function makeRow() {
    const el = document.createElement("div");
    el.className = "row";
    el.innerHTML =
      '<span class="c-state"><span class="badge"></span></span><span class="c-kind"></span>' +
      '<span class="c-name"></span><span class="c-num c-files"></span><span class="c-num c-bytes"></span>' +
      '<span class="c-num c-errors"></span><span class="c-since"></span><span class="c-chart"></span>' +
      '<span class="c-reason"></span>';
    spacer.appendChild(el);
    const q = (c) => el.querySelector(c);
    const row = {
      el, key: null, ver: -1, hist: null, histLen: -1,
      badge: q(".badge"), kind: q(".c-kind"), name: q(".c-name"), files: q(".c-files"),
      bytes: q(".c-bytes"), errors: q(".c-errors"), since: q(".c-since"), reason: q(".c-reason"),
      chart: q(".c-chart"), plot: null, lastGood: null,
    };
    row.plot = new uPlot(sparkOpts(220, 40), [[], [], []], row.chart);
    return row;
  }

  function bindRow(row, e) {
    const k = keyOf(e);
    if (row.key !== k) {
      row.key = k; row.ver = -1; row.hist = null; row.histLen = -1;
      row.el.dataset.name = e.name; row.el.dataset.kind = e.kind;
      row.name.textContent = nameOf(e); row.name.title = nameOf(e);
      row.kind.textContent = e.kind;
    }
    if (row.ver !== e._ver) {
      row.ver = e._ver;
      row.el.className = "row " + e.state;
      row.badge.className = "badge " + e.state; row.badge.textContent = e.state;
      row.files.textContent = si(e.files_per_s, "");
      row.bytes.textContent = si(e.bytes_per_s, "B");
      row.errors.textContent = si(e.errors_per_s, "");
      row.reason.textContent = e.reason; row.reason.title = e.reason;
      row.lastGood = e.last_good_unix;
      row.lagText = e.lag_p95_s != null ? " · lag " + si(e.lag_p95_s, "s") : "";
      row.since.textContent = ago(e.last_good_unix) + row.lagText;
      row.since.title = e.window_lag_p95_s != null ? "p95 delivery lag over the window: " + si(e.window_lag_p95_s, "s") : "";
    }
    const h = hist.get(k);
    if (h && (row.hist !== h || row.histLen !== h.t.length)) {
      row.hist = h; row.histLen = h.t.length;
      row.plot.setData([h.t, h.f, h.e]);
    } else if (!h && row.histLen !== 0) {
      row.hist = null; row.histLen = 0;
      row.plot.setData([[], [], []]);
    }
  }

  function render() {
    frame = 0;
    const t0 = performance.now();
    if (dirtySort) { rebuildOrder(); dirtySort = false; }
    spacer.style.height = order.length * ROW_H + "px";
    const first = Math.max(0, Math.floor(list.scrollTop / ROW_H) - 2);
    const n = Math.ceil(list.clientHeight / ROW_H) + 4;
    while (pool.length < n) pool.push(makeRow());
    const want = [];
    for (let i = 0; i < pool.length; i++) {
      const row = pool[i];
      const idx = first + i;
      if (idx >= order.length || i >= n) { row.el.style.display = "none"; row.key = null; continue; }
      row.el.style.display = "";
      row.el.style.transform = "translateY(" + idx * ROW_H + "px)";
      const e = entities.get(order[idx]);
      bindRow(row, e);
      if (!hist.has(row.key) && !pending.has(row.key)) want.push(e);
    }
    fetchHistory(want);
    renderTotals();
    stats.renderMs = performance.now() - t0;
    stats.maxRenderMs = Math.max(stats.maxRenderMs, stats.renderMs);
  }

  function schedule() { if (!frame) frame = requestAnimationFrame(render); }

  function fetchHistory(want) {
    const byKind = new Map();
    for (const e of want) {
      pending.add(keyOf(e));
      if (!byKind.has(e.kind)) byKind.set(e.kind, []);
      byKind.get(e.kind).push(nameOf(e));
    }
    for (const [kind, names] of byKind) {
      const qs = "kind=" + kind + names.map((n) => "&name=" + encodeURIComponent(n)).join("");
      fetch("/api/history?" + qs)
        .then((r) => (r.ok ? r.json() : {}))
        .then((m) => {
          for (const n of names) {
            const k = kind + ":" + n;
            pending.delete(k);
            const s = m[n];
            if (s && entities.has(k)) hist.set(k, { t: s.t, f: s.files_per_s, e: s.errors_per_s });
          }
          schedule();
        })
        .catch(() => { for (const n of names) pending.delete(kind + ":" + n); });
    }
  }

  // ---- totals -------------------------------------------------------------------
  function renderTotals() {
    if (!total) return;
    $("total-files-s").textContent = si(total.files_per_s, "");
    $("total-bytes-s").textContent = si(total.bytes_per_s, "B");
    $("total-errors-s").textContent = si(total.errors_per_s, "");
    $("total-good").textContent = count(total.good_total);
    $("total-errors").textContent = count(total.errors_total);
    $("total-since").textContent = ago(total.last_good_unix);
    if (totalPlot && totalHist.loaded && totalPlot._len !== totalHist.t.length) {
      totalPlot._len = totalHist.t.length;
      totalPlot.setData([totalHist.t, totalHist.f, totalHist.e]);
    }
  }

  function makeTotalChart() {
    const el = $("total-chart");
    totalPlot = new uPlot({
      width: Math.max(300, el.clientWidth), height: 130,
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max, 1e-9) * 1.1] } },
      series: [{}, { label: "good files/s", stroke: "#1b873f", fill: "rgba(27,135,63,0.12)", width: 1.5, points: { show: false } },
        { label: "errors/s", stroke: "#c81e1e", width: 1.5, points: { show: false } }],
    }, [[], [], []], el);
    fetch("/api/history?kind=total&name=all")
      .then((r) => r.json())
      .then((m) => {
        const s = m.all || { t: [], files_per_s: [], errors_per_s: [] };
        totalHist = { t: s.t, f: s.files_per_s, e: s.errors_per_s, loaded: true };
        if (total) push(totalHist, total.point);
        schedule();
      })
      .catch(() => {});
    window.addEventListener("resize", () => totalPlot.setSize({ width: Math.max(300, el.clientWidth), height: 130 }));
  }

  // ---- wiring -------------------------------------------------------------------
  list.addEventListener("scroll", schedule, { passive: true });
  window.addEventListener("resize", schedule);
  for (const id of ["filter", "kind", "sort"]) {
    $(id).addEventListener("input", () => { dirtySort = true; list.scrollTop = 0; schedule(); });
  }
  setInterval(() => {
    for (const row of pool) if (row.key) row.since.textContent = ago(row.lastGood) + (row.lagText || "");
    if (total) $("total-since").textContent = ago(total.last_good_unix);
  }, 1000);
  makeTotalChart();
  connect();
})();
