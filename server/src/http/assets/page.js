// capsync share page, 3 of 3: reads the session snapshot, then follows it live.
//
// The viewer token is the URL fragment (#...): browsers never send a fragment
// to the server, so it stays out of access logs and Referer headers. It goes
// to the API only in the Authorization header. Live updates are Server-Sent
// Events read through fetch(), because EventSource cannot send that header.
//
// The page opens at the top, where the title and the first prompt are. It
// follows new activity only while the reader is at the end of the page; a
// reader who scrolled up stays where they are and gets a "jump to latest"
// button instead.

const segments = location.pathname.split("/").filter(Boolean);
const shareId = decodeURIComponent(segments[1] || "");
const token = decodeURIComponent(location.hash.replace(/^#/, "")).trim();
const api = "/api/shares/" + encodeURIComponent(shareId);

// A reload would otherwise put the reader back mid-page before anything is there to show.
if ("scrollRestoration" in history) history.scrollRestoration = "manual";

// ---- the document: what the snapshot said, with every op since applied ----

const doc = {
  cursor: 0,
  session: null,
  models: new Map(),
  diffs: null,
  messages: new Map(), // id -> {info, parts: Map(id -> part)}
  // Parts whose message has not arrived (yet): message id -> Map(id -> part).
  // The server's snapshot holds them once the message exists, so the page does too.
  orphans: new Map(),
  // Text part id -> its server-rendered HTML, in segments to join: a delta replaces
  // the segments from its `htmlFrom` on, so a long answer is not sent again whole.
  html: new Map(),
  // Sub-agents' sessions shared along with this one: session id -> share id.
  // This page's token reads them too.
  children: new Map(),
};
let presence = null;
let clockOffset = 0; // server clock minus ours, in ms
let lastChange = null;
let lastEventId = null;
let stopped = false;
let reloadNeeded = false;

function loadDocument(snapshot) {
  doc.cursor = snapshot.cursor || 0;
  doc.session = snapshot.session || null;
  doc.models = new Map((snapshot.models || []).map((m) => [modelKey(m), m]));
  doc.diffs = Array.isArray(snapshot.diffs) ? snapshot.diffs : null;
  doc.messages = new Map();
  doc.orphans = new Map();
  for (const m of snapshot.messages || []) {
    doc.messages.set(idOf(m.info), {
      info: m.info,
      parts: new Map((m.parts || []).map((p) => [idOf(p), p])),
    });
  }
  // Parts whose message has not arrived: kept aside until it does, as the server does.
  for (const p of snapshot.orphanParts || []) {
    const messageId = typeof p.messageID === "string" ? p.messageID : "";
    partsOf(messageId).set(idOf(p), p);
  }
  doc.html = new Map(Object.entries(obj(snapshot.html)).filter(([, segments]) => isSegments(segments)));
  doc.children = new Map(Object.entries(obj(snapshot.children)).filter(([, id]) => typeof id === "string"));
}

// A text part's HTML as the server sends it: segments to join.
function isSegments(html) {
  return Array.isArray(html) && html.every((segment) => typeof segment === "string");
}

// A model's record key, as the server keys it: `providerID/id`, or `id` alone.
function modelKey(m) {
  const provider = m && typeof m.providerID === "string" ? m.providerID : "";
  return provider ? provider + "/" + idOf(m) : idOf(m);
}

// The message id and parts map holding part `partId`, among messages and orphans.
function findPart(partId) {
  for (const [messageId, message] of doc.messages) {
    if (message.parts.has(partId)) return [messageId, message.parts];
  }
  for (const [messageId, parts] of doc.orphans) {
    if (parts.has(partId)) return [messageId, parts];
  }
  return [null, null];
}

function partsOf(messageId) {
  const message = doc.messages.get(messageId);
  if (message) return message.parts;
  if (!doc.orphans.has(messageId)) doc.orphans.set(messageId, new Map());
  return doc.orphans.get(messageId);
}

// Applies one op as the server did. The server sends each op with its
// `effect` (capsync_shared::model::op::Effect: the record it touches, read from
// the payload by the same code that validated it), so this only keeps records;
// the record itself is the op's payload. Returns the id of the message to
// redraw, "" for the header, or null.
function applyOp(op) {
  const e = op.effect;
  const record = op.payload;
  if (!e || typeof e !== "object") return null;
  switch (e.type) {
    case "session":
      doc.session = record;
      return "";
    case "modelUpsert":
      doc.models.set(e.id, record);
      return "";
    case "diffSet":
      doc.diffs = Array.isArray(e.diffs) ? e.diffs : [];
      return "";
    case "messageUpsert": {
      const existing = doc.messages.get(e.id);
      const parts = existing ? existing.parts : doc.orphans.get(e.id) || new Map();
      doc.orphans.delete(e.id);
      // Tool views show paths relative to the message's project root: when
      // that changed, its parts are drawn again (usage updates keep them).
      if (!existing || rootOf(existing) !== rootOf({ info: record })) {
        for (const partId of parts.keys()) partNodes.delete(partId);
      }
      doc.messages.set(e.id, { info: record, parts });
      return e.id;
    }
    case "messageRemove": {
      const message = doc.messages.get(e.id);
      for (const partId of message ? message.parts.keys() : []) {
        doc.html.delete(partId);
        partNodes.delete(partId);
      }
      doc.messages.delete(e.id);
      doc.orphans.delete(e.id);
      return e.id;
    }
    case "partUpsert": {
      const [oldMessage, oldParts] = findPart(e.id);
      if (oldParts && oldMessage !== e.messageId) {
        oldParts.delete(e.id);
        redraw(oldMessage);
      }
      partsOf(e.messageId).set(e.id, record);
      if (isSegments(op.html)) doc.html.set(e.id, op.html);
      else doc.html.delete(e.id);
      partNodes.delete(e.id);
      return e.messageId;
    }
    case "partRemove": {
      const [messageId, parts] = findPart(e.id);
      if (parts) parts.delete(e.id);
      doc.html.delete(e.id);
      partNodes.delete(e.id);
      return messageId;
    }
    case "partDelta": {
      const [messageId, parts] = findPart(e.id);
      if (!parts) return null;
      const part = parts.get(e.id);
      part[e.field] = str(part[e.field]) + e.delta;
      if (e.field === "text") {
        const kept = doc.html.get(e.id) || [];
        const from = op.htmlFrom;
        if (isSegments(op.html) && Number.isInteger(from) && from >= 0 && from <= kept.length) {
          doc.html.set(e.id, kept.slice(0, from).concat(op.html));
        } else {
          doc.html.delete(e.id); // stale: show the raw text instead
        }
      }
      partNodes.delete(e.id);
      return messageId;
    }
    default:
      return null;
  }
}

// ---- rendering ----

const messageNodes = new Map(); // message id -> <article>
// Part id -> its node, reused while the part is unchanged, so a streaming
// message redraws only the part that grew (images are not decoded again,
// and a reader's text selection elsewhere in the message survives).
const partNodes = new Map();
const pending = new Set(); // message ids to redraw
let headerDirty = true;

function redraw(messageId) {
  if (messageId === "") headerDirty = true;
  else if (messageId !== null && messageId !== undefined) pending.add(messageId);
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

// Cost and tokens of the whole session: the sum over its assistant messages
// (each holds the usage of its model calls; opencode's session record may not).
function usageTotals() {
  const total = { cost: 0, input: 0, output: 0, reasoning: 0, cache: { read: 0, write: 0 } };
  for (const { info } of doc.messages.values()) {
    if (!info || info.role !== "assistant") continue;
    const t = obj(info.tokens);
    total.cost += num(info.cost);
    total.input += num(t.input);
    total.output += num(t.output);
    total.reasoning += num(t.reasoning);
    total.cache.read += num(obj(t.cache).read);
    total.cache.write += num(obj(t.cache).write);
  }
  total.all = total.input + total.output + total.reasoning + total.cache.read + total.cache.write;
  return total;
}

function renderHeader() {
  const title = (doc.session && str(doc.session.title)) || "Untitled session";
  $("title").textContent = title;
  $("bar-title").textContent = title;
  document.title = title + " · capsync";
  const meta = $("meta");
  meta.replaceChildren();
  const models = modelNames();
  if (models.length) meta.append(el("span", "meta-item", (models.length > 1 ? "Models: " : "Model: ") + models.join(", ")));
  meta.append(el("span", "meta-item", plural(doc.messages.size, "message", "messages")));
  if (doc.session && doc.session.time && typeof doc.session.time.created === "number") {
    meta.append(el("span", "meta-item", "Started " + formatTime(doc.session.time.created)));
  }
  const usage = usageTotals();
  if (usage.all > 0 || usage.cost > 0) {
    meta.append(el("span", "meta-item", "Tokens: " + tokenItems(usage).join(" · ")));
  }
  const totals = $("totals");
  totals.textContent = usage.all > 0 || usage.cost > 0 ? formatCost(usage.cost) + " · " + plural(usage.all, "token", "tokens") : "";
  totals.title = usage.all > 0 ? "Cost " + formatCost(usage.cost) + "; tokens " + tokenItems(usage).join(" · ") : "";
  renderDiffs();
  renderPresence();
}

function renderDiffs() {
  const box = $("diffs");
  const diffs = doc.diffs || [];
  box.hidden = diffs.length === 0;
  if (!diffs.length) return;
  const { additions, deletions } = totalsOf(diffs);
  $("diffs-list").replaceChildren(fileDiffList(diffs, "session"));
  $("diffs-summary").textContent =
    diffs.length + (diffs.length === 1 ? " file changed" : " files changed") + " · +" + count(additions) + " −" + count(deletions);
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

function partNode(message) {
  return (part) => {
    const id = idOf(part);
    if (partNodes.has(id)) return partNodes.get(id);
    const node = renderPart(part, message);
    partNodes.set(id, node);
    return node;
  };
}

function renderMessage(id) {
  const message = doc.messages.get(id);
  const node = messageNodes.get(id);
  if (!message) {
    if (node) node.remove();
    messageNodes.delete(id);
    return;
  }
  const article = renderMessageNode(id, message, partNode(message));
  if (node) node.replaceWith(article);
  messageNodes.set(id, article);
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

// ---- where the reader is ----

// At (or within a few pixels of) the end of the page.
function atEnd() {
  const page = document.documentElement;
  return window.innerHeight + window.scrollY >= page.scrollHeight - 24;
}

function scrollToEnd() {
  window.scrollTo(0, document.documentElement.scrollHeight);
}

function showJump(show) {
  $("jump").hidden = !show;
}

// Draws what changed. `opening`: the first drawing of the page, which stays
// at the top; otherwise a reader at the end is kept at the end.
function flush(opening) {
  const follow = !opening && atEnd();
  const before = document.documentElement.scrollHeight;
  if (headerDirty) renderHeader();
  headerDirty = false;
  for (const id of pending) renderMessage(id);
  pending.clear();
  placeMessages();
  if (opening) window.scrollTo(0, 0);
  else if (follow) scrollToEnd();
  else if (document.documentElement.scrollHeight > before && !atEnd()) showJump(true);
}

function renderAll(opening) {
  for (const node of messageNodes.values()) node.remove();
  messageNodes.clear();
  partNodes.clear();
  for (const id of doc.messages.keys()) pending.add(id);
  headerDirty = true;
  flush(opening);
}

$("jump").addEventListener("click", () => {
  showJump(false);
  scrollToEnd();
});
window.addEventListener("scroll", () => {
  if (atEnd()) showJump(false);
}, { passive: true });

// The title in the sticky bar once the big one has scrolled away.
if ("IntersectionObserver" in window) {
  new IntersectionObserver(
    ([entry]) => $("top").classList.toggle("scrolled", !entry.isIntersecting),
    { rootMargin: "-60px 0px 0px 0px" },
  ).observe($("title"));
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
  $("top").hidden = true;
  $("intro").hidden = true;
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
    partNodes.clear();
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
    flush(false);
    showRevoked();
    return;
  } else if (name === "snapshotRequired") {
    // The ops this page needs next were compacted away: the snapshot holds
    // their effect, so read it again and follow from its cursor.
    reloadNeeded = true;
  }
  flush(false);
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
        await load(false);
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

// Reads the snapshot and draws it; `opening` on the page's first load.
async function load(opening) {
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
      renderAll(opening);
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

load(true);
