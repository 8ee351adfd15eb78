// The live dashboard. Plain JavaScript, no framework, no build step.
//
// Data: REST for the lists (meters, pumps, vehicles) and anything on demand; the WebSocket `/ws` for
// everything live (`dashboard:*` for meters, `subscribe_device` for pumps and vehicles). The token comes
// from `?token=` (then removed from the address bar) or the login dialog, and is kept for this tab only.
// Every device-provided string is set with textContent, never as markup.
"use strict";

(() => {
  const BLOCK_MS = 30 * 60 * 1000;
  const TOKEN_KEY = "telemetry.token";
  const LIST_CAP = 1000; // rows fetched per list; the hub's snapshot holds as many meters
  const MAX_SUBSCRIPTIONS = 950; // the hub allows 1000 rooms per connection
  const EFFICIENCY_CAP = 200; // vehicles asked for their efficiency per refresh
  const MAX_ALERTS = 100;
  const FINAL = new Set(["acked", "failed", "expired"]);
  const RECONNECT_MAX_MS = 30000;

  const $ = (sel, root = document) => root.querySelector(sel);
  const WANTED_METER = new URL(location.href).searchParams.get("meter"); // `?meter=` picks the chart's meter
  const meta = (name) => {
    const el = document.querySelector(`meta[name="${name}"]`);
    const v = el ? el.getAttribute("content") : "";
    return v && !v.startsWith("{{") ? v : "";
  };

  // ---- site time ------------------------------------------------------------------------------

  let SITE_TZ = meta("site-timezone") || "UTC";
  let partsFormat;
  try {
    partsFormat = new Intl.DateTimeFormat("en-GB", {
      timeZone: SITE_TZ, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
  } catch (e) {
    SITE_TZ = "UTC";
    partsFormat = new Intl.DateTimeFormat("en-GB", {
      timeZone: "UTC", hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
  }

  function partsIn(ms) {
    const p = {};
    for (const { type, value } of partsFormat.formatToParts(new Date(ms))) p[type] = Number(value);
    p.hour %= 24;
    return p;
  }
  const offsetAt = (ms) => {
    const p = partsIn(ms);
    return Date.UTC(p.year, p.month - 1, p.day, p.hour, p.minute, p.second) - Math.floor(ms / 1000) * 1000;
  };
  function localMidnight(ms) {
    const p = partsIn(ms);
    const wall = Date.UTC(p.year, p.month - 1, p.day);
    const guess = wall - offsetAt(ms);
    return wall - offsetAt(guess); // again at the guess: the offset may differ at midnight (DST)
  }
  function siteDay(ms) {
    const start = localMidnight(ms);
    return { start, end: localMidnight(start + 25 * 3600e3) }; // 23-, 24- and 25-hour days alike
  }
  const pad = (n) => String(n).padStart(2, "0");
  const hhmm = (ms) => { const p = partsIn(ms); return `${pad(p.hour)}:${pad(p.minute)}`; };
  function when(iso) {
    if (!iso) return "—";
    const ms = Date.parse(iso);
    if (Number.isNaN(ms)) return "—";
    const p = partsIn(ms);
    const today = partsIn(Date.now());
    const time = `${pad(p.hour)}:${pad(p.minute)}:${pad(p.second)}`;
    return p.year === today.year && p.month === today.month && p.day === today.day
      ? time : `${p.year}-${pad(p.month)}-${pad(p.day)} ${time}`;
  }

  const PEAK = (() => {
    const m = /^(\d\d):(\d\d)-(\d\d):(\d\d)$/.exec(meta("peak-window") || "14:00-22:00");
    return m ? { start: +m[1] * 60 + +m[2], end: +m[3] * 60 + +m[4] } : { start: 840, end: 1320 };
  })();
  function inPeakWindow(ms) {
    const p = partsIn(ms);
    const t = p.hour * 60 + p.minute;
    return PEAK.start <= PEAK.end ? t >= PEAK.start && t < PEAK.end : t >= PEAK.start || t < PEAK.end;
  }

  // Rows and cards stay ordered: online devices first, then by id (as the API lists them).
  function place(container, node, id, offline) {
    const order = `${offline ? 1 : 0}|${id}`;
    if (node.dataset.order === order && node.parentNode === container) return;
    node.dataset.order = order;
    let before = null;
    for (const other of container.children) {
      if (other !== node && other.dataset.order > order) { before = other; break; }
    }
    if (before !== node.nextSibling || node.parentNode !== container) container.insertBefore(node, before);
  }

  const num = (v, digits) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "—");

  // ---- state ----------------------------------------------------------------------------------

  const state = {
    token: "",
    started: false,
    meters: new Map(), // id -> {id, status, lastSeen, reading, block, row}
    pumps: new Map(), // id -> {id, doc, online, lastSeen, lastEvent, cmd, card}
    vehicles: new Map(), // id -> {id, status, reading, perf, row}
    selected: null,
    blockInfo: null,
    ws: null,
    wsOpen: false,
    attempt: 0,
    reconnectAt: 0,
    reconnectTimer: null,
    subscribed: new Set(),
    alerts: 0,
  };

  // ---- REST -----------------------------------------------------------------------------------

  class ApiFailure extends Error {
    constructor(status, message, error) {
      super(message);
      this.status = status;
      this.error = error;
    }
  }

  async function api(path, { method = "GET", body } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    let res;
    try {
      res = await fetch(path, {
        method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new ApiFailure(0, "the API cannot be reached");
    }
    let data = null;
    try { data = await res.json(); } catch (e) { /* not JSON */ }
    if (res.status === 401) {
      needLogin(state.token ? "The token was refused." : "This dashboard needs an API token.");
      throw new ApiFailure(401, "unauthorized");
    }
    if (!res.ok) {
      const err = data && data.error;
      throw new ApiFailure(res.status, (err && err.message) || `${res.status} ${res.statusText}`, err);
    }
    return { data, headers: res.headers };
  }

  async function fetchList(path) {
    const out = [];
    const limit = 500;
    for (let offset = 0; out.length < LIST_CAP; offset += limit) {
      const sep = path.includes("?") ? "&" : "?";
      const { data, headers } = await api(`${path}${sep}limit=${limit}&offset=${offset}`);
      if (!Array.isArray(data)) break;
      out.push(...data);
      const total = Number(headers.get("X-Total-Count"));
      if (data.length < limit || (total && offset + limit >= total)) break;
    }
    return out.slice(0, LIST_CAP);
  }

  let noticeTimer = null;
  function notice(text) {
    const el = $("#notice");
    el.textContent = text;
    el.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { el.hidden = true; }, 8000);
  }
  const complain = (what) => (e) => {
    if (e instanceof ApiFailure && e.status === 401) return;
    notice(`${what}: ${e.message}`);
  };

  // ---- token ----------------------------------------------------------------------------------

  function initToken() {
    const url = new URL(location.href);
    const fromUrl = url.searchParams.get("token");
    if (fromUrl !== null) {
      sessionStorage.setItem(TOKEN_KEY, fromUrl);
      url.searchParams.delete("token"); // keep it out of history and of anything copied from the address bar
      history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
    state.token = sessionStorage.getItem(TOKEN_KEY) || "";
    $("#logout").hidden = !state.token;
  }

  function needLogin(reason) {
    stopSocket();
    setConnection("unauthorized", "not connected: token needed");
    const dialog = $("#login");
    $("#login-reason").textContent = reason;
    if (!dialog.open) dialog.showModal();
  }

  $("#login-form").addEventListener("submit", () => {
    state.token = $("#login-token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $("#logout").hidden = !state.token;
    start();
  });
  $("#logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = "";
    needLogin("Enter another API token.");
  });

  // ---- connection indicator ---------------------------------------------------------------------

  function setConnection(kind, text) {
    const el = $("#connection");
    el.className = `conn conn-${kind}`;
    el.textContent = text;
    el.dataset.state = kind;
  }

  // ---- meters ---------------------------------------------------------------------------------

  function meterRow(id) {
    let m = state.meters.get(id);
    if (m) return m;
    const row = document.createElement("tr");
    row.dataset.meterId = id;
    for (const cls of ["id", "status", "power num", "kwh num", "count num", "peak", "seen"]) {
      const td = document.createElement("td");
      td.className = cls;
      row.appendChild(td);
    }
    row.querySelector(".id").textContent = id;
    row.tabIndex = 0;
    row.addEventListener("click", () => select(id));
    row.addEventListener("keydown", (e) => { if (e.key === "Enter") select(id); });
    place($("#meters tbody"), row, id, false);
    m = { id, status: null, lastSeen: null, reading: null, block: null, row };
    state.meters.set(id, m);
    applyFilter(row);
    $("#meters-empty").hidden = true;
    $("#meter-count").textContent = `${state.meters.size} meter${state.meters.size === 1 ? "" : "s"}`;
    return m;
  }

  function updateMeter(id, { status, lastSeen, reading, block } = {}) {
    const m = meterRow(id);
    if (status) m.status = status;
    if (lastSeen) m.lastSeen = lastSeen;
    if (reading && reading.timestamp &&
        (!m.reading || Date.parse(reading.timestamp) >= Date.parse(m.reading.timestamp))) {
      m.reading = reading;
    }
    // a late reading reports an older block: only ever move the displayed block forward
    if (block && block.start && (!m.block || Date.parse(block.start) >= Date.parse(m.block.start))) {
      m.block = block;
    }
    renderMeter(m);
  }

  function renderMeter(m) {
    const r = m.row;
    const status = r.querySelector(".status");
    status.textContent = m.status || "—";
    status.className = `status badge-cell ${m.status === "online" ? "ok" : m.status === "offline" ? "bad" : ""}`;
    r.querySelector(".power").textContent = m.reading ? num(m.reading.totalPowerKw, 2) : "—";
    const current = m.block && Date.parse(m.block.end) > Date.now() ? m.block : null;
    r.querySelector(".kwh").textContent = current ? num(current.totalKwh, 3) : "—";
    r.querySelector(".count").textContent = current ? String(current.readingCount) : "—";
    const peak = r.querySelector(".peak");
    if (current) {
      peak.textContent = `${hhmm(Date.parse(current.start))} ${current.isPeakHour ? "peak" : "off-peak"}`;
      peak.className = `peak ${current.isPeakHour ? "is-peak" : "off-peak"}`;
    } else {
      peak.textContent = "—";
      peak.className = "peak";
    }
    r.querySelector(".seen").textContent = when(m.reading ? m.reading.timestamp : m.lastSeen);
    r.classList.toggle("selected", state.selected === m.id);
    r.classList.toggle("offline", m.status === "offline");
    place(r.parentNode, r, m.id, m.status === "offline");
  }

  async function loadMeters() {
    const list = await fetchList("/api/meters");
    for (const m of list) {
      updateMeter(m.deviceId, { status: m.status, lastSeen: m.lastSeen, reading: m.lastReading });
    }
    if (!state.selected) selectFirst();
  }

  // the first row: an online meter when there is one
  function selectFirst() {
    const first = $("#meters tbody").firstElementChild;
    if (first) select(first.dataset.meterId);
  }

  function applyFilter(row) {
    const f = $("#meter-filter").value.trim().toLowerCase();
    row.hidden = Boolean(f) && !row.dataset.meterId.toLowerCase().includes(f);
  }
  $("#meter-filter").addEventListener("input", () => {
    for (const row of $("#meters tbody").children) applyFilter(row);
  });

  function select(id) {
    if (!id) return;
    const previous = state.selected;
    state.selected = id;
    if (previous !== id) chartBlocks = null;
    const m = meterRow(id);
    if (previous && state.meters.has(previous)) renderMeter(state.meters.get(previous));
    renderMeter(m);
    $("#chart-meter").textContent = `— ${id}`;
    if (previous && previous !== id) unsubscribe(previous);
    subscribe(id); // its latest reading, even when it is past the lists' cap
    api(`/api/meters/${encodeURIComponent(id)}/current-block`)
      .then(({ data }) => updateMeter(id, { block: data }))
      .catch(complain(`current block of ${id}`));
    loadChart();
  }

  // ---- today's blocks chart -------------------------------------------------------------------

  let chartLoading = false;
  let chartBlocks = null; // the selected meter's blocks as drawn

  // a live update carries the block of its reading: redraw that bar without asking the API again
  function chartUpsert(block) {
    if (!chartBlocks || !block || !block.start) return;
    const t = Date.parse(block.start);
    const i = chartBlocks.findIndex((b) => Date.parse(b.start) === t);
    if (i >= 0) chartBlocks[i] = { ...chartBlocks[i], ...block };
    else chartBlocks.push(block);
    chartBlocks.sort((a, b) => Date.parse(a.start) - Date.parse(b.start));
    drawChart(chartBlocks);
  }

  async function loadChart() {
    const id = state.selected;
    if (!id || chartLoading) return;
    chartLoading = true;
    try {
      const blocks = await fetchList(`/api/meters/${encodeURIComponent(id)}/blocks/today`);
      if (id === state.selected) drawChart(blocks);
    } catch (e) {
      complain(`today's blocks of ${id}`)(e);
    } finally {
      chartLoading = false;
    }
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, parent, text) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    if (parent) parent.appendChild(el);
    return el;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const step = 10 ** Math.floor(Math.log10(v));
    for (const f of [1, 2, 2.5, 5, 10]) if (f * step >= v) return f * step;
    return 10 * step;
  }

  function drawChart(blocks) {
    chartBlocks = blocks;
    const now = Date.now();
    const day = siteDay(now);
    const slots = Math.round((day.end - day.start) / BLOCK_MS);
    const W = 960, H = 240, L = 48, R = 20, T = 18, B = 26;
    const slotW = (W - L - R) / slots;
    const top = niceMax(Math.max(0, ...blocks.map((b) => b.totalKwh || 0)));
    const y = (v) => T + (H - T - B) * (1 - v / top);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart-svg" });
    for (let i = 0; i < slots; i++) {
      if (inPeakWindow(day.start + i * BLOCK_MS)) {
        svg("rect", { x: L + i * slotW, y: T, width: slotW, height: H - T - B, class: "win" }, root);
      }
    }
    for (let k = 0; k <= 4; k++) {
      const v = (top * k) / 4;
      svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }, root);
      svg("text", { x: L - 6, y: y(v) + 4, class: "ylabel" }, root, Number(v.toFixed(3)).toString());
    }
    svg("text", { x: 4, y: 11, class: "ylabel unit" }, root, "kWh");
    const nowSlot = Math.floor((now - day.start) / BLOCK_MS);
    svg("rect", { x: L + nowSlot * slotW, y: T, width: slotW, height: H - T - B, class: "now" }, root);
    let total = 0;
    let drawn = 0;
    for (const b of blocks) {
      const i = Math.round((Date.parse(b.start) - day.start) / BLOCK_MS);
      if (i < 0 || i >= slots) continue;
      const kwh = b.totalKwh || 0;
      total += kwh;
      drawn += 1;
      const h = Math.max(kwh > 0 ? 1 : 0, H - B - y(kwh));
      const bar = svg("rect", {
        x: L + i * slotW + 1, y: H - B - h, width: Math.max(1, slotW - 2), height: h,
        class: `bar ${b.isPeakHour ? "peak" : "off"}`,
      }, root);
      bar.dataset.start = b.start;
      svg("title", {}, bar,
        `${hhmm(Date.parse(b.start))}–${hhmm(Date.parse(b.end))}  ${num(kwh, 3)} kWh, ` +
        `${b.readingCount} readings${b.isPeakHour ? ", peak" : ""}`);
    }
    for (let i = 0; i <= slots; i += 6) {
      svg("text", { x: L + i * slotW, y: H - 8, class: "xlabel" }, root, i === slots ? "24:00" : hhmm(day.start + i * BLOCK_MS));
    }
    svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }, root);
    const chart = $("#chart");
    chart.replaceChildren(root);
    chart.dataset.blocks = String(drawn);
    $("#chart-total").textContent = drawn
      ? `${num(total, 3)} kWh today in ${drawn} block${drawn === 1 ? "" : "s"} (times in ${SITE_TZ})`
      : `No blocks yet today (times in ${SITE_TZ}).`;
  }

  // ---- block clock ----------------------------------------------------------------------------

  function tick() {
    const info = state.blockInfo;
    const el = $("#block-info");
    if (!info) { el.textContent = ""; return; }
    const end = Date.parse(info.end);
    const left = Math.max(0, Math.ceil((end - Date.now()) / 60000));
    el.textContent = `Block ${hhmm(Date.parse(info.start))}–${hhmm(end)} · ` +
      `${info.isPeakHour ? "PEAK" : "off-peak"} · ${left} min left`;
    el.className = `block-info ${info.isPeakHour ? "is-peak" : "off-peak"}`;
    if (Date.now() >= end) {
      // a new block began: a fresh snapshot brings every meter's new block and its peak flag
      state.blockInfo = null;
      for (const m of state.meters.values()) renderMeter(m);
      send({ type: "dashboard:register" });
      loadChart();
    }
  }

  // ---- pumps ----------------------------------------------------------------------------------

  function el(tag, cls, parent, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }

  function pumpCard(id) {
    let p = state.pumps.get(id);
    if (p) return p;
    const card = el("article", "pump");
    card.dataset.pumpId = id;
    const head = el("header", "", card);
    el("h3", "", head, id);
    el("span", "badge online-badge", head, "—");
    const tanks = el("div", "tanks", card);
    for (const [key, label] of [["ground", "Ground tank"], ["roof", "Roof tank"]]) {
      const t = el("div", "tank", tanks);
      t.dataset.tank = key;
      const body = el("div", "tank-body", t);
      el("div", "tank-fill", body);
      el("div", "tank-value", t, "—");
      el("div", "tank-label", t, label);
      el("div", "tank-flags", t, "");
    }
    const facts = el("dl", "facts", card);
    for (const [key, label] of [["state", "Pump"], ["amps", "Current"], ["mode", "Mode"],
      ["event", "Last event"], ["updated", "Updated"]]) {
      el("dt", "", facts, label);
      el("dd", `pump-${key}`, facts, "—");
    }
    el("p", "pump-nodata muted", card, "No status received yet.");
    const actions = el("div", "pump-actions", card);
    const button = el("button", "pump-toggle", actions, "Turn on");
    button.type = "button";
    button.addEventListener("click", () => togglePump(id));
    el("span", "cmd-status", actions, "");
    place($("#pumps"), card, id, false);
    p = { id, doc: null, online: null, lastSeen: null, lastEvent: null, cmd: null, card };
    state.pumps.set(id, p);
    $("#pumps-empty").hidden = true;
    $("#pump-count").textContent = `${state.pumps.size} controller${state.pumps.size === 1 ? "" : "s"}`;
    subscribe(id);
    return p;
  }

  function updatePump(id, doc, online) {
    const p = pumpCard(id);
    if (doc && doc.ground_tank &&
        (!p.doc || !p.doc.timestamp || !doc.timestamp || Date.parse(doc.timestamp) >= Date.parse(p.doc.timestamp))) {
      p.doc = doc;
    }
    if (typeof online === "boolean") p.online = online;
    renderPump(p);
  }

  function renderTank(card, key, tank) {
    const t = card.querySelector(`.tank[data-tank="${key}"]`);
    const level = tank && typeof tank.level_percent === "number" ? tank.level_percent : null;
    t.querySelector(".tank-fill").style.height = `${level === null ? 0 : Math.min(100, Math.max(0, level))}%`;
    t.querySelector(".tank-value").textContent = level === null ? "—" : `${level.toFixed(1)}%`;
    const flags = [];
    if (tank && tank.sensor_working === false) flags.push("sensor fault");
    if (tank && tank.connected === false) flags.push("disconnected");
    if (tank && tank.alarm_active) flags.push("alarm");
    if (tank && tank.water_supply_on) flags.push("supply on");
    t.querySelector(".tank-flags").textContent = flags.join(", ");
    t.classList.toggle("alarm", Boolean(tank && (tank.alarm_active || tank.sensor_working === false)));
    t.classList.toggle("low", level !== null && level < 15);
  }

  function renderPump(p) {
    const c = p.card;
    const d = p.doc || {};
    const badge = c.querySelector(".online-badge");
    badge.textContent = p.online === null ? "—" : p.online ? "online" : "offline";
    badge.className = `badge online-badge ${p.online ? "ok" : p.online === false ? "bad" : ""}`;
    renderTank(c, "ground", d.ground_tank);
    renderTank(c, "roof", d.roof_tank);
    const pump = d.pump || {};
    const running = pump.running === true;
    const stateEl = c.querySelector(".pump-state");
    stateEl.textContent = pump.running === undefined ? "—" : running ? "running" : "stopped";
    stateEl.className = `pump-state ${running ? "running" : "stopped"}`;
    const protections = ["protection_active", "overcurrent_protection", "overtime_protection"]
      .filter((k) => pump[k]).map((k) => k.replace(/_/g, " "));
    if (protections.length) stateEl.textContent += ` (${protections.join(", ")})`;
    c.querySelector(".pump-amps").textContent = typeof pump.current_amps === "number"
      ? `${pump.current_amps.toFixed(2)} A` : "—";
    const sys = d.system || {};
    c.querySelector(".pump-mode").textContent = sys.auto_mode_enabled === true ? "auto"
      : sys.auto_mode_enabled === false ? "manual" : "—";
    c.querySelector(".pump-event").textContent = p.lastEvent || "—";
    c.querySelector(".pump-updated").textContent = when(d.timestamp || p.lastSeen);
    c.classList.toggle("running", running);
    c.classList.toggle("empty", !p.doc);
    c.classList.toggle("offline", p.online === false);
    place(c.parentNode, c, p.id, p.online === false);
    const button = c.querySelector(".pump-toggle");
    button.textContent = running ? "Turn off" : "Turn on";
    button.dataset.state = running ? "off" : "on";
    button.disabled = Boolean(p.cmd && !FINAL.has(p.cmd.status) && !p.cmd.error);
    const status = c.querySelector(".cmd-status");
    if (p.cmd) {
      status.textContent = commandText(p.cmd);
      status.className = `cmd-status cmd-${p.cmd.error ? "refused" : p.cmd.status}`;
      status.dataset.status = p.cmd.error ? "refused" : p.cmd.status;
    }
  }

  function commandText(cmd) {
    const what = `pump ${cmd.state}`;
    if (cmd.error) return `${what}: refused — ${cmd.error}`;
    const result = cmd.result && typeof cmd.result === "object" ? cmd.result : null;
    const detail = result && result.message ? ` — ${result.message}` : "";
    return `${what}: ${cmd.status}${detail}`;
  }

  async function togglePump(id) {
    const p = pumpCard(id);
    const wanted = p.card.querySelector(".pump-toggle").dataset.state || "on";
    p.cmd = { id: null, state: wanted, status: "sending", result: null, error: null };
    renderPump(p);
    try {
      const { data } = await api(`/api/v1/devices/${encodeURIComponent(id)}/commands`, {
        method: "POST", body: { command: "pump", state: wanted },
      });
      if (p.cmd.status === "sending") {
        p.cmd.id = data.commandId;
        p.cmd.status = data.status;
        p.cmd.result = data.result;
      }
      renderPump(p);
      pollCommand(p, data.commandId);
    } catch (e) {
      p.cmd.error = e.message;
      renderPump(p);
    }
  }

  // the live `command_result` usually comes first; polling covers a lost one (it is not queued for us)
  async function pollCommand(p, commandId) {
    const deadline = Date.now() + 5 * 60 * 1000;
    while (p.cmd && p.cmd.id === commandId && !FINAL.has(p.cmd.status) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 1500));
      if (!p.cmd || p.cmd.id !== commandId || FINAL.has(p.cmd.status)) return;
      try {
        const { data } = await api(
          `/api/v1/devices/${encodeURIComponent(p.id)}/commands/${encodeURIComponent(commandId)}`);
        commandResult({ commandId, deviceId: p.id, status: data.status, result: data.result });
      } catch (e) {
        if (e.status === 401 || e.status === 404) return;
      }
    }
  }

  function commandResult(msg) {
    const p = state.pumps.get(msg.deviceId);
    if (!p || !p.cmd || p.cmd.id !== msg.commandId) return;
    if (FINAL.has(p.cmd.status) && !FINAL.has(msg.status)) return;
    p.cmd.status = msg.status;
    p.cmd.result = msg.result;
    renderPump(p);
  }

  async function loadPumps() {
    const list = await fetchList("/api/v1/devices/status");
    for (const doc of list) {
      updatePump(doc.device_id, doc.ground_tank ? doc : null, doc.online);
      state.pumps.get(doc.device_id).lastSeen = doc.last_seen;
    }
  }

  // ---- vehicles -------------------------------------------------------------------------------

  function vehicleRow(id) {
    let v = state.vehicles.get(id);
    if (v) return v;
    const row = document.createElement("tr");
    row.dataset.vehicleId = id;
    for (const cls of ["id", "status", "soc num", "ac num", "dc num", "eff num", "health"]) el("td", cls, row);
    row.querySelector(".id").textContent = id;
    place($("#vehicles tbody"), row, id, false);
    v = { id, status: null, reading: null, perf: null, row };
    state.vehicles.set(id, v);
    $("#vehicles-empty").hidden = true;
    subscribe(id);
    return v;
  }

  function renderVehicle(v) {
    const r = v.row;
    const status = r.querySelector(".status");
    status.textContent = v.status || "—";
    status.className = `status ${v.status === "online" ? "ok" : v.status === "offline" ? "bad" : ""}`;
    r.classList.toggle("offline", v.status === "offline");
    place(r.parentNode, r, v.id, v.status === "offline");
    r.querySelector(".soc").textContent = v.reading ? num(v.reading.soc, 1) : "—";
    const perf = v.perf;
    r.querySelector(".ac").textContent = perf ? num(perf.totalKwhConsumedAc, 2) : "—";
    r.querySelector(".dc").textContent = perf ? num(perf.totalKwhDeliveredDc, 2) : "—";
    r.querySelector(".eff").textContent = perf ? num(perf.efficiencyRatio, 3) : "—";
    const health = r.querySelector(".health");
    const verdict = perf ? perf.status || (perf.efficiencyRatio === null ? "insufficient_data"
      : perf.efficiencyRatio < 0.85 ? "fault_suspected" : "normal") : null;
    health.textContent = verdict ? VERDICTS[verdict] || verdict : "—";
    health.className = `health ${verdict === "fault_suspected" ? "bad" : verdict === "normal" ? "ok" : ""}`;
  }

  const VERDICTS = { normal: "normal", fault_suspected: "fault suspected", insufficient_data: "no data" };

  async function fetchPerformance(id) {
    try {
      const { data } = await api(`/v1/analytics/performance/${encodeURIComponent(id)}`);
      const v = state.vehicles.get(id);
      if (v) { v.perf = data; renderVehicle(v); }
    } catch (e) {
      if (e.status === 401) throw e;
    }
  }

  // a vehicle that just reported has a new efficiency: ask again once its burst of readings settles
  const perfTimers = new Map();
  function performanceSoon(id) {
    clearTimeout(perfTimers.get(id));
    perfTimers.set(id, setTimeout(() => { perfTimers.delete(id); fetchPerformance(id); }, 1500));
  }

  async function loadVehicles() {
    const list = await fetchList("/api/vehicles");
    for (const item of list) {
      const v = vehicleRow(item.deviceId);
      v.status = item.status;
      if (item.lastReading) v.reading = item.lastReading;
      renderVehicle(v);
    }
    // one request per vehicle: the first ones here, the others as they report (see `device_update`)
    const ids = list.map((x) => x.deviceId).slice(0, EFFICIENCY_CAP);
    const workers = Array.from({ length: 4 }, async () => {
      while (ids.length) await fetchPerformance(ids.shift());
    });
    await Promise.all(workers);
  }

  // ---- alerts ---------------------------------------------------------------------------------

  // `alert_triggered` / `alert_resolved` carry PUMP's fields (device_id, alert_type, message, severity,
  // timestamp) and the whole alert in `alert`; `/api/v1/alerts/active` lists the ones already raised.
  const alertItems = new Map(); // alert id -> <li>

  function normalAlert(msg) {
    const a = msg.alert && typeof msg.alert === "object" ? msg.alert : {};
    return {
      id: a.id ?? null,
      deviceId: msg.deviceId || msg.device_id || a.deviceId || "",
      type: msg.alert_type || a.type || "alert",
      severity: String(msg.severity || a.severity || "info"),
      message: msg.message || a.message || "",
      raisedAt: a.raisedAt || msg.timestamp || new Date().toISOString(),
      resolvedAt: a.resolvedAt || null,
      acknowledged: Boolean(a.acknowledged),
    };
  }

  function showAlert(a, resolved) {
    let li = a.id !== null ? alertItems.get(a.id) : undefined;
    if (!li) {
      li = el("li", "alert");
      for (const cls of ["alert-time", "alert-sev", "alert-device", "alert-text"]) el("span", cls, li);
      if (a.id !== null) { li.dataset.alertId = String(a.id); alertItems.set(a.id, li); }
      const list = $("#alerts");
      list.insertBefore(li, list.firstChild);
      while (list.children.length > MAX_ALERTS) {
        const gone = list.lastChild;
        alertItems.delete(Number(gone.dataset.alertId));
        list.removeChild(gone);
      }
      state.alerts += 1;
      $("#alerts-empty").hidden = true;
      $("#alert-count").textContent = `${state.alerts} shown`;
    }
    li.className = `alert sev-${a.severity.toLowerCase().replace(/[^a-z]/g, "")}${resolved ? " resolved" : ""}`;
    li.dataset.type = a.type;
    li.dataset.state = resolved ? "resolved" : "active";
    li.querySelector(".alert-time").textContent = when(a.raisedAt);
    li.querySelector(".alert-sev").textContent = resolved ? "resolved" : a.severity;
    li.querySelector(".alert-device").textContent = a.deviceId;
    li.querySelector(".alert-text").textContent =
      `${a.type.replace(/_/g, " ")}${a.message ? `: ${a.message}` : ""}` +
      (resolved && a.resolvedAt ? ` (resolved ${when(a.resolvedAt)})` : "");
  }

  async function loadAlerts() {
    let list;
    try {
      ({ data: list } = await api("/api/v1/alerts/active?limit=50"));
    } catch (e) {
      if (e.status === 404) return; // an API without alerts
      throw e;
    }
    for (const a of (list || []).slice().reverse()) {
      if (!alertItems.has(a.id)) showAlert(normalAlert({ alert: a }), false);
    }
  }

  // ---- WebSocket ------------------------------------------------------------------------------

  function send(msg) {
    if (state.ws && state.wsOpen) state.ws.send(JSON.stringify(msg));
  }

  function subscribe(id) {
    if (state.subscribed.has(id) || state.subscribed.size >= MAX_SUBSCRIPTIONS) return;
    if (!state.wsOpen) return; // done for everyone known when the socket opens
    state.subscribed.add(id);
    send({ type: "subscribe_device", deviceId: id });
  }

  function unsubscribe(id) {
    // pumps and vehicles stay subscribed; only a meter picked for the chart is let go
    if (!state.subscribed.has(id) || state.pumps.has(id) || state.vehicles.has(id)) return;
    state.subscribed.delete(id);
    send({ type: "unsubscribe_device", deviceId: id });
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const query = state.token ? `?token=${encodeURIComponent(state.token)}` : "";
    const ws = new WebSocket(`${proto}//${location.host}/ws${query}`);
    state.ws = ws;
    state.wsOpen = false;
    if (state.attempt === 0) setConnection("connecting", "connecting…");
    ws.onopen = () => {
      if (state.ws !== ws) return;
      const again = state.attempt > 0;
      state.wsOpen = true;
      state.attempt = 0;
      state.subscribed.clear();
      setConnection("connected", "connected");
      send({ type: "dashboard:register" });
      for (const id of [state.selected, ...state.pumps.keys(), ...state.vehicles.keys()]) if (id) subscribe(id);
      if (again) refreshAll(); // catch up on what happened while we were away
    };
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      try { handle(msg); } catch (e) { console.error("message", msg, e); }
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      const wasOpen = state.wsOpen;
      state.ws = null;
      state.wsOpen = false;
      if (ev.code === 4401 || ev.code === 1008) { needLogin("The token was refused."); return; }
      if (!wasOpen && state.attempt === 0) {
        // a refused handshake looks like any failure from here: ask the REST API whether it is the token
        api("/api/meters?limit=1").then(() => scheduleReconnect(), (e) => { if (e.status !== 401) scheduleReconnect(); });
        return;
      }
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    if (!state.started) return;
    const base = Math.min(RECONNECT_MAX_MS, 1000 * 2 ** state.attempt);
    const delay = base / 2 + Math.random() * base / 2; // jitter: a restarted API is not hit by all at once
    state.attempt += 1;
    state.reconnectAt = Date.now() + delay;
    state.reconnectTimer = setTimeout(connect, delay);
    showReconnect();
  }

  function showReconnect() {
    if (state.wsOpen || !state.reconnectAt || !state.started) return;
    const secs = Math.max(0, Math.ceil((state.reconnectAt - Date.now()) / 1000));
    setConnection("reconnecting", `reconnecting${secs ? ` in ${secs} s` : "…"} (attempt ${state.attempt})`);
  }

  function stopSocket() {
    state.started = false;
    clearTimeout(state.reconnectTimer);
    state.reconnectAt = 0;
    if (state.ws) {
      const ws = state.ws;
      state.ws = null;
      state.wsOpen = false;
      ws.close();
    }
  }

  // data newer than what we show; with nothing shown yet, new only once the lists were loaded
  function isNewer(data, shown, listed) {
    if (!data || !data.timestamp) return false;
    if (!shown || !shown.timestamp) return listed;
    return Date.parse(data.timestamp) > Date.parse(shown.timestamp);
  }

  function handle(msg) {
    switch (msg.type) {
      case "dashboard:registered":
        state.blockInfo = msg.blockInfo || null;
        for (const item of msg.meters || []) {
          updateMeter(item.meter.deviceId, {
            status: item.meter.status, lastSeen: item.meter.lastSeen, reading: item.reading, block: item.currentBlock,
          });
        }
        if (!state.selected) selectFirst();
        tick();
        break;
      case "dashboard:update": {
        const id = msg.meter.deviceId;
        updateMeter(id, { status: msg.meter.status, lastSeen: msg.meter.lastSeen, reading: msg.reading, block: msg.currentBlock });
        if (msg.blockInfo && (!state.blockInfo || Date.parse(msg.blockInfo.start) >= Date.parse(state.blockInfo.start))) {
          state.blockInfo = msg.blockInfo;
        }
        if (id === state.selected) chartUpsert(msg.currentBlock);
        if (!state.selected) select(id);
        break;
      }
      case "device_update":
        // `subscribe_device` first replays the latest state, which may be old: only newer data means online
        if (msg.kind === "pump") {
          const p = pumpCard(msg.deviceId);
          updatePump(msg.deviceId, msg.data, isNewer(msg.data, p.doc, p.online !== null) ? true : undefined);
        } else if (msg.kind === "vehicle") {
          const v = vehicleRow(msg.deviceId);
          if (isNewer(msg.data, v.reading, v.status !== null)) {
            v.reading = msg.data;
            v.status = "online";
            performanceSoon(msg.deviceId);
          } else if (!v.reading) v.reading = msg.data;
          renderVehicle(v);
        } else if (msg.kind === "meter") updateMeter(msg.deviceId, { reading: msg.data });
        break;
      case "pump_event": {
        const p = pumpCard(msg.deviceId);
        const ev = msg.data && msg.data.event;
        p.lastEvent = ev ? `${ev} at ${when(msg.timestamp)}` : null;
        renderPump(p);
        break;
      }
      case "device_offline": {
        if (state.pumps.has(msg.deviceId)) updatePump(msg.deviceId, null, false);
        const v = state.vehicles.get(msg.deviceId);
        if (v) { v.status = "offline"; renderVehicle(v); }
        if (state.meters.has(msg.deviceId)) updateMeter(msg.deviceId, { status: "offline" });
        break;
      }
      case "meter-status-change":
        if (msg.meterId) updateMeter(msg.meterId, { status: msg.status });
        break;
      case "command_result":
        commandResult(msg);
        break;
      case "alert_triggered": {
        const a = normalAlert(msg);
        showAlert(a, false);
        const kind = msg.alert && msg.alert.kind;
        // a device we have not listed yet: fetch the list now rather than at the next refresh
        if (kind === "pump" && !state.pumps.has(a.deviceId)) refreshSoon("pumps", loadPumps);
        if (kind === "vehicle" && !state.vehicles.has(a.deviceId)) refreshSoon("vehicles", loadVehicles);
        break;
      }
      case "alert_resolved":
        showAlert(normalAlert(msg), true);
        break;
      case "error":
        notice(`server: ${(msg.error && msg.error.message) || "error"}${msg.request ? ` (${msg.request})` : ""}`);
        break;
      default:
        break; // subscribed, unsubscribed, meter-reading-update…: nothing to show
    }
  }

  // ---- start ----------------------------------------------------------------------------------

  const refreshTimers = {};
  function refreshSoon(name, load) {
    if (refreshTimers[name]) return;
    refreshTimers[name] = setTimeout(() => {
      refreshTimers[name] = null;
      load().catch(complain(name));
    }, 1000);
  }

  function refreshAll() {
    loadMeters().catch(complain("meters"));
    loadPumps().catch(complain("pump controllers"));
    loadVehicles().catch(complain("vehicles"));
    loadAlerts().catch(complain("alerts"));
    loadChart();
  }

  function start() {
    stopSocket();
    state.started = true;
    state.attempt = 0;
    if (WANTED_METER && !state.selected) select(WANTED_METER);
    connect();
    refreshAll();
  }

  window.addEventListener("online", () => { if (state.started && !state.ws) connect(); });
  setInterval(() => { tick(); showReconnect(); }, 1000);
  setInterval(() => { if (state.started) { loadMeters().catch(() => {}); loadPumps().catch(() => {}); } }, 30000);
  setInterval(() => { if (state.started) { loadVehicles().catch(() => {}); loadChart(); } }, 60000);

  initToken();
  start();
})();
