// streamproc dashboard: renders the snapshots pushed by /dashboard/events (SSE).
// Plain DOM and inline SVG; no library, nothing from another site.
"use strict";

(function () {
  const HISTORY = 120; // points kept per series (~2 min at 1 s)
  const COLORS = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const history = new Map(); // "topic/group" -> {rate: [], backlog: []}
  const panelNodes = new Map(); // application panel name -> its <section>
  let selected = null; // {topic, group} of the DLQ view
  let shownDlq = -1;

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
    return (v / 60).toFixed(1) + " min";
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

  function drawChart(svg, field, keys) {
    const W = 600, H = 140, PAD = 4;
    let max = 1;
    for (const k of keys) for (const v of history.get(k)[field]) if (v !== null && v > max) max = v;
    let seen = 0;
    for (const k of keys) for (const v of history.get(k)[field]) if (v !== null && v > seen) seen = v;
    svg.dataset.max = seen; // the largest value shown (tests read it)
    const ns = "http://www.w3.org/2000/svg";
    const parts = [];
    for (let i = 1; i < 4; i++) {
      const y = PAD + ((H - 2 * PAD) * i) / 4;
      const line = document.createElementNS(ns, "line");
      line.setAttribute("x1", 0); line.setAttribute("x2", W);
      line.setAttribute("y1", y); line.setAttribute("y2", y);
      line.setAttribute("class", "grid");
      parts.push(line);
    }
    keys.forEach((k, i) => {
      const vals = history.get(k)[field];
      const pts = [];
      vals.forEach((v, j) => {
        if (v === null) return;
        const x = W - (vals.length - 1 - j) * (W / (HISTORY - 1));
        const y = H - PAD - (v / max) * (H - 2 * PAD);
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
    label.textContent = "max " + num(Math.round(max * 100) / 100);
    parts.push(label);
    svg.replaceChildren(...parts);
  }

  function remember(g) {
    const k = g.topic + "/" + g.group;
    if (!history.has(k)) history.set(k, { rate: [], backlog: [] });
    const h = history.get(k);
    h.rate.push(g.done_per_s);
    h.backlog.push(g.backlog);
    for (const s of [h.rate, h.backlog]) while (s.length > HISTORY) s.shift();
    return k;
  }

  function render(s) {
    $("prefix").textContent = "prefix " + s.prefix;
    $("interval").textContent = s.interval_s;
    $("updated").textContent = new Date(s.server_time_ms).toISOString().replace(".000", "");
    let rate = 0, rateKnown = false, backlog = 0, oldest = null;
    const keys = [];
    const rows = s.groups.map((g) => {
      keys.push(remember(g));
      if (g.done_per_s !== null) { rate += g.done_per_s; rateKnown = true; }
      backlog += g.backlog || 0;
      if (g.oldest_pending_age_s !== null) oldest = Math.max(oldest || 0, g.oldest_pending_age_s);
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = color(keys.length - 1);
      const dlqCell = g.dlq
        ? el("button", { class: "link", type: "button", "data-testid": "dlq-open", onclick: () => select(g.topic, g.group) }, num(g.dlq))
        : "0";
      const lat = g.latency_p50_ms === null ? el("span", { class: "muted", title: s.latency_note }, "–")
        : el("span", { "data-field": "latency", title: s.latency_note },
          "≤ " + num(g.latency_p50_ms, 0) + " / ≤ " + num(g.latency_p99_ms, 0) + " ms");
      return el("tr", { "data-group": g.group, "data-topic": g.topic },
        el("td", {}, swatch, g.group), el("td", {}, g.topic), el("td", { class: "n" }, num(g.consumers)),
        el("td", { class: "n", "data-field": "done_per_s" }, num(g.done_per_s, 1)),
        el("td", { class: "n", "data-field": "done_total" }, num(g.done_total)),
        el("td", { class: "n", "data-field": "lag" }, num(g.lag)),
        el("td", { class: "n", "data-field": "pending" }, num(g.pending)),
        el("td", { class: "n", "data-field": "backlog" }, num(g.backlog)),
        el("td", { class: "n" }, secs(g.oldest_pending_age_s)),
        el("td", { class: "n" }, secs(g.pending_age_p50_s) + " / " + secs(g.pending_age_p99_s)),
        el("td", { class: "n" }, lat),
        el("td", { class: "n" }, num(g.retries_waiting)),
        el("td", { class: "n" + (g.dlq ? " bad" : ""), "data-field": "dlq" }, dlqCell));
    });
    fill($("groups").tBodies[0], rows.length ? rows : [el("tr", {}, el("td", { colspan: 13, class: "muted" }, "No consumer groups yet."))]);
    $("latency-note").textContent = "Processing latency p50/p99: " + s.latency_note + ".";
    $("total-rate").textContent = rateKnown ? num(rate, 1) : "–";
    $("total-backlog").textContent = num(backlog);
    $("total-oldest").textContent = secs(oldest);
    $("total-dlq").textContent = num(s.dlq_total);
    $("total-dlq").className = "value" + (s.dlq_total ? " bad" : "");
    drawChart($("chart-rate"), "rate", keys);
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
      ? t.schedules.map((x) => el("tr", {}, el("td", {}, x.name), el("td", {}, x.trigger), el("td", {}, x.last), el("td", {}, x.next)))
      : [el("tr", {}, el("td", { colspan: 4, class: "muted" }, "No schedules seen."))]);
    fill($("renders").tBodies[0], s.renders.length
      ? s.renders.map((r) => el("tr", {}, el("td", {}, r.group), el("td", { class: "n" }, num(r.consumers)), el("td", { class: "n" }, num(r.in_flight)),
        el("td", { class: "n" }, num(r.waiting)), el("td", { class: "n" }, num(r.done_per_s, 1)), el("td", { class: "n" }, num(r.dlq))))
      : [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No render group."))]);
    fill($("topics").tBodies[0], s.topics.map((t) => el("tr", {}, el("td", {}, t.topic), el("td", { class: "n" }, num(t.length)),
      el("td", { class: "n" }, num(t.added_per_s, 1)), el("td", { class: "n" }, secs(t.last_age_s)))));
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

  $("dlq-reason").addEventListener("change", () => loadDlq());

  $("logout").addEventListener("click", async () => {
    await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } });
    location.assign("/dashboard");
  });

  const source = new EventSource("/dashboard/events");
  source.addEventListener("snapshot", (e) => {
    $("live").textContent = "live";
    $("live").className = "live on";
    render(JSON.parse(e.data));
  });
  source.addEventListener("problem", (e) => {
    $("live").textContent = "Redis unavailable";
    $("live").className = "live off";
    $("live").title = JSON.parse(e.data).detail;
  });
  source.addEventListener("logout", () => { source.close(); location.assign("/dashboard"); });
  source.onerror = () => { $("live").textContent = "reconnecting…"; $("live").className = "live off"; };
})();
