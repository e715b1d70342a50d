// The Roundtable web view. Everything shown is derived from the session's envelopes,
// which arrive as server-sent events (one per envelope, id = sequence number).
"use strict";
(function () {
  const COLORS = ["#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#dc2626", "#65a30d", "#9333ea", "#0d9488"];
  const CONTRIBUTIONS = new Set(["message", "proposal", "vote", "verdict", "commit", "reveal", "summary", "work", "board"]);
  const VOTE_KINDS = new Set(["vote", "commit", "reveal", "verdict", "proposal"]);
  const NOT_DECISIONS = new Set(["stop", "failure", "absent", "join", "task", "tool_call", "tool_result", "tool_list"]);
  const SVGNS = "http://www.w3.org/2000/svg";

  // ---- DOM helpers (text always goes in as text nodes, never as HTML) -----------------
  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, String(v));
    }
  }
  function add(el, kids) {
    for (const k of kids.flat(Infinity)) {
      if (k === null || k === undefined || k === false) continue;
      el.appendChild(typeof k === "object" ? k : document.createTextNode(String(k)));
    }
    return el;
  }
  function h(tag, attrs, ...kids) { const el = document.createElement(tag); setAttrs(el, attrs); return add(el, kids); }
  function s(tag, attrs, ...kids) { const el = document.createElementNS(SVGNS, tag); setAttrs(el, attrs); return add(el, kids); }

  function money(c) { return "$" + (c || 0).toFixed(4); }
  function num(n) { return (n || 0).toLocaleString("en-US"); }
  function firstLine(t, max) {
    const flat = String(t || "").trim().split(/\s+/).join(" ");
    return flat.length > max ? flat.slice(0, max) + "…" : flat;
  }
  function recipient(to) {
    if (!to || to.type === "all") return "all";
    if (to.type === "peer") return to.id;
    return "group " + to.id;
  }

  const connEl = document.getElementById("conn");
  const listEl = document.getElementById("session-list");
  const mainEl = document.getElementById("main");
  const intro = mainEl.firstElementChild;
  function setConn(cls, text) { connEl.className = "conn " + cls; connEl.textContent = text; }

  // ---- Sessions list ----------------------------------------------------------------
  let sessions = [];
  let current = null;

  async function loadSessions() {
    try {
      const r = await fetch("/api/sessions", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      sessions = await r.json();
      renderSessions();
    } catch (e) {
      listEl.replaceChildren(h("li", { class: "muted" }, "Cannot list sessions: " + e.message));
    }
  }

  function renderSessions() {
    if (!sessions.length) {
      listEl.replaceChildren(h("li", { class: "muted" }, "No sessions yet."));
      return;
    }
    listEl.replaceChildren(...sessions.map((x) => h("li", null,
      h("a", { href: "#/s/" + encodeURIComponent(x.id), class: current && current.id === x.id ? "current" : null, "data-session": x.id },
        h("div", { class: "team" }, x.team || "?"),
        h("div", { class: "sid" }, x.id),
        h("div", { class: "state " + (x.stop ? "stopped" : "open") },
          x.stop ? "stopped: " + firstLine(x.stop, 70) : "open · " + x.envelopes + " envelopes")))));
  }

  // ---- One session, live --------------------------------------------------------------
  function openSession(id) {
    if (current && current.id === id) return;
    closeSession();
    const me = { id, entries: [], bySeq: new Map(), byId: new Map(), es: null, timer: null, problem: null };
    // The seat panel lives apart from what each envelope re-renders, so that an answer
    // being typed survives the envelopes that arrive meanwhile.
    me.seatEl = h("div", { id: "seat-host" });
    me.contentEl = h("div", null, h("p", { class: "muted" }, "Loading session " + id + " …"));
    me.seat = null;
    current = me;
    if (!sessions.some((x) => x.id === id)) loadSessions();
    renderSessions();
    mainEl.replaceChildren(me.seatEl, me.contentEl);
    resumeSeat(me);
    const es = new EventSource("/api/sessions/" + encodeURIComponent(id) + "/events");
    me.es = es;
    es.addEventListener("envelope", (ev) => {
      const m = JSON.parse(ev.data);
      if (me.bySeq.has(m.seq)) return;
      me.bySeq.set(m.seq, m.env);
      me.byId.set(m.env.id, m.seq);
      me.entries.push({ seq: m.seq, env: m.env, step: m.step });
      schedule(me);
    });
    es.addEventListener("problem", (ev) => { me.problem = ev.data; schedule(me); });
    es.onopen = () => setConn("live", "live");
    es.onerror = async () => {
      if (es.readyState !== EventSource.CLOSED) { setConn("retry", "reconnecting…"); return; }
      setConn("retry", "disconnected");
      if (!me.entries.length && current === me) {
        let why = "it could not be read";
        try { const r = await fetch("/api/sessions/" + encodeURIComponent(id) + "/trace"); why = (await r.json()).error || why; } catch (e) { /* keep the generic reason */ }
        mainEl.replaceChildren(h("div", { class: "panel" }, h("h2", null, "Cannot show session " + id), h("p", null, why)));
      }
    };
  }

  function closeSession() {
    if (current && current.es) current.es.close();
    if (current && current.seat && current.seat.poll) clearInterval(current.seat.poll);
    current = null;
  }

  function schedule(me) {
    if (me.timer) return;
    me.timer = setTimeout(() => { me.timer = null; if (current === me) render(me); }, 40);
  }

  // ---- Everything shown, derived from the envelopes ----------------------------------
  function derive(me) {
    const es = me.entries.slice().sort((a, b) => a.seq - b.seq);
    const task = es.find((e) => e.env.kind === "task");
    const tj = (task && task.env.body.json) || {};
    const plan = tj.plan || null;
    const peers = plan ? plan.peers.map((p) => p.id) : [];
    for (const e of es) {
      if (e.env.kind !== "task" && !peers.includes(e.env.from)) peers.push(e.env.from);
    }
    const color = {};
    peers.forEach((p, i) => { color[p] = COLORS[i % COLORS.length]; });
    const stop = es.find((e) => e.env.kind === "stop");
    const seqOf = (id) => me.byId.get(id);

    const led = new Set();
    if (stop) {
      const stack = (stop.env.parents || []).map(seqOf).filter((x) => x !== undefined);
      while (stack.length) {
        const q = stack.pop();
        if (led.has(q)) continue;
        led.add(q);
        for (const p of (me.bySeq.get(q).parents || [])) { const x = seqOf(p); if (x !== undefined) stack.push(x); }
      }
    }

    const stats = {};
    const series = {};
    for (const p of peers) {
      stats[p] = { messages: 0, calls: 0, failures: 0, input: 0, output: 0, cost: 0, latency: 0 };
      series[p] = { tokens: [[0, 0]], cost: [[0, 0]] };
    }
    const inter = new Map();
    let round = 0;
    for (const e of es) {
      const env = e.env;
      if (env.kind === "task" || env.kind === "stop") continue;
      round = Math.max(round, env.round || 0);
      const st = stats[env.from];
      if (CONTRIBUTIONS.has(env.kind)) st.messages += 1;
      if (env.kind === "failure") st.failures += 1;
      const u = env.usage;
      if (u) {
        st.calls += u.calls || 1;
        st.input += u.prompt_tokens || 0;
        st.output += u.completion_tokens || 0;
        st.cost += u.cost_usd || 0;
        st.latency += u.latency_ms || 0;
        series[env.from].tokens.push([e.seq, st.input + st.output]);
        series[env.from].cost.push([e.seq, st.cost]);
      }
      if (CONTRIBUTIONS.has(env.kind)) {
        for (const pid of env.parents || []) {
          const ps = seqOf(pid);
          if (ps === undefined) continue;
          const other = me.bySeq.get(ps).from;
          if (other === env.from || me.bySeq.get(ps).kind === "task") continue;
          const k = env.from + "\u0000" + other;
          const x = inter.get(k) || { from: env.from, to: other, answers: 0, direct: 0 };
          x.answers += 1;
          inter.set(k, x);
        }
      }
      if (env.to && env.to.type === "peer") {
        const k = env.from + "\u0000" + env.to.id;
        const x = inter.get(k) || { from: env.from, to: env.to.id, answers: 0, direct: 0 };
        x.direct += 1;
        inter.set(k, x);
      }
    }
    const lastSeq = es.length ? es[es.length - 1].seq : 0;
    return {
      es, task, plan, peers, color, stop, led, stats, series, lastSeq, round,
      inter: [...inter.values()],
      team: tj.team_name || (plan && plan.name) || "?",
      protocol: plan && plan.protocol ? plan.protocol.kind : "?",
      forked: tj.forked_from || null,
    };
  }

  function who(d, seq) {
    const env = current.bySeq.get(seq);
    if (!env) return "#" + seq;
    return "#" + seq + " " + (env.kind === "task" ? "the task" : env.from);
  }

  function jump(seq) {
    return {
      href: "#/s/" + encodeURIComponent(current.id),
      onclick: (ev) => {
        ev.preventDefault();
        const el = document.getElementById("env-" + seq);
        if (el) { el.scrollIntoView({ behavior: "smooth", block: "center" }); el.classList.add("flash"); }
      },
    };
  }

  // ---- Panels --------------------------------------------------------------------------
  function head(d, me) {
    const stopped = !!d.stop;
    return h("section", { class: "head" },
      h("h1", null, d.team, " ", h("span", { class: "badge " + (stopped ? "stopped" : "open") }, stopped ? "stopped" : "in progress")),
      h("div", { class: "meta" }, "protocol ", d.protocol, " · session ", me.id, " · ", String(d.es.length), " envelopes · ",
        String(d.peers.length), " peers",
        d.forked ? [" · forked from ", h("a", { href: "#/s/" + encodeURIComponent(d.forked.session) }, d.forked.session), " at #", String(d.forked.at),
          d.forked.edited ? " with #" + d.forked.edited.seq + " edited" : ""] : null),
      h("p", { class: "topic" }, d.task ? d.task.env.body.text : ""));
  }

  function decisionPanel(d) {
    if (!d.stop) {
      return h("section", { class: "panel wide decision pending", "data-role": "decision" },
        h("h2", null, "Decision"),
        h("p", { class: "reason" }, "In progress: round " + (d.round + 1) + ", " + d.es.filter((e) => CONTRIBUTIONS.has(e.env.kind)).length + " messages so far"),
        h("p", { class: "muted" }, "The stop decision and the messages that led to it appear here when the session ends."));
    }
    const env = d.stop.env;
    const j = env.body.json || {};
    const answer = j.answer || env.body.text;
    const decidedBy = (env.parents || []).map((id) => current.byId.get(id)).filter((x) => x !== undefined);
    const chain = [...d.led].sort((a, b) => a - b);
    const ballots = d.es.filter((e) => e.seq < d.stop.seq && ["vote", "verdict", "reveal"].includes(e.env.kind) &&
      (e.env.parents || []).some((id) => decidedBy.includes(current.byId.get(id))));
    return h("section", { class: "panel wide decision", "data-role": "decision" },
      h("h2", null, "Why it stopped"),
      h("p", { class: "reason" }, j.reason || "stopped"),
      h("div", { class: "muted" }, "Recorded by ", env.from, " as envelope #", String(d.stop.seq), "."),
      answer ? [h("div", { class: "muted", style: "margin-top:8px" }, "Final answer"), h("div", { class: "answer" }, answer)] : null,
      decidedBy.length
        ? h("div", null, "Decided by:", h("ul", null, decidedBy.map((q) => {
          const e = current.bySeq.get(q);
          return h("li", null, h("a", jump(q), who(d, q)), " (", e.kind, ", round ", String((e.round || 0) + 1), "): ", firstLine(e.body.text, 120));
        })))
        : h("div", { class: "muted" }, "It names no envelope it was decided from; its reason says why.",
          lastRound(d).length ? [" The last round before it: ", lastRound(d).map((q, i) => [i ? ", " : "", h("a", jump(q), who(d, q))])] : null),
      ballots.length
        ? h("div", { style: "margin-top:6px" }, "Ballots on it:", h("ul", null, ballots.map((e) =>
          h("li", null, h("a", jump(e.seq), who(d, e.seq)), " (", e.env.kind, "): ", ballot(e.env)))))
        : null,
      chain.length > decidedBy.length
        ? h("div", { style: "margin-top:6px" }, "The messages that led to it (", String(chain.length), "): ",
          chain.map((q, i) => [i ? ", " : "", h("a", jump(q), who(d, q))]))
        : null);
  }

  function lastRound(d) {
    const before = d.es.filter((e) => e.seq < d.stop.seq && CONTRIBUTIONS.has(e.env.kind));
    if (!before.length) return [];
    const r = Math.max(...before.map((e) => e.env.round || 0));
    return before.filter((e) => (e.env.round || 0) === r).map((e) => e.seq);
  }

  function graphPanel(d) {
    const W = 460, H = 300, cx = W / 2, cy = H / 2 - 6, R = Math.min(115, 40 + d.peers.length * 18);
    const pos = {};
    d.peers.forEach((p, i) => {
      const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, d.peers.length);
      pos[p] = d.peers.length === 1 ? [cx, cy] : [cx + R * Math.cos(a), cy + R * Math.sin(a)];
    });
    const radius = (p) => 14 + Math.min(10, (d.stats[p] ? d.stats[p].messages : 0) * 1.5);
    const has = new Set(d.inter.map((x) => x.from + "\u0000" + x.to));
    const edges = [];
    const labels = [];
    for (const x of d.inter) {
      if (!pos[x.from] || !pos[x.to]) continue;
      const [x1, y1] = pos[x.from];
      const [x2, y2] = pos[x.to];
      const len = Math.hypot(x2 - x1, y2 - y1) || 1;
      const ux = (x2 - x1) / len, uy = (y2 - y1) / len;
      const off = has.has(x.to + "\u0000" + x.from) ? 7 : 0;
      const ox = -uy * off, oy = ux * off;
      const r1 = radius(x.from) + 2, r2 = radius(x.to) + 6;
      const count = x.answers + x.direct;
      edges.push(s("line", {
        class: "edge", x1: x1 + ux * r1 + ox, y1: y1 + uy * r1 + oy, x2: x2 - ux * r2 + ox, y2: y2 - uy * r2 + oy,
        stroke: d.color[x.from], "stroke-width": Math.min(6, 1.2 + count * 0.8), "stroke-dasharray": x.answers ? null : "4 3",
        "marker-end": "url(#arrow)", opacity: 0.8,
      }, s("title", null, x.from + " answered " + x.to + " " + x.answers + "×" + (x.direct ? ", wrote to them directly " + x.direct + "×" : ""))));
      labels.push(s("text", { x: (x1 + x2) / 2 + ox * 2.2, y: (y1 + y2) / 2 + oy * 2.2 + 4, "text-anchor": "middle", "font-size": 11, fill: "#334155" }, String(count)));
    }
    const nodes = d.peers.map((p) => {
      const [x, y] = pos[p];
      const r = radius(p);
      return s("g", { class: "node", "data-peer": p },
        s("circle", { cx: x, cy: y, r, fill: d.color[p], opacity: 0.9 }),
        s("text", { x, y: y + 4, "text-anchor": "middle", "font-size": 11, fill: "#fff", "font-weight": 700 }, String(d.stats[p] ? d.stats[p].messages : 0)),
        s("text", { x, y: y < cy - 1 ? y - r - 7 : y + r + 14, "text-anchor": "middle", "font-size": 12, fill: "#1f2933" }, p));
    });
    const svg = s("svg", { viewBox: "0 0 " + W + " " + H, width: "100%", role: "img", "aria-label": "Interaction graph", id: "graph" },
      s("defs", null, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
        s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#64748b" }))),
      edges, labels, nodes);
    return h("section", { class: "panel", "data-role": "graph" },
      h("h2", null, "Who answered whom"),
      svg,
      h("div", { class: "muted", style: "font-size:12px" },
        d.inter.length ? "An arrow A → B: A's messages answer B's (from their causal parents); dashed: direct messages. Numbers in circles: messages sent."
          : "No one has answered anyone yet."));
  }

  function chart(d, key, fmt) {
    const W = 460, H = 150, L = 48, Rm = 10, T = 10, B = 22;
    const maxX = Math.max(1, d.lastSeq);
    let maxY = 0;
    for (const p of d.peers) for (const [, v] of d.series[p][key]) maxY = Math.max(maxY, v);
    const X = (x) => L + ((W - L - Rm) * x) / maxX;
    const Y = (y) => H - B - (maxY ? ((H - B - T) * y) / maxY : 0);
    const lines = d.peers.map((p) => {
      const pts = [];
      let last = 0;
      for (const [x, v] of d.series[p][key]) { pts.push(X(x) + "," + Y(last)); pts.push(X(x) + "," + Y(v)); last = v; }
      pts.push(X(maxX) + "," + Y(last));
      return s("polyline", { points: pts.join(" "), fill: "none", stroke: d.color[p], "stroke-width": 2, "data-peer": p });
    });
    return s("svg", { viewBox: "0 0 " + W + " " + H, width: "100%", class: "chart", "data-chart": key },
      s("line", { x1: L, y1: H - B, x2: W - Rm, y2: H - B, stroke: "#cbd5e1" }),
      s("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#cbd5e1" }),
      s("text", { x: L - 4, y: T + 8, "text-anchor": "end", "font-size": 10, fill: "#6b7785" }, fmt(maxY)),
      s("text", { x: L - 4, y: H - B, "text-anchor": "end", "font-size": 10, fill: "#6b7785" }, fmt(0)),
      s("text", { x: L, y: H - 6, "font-size": 10, fill: "#6b7785" }, "#1"),
      s("text", { x: W - Rm, y: H - 6, "text-anchor": "end", "font-size": 10, fill: "#6b7785" }, "#" + maxX + " (envelopes, in log order)"),
      lines);
  }

  function costPanel(d) {
    const tot = { messages: 0, calls: 0, failures: 0, input: 0, output: 0, cost: 0, latency: 0 };
    const rows = d.peers.map((p) => {
      const x = d.stats[p];
      for (const k of Object.keys(tot)) tot[k] += x[k];
      return h("tr", { "data-peer": p },
        h("td", null, h("span", { class: "swatch", style: "background:" + d.color[p] }), p),
        h("td", null, num(x.messages)), h("td", null, num(x.calls)), h("td", null, num(x.failures)),
        h("td", null, num(x.input)), h("td", null, num(x.output)), h("td", null, num(x.input + x.output)),
        h("td", null, money(x.cost)), h("td", null, num(x.latency) + " ms"));
    });
    const noCost = tot.cost === 0;
    return h("section", { class: "panel", "data-role": "cost" },
      h("h2", null, "Tokens and cost per peer"),
      h("table", null,
        h("thead", null, h("tr", null, ["Peer", "Msgs", "Calls", "Fails", "In", "Out", "Tokens", "Cost", "Latency"].map((t) => h("th", null, t)))),
        h("tbody", null, rows,
          h("tr", { class: "total" }, h("td", null, "total"), h("td", null, num(tot.messages)), h("td", null, num(tot.calls)), h("td", null, num(tot.failures)),
            h("td", null, num(tot.input)), h("td", null, num(tot.output)), h("td", null, num(tot.input + tot.output)), h("td", null, money(tot.cost)),
            h("td", null, num(tot.latency) + " ms")))),
      h("div", { class: "chart-title" }, "Tokens over the session (cumulative per peer)"),
      chart(d, "tokens", (v) => num(Math.round(v))),
      h("div", { class: "chart-title" }, noCost ? "Cost over the session: $0 (no prices configured for these models)" : "Cost over the session (cumulative per peer)"),
      noCost ? null : chart(d, "cost", (v) => money(v)));
  }

  // A vote, verdict or proposal in a few words: its structured fields when it has them.
  function ballot(env) {
    const j = env.body.json;
    // A reveal's JSON is its salt and commitment: the answer is the text.
    if (!j || typeof j !== "object" || Array.isArray(j) || env.kind === "reveal" || env.kind === "commit") return firstLine(env.body.text, 90);
    const parts = [];
    if (typeof j.approve === "boolean") parts.push(j.approve ? "✓ approves" : "✗ rejects");
    for (const [k, v] of Object.entries(j)) {
      if (k === "approve" || v === null || typeof v === "object") continue;
      parts.push(k + ": " + firstLine(String(v), 60));
    }
    return parts.length ? parts.join(" · ") : firstLine(env.body.text, 90);
  }

  function votesPanel(d) {
    // What was written after the stop decides nothing.
    const rows = d.es.filter((e) => !afterStop(d, e) && (VOTE_KINDS.has(e.env.kind) ||
      (!e.env.usage && (e.env.parents || []).length && !NOT_DECISIONS.has(e.env.kind))));
    const body = rows.length
      ? h("table", { class: "votes" },
        h("thead", null, h("tr", null, ["#", "Round", "Peer", "Kind", "What", "From"].map((t) => h("th", null, t)))),
        h("tbody", null, rows.map((e) => {
          const what = ballot(e.env);
          return h("tr", null,
            h("td", null, h("a", jump(e.seq), "#" + e.seq)), h("td", null, String((e.env.round || 0) + 1)),
            h("td", null, e.env.from), h("td", null, e.env.kind), h("td", { class: "text" }, what),
            h("td", null, (e.env.parents || []).map((id) => current.byId.get(id)).filter((x) => x !== undefined).map((q) => "#" + q).join(" ")));
        })))
      : h("p", { class: "muted" }, "No votes, proposals or verdicts in this session (protocol " + d.protocol + ").");
    const consensus = d.stop && /consensus/i.test(((d.stop.env.body.json || {}).reason) || "");
    return h("section", { class: "panel wide", "data-role": "votes" },
      h("h2", null, "Votes and decisions"),
      consensus ? h("p", null, "Consensus: ", (d.stop.env.body.json || {}).reason) : null,
      body);
  }

  // What a tool envelope says besides its text: who called which tool, how the call
  // ended, what an MCP server listed. Null for other envelopes.
  function toolNote(env) {
    const j = env.body.json;
    if (!j || typeof j !== "object") return null;
    if (env.kind === "tool_call") return env.from + " calls " + j.tool;
    if (env.kind === "tool_result") {
      const parts = [j.tool, j.outcome];
      if (typeof j.exit_status === "number") parts.push("exit " + j.exit_status);
      if (typeof j.signal === "number") parts.push("signal " + j.signal);
      if (j.outcome !== "outcome unknown") parts.push(num(j.duration_ms || 0) + " ms");
      if (j.truncated) parts.push("output cut");
      return parts.join(" · ");
    }
    if (env.kind === "tool_list") {
      if (j.error) return "MCP server " + j.server + " could not be started";
      return "MCP server " + j.server + ": " + (j.tools || []).map((t) => t.name).join(", ");
    }
    return null;
  }

  function afterStop(d, e) {
    return !!d.stop && e.seq > d.stop.seq;
  }

  function card(d, e) {
    const env = e.env;
    const led = d.led.has(e.seq);
    const cls = ["card", env.kind === "task" ? "task" : "", env.kind === "stop" ? "stop" : "", env.kind === "failure" ? "failure" : "", led ? "led" : ""].join(" ");
    const u = env.usage;
    const answers = (env.parents || []).map((id) => current.byId.get(id)).filter((x) => x !== undefined);
    let text = env.body.text;
    if (env.kind === "stop") text = ((env.body.json || {}).reason || "") + (text ? "\nFinal answer: " + firstLine(text, 160) : "");
    return h("article", { class: cls, id: "env-" + e.seq, "data-seq": e.seq, "data-kind": env.kind },
      h("div", { class: "hdr" },
        h("span", { class: "seq" }, "#" + e.seq),
        h("span", { class: "who" }, d.color[env.from] ? h("span", { class: "swatch", style: "background:" + d.color[env.from] }) : null, env.kind === "task" ? "Task" : env.from),
        env.kind === "task" ? null : h("span", { class: "to" }, "→ " + recipient(env.to)),
        env.kind === "message" || env.kind === "task" ? null : h("span", { class: "kind" }, env.kind),
        toolNote(env) ? h("span", { class: "tool", "data-role": "tool" }, toolNote(env)) : null,
        h("code", { class: "muted", "data-role": "step" }, e.step || env.step),
        led ? h("span", { class: "star" }, "★ led to the decision") : null,
        afterStop(d, e) ? h("span", { class: "late", "data-role": "late" }, "after the stop: decides nothing") : null),
      h("div", { class: "text" }, text),
      (u || answers.length) ? h("div", { class: "foot" },
        u ? [u.model, " · ", num(u.prompt_tokens), " in + ", num(u.completion_tokens), " out tokens · ", num(u.latency_ms), " ms", u.cost_usd ? " · " + money(u.cost_usd) : ""] : null,
        answers.length ? [u ? " · " : "", env.kind === "stop" ? "decided by " : "answers ", answers.map((q, i) => [i ? ", " : "", h("a", jump(q), who(d, q))])] : null)
        : null);
  }

  function transcript(d) {
    const byRound = new Map();
    for (const e of d.es) {
      if (e.env.kind === "task" || e.env.kind === "stop") continue;
      const r = e.env.round || 0;
      if (!byRound.has(r)) byRound.set(r, []);
      byRound.get(r).push(e);
    }
    const rounds = [...byRound.keys()].sort((a, b) => a - b);
    return h("section", { class: "transcript", "data-role": "transcript" },
      h("h2", { style: "margin-top:24px" }, "Transcript"),
      d.task ? card(d, d.task) : null,
      rounds.map((r) => h("section", { class: "round", "data-round": r + 1 }, h("h3", null, "Round " + (r + 1)), byRound.get(r).map((e) => card(d, e)))),
      d.stop ? h("section", { class: "round" }, h("h3", null, "Stop"), card(d, d.stop)) : null);
  }

  function render(me) {
    const d = derive(me);
    const y = window.scrollY;
    document.title = d.team + " · Roundtable";
    const parts = [
      head(d, me),
      me.problem ? h("div", { class: "panel" }, "Problem reading the log: " + me.problem) : null,
      h("div", { class: "grid" }, decisionPanel(d), graphPanel(d), costPanel(d), votesPanel(d)),
      transcript(d),
    ];
    me.contentEl.replaceChildren(...parts.filter((p) => p !== null));
    me.derived = d;
    renderSeat(me);
    window.scrollTo(0, y);
  }

  // ---- A seat at the table (only when the server was started to act: `ui --act`) -----
  // Writes are POST with a JSON body and the CSRF header from GET /api/act; the token
  // travels in the cookie the page's URL set.
  const act = { state: "unknown", csrf: null, header: null };

  async function checkActing() {
    try {
      const r = await fetch("/api/act", { cache: "no-store" });
      if (r.ok) {
        const j = await r.json();
        Object.assign(act, { state: "on", csrf: j.csrf, header: j.csrf_header });
      } else {
        act.state = r.status === 401 ? "locked" : "off";
      }
    } catch (e) {
      act.state = "off";
    }
  }

  async function write(path, body) {
    const headers = { "Content-Type": "application/json" };
    headers[act.header] = act.csrf;
    const r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
    let j = {};
    try { j = await r.json(); } catch (e) { /* no JSON: the status says it */ }
    if (!r.ok) throw new Error(j.error || "HTTP " + r.status);
    return j;
  }

  function seatKey(id) { return "rt-seat:" + id; }

  // A seat this tab took earlier (a reload keeps it while the server holds it).
  function resumeSeat(me) {
    let saved = null;
    try { saved = JSON.parse(sessionStorage.getItem(seatKey(me.id)) || "null"); } catch (e) { saved = null; }
    if (saved && saved.handle) startSeat(me, saved.peer, saved.handle);
  }

  function startSeat(me, peer, handle) {
    me.seat = { peer, handle, state: null, shown: null, poll: null, error: "", done: "" };
    sessionStorage.setItem(seatKey(me.id), JSON.stringify({ peer, handle }));
    const tick = () => pollSeat(me);
    me.seat.poll = setInterval(tick, 700);
    tick();
  }

  function endSeat(me, why) {
    if (me.seat && me.seat.poll) clearInterval(me.seat.poll);
    sessionStorage.removeItem(seatKey(me.id));
    me.seat = null;
    me.seatNote = why || "";
    renderSeat(me);
  }

  async function pollSeat(me) {
    const seat = me.seat;
    if (!seat) return;
    try {
      const r = await fetch("/api/seats/" + encodeURIComponent(seat.handle), { cache: "no-store" });
      if (r.status === 404 || r.status === 401) {
        let why = "";
        try { why = (await r.json()).error; } catch (e) { /* keep it empty */ }
        if (me.seat === seat) endSeat(me, why);
        return;
      }
      if (!r.ok) return;
      seat.state = await r.json();
    } catch (e) {
      return;
    }
    if (me.seat === seat && current === me) renderSeat(me);
  }

  function humanSeats(d) {
    return d && d.plan ? d.plan.peers.filter((p) => p.kind === "human").map((p) => p.id) : [];
  }

  // Re-rendered only when what it shows changes (a new question, the end), never while
  // the same question is being answered.
  function renderSeat(me) {
    const d = me.derived;
    const humans = humanSeats(d);
    const seat = me.seat;
    const st = seat && seat.state;
    const shown = JSON.stringify([act.state, humans, !!(d && d.stop), seat && seat.handle, me.seatNote || "",
      st && [st.question && st.question.n, st.over, st.failed, st.notices.length]]);
    if (me.seatShown === shown) return;
    me.seatShown = shown;
    if (!humans.length || act.state === "off" || act.state === "unknown" || (d.stop && !seat)) {
      me.seatEl.replaceChildren();
      return;
    }
    if (act.state === "locked") {
      me.seatEl.replaceChildren(h("section", { class: "panel seat", "data-role": "seat" },
        h("h2", null, "Seats for people"),
        h("p", { class: "muted" }, "This session has a seat for a person (" + humans.join(", ") + "). To take it here, open this page with the URL ",
          h("code", null, "roundtable ui --act"), " printed: it carries the token that acting needs.")));
      return;
    }
    if (!seat) {
      const err = h("p", { class: "error", "data-role": "seat-error" }, me.seatNote || "");
      me.seatEl.replaceChildren(h("section", { class: "panel seat", "data-role": "seat" },
        h("h2", null, "Seats for people"),
        h("p", null, "Sit at the table as a human peer: you answer its duties here, as you would with ",
          h("code", null, "roundtable join " + me.id + " --as " + humans[0]), "."),
        h("div", { class: "seat-actions" }, humans.map((p) => h("button", {
          type: "button", "data-take": p,
          onclick: async (ev) => {
            ev.target.disabled = true;
            try {
              const j = await write("/api/seats", { session: me.id, peer: p });
              me.seatNote = "";
              startSeat(me, p, j.seat);
            } catch (e) {
              err.textContent = e.message;
              ev.target.disabled = false;
            }
          },
        }, "Take seat " + p))),
        err));
      return;
    }
    const base = "/api/seats/" + encodeURIComponent(seat.handle);
    const err = h("p", { class: "error", "data-role": "seat-error" });
    const done = h("p", { class: "muted", "data-role": "seat-done" }, seat.done);
    let body;
    if (!st) {
      body = h("p", { class: "muted" }, "Taking the seat…");
    } else if (st.over) {
      body = h("p", { class: "reason", "data-role": "seat-over" }, "The session is over.");
    } else if (st.failed) {
      body = h("p", { class: "error" }, "The seat stopped: " + st.failed);
    } else if (!st.question) {
      body = h("p", { class: "muted", "data-role": "seat-idle" }, "Nothing is asked of you now; your duties appear here as they come.");
    } else {
      body = questionForm(me, st.question, base, err, done);
    }
    const others = d && d.plan ? d.plan.peers.map((p) => p.id).filter((p) => p !== seat.peer) : [];
    const sayErr = h("p", { class: "error", "data-role": "say-error" });
    const sayText = h("textarea", { rows: 2, "data-role": "say-text", placeholder: "Say something at any time…" });
    const sayTo = h("select", { "data-role": "say-to" }, h("option", { value: "" }, "to everyone"), others.map((p) => h("option", { value: p }, "to " + p)));
    const sayForm = h("form", {
      class: "say", "data-role": "say-form",
      onsubmit: async (ev) => {
        ev.preventDefault();
        sayErr.textContent = "";
        try {
          await write(base + "/say", { to: sayTo.value || null, text: sayText.value });
          sayText.value = "";
          sayErr.textContent = "";
        } catch (e) {
          sayErr.textContent = e.message;
        }
      },
    }, h("div", { class: "muted" }, "Interject"), h("div", { class: "row" }, sayTo, sayText, h("button", { type: "submit", "data-role": "say-send" }, "Send")), sayErr);
    me.seatEl.replaceChildren(h("section", { class: "panel seat held", "data-role": "seat" },
      h("h2", null, "Your seat"),
      h("div", { class: "row" }, h("span", null, "You hold seat ", h("b", null, seat.peer), " in this session."),
        h("button", {
          type: "button", class: "quiet", "data-role": "leave",
          onclick: async () => {
            try { await write(base + "/leave", {}); } catch (e) { /* gone already */ }
            endSeat(me, "You left seat " + seat.peer + ".");
          },
        }, "Leave the seat")),
      h("div", { "data-role": "question" }, body),
      err, done,
      st && st.notices.length ? h("ul", { class: "notices", "data-role": "seat-notices" }, st.notices.map((n) => h("li", null, n))) : null,
      st && !st.over ? sayForm : null));
  }

  function questionForm(me, q, base, err, done) {
    const inputs = [];
    let fields;
    if (q.form === "text") {
      const ta = h("textarea", { name: "answer", rows: 4, placeholder: "Your answer" });
      inputs.push(() => ({ answer: ta.value }));
      fields = h("label", { class: "field" }, h("span", null, "Your answer"), ta);
    } else {
      const got = {};
      fields = q.form.map((f) => {
        if (f.kind === "yesno") {
          const yes = h("input", { type: "radio", name: f.name, value: "yes" });
          const no = h("input", { type: "radio", name: f.name, value: "no" });
          got[f.name] = () => (yes.checked ? true : no.checked ? false : "");
          const [y, n] = f.name === "approve" ? ["Approve", "Deny"] : ["Yes", "No"];
          return h("fieldset", { class: "field", "data-field": f.name }, h("legend", null, f.name),
            h("label", null, yes, " " + y), h("label", null, no, " " + n));
        }
        const el = f.kind === "fraction"
          ? h("input", { type: "text", inputmode: "decimal", name: f.name, placeholder: "a number from 0 to 1" })
          : h("textarea", { name: f.name, rows: 2, placeholder: f.optional ? "may be empty" : "" });
        got[f.name] = () => el.value;
        return h("label", { class: "field", "data-field": f.name }, h("span", null, f.name + (f.optional ? " (may be empty)" : "")), el);
      });
      inputs.push(() => ({ fields: Object.fromEntries(Object.entries(got).map(([k, g]) => [k, g()])) }));
    }
    const form = h("form", {
      class: "answer", "data-role": "answer-form",
      onsubmit: async (ev) => {
        ev.preventDefault();
        err.textContent = "";
        const submit = form.querySelector("button[type=submit]");
        submit.disabled = true;
        try {
          const j = await write(base + "/answer", Object.assign({ step: q.step }, ...inputs.map((g) => g())));
          if (me.seat) {
            me.seat.done = "Answered " + q.label + ": " + firstLine(j.answered, 200);
            me.seat.state.question = null;
            me.seatShown = null;
            renderSeat(me);
          }
        } catch (e) {
          err.textContent = e.message;
          submit.disabled = false;
        }
      },
    }, fields, h("button", { type: "submit", "data-role": "submit" }, "Answer"));
    return h("div", { class: "duty" },
      h("h3", null, "Your duty: " + q.label + (q.round ? " (round " + q.round + ")" : "")),
      q.instruction ? h("p", { class: "instruction" }, q.instruction) : null,
      h("details", { "data-role": "seat-context" }, h("summary", null, "What you see under the context policy (" + q.context.length + " messages)"),
        h("ol", null, q.context.map((c) => h("li", null, h("b", null, c.from || "task"), ": ", c.text)))),
      form);
  }

  // ---- Routing ----------------------------------------------------------------------------
  function route() {
    const m = location.hash.match(/^#\/s\/(.+)$/);
    if (m) {
      openSession(decodeURIComponent(m[1]));
    } else {
      closeSession();
      setConn("", "");
      mainEl.replaceChildren(intro);
      renderSessions();
    }
  }
  window.addEventListener("hashchange", route);
  loadSessions();
  setInterval(loadSessions, 2500);
  checkActing().then(() => { if (current && current.derived) renderSeat(current); });
  route();
})();
