// capsync share page: reads the session snapshot, then follows it live.
//
// The viewer token is the URL fragment (#...): browsers never send a fragment
// to the server, so it stays out of access logs and Referer headers. It goes
// to the API only in the Authorization header. Live updates are Server-Sent
// Events read through fetch(), because EventSource cannot send that header.
//
// Everything from the session is untrusted: it is put into the page with
// textContent, except the HTML of text parts, which the server rendered from
// markdown with raw HTML escaped (and the Content-Security-Policy forbids
// inline script besides).
"use strict";

(() => {
  const segments = location.pathname.split("/").filter(Boolean);
  const shareId = decodeURIComponent(segments[1] || "");
  const token = decodeURIComponent(location.hash.replace(/^#/, "")).trim();
  const api = "/api/shares/" + encodeURIComponent(shareId);

  // Part types that are bookkeeping, not content.
  const QUIET_PARTS = new Set(["step-start", "step-finish", "snapshot", "patch"]);

  const $ = (id) => document.getElementById(id);
  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  };

  // ---- the document: what the snapshot said, with every op since applied ----

  const doc = {
    cursor: 0,
    session: null,
    models: new Map(),
    diffs: null,
    messages: new Map(), // id -> {info, parts: Map(id -> part)}
    html: new Map(), // text part id -> server-rendered HTML
  };
  let presence = null;
  let clockOffset = 0; // server clock minus ours, in ms
  let lastChange = null;
  let lastEventId = null;
  let stopped = false;
  let reloadNeeded = false;
  // Details the reader opened or closed, kept across re-renders of a message.
  const detailsState = new Map();

  const str = (v) => (typeof v === "string" ? v : "");
  const idOf = (v) => (v && typeof v.id === "string" ? v.id : "");

  function loadDocument(snapshot) {
    doc.cursor = snapshot.cursor || 0;
    doc.session = snapshot.session || null;
    doc.models = new Map((snapshot.models || []).map((m) => [idOf(m), m]));
    doc.diffs = Array.isArray(snapshot.diffs) ? snapshot.diffs : null;
    doc.messages = new Map();
    for (const m of snapshot.messages || []) {
      doc.messages.set(idOf(m.info), {
        info: m.info,
        parts: new Map((m.parts || []).map((p) => [idOf(p), p])),
      });
    }
    doc.html = new Map(Object.entries(snapshot.html || {}));
  }

  function findPart(partId) {
    for (const [messageId, message] of doc.messages) {
      if (message.parts.has(partId)) return [messageId, message];
    }
    return [null, null];
  }

  // Applies one op as the server did (see the README's op kinds); returns the
  // id of the message to redraw, "" for the header, or null.
  function applyOp(op) {
    const p = op.payload || {};
    switch (op.kind) {
      case "session.upsert":
        doc.session = p;
        return "";
      case "model.upsert":
        doc.models.set(idOf(p), p);
        return "";
      case "diff.set":
        doc.diffs = Array.isArray(p) ? p : Array.isArray(p.diffs) ? p.diffs : [];
        return "";
      case "message.upsert": {
        const existing = doc.messages.get(p.id);
        doc.messages.set(p.id, { info: p, parts: existing ? existing.parts : new Map() });
        return p.id;
      }
      case "message.remove": {
        const id = str(p.id) || str(p.messageID);
        const message = doc.messages.get(id);
        if (message) for (const partId of message.parts.keys()) doc.html.delete(partId);
        doc.messages.delete(id);
        return id;
      }
      case "part.upsert": {
        const [oldMessage, old] = findPart(p.id);
        if (old && oldMessage !== p.messageID) old.parts.delete(p.id);
        const message = doc.messages.get(p.messageID);
        if (message) message.parts.set(p.id, p);
        if (typeof op.html === "string") doc.html.set(p.id, op.html);
        else doc.html.delete(p.id);
        if (oldMessage && oldMessage !== p.messageID) redraw(oldMessage);
        return p.messageID;
      }
      case "part.remove": {
        const id = str(p.partID) || str(p.id);
        const [messageId, message] = findPart(id);
        if (message) message.parts.delete(id);
        doc.html.delete(id);
        return messageId;
      }
      case "part.delta": {
        const id = str(p.partID) || str(p.id);
        const field = str(p.field) || "text";
        const [messageId, message] = findPart(id);
        if (!message) return null;
        const part = message.parts.get(id);
        part[field] = str(part[field]) + str(p.delta);
        if (typeof op.html === "string") doc.html.set(id, op.html);
        else if (field === "text") doc.html.delete(id); // stale: show the raw text instead
        return messageId;
      }
      default:
        return null;
    }
  }

  // ---- rendering ----

  const messageNodes = new Map(); // message id -> <article>
  const pending = new Set(); // message ids to redraw
  let headerDirty = true;

  function redraw(messageId) {
    if (messageId === "") headerDirty = true;
    else if (messageId !== null && messageId !== undefined) pending.add(messageId);
  }

  function formatTime(ms) {
    if (typeof ms !== "number") return "";
    return new Date(ms).toLocaleString(undefined, {
      year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
    });
  }

  function ago(ms) {
    if (typeof ms !== "number") return "";
    const seconds = Math.max(0, Math.round((Date.now() + clockOffset - ms) / 1000));
    if (seconds < 10) return "just now";
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
    return formatTime(ms);
  }

  function modelNames() {
    const names = [];
    for (const m of doc.models.values()) {
      names.push(str(m.name) || str(m.id) || [str(m.providerID), str(m.modelID)].filter(Boolean).join("/"));
    }
    if (names.length === 0) {
      // No model records: the models the assistant messages name.
      const seen = new Set();
      for (const { info } of doc.messages.values()) {
        const name = [str(info.providerID), str(info.modelID)].filter(Boolean).join("/");
        if (name && !seen.has(name)) { seen.add(name); names.push(name); }
      }
    }
    return names.filter(Boolean);
  }

  function renderHeader() {
    const title = (doc.session && str(doc.session.title)) || "Untitled session";
    $("title").textContent = title;
    document.title = title + " · capsync";
    const meta = $("meta");
    meta.replaceChildren();
    const models = modelNames();
    if (models.length) meta.append(el("span", "meta-item", (models.length > 1 ? "Models: " : "Model: ") + models.join(", ")));
    const count = doc.messages.size;
    meta.append(el("span", "meta-item", count + (count === 1 ? " message" : " messages")));
    if (doc.session && doc.session.time && typeof doc.session.time.created === "number") {
      meta.append(el("span", "meta-item", "Started " + formatTime(doc.session.time.created)));
    }
    renderDiffs();
    renderPresence();
  }

  function renderDiffs() {
    const box = $("diffs");
    const diffs = doc.diffs || [];
    box.hidden = diffs.length === 0;
    if (!diffs.length) return;
    let added = 0;
    let removed = 0;
    const list = $("diffs-list");
    list.replaceChildren();
    for (const d of diffs) {
      const a = typeof d.additions === "number" ? d.additions : 0;
      const r = typeof d.deletions === "number" ? d.deletions : 0;
      added += a;
      removed += r;
      const li = el("li");
      li.append(el("span", "file", str(d.file) || "?"), el("span", "add", " +" + a), el("span", "del", " −" + r));
      list.append(li);
    }
    $("diffs-summary").textContent =
      diffs.length + (diffs.length === 1 ? " file changed" : " files changed") + " · +" + added + " −" + removed;
  }

  function renderPresence() {
    const node = $("presence");
    node.replaceChildren();
    if (!presence) return;
    const connected = presence.writerConnected === true;
    node.className = "presence " + (connected ? "on" : "off");
    node.append(el("span", "dot"), el("span", "", connected ? "Agent connected" : "Agent not connected"));
    const changed = lastChange !== null ? lastChange : presence.lastChange;
    if (typeof changed === "number") {
      const when = el("span", "when", " · last change " + ago(changed));
      when.title = formatTime(changed);
      node.append(when);
    }
  }

  function roleLabel(role) {
    if (role === "user") return "User";
    if (role === "assistant") return "Assistant";
    return role || "Message";
  }

  function renderMessage(id) {
    const message = doc.messages.get(id);
    let node = messageNodes.get(id);
    if (!message) {
      if (node) node.remove();
      messageNodes.delete(id);
      return;
    }
    const info = message.info || {};
    const role = str(info.role);
    const article = el("article", "message role-" + (role || "other"));
    article.dataset.id = id;
    const head = el("div", "message-head");
    head.append(el("span", "role", roleLabel(role)));
    const model = str(info.modelID) || (info.model && str(info.model.modelID));
    if (model && role === "assistant") head.append(el("span", "model", model));
    if (info.time && typeof info.time.created === "number") {
      head.append(el("time", "time", formatTime(info.time.created)));
    }
    if (role === "assistant" && info.tokens && typeof info.tokens.output === "number") {
      head.append(el("span", "tokens", info.tokens.input + " in · " + info.tokens.output + " out"));
    }
    article.append(head);
    const parts = [...message.parts.values()].sort((a, b) => (idOf(a) < idOf(b) ? -1 : idOf(a) > idOf(b) ? 1 : 0));
    for (const part of parts) {
      const rendered = renderPart(part);
      if (rendered) article.append(rendered);
    }
    if (info.error && typeof info.error === "object") {
      const name = str(info.error.name) || "Error";
      const detail = info.error.data && str(info.error.data.message);
      article.append(el("div", "message-error", detail ? name + ": " + detail : name));
    }
    if (node) node.replaceWith(article);
    messageNodes.set(id, article);
  }

  function renderPart(part) {
    const type = str(part.type);
    if (QUIET_PARTS.has(type)) return null;
    if (type === "text") return renderText(part);
    if (type === "reasoning") {
      const box = el("div", "reasoning");
      box.append(el("div", "label", "Thinking"), el("div", "plain", str(part.text)));
      return box;
    }
    if (type === "tool") return renderTool(part);
    if (type === "file") {
      return el("div", "file-part", "📎 " + (str(part.filename) || str(part.url) || "file") + (part.mime ? " (" + str(part.mime) + ")" : ""));
    }
    return el("div", "other-part", "[" + (type || "part") + "]");
  }

  function renderText(part) {
    const html = doc.html.get(idOf(part));
    if (typeof html === "string") {
      const box = el("div", "text markdown");
      box.innerHTML = html; // rendered by the server with raw HTML escaped
      for (const a of box.querySelectorAll("a")) {
        a.target = "_blank";
        a.rel = "noopener noreferrer";
      }
      return box;
    }
    return el("div", "text plain", str(part.text));
  }

  function collapsible(key, summary, body, openByDefault) {
    const details = el("details", "collapsible");
    details.open = detailsState.has(key) ? detailsState.get(key) : openByDefault;
    details.addEventListener("toggle", () => detailsState.set(key, details.open));
    details.append(el("summary", "", summary), body);
    return details;
  }

  // The one input field that says what a call of a well-known tool did.
  function inputLine(input) {
    if (!input || typeof input !== "object") return "";
    for (const key of ["command", "filePath", "pattern", "path", "url", "query", "description"]) {
      if (typeof input[key] === "string" && input[key]) return input[key];
    }
    return "";
  }

  // The input's simple fields on one line ("command: pytest -q · path: src"),
  // each cut to its first line; the whole input is in the collapsible JSON.
  function inputSummary(input, title) {
    if (!input || typeof input !== "object" || Array.isArray(input)) return "";
    const items = [];
    for (const [key, value] of Object.entries(input)) {
      if (!["string", "number", "boolean"].includes(typeof value)) continue;
      let text = String(value);
      if (text === "" || text === title) continue;
      const firstLine = text.split("\n")[0];
      text = firstLine.length > 100 ? firstLine.slice(0, 100) + "…" : firstLine + (firstLine !== text ? " …" : "");
      items.push(key + ": " + text);
      if (items.length === 4) break;
    }
    return items.join("  ·  ");
  }

  function renderTool(part) {
    const state = part.state && typeof part.state === "object" ? part.state : {};
    let status = str(state.status) || "pending";
    const running = status === "running" || status === "pending";
    if (running && presence && presence.interrupted === true) status = "interrupted";
    const box = el("div", "tool status-" + status);
    const head = el("div", "tool-head");
    head.append(el("span", "tool-name", str(part.tool) || "tool"), el("span", "badge " + status, status));
    const title = str(state.title) || inputLine(state.input);
    if (title) head.append(el("span", "tool-title", title));
    box.append(head);
    const args = inputSummary(state.input, title);
    if (args) box.append(el("div", "tool-args", args));
    const id = idOf(part);
    if (state.input !== undefined && state.input !== null) {
      const pre = el("pre", "tool-input", JSON.stringify(state.input, null, 2));
      box.append(collapsible(id + ":input", "Input (JSON)", pre, false));
    }
    const diff = state.metadata && typeof state.metadata.diff === "string" ? state.metadata.diff : "";
    if (diff) box.append(collapsible(id + ":diff", "Diff", renderDiff(diff), true));
    if (status === "error" && state.error !== undefined) {
      box.append(el("pre", "tool-error", typeof state.error === "string" ? state.error : JSON.stringify(state.error, null, 2)));
    }
    if (typeof state.output === "string" && state.output !== "") {
      const lines = state.output.replace(/\n$/, "").split("\n").length;
      box.append(collapsible(id + ":output", "Output · " + lines + (lines === 1 ? " line" : " lines"), el("pre", "tool-output", state.output), false));
    }
    if (status === "interrupted") {
      box.append(el("div", "interrupted-note", "The agent disconnected before this call finished."));
    }
    return box;
  }

  function renderDiff(text) {
    const pre = el("pre", "diff");
    for (const line of text.split("\n")) {
      const cls = line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : line.startsWith("@@") ? "hunk" : "";
      pre.append(el("span", cls, line + "\n"));
    }
    return pre;
  }

  function placeMessages() {
    const main = $("messages");
    const ids = [...doc.messages.keys()].sort();
    let previous = null;
    for (const id of ids) {
      const node = messageNodes.get(id);
      if (!node) continue;
      const expected = previous ? previous.nextSibling : main.firstChild;
      if (expected !== node) main.insertBefore(node, expected);
      previous = node;
    }
  }

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 120;
  }

  function flush() {
    const follow = nearBottom();
    if (headerDirty) renderHeader();
    headerDirty = false;
    for (const id of pending) renderMessage(id);
    pending.clear();
    placeMessages();
    if (follow) window.scrollTo(0, document.body.scrollHeight);
  }

  function renderAll() {
    for (const node of messageNodes.values()) node.remove();
    messageNodes.clear();
    for (const id of doc.messages.keys()) pending.add(id);
    headerDirty = true;
    flush();
  }

  // ---- states ----

  function setStatus(text, cls) {
    const node = $("status");
    node.textContent = text;
    node.className = "status " + (cls || "");
  }

  function showNotice(title, text) {
    stopped = true;
    $("notice-title").textContent = title;
    $("notice-text").textContent = text;
    $("notice").hidden = false;
    document.querySelector("header.top").hidden = true;
    $("messages").hidden = true;
    document.title = title + " · capsync";
  }

  function showRevoked() {
    stopped = true;
    if (doc.messages.size === 0 && !doc.session) {
      showNotice(
        "This link no longer works",
        "It was revoked or has expired. Ask whoever shared it for a new link.",
      );
      return;
    }
    document.body.classList.add("revoked");
    setStatus("link revoked", "revoked");
    const banner = $("banner");
    banner.textContent =
      "This link was revoked or has expired. The page no longer updates; what is shown is as it was then.";
    banner.hidden = false;
  }

  function setPresence(next) {
    const wasInterrupted = presence && presence.interrupted === true;
    presence = next || null;
    if (presence && typeof presence.serverTime === "number") clockOffset = presence.serverTime - Date.now();
    if (presence && typeof presence.lastChange === "number" && (lastChange === null || presence.lastChange > lastChange)) {
      lastChange = presence.lastChange;
    }
    headerDirty = true;
    // Running tool calls change look when the writer is (or stops being) gone too long.
    if ((presence && presence.interrupted === true) !== wasInterrupted) {
      for (const id of doc.messages.keys()) pending.add(id);
    }
  }

  // ---- talking to the server ----

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const authHeaders = () => ({ Authorization: "Bearer " + token });

  // Reads a text/event-stream body, calling onEvent(name, data, id) per event.
  async function readEvents(body, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let name = "message";
    let data = [];
    let id = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") {
          if (data.length) onEvent(name, data.join("\n"), id);
          name = "message";
          data = [];
          id = null;
          // A reload reads the snapshot again, so the rest of this stream is not needed.
          if (stopped || reloadNeeded) { reader.cancel().catch(() => {}); return; }
          continue;
        }
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") name = val;
        else if (field === "data") data.push(val);
        else if (field === "id") id = val;
      }
    }
  }

  function onEvent(name, data, id) {
    let body;
    try {
      body = JSON.parse(data);
    } catch {
      return;
    }
    if (name === "hello") {
      setPresence(body.presence);
      if (typeof body.cursor === "number" && body.cursor < doc.cursor) {
        // The server is behind what this page showed (restored from a backup?): start over.
        reloadNeeded = true;
      }
    } else if (name === "ops") {
      for (const op of body.ops || []) {
        if (typeof op.cursor !== "number" || op.cursor <= doc.cursor) continue; // seen before a reconnect
        redraw(applyOp(op));
        doc.cursor = op.cursor;
        if (typeof op.appliedAt === "number") lastChange = op.appliedAt;
        headerDirty = true;
      }
      if (id !== null) lastEventId = id;
    } else if (name === "presence") {
      setPresence(body);
    } else if (name === "revoked") {
      flush();
      showRevoked();
      return;
    } else if (name === "snapshotRequired") {
      // The ops this page needs next were compacted away: the snapshot holds
      // their effect, so read it again and follow from its cursor.
      reloadNeeded = true;
    }
    flush();
  }

  async function follow() {
    let backoff = 1000;
    while (!stopped) {
      try {
        const headers = authHeaders();
        headers.Accept = "text/event-stream";
        if (lastEventId !== null) headers["Last-Event-ID"] = String(lastEventId);
        const response = await fetch(api + "/events", { headers, cache: "no-store" });
        if (response.status === 401 || response.status === 403) {
          showRevoked();
          return;
        }
        if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
        setStatus("live", "live");
        backoff = 1000;
        await readEvents(response.body, onEvent);
        if (reloadNeeded) {
          reloadNeeded = false;
          await load();
          return;
        }
      } catch (err) {
        // Network trouble or a restart: try again below.
      }
      if (stopped) return;
      setStatus("reconnecting…", "reconnecting");
      await sleep(backoff + Math.random() * 500);
      backoff = Math.min(backoff * 2, 30000);
    }
  }

  async function load() {
    if (!shareId || !token) {
      showNotice(
        "This link is incomplete",
        "A share link ends with # and an access key. Copy the whole link and try again.",
      );
      return;
    }
    let backoff = 1000;
    for (;;) {
      let response;
      try {
        response = await fetch(api + "/snapshot", { headers: authHeaders(), cache: "no-store" });
      } catch {
        response = null;
      }
      if (response && response.ok) {
        const snapshot = await response.json();
        loadDocument(snapshot);
        setPresence(snapshot.presence);
        lastEventId = String(doc.cursor);
        renderAll();
        follow();
        return;
      }
      if (response && (response.status === 401 || response.status === 403)) {
        // A token of another kind than viewer is told so by the server (its
        // own prefix says what it is); anything else gets the same words.
        const body = await response.json().catch(() => ({}));
        const message = str(body.message);
        showNotice(
          "This link no longer works",
          message.startsWith("This is")
            ? message
            : "It may have been revoked or have expired, or it was not copied whole. Ask whoever shared it for a new link.",
        );
        return;
      }
      // Rate limited, or the server busy: wait as long as it asks, then try again.
      const retryAfter = response ? Number(response.headers.get("Retry-After")) : NaN;
      if (response && response.status === 429) {
        setStatus("too many invalid links were tried from here; retrying shortly…", "reconnecting");
      } else {
        setStatus("cannot reach the server; retrying…", "reconnecting");
      }
      await sleep(retryAfter > 0 ? retryAfter * 1000 : backoff);
      backoff = Math.min(backoff * 2, 30000);
    }
  }

  setInterval(() => {
    if (!stopped) renderPresence();
  }, 10000);

  load();
})();
