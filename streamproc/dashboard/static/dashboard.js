// streamproc dashboard: renders the snapshots pushed by /dashboard/events (SSE).
// Plain DOM and inline SVG; no library, nothing from another site.
"use strict";

(function () {
  const HISTORY = 120; // points kept per series (~2 min at 1 s)
  const COLORS = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const history = new Map(); // group -> {rate: [], failed: [], backlog: []}
  const times = []; // server time (ms) of each point, shared by every series
  const panelNodes = new Map(); // application panel name -> its <section>
  let selected = null; // {topic, group} of the DLQ view
  let shownDlq = -1;
  let lastAt = null; // server time of the last snapshot shown
  const openTasks = new Set(); // task ids whose details are open

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "–" : String(c)));
    return node;
  }

  function num(v, digits) {
    if (v === null || v === undefined) return "–";
    if (typeof v !== "number") return String(v);
    return digits === undefined ? v.toLocaleString("en-US") : v.toFixed(digits);
  }

  function secs(v) {
    if (v === null || v === undefined) return "–";
    if (v < 1) return (v * 1000).toFixed(0) + " ms";
    if (v < 120) return v.toFixed(1) + " s";
    if (v < 7200) return (v / 60).toFixed(1) + " min";
    if (v < 172800) return (v / 3600).toFixed(1) + " h";
    return (v / 86400).toFixed(0) + " d";
  }

  // "2026-12-01T20:00:00Z (in 45 s)" / "(3 min ago)": as the CLI writes times (streamproc._human)
  function span(sec) {
    const a = Math.abs(sec);
    if (a < 90) return Math.round(a) + " s";
    if (a < 90 * 60) return Math.round(a / 60) + " min";
    if (a < 36 * 3600) return Math.round(a / 3600) + " h";
    return Math.round(a / 86400) + " d";
  }

  function when(text, ms, now) {
    if (ms === null || ms === undefined) return text || "–";
    const d = (ms - now) / 1000;
    const rel = Math.abs(d) < 1 ? "now" : d > 0 ? "in " + span(d) : span(d) + " ago";
    return new Date(ms).toISOString().replace(".000", "") + " (" + rel + ")";
  }

  // 1536 -> "1.5 KiB", as `streamproc check` writes sizes (inspect._bytes)
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB"];
    let size = n, i = 0;
    while (size >= 1024 && i < units.length - 1) { size /= 1024; i++; }
    return i === 0 ? n + " B" : size.toFixed(1) + " " + units[i];
  }

  // Redis' used_memory against maxmemory, high at the alert ratio (as `streamproc check`)
  function renderMemory(m) {
    const pct = (r) => Math.round(r * 100) + " %";
    if (!m) {
      $("memory").textContent = "–";
      $("memory").className = "value";
      $("memory-of").textContent = "not read (INFO refused)";
      $("memory-of").className = "sub-value";
      return;
    }
    const high = m.high;
    if (m.ratio === null) {
      $("memory").textContent = bytes(m.used_bytes);
      $("memory-of").textContent = "maxmemory not set: no limit";
    } else {
      $("memory").textContent = pct(m.ratio);
      $("memory-of").textContent = bytes(m.used_bytes) + " of " + bytes(m.maxmemory_bytes) +
        (high ? " — high: at maxmemory Redis refuses writes" : " · alert at " + pct(m.alert_ratio));
    }
    $("memory").className = "value" + (high ? " bad" : "");
    $("memory-of").className = "sub-value" + (high ? " bad" : "");
  }

  function clip(text, n) {
    return text.length > n ? text.slice(0, n - 1) + "…" : text;
  }

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  function color(i) {
    return COLORS[i % COLORS.length];
  }

  function hms(ms) {
    return new Date(ms).toISOString().slice(11, 19);
  }

  // One polyline per group over the last HISTORY points; the x axis is the server's time
  // (HH:MM:SS, UTC) of the points, the y axis runs from 0 to the largest value shown.
  function drawChart(svg, field, keys) {
    const W = 600, H = 140, PAD = 4, AXIS = 16;
    const top = H - AXIS;
    let seen = 0;
    for (const k of keys) for (const v of history.get(k)[field]) if (v !== null && v > seen) seen = v;
    const max = Math.max(seen, field === "backlog" ? 1 : 0.1);
    svg.dataset.max = seen; // the largest value shown (tests read it)
    const ns = "http://www.w3.org/2000/svg";
    const parts = [];
    const step = W / (HISTORY - 1);
    for (let i = 1; i < 4; i++) {
      const y = PAD + ((top - 2 * PAD) * i) / 4;
      const line = document.createElementNS(ns, "line");
      line.setAttribute("x1", 0); line.setAttribute("x2", W);
      line.setAttribute("y1", y); line.setAttribute("y2", y);
      line.setAttribute("class", "grid");
      parts.push(line);
    }
    // time axis: a tick every 30 points (~30 s), labelled with the point's time
    const n = times.length;
    const ticks = [];
    for (let j = n - 1; j >= 0; j -= 30) ticks.push(j);
    for (const j of ticks) {
      const x = W - (n - 1 - j) * step;
      const tick = document.createElementNS(ns, "line");
      tick.setAttribute("x1", x); tick.setAttribute("x2", x);
      tick.setAttribute("y1", top); tick.setAttribute("y2", top + 4);
      tick.setAttribute("class", "tick");
      parts.push(tick);
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", Math.max(x - 2, 40)); t.setAttribute("y", H - 2);
      t.setAttribute("text-anchor", "end");
      t.setAttribute("class", "axis time");
      t.textContent = hms(times[j]);
      parts.push(t);
    }
    keys.forEach((k, i) => {
      const vals = history.get(k)[field];
      const pts = [];
      vals.forEach((v, j) => {
        if (v === null) return;
        const x = W - (vals.length - 1 - j) * step;
        const y = top - PAD - (v / max) * (top - 2 * PAD);
        pts.push(x.toFixed(1) + "," + y.toFixed(1));
      });
      if (!pts.length) return;
      const pl = document.createElementNS(ns, "polyline");
      pl.setAttribute("points", pts.join(" "));
      pl.setAttribute("fill", "none");
      pl.setAttribute("stroke", color(i));
      pl.setAttribute("stroke-width", "2");
      pl.setAttribute("vector-effect", "non-scaling-stroke");
      parts.push(pl);
    });
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 6); label.setAttribute("y", 14);
    label.setAttribute("class", "axis");
    label.textContent = "max " + num(Math.round(seen * 100) / 100);
    parts.push(label);
    svg.replaceChildren(...parts);
  }

  // A group over all its topics (the tasks group reads one stream per priority): sums,
  // except consumers (the same processes read every topic) and ages (the largest).
  function combine(rows) {
    const sum = (f) => rows.some((r) => r[f] !== null) ? rows.reduce((a, r) => a + (r[f] || 0), 0) : null;
    const most = (f) => rows.reduce((a, r) => (r[f] === null ? a : Math.max(a === null ? 0 : a, r[f])), null);
    const g = rows[0];
    return {
      group: g.group, topic: rows.map((r) => r.topic).join(", "), state: g.state,
      consumers: most("consumers"), done_per_s: sum("done_per_s"), failed_per_s: sum("failed_per_s"),
      done_total: sum("done_total"), lag: sum("lag"), pending: sum("pending"), backlog: sum("backlog"),
      oldest_pending_age_s: most("oldest_pending_age_s"), longest_idle_s: most("longest_idle_s"),
      pending_age_p50_s: most("pending_age_p50_s"), pending_age_p99_s: most("pending_age_p99_s"),
      latency_p50_ms: g.latency_p50_ms, latency_p99_ms: g.latency_p99_ms,
      retries_waiting: sum("retries_waiting"), dlq: sum("dlq"), stuck_pending: sum("stuck_pending"),
    };
  }

  function remember(g) {
    const k = g.group;
    if (!history.has(k)) history.set(k, { rate: [], failed: [], backlog: [] });
    const h = history.get(k);
    h.rate.push(g.done_per_s);
    h.failed.push(g.failed_per_s);
    h.backlog.push(g.backlog);
    for (const s of [h.rate, h.failed, h.backlog]) while (s.length > HISTORY) s.shift();
    return k;
  }

  function groupRow(g, s, i, reasons, sub) {
    const swatch = el("span", { class: "swatch" });
    if (!sub) swatch.style.background = color(i);
    const dlqCell = g.dlq && sub !== null
      ? el("button", { class: "link", type: "button", "data-testid": "dlq-open", onclick: () => select(g.topic, g.group) }, num(g.dlq))
      : num(g.dlq);
    const lat = g.latency_p50_ms === null ? el("span", { class: "muted", title: s.latency_note }, "–")
      : el("span", { "data-field": "latency", title: s.latency_note },
        "≤ " + num(g.latency_p50_ms, 0) + " / ≤ " + num(g.latency_p99_ms, 0) + " ms");
    const state = el("span", { class: "state " + g.state, "data-field": "state", title: reasons.join("\n") || g.state }, g.state);
    const attrs = sub
      ? { class: "sub", "data-group": g.group, "data-topic": g.topic }
      : { class: "group-row state-" + g.state, "data-group": g.group, "data-state": g.state };
    if (!sub && sub !== null) attrs["data-topic"] = g.topic; // a group on one topic: one row
    return el("tr", attrs,
      el("td", {}, sub ? "" : swatch, sub ? el("span", { class: "muted" }, "↳ " + g.topic) : g.group),
      el("td", {}, sub ? "" : (sub === null ? rowsTopics(g) : g.topic)),
      el("td", {}, sub ? "" : state),
      el("td", { class: "n" }, num(g.consumers)),
      el("td", { class: "n", "data-field": "done_per_s" }, num(g.done_per_s, 1)),
      el("td", { class: "n" + (g.failed_per_s ? " bad" : ""), "data-field": "failed_per_s" }, num(g.failed_per_s, 1)),
      el("td", { class: "n", "data-field": "done_total" }, num(g.done_total)),
      el("td", { class: "n", "data-field": "lag" }, num(g.lag)),
      el("td", { class: "n", "data-field": "pending" }, num(g.pending)),
      el("td", { class: "n", "data-field": "backlog" }, num(g.backlog)),
      el("td", { class: "n", "data-field": "oldest" }, secs(g.oldest_pending_age_s)),
      el("td", { class: "n" + (g.stuck_pending ? " bad" : ""), "data-field": "idle" }, g.stuck_pending ? secs(g.longest_idle_s) : "–"),
      el("td", { class: "n" }, secs(g.pending_age_p50_s) + " / " + secs(g.pending_age_p99_s)),
      el("td", { class: "n" }, sub ? "" : lat),
      el("td", { class: "n" }, num(g.retries_waiting)),
      el("td", { class: "n" + (g.dlq ? " bad" : ""), "data-field": "dlq" }, dlqCell));
  }

  function rowsTopics(g) {
    return el("span", { class: "muted" }, g.topic.split(", ").length + " topics");
  }

  function render(s) {
    $("prefix").textContent = "prefix " + s.prefix;
    $("interval").textContent = s.interval_s;
    $("updated").textContent = new Date(s.server_time_ms).toISOString().replace(".000", "");
    lastAt = s.server_time_ms;
    times.push(s.server_time_ms);
    while (times.length > HISTORY) times.shift();
    let rate = 0, rateKnown = false, failed = 0, backlog = 0, oldest = null;
    const keys = [];
    const byGroup = new Map();
    for (const g of s.groups) {
      if (!byGroup.has(g.group)) byGroup.set(g.group, []);
      byGroup.get(g.group).push(g);
    }
    const reasonsOf = new Map((s.health || []).map((h) => [h.group, h.reasons]));
    const counts = { ok: 0, busy: 0, stuck: 0, backlog: 0 };
    const rows = [];
    for (const [name, parts] of byGroup) {
      const g = parts.length === 1 ? parts[0] : combine(parts);
      keys.push(remember(g));
      counts[g.state] = (counts[g.state] || 0) + 1;
      if (g.done_per_s !== null) { rate += g.done_per_s; rateKnown = true; }
      failed += g.failed_per_s || 0;
      backlog += g.backlog || 0;
      if (g.oldest_pending_age_s !== null) oldest = Math.max(oldest || 0, g.oldest_pending_age_s);
      const reasons = reasonsOf.get(name) || [];
      if (parts.length === 1) rows.push(groupRow(g, s, keys.length - 1, reasons, false));
      else {
        rows.push(groupRow(g, s, keys.length - 1, reasons, null));
        for (const p of parts) rows.push(groupRow(p, s, keys.length - 1, reasons, true));
      }
    }
    fill($("groups").tBodies[0], rows.length ? rows : [el("tr", {}, el("td", { colspan: 16, class: "muted" }, "No consumer groups yet."))]);
    const span = s.latency_window_s ? " (the last " + Math.round(s.latency_window_s) + " s)" : "";
    $("latency-note").textContent = "Processing latency p50/p99: " + s.latency_note + span + ".";
    $("total-rate").textContent = rateKnown ? num(rate, 1) : "–";
    $("total-failed").textContent = rateKnown ? num(failed, 1) + " failed/s" : "";
    $("total-failed").className = "sub-value" + (failed ? " bad" : "");
    $("total-backlog").textContent = num(backlog);
    $("total-oldest").textContent = secs(oldest);
    $("total-dlq").textContent = num(s.dlq_total);
    $("total-dlq").className = "value" + (s.dlq_total ? " bad" : "");
    renderMemory(s.redis_memory);
    const worst = counts.stuck ? "stuck" : counts.backlog ? "backlog" : counts.busy ? "busy" : "ok";
    $("total-state").textContent = worst;
    $("total-state").className = "value state-text " + worst;
    $("state-card").className = "card state-card state-" + worst;
    $("total-states").textContent = ["ok", "busy", "stuck", "backlog"].map((k) => counts[k] + " " + k).join(" · ");
    drawChart($("chart-rate"), "rate", keys);
    drawChart($("chart-failed"), "failed", keys);
    drawChart($("chart-backlog"), "backlog", keys);
    $("legend").replaceChildren(...keys.map((k, i) => {
      const sw = el("span", { class: "swatch" });
      sw.style.background = color(i);
      return el("span", {}, sw, k);
    }));

    // DLQ chips: groups with dead letters; keep the selected one, else pick the first.
    const withDlq = s.groups.filter((g) => g.dlq > 0);
    $("dlq-groups").replaceChildren(...withDlq.map((g) => el("button", {
      type: "button",
      class: "chip" + (selected && selected.topic === g.topic && selected.group === g.group ? " on" : ""),
      onclick: () => select(g.topic, g.group),
    }, g.group + " on " + g.topic + " · " + g.dlq)));
    if (!selected && withDlq.length) select(withDlq[0].topic, withDlq[0].group);
    else if (selected) {
      const g = s.groups.find((x) => x.topic === selected.topic && x.group === selected.group);
      const n = g ? g.dlq : 0;
      if (n !== shownDlq) loadDlq();
    }

    const t = s.ticker;
    $("ticker-leader").textContent = t && t.leader ? t.leader : "none";
    $("ticker-ttl").textContent = t && t.leader_ttl_ms !== null ? "(lease " + (t.leader_ttl_ms / 1000).toFixed(1) + " s left)" : "";
    $("ticker-runtime").textContent = t ? num(t.runtime_schedules) : "0";
    fill($("schedules").tBodies[0], t && t.schedules.length
      ? t.schedules.map((x) => el("tr", { "data-schedule": x.name }, el("td", {}, x.name), el("td", {}, x.trigger),
        el("td", {}, when(x.last, x.last_ms, s.server_time_ms)), el("td", {}, when(x.next, x.next_ms, s.server_time_ms))))
      : [el("tr", {}, el("td", { colspan: 4, class: "muted" }, "No schedules seen."))]);
    fill($("renders").tBodies[0], s.renders.length
      ? s.renders.map((r) => el("tr", {}, el("td", {}, r.group), el("td", { class: "n" }, num(r.consumers)), el("td", { class: "n" }, num(r.in_flight)),
        el("td", { class: "n" }, num(r.waiting)), el("td", { class: "n" }, num(r.done_per_s, 1)), el("td", { class: "n" }, num(r.dlq))))
      : [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No render group."))]);
    fill($("topics").tBodies[0], s.topics.map((t) => el("tr", { "data-topic": t.topic, class: t.unread ? "unread" : "" },
      el("td", {}, t.topic, t.unread ? el("span", { class: "tag warn", "data-testid": "unread", title: "entries and no consumer group: nothing handles them" }, "no reader") : ""),
      el("td", { class: "n" }, num(t.length)), el("td", { class: "n" }, num(t.groups)),
      el("td", { class: "n" }, num(t.added_per_s, 1)), el("td", { class: "n" }, secs(t.last_age_s)))));
    const unread = s.topics.filter((t) => t.unread).map((t) => t.topic);
    $("unread-note").hidden = !unread.length;
    $("unread-note").textContent = unread.length
      ? "Written to, read by no consumer group: " + unread.join(", ") + ". Whatever is published there is never handled." : "";
    renderPanels(s.panels || []);
  }

  // The application's panels (App(panels=...)): one table each, or its error. Every value is
  // written as text (el() makes text nodes): they come from Redis, written by others.
  function renderPanels(panels) {
    const seen = new Set();
    for (const p of panels) {
      seen.add(p.name);
      let section = panelNodes.get(p.name);
      if (!section) {
        section = el("section", { "data-panel": p.name, "data-testid": "panel" });
        panelNodes.set(p.name, section);
      }
      $("panels").append(section); // (re)appended in the snapshot's order
      const count = p.error ? "" : p.rows.length < p.total
        ? "(" + num(p.rows.length) + " of " + num(p.total) + ")" : "(" + num(p.total) + ")";
      const head = el("h2", {}, p.title + " ", el("span", { class: "muted" }, count));
      if (p.error) {
        section.replaceChildren(head, el("p", { class: "panel-error", role: "alert", "data-field": "panel-error" },
          "Could not read this panel: " + p.error));
        continue;
      }
      const numeric = p.columns.map((_, i) => p.rows.some((r) => typeof r[i] === "number"));
      const rows = p.rows.map((r) => el("tr", {}, ...r.map((v, i) =>
        el("td", numeric[i] ? { class: "n" } : {}, typeof v === "number" ? num(v) : v))));
      const table = el("table", {},
        el("thead", {}, el("tr", {}, ...p.columns.map((c, i) => el("th", numeric[i] ? { class: "n" } : {}, c)))),
        el("tbody", {}, ...(rows.length ? rows
          : [el("tr", {}, el("td", { colspan: p.columns.length, class: "muted" }, "Nothing to show."))])));
      const parts = [head, el("div", { class: "panel-scroll" }, table)];
      if (p.note) parts.push(el("p", { class: "note" }, p.note));
      section.replaceChildren(...parts);
    }
    for (const [name, section] of panelNodes) {
      if (!seen.has(name)) { section.remove(); panelNodes.delete(name); }
    }
  }

  function select(topic, group) {
    selected = { topic, group };
    shownDlq = -1;
    loadDlq();
  }

  function ago(s) {
    if (s >= 86400) return Math.floor(s / 86400) + " d ago";
    if (s >= 3600) return Math.floor(s / 3600) + " h ago";
    if (s >= 60) return Math.floor(s / 60) + " min ago";
    return s + " s ago";
  }

  // A row per dead letter; "Details" opens a row beneath with the indented payload and the
  // full error (text nodes only: what a client posted is never parsed as HTML).
  function dlqRows(topic, group, d) {
    const detail = el("tr", { class: "dlq-detail", hidden: "" },
      el("td", { colspan: "9" },
        el("div", { class: "muted" }, "event id " + (d.id || "–") + " · key " + (d.key || "–") + " · entry " + (d.entry_id || "–") + " · attempts " + (d.attempts || "–") + " · " + (d.at || "")),
        el("div", { class: "label" }, "payload"), el("pre", { "data-testid": "dlq-payload" }, d.payload),
        el("div", { class: "label" }, "error"), el("pre", { class: "err", "data-testid": "dlq-error" }, (d.error_type ? d.error_type + ": " : "") + d.error)));
    const toggle = () => { detail.hidden = !detail.hidden; };
    const ask = () => !d.undecodable || confirm("This entry did not decode (" + d.reason + "): replayed, it fails the same way again unless the code changed. Replay it?");
    const row = el("tr", { "data-dlq-id": d.dlq_id },
      el("td", { class: "mono" }, d.dlq_id), el("td", {}, ago(d.age_s)), el("td", {}, d.type || "(none)"),
      el("td", {}, el("span", { class: "tag" }, d.reason)),
      el("td", { class: "err", title: d.error }, clip((d.error_type ? d.error_type + ": " : "") + (d.error.split("\n")[0] || ""), 140)),
      el("td", { class: "n" }, d.deliveries), el("td", {}, d.consumer || "–"),
      el("td", {}, el("button", { type: "button", class: "link", "data-testid": "dlq-expand", onclick: toggle }, "Details")),
      el("td", {}, el("button", { type: "button", class: "replay", "data-testid": "replay", onclick: () => { if (ask()) replay(topic, group, [d.dlq_id]); } }, "Replay")));
    return [row, detail];
  }

  async function loadDlq() {
    if (!selected) return;
    const { topic, group } = selected;
    const reason = $("dlq-reason").value;
    const r = await fetch("/dashboard/api/dlq?" + new URLSearchParams({ topic, group, reason }), { credentials: "same-origin" });
    if (!r.ok) { $("dlq-status").textContent = "Could not load dead letters (" + r.status + ")."; return; }
    const body = await r.json();
    shownDlq = body.total;
    const pick = $("dlq-reason");
    if (pick.options.length <= 1) pick.append(...body.reasons.map((x) => el("option", { value: x }, x)));
    $("dlq-title").textContent = "· " + group + " on " + topic + " (shown " + body.entries.length + " of " + body.matching +
      (reason ? " " + reason + ", " + body.total + " in all" : "") + "; " + body.replayed + " replayed so far)";
    $("dlq-empty").hidden = body.entries.length > 0;
    fill($("dlq").tBodies[0], body.entries.flatMap((d) => dlqRows(topic, group, d)));
  }

  async function replay(topic, group, ids) {
    $("dlq-status").textContent = "Replaying…";
    const r = await fetch("/dashboard/api/dlq/replay", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ topic, group, ids }),
    });
    const body = await r.json().catch(() => ({}));
    $("dlq-status").textContent = r.ok
      ? "Replayed " + body.replayed + " to " + group + "'s retry stream."
      : "Replay refused: " + (body.detail || r.status);
    loadDlq();
  }

  // ------------------------------------------------------------------ tasks
  // Queued and running tasks first, then finished ones (GET /dashboard/api/tasks), refreshed
  // every 2 s; "Details" opens the payload, detail and result; Cancel asks for confirmation.

  function pretty(v) {
    return v === null || v === undefined ? "–" : JSON.stringify(v, null, 2);
  }

  function taskRows(r) {
    const t = r.task;
    const open = openTasks.has(t.id);
    const detail = el("tr", { class: "task-detail", "data-task-detail": t.id },
      el("td", { colspan: "12" },
        el("div", { class: "muted" }, "task " + t.id + " · queue " + t.queue + " · entry " + (r.entry_id || "no longer in the stream") +
          " · created " + t.created_at + (t.cancelled_by ? " · cancel asked by " + t.cancelled_by : "")),
        el("div", { class: "label" }, "payload"), el("pre", { "data-testid": "task-payload" }, pretty(r.payload)),
        el("div", { class: "label" }, "progress detail"), el("pre", {}, pretty(t.detail)),
        el("div", { class: "label" }, "result"), el("pre", {}, pretty(t.result)),
        t.error ? el("div", { class: "label" }, "error") : "", t.error ? el("pre", { class: "err" }, t.error) : ""));
    detail.hidden = !open;
    const toggle = () => {
      detail.hidden = !detail.hidden;
      if (detail.hidden) openTasks.delete(t.id); else openTasks.add(t.id);
    };
    const canCancel = (t.status === "queued" || t.status === "running") && !t.cancel_requested;
    const bar = el("span", { class: "bar" }, el("span", {}));
    bar.firstChild.style.width = Math.round(t.progress * 100) + "%";
    const row = el("tr", { "data-task": t.id, "data-status": t.status },
      el("td", {}, t.type), el("td", {}, t.priority),
      el("td", {}, el("span", { class: "tag status-" + t.status, "data-field": "status" }, t.status + (t.cancel_requested && t.status === "running" ? " (cancelling)" : ""))),
      el("td", { class: "n" }, bar, " " + Math.round(t.progress * 100) + "%"),
      el("td", { class: "n" }, num(t.attempts)), el("td", { class: "n" }, secs(r.runtime_s)),
      el("td", {}, t.submitted_by || "–"), el("td", { class: "mono" }, r.runner || "–"),
      el("td", { class: "err", title: t.error || "" }, clip(t.error || "", 80)),
      el("td", {}, el("button", { type: "button", class: "link", "data-testid": "task-expand", onclick: toggle }, "Details")),
      el("td", {}, canCancel ? el("button", { type: "button", class: "replay danger", "data-testid": "task-cancel",
        onclick: () => { if (confirm("Cancel task " + t.type + " " + t.id + "?")) cancelTask(t.id); } }, "Cancel") : ""));
    return [row, detail];
  }

  async function loadTasks() {
    const status = $("task-status").value;
    const r = await fetch("/dashboard/api/tasks?" + new URLSearchParams(status ? { status } : {}), { credentials: "same-origin" });
    if (!r.ok) { $("tasks-note").textContent = "Could not load tasks (" + r.status + ")."; return; }
    const body = await r.json();
    $("tasks-title").textContent = "· " + body.active + " queued or running · shown " + body.tasks.length;
    $("tasks-empty").hidden = body.tasks.length > 0;
    fill($("tasks").tBodies[0], body.tasks.flatMap(taskRows));
  }

  async function cancelTask(id) {
    $("tasks-note").textContent = "Cancelling…";
    const r = await fetch("/dashboard/api/tasks/cancel", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ id }),
    });
    const body = await r.json().catch(() => ({}));
    $("tasks-note").textContent = r.ok
      ? (body.verdict === "cancelled" ? "Cancelled " + id + " (it was queued)." : "Asked " + id + " to stop (it is running).")
      : "Cancel refused: " + (body.detail || r.status);
    loadTasks();
  }

  $("task-status").addEventListener("change", () => loadTasks());
  loadTasks();
  setInterval(() => { if (!document.hidden && !document.body.classList.contains("stale")) loadTasks(); }, 2000);

  $("dlq-reason").addEventListener("change", () => loadDlq());

  $("logout").addEventListener("click", async () => {
    await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } });
    location.assign("/dashboard");
  });

  // While the figures are not fresh (Redis down, or the server gone) they are greyed and the
  // banner says since when they are stale; the next snapshot clears both.
  function stale(why) {
    document.body.classList.add("stale");
    $("outage").hidden = false;
    $("outage").textContent = why + " — figures as of " + (lastAt === null ? "never" : hms(lastAt) + " UTC") + ".";
  }

  // The browser retries a dropped stream by itself, but gives up for good after an answer
  // that is not a stream (a 503 while Redis did not answer at the moment it reconnected):
  // then open a new one in a few seconds, until one is live again.
  function connect() {
    const source = new EventSource("/dashboard/events");
    source.addEventListener("snapshot", (e) => {
      $("live").textContent = "live";
      $("live").className = "live on";
      document.body.classList.remove("stale");
      $("outage").hidden = true;
      render(JSON.parse(e.data));
    });
    source.addEventListener("problem", (e) => {
      $("live").textContent = "Redis unavailable";
      $("live").className = "live off";
      $("live").title = JSON.parse(e.data).detail;
      stale("Redis does not answer");
    });
    source.addEventListener("logout", () => { source.close(); location.assign("/dashboard"); });
    source.onerror = () => {
      $("live").textContent = "reconnecting…"; $("live").className = "live off";
      stale("The dashboard's server does not answer");
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 3000);
    };
  }
  connect();
})();
