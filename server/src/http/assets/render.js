// capsync share page, 1 of 3: helpers, and how each part of a message looks.
//
// page.rs joins render.js, tools.js and page.js into the one script the page
// loads, inside a single function with "use strict": names declared at the top
// level of these files are shared by the three and invisible to anything else.
//
// Everything from the session is untrusted. It goes into the page through
// textContent and element properties, never as markup, except the HTML of text
// parts, which the server rendered from markdown with raw HTML escaped
// (markdown.rs). Images are shown only from data: URLs of four raster types,
// checked here (safeImageUrl), which is all the Content-Security-Policy allows.

const $ = (id) => document.getElementById(id);
const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
};
const str = (v) => (typeof v === "string" ? v : "");
const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : 0);
const obj = (v) => (v && typeof v === "object" && !Array.isArray(v) ? v : {});
const idOf = (v) => (v && typeof v.id === "string" ? v.id : "");
// table[key] for the table's own keys only: a key like "constructor" comes
// from the session and must not reach Object.prototype.
const lookup = (table, key) => (Object.prototype.hasOwnProperty.call(table, key) ? table[key] : undefined);

// ---- numbers, sizes, times ----

// Fixed to one locale so the numbers read the same for everyone (and in tests).
const integers = new Intl.NumberFormat("en-US");
const count = (n) => integers.format(Math.round(num(n)));
const plural = (n, one, many) => count(n) + " " + (Math.round(num(n)) === 1 ? one : many);

function formatCost(cost) {
  const c = num(cost);
  // Single steps cost fractions of a cent: two decimals would show $0.00.
  return "$" + (c >= 1 ? c.toFixed(2) : c.toFixed(4));
}

function formatBytes(bytes) {
  const b = num(bytes);
  if (b >= 1024 * 1024) return (b / (1024 * 1024)).toFixed(1) + " MB";
  return Math.max(1, Math.round(b / 1024)) + " KB";
}

function formatDuration(ms) {
  const m = num(ms);
  if (m < 1000) return Math.round(m) + " ms";
  if (m < 60000) return (m / 1000).toFixed(1) + " s";
  return Math.floor(m / 60000) + " min " + Math.round((m % 60000) / 1000) + " s";
}

function formatTime(ms) {
  if (typeof ms !== "number") return "";
  return new Date(ms).toLocaleString(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
  });
}

// The token counts opencode reports ({input, output, reasoning, cache: {read, write}}),
// as "8,120 in · 1,290 out …"; reasoning and cache only when there were any.
function tokenItems(tokens) {
  const t = obj(tokens);
  const cache = obj(t.cache);
  const items = [count(t.input) + " in", count(t.output) + " out"];
  if (num(t.reasoning)) items.push(count(t.reasoning) + " reasoning");
  if (num(cache.read)) items.push(count(cache.read) + " cache read");
  if (num(cache.write)) items.push(count(cache.write) + " cache write");
  return items;
}

// A path relative to the session's project root, as the agent's own UI shows it.
function relPath(path, root) {
  const p = str(path);
  const r = str(root).replace(/\/+$/, "");
  if (r && p.startsWith(r + "/")) return p.slice(r.length + 1);
  return p;
}

// The project root of a message's session (assistant messages say where they ran).
const rootOf = (message) => str(obj(obj(obj(message).info).path).root);

// ---- building blocks ----

// Details the reader opened or closed, by key, kept across re-renders.
const detailsState = new Map();

function collapsible(key, summary, body, openByDefault) {
  const details = el("details", "collapsible");
  details.open = detailsState.has(key) ? detailsState.get(key) : openByDefault;
  details.addEventListener("toggle", () => detailsState.set(key, details.open));
  const head = el("summary");
  if (summary instanceof Node) head.append(summary);
  else head.textContent = summary;
  details.append(head, body);
  return details;
}

const lineCount = (text) => (text === "" ? 0 : text.replace(/\n$/, "").split("\n").length);

// A unified diff, coloured by line: added, removed, hunk headers, file headers.
// Also reads apply_patch's "*** Add File:" format, whose added lines come
// before any "@@".
function renderDiff(text) {
  const pre = el("pre", "diff");
  let inHunk = false;
  for (const line of String(text).replace(/\n$/, "").split("\n")) {
    let cls = "";
    if (/^(Index: |diff |={10})/.test(line)) {
      inHunk = false;
      cls = "meta";
    } else if (line.startsWith("*** ")) {
      inHunk = /^\*\*\* (Add|Update|Delete) File/.test(line);
      cls = "meta";
    } else if (line.startsWith("@@")) {
      inHunk = true;
      cls = "hunk";
    } else if (!inHunk && (line.startsWith("--- ") || line.startsWith("+++ "))) {
      cls = "meta";
    } else if (line.startsWith("+")) {
      cls = "add";
    } else if (line.startsWith("-")) {
      cls = "del";
    } else if (line.startsWith("\\")) {
      cls = "meta";
    }
    pre.append(el("span", cls ? "line " + cls : "line", line + "\n"));
  }
  return pre;
}

// Lines added and removed in a unified diff, for diffs that do not say.
function diffStats(text) {
  let additions = 0;
  let deletions = 0;
  let inHunk = false;
  for (const line of String(text).split("\n")) {
    if (line.startsWith("@@")) inHunk = true;
    else if (/^(Index: |diff )/.test(line)) inHunk = false;
    else if (inHunk && line.startsWith("+")) additions++;
    else if (inHunk && line.startsWith("-")) deletions++;
  }
  return { additions, deletions };
}

function stats(additions, deletions) {
  const span = el("span", "stats");
  span.append(el("span", "add", "+" + count(additions)), el("span", "del", " −" + count(deletions)));
  return span;
}

// A list of file diffs ({file, patch, additions, deletions, status}, opencode's
// FileDiff; older agents send before/after instead of a patch, shown without
// one). Each file opens to its patch.
function fileDiffList(diffs, keyPrefix) {
  const list = el("ul", "file-diffs");
  for (const d of diffs) {
    const diff = obj(d);
    const li = el("li", "file-diff");
    const name = el("span", "file", str(diff.file) || "?");
    const line = el("span", "file-line");
    line.append(name, " ", stats(diff.additions, diff.deletions));
    if (diff.status && diff.status !== "modified") line.append(el("span", "file-status", str(diff.status)));
    const patch = str(diff.patch);
    if (patch) li.append(collapsible(keyPrefix + ":" + str(diff.file), line, renderDiff(patch), false));
    else li.append(line);
    list.append(li);
  }
  return list;
}

function totalsOf(diffs) {
  let additions = 0;
  let deletions = 0;
  for (const d of diffs) {
    additions += num(obj(d).additions);
    deletions += num(obj(d).deletions);
  }
  return { additions, deletions };
}

// ---- images and attachments ----

// Only these, base64, and small: a raster image cannot run script, SVG could
// carry some (and is never shown), and a remote URL would tell a third party
// who reads the share. The CSP's img-src allows data: and nothing else.
const IMAGE_URL = /^data:image\/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/]+={0,2}$/;
const MAX_IMAGE_URL_BYTES = 256 * 1024;

function safeImageUrl(url) {
  return typeof url === "string" && url.length <= MAX_IMAGE_URL_BYTES && IMAGE_URL.test(url) ? url : null;
}

// A file part ({mime, filename, url, source}), in a message or attached to a
// tool's result. capsync may have dropped a data URL too large to keep, leaving
// `capsyncOmitted: {bytes, reason}` in its place.
function renderFile(file) {
  const f = obj(file);
  const url = str(f.url);
  const source = obj(f.source);
  const box = el("div", "file-part");
  const head = el("div", "file-head");
  const name = str(f.filename) || str(source.path) || (url.startsWith("file://") ? url.slice(7) : "") || "attachment";
  head.append(el("span", "file-name", name));
  if (f.mime) head.append(el("span", "file-mime", f.mime === "application/x-directory" ? "directory" : str(f.mime)));
  box.append(head);
  const omitted = f.capsyncOmitted && typeof f.capsyncOmitted === "object" ? f.capsyncOmitted : null;
  if (omitted) {
    const note = el("div", "file-note omitted", "attachment omitted (" + formatBytes(omitted.bytes) + ")");
    if (omitted.reason) note.title = str(omitted.reason);
    box.append(note);
    return box;
  }
  const image = safeImageUrl(url);
  if (image) {
    const img = el("img", "attachment-image");
    img.alt = name;
    img.decoding = "async";
    img.src = image;
    box.append(img);
  } else if (url.startsWith("data:image/")) {
    const why = url.startsWith("data:image/svg") ? "SVG images are not shown" : "image not shown (" + formatBytes(url.length) + ")";
    box.append(el("div", "file-note", why));
  }
  return box;
}

// ---- parts ----

// Parts in the order the agent made them: opencode's part ids ascend in time.
function sortedParts(parts) {
  return [...parts].sort((a, b) => (idOf(a) < idOf(b) ? -1 : idOf(a) > idOf(b) ? 1 : 0));
}

// The node for one part, or null for bookkeeping nothing shows. Every node
// carries its type, so the page (and its test) can find parts by kind.
function renderPart(part, message) {
  const type = str(part.type);
  const node = renderPartOfType(type, part, message);
  if (!node) return null;
  node.classList.add("part", "part-" + (type.replace(/[^a-z-]/g, "") || "unknown"));
  node.dataset.part = idOf(part);
  return node;
}

function renderPartOfType(type, part, message) {
  switch (type) {
    case "text": return renderText(part);
    case "reasoning": return renderReasoning(part);
    case "tool": return renderTool(part, message);
    case "file": return renderFile(part);
    case "step-start": return el("div", "step-start");
    case "step-finish": return renderStepFinish(part);
    case "patch": return renderPatch(part, message);
    // A snapshot is a hash of the work tree for undo: nothing a reader can use.
    case "snapshot": return null;
    case "compaction": return renderCompaction(part);
    case "subtask": return renderSubtask(part);
    case "agent": return renderAgentMention(part);
    case "retry": return renderRetry(part);
    default: return el("div", "other-part", "[" + (type || "part") + "]");
  }
}

function renderText(part) {
  const segments = doc.html.get(idOf(part));
  let box;
  if (segments) {
    box = el("div", "text markdown");
    box.innerHTML = segments.join(""); // rendered by the server with raw HTML escaped
    for (const a of box.querySelectorAll("a")) {
      a.target = "_blank";
      a.rel = "noopener noreferrer";
    }
  } else {
    box = el("div", "text plain", str(part.text));
  }
  // Text the agent added itself (a file it read in for an @-mention, a
  // background task's result) or kept from the model: shown, but quietly.
  if (part.synthetic === true || part.ignored === true) {
    const aside = el("div", "text-aside");
    aside.append(el("div", "aside-label", part.synthetic === true ? "added automatically" : "not sent to the model"), box);
    return aside;
  }
  return box;
}

function renderReasoning(part) {
  const text = str(part.text);
  const time = obj(part.time);
  let label = "Thinking";
  if (typeof time.start === "number" && typeof time.end === "number") label += " · " + formatDuration(time.end - time.start);
  else if (typeof time.start === "number") label += "…";
  const body = el("div", "plain", text);
  const box = el("div", "reasoning");
  // Long reasoning starts folded: it is the least read part of a session.
  box.append(collapsible(idOf(part) + ":reasoning", label, body, text.length < 800));
  return box;
}

const STEP_REASONS = { "tool-calls": "called tools", stop: "done", length: "hit the output limit", "content-filter": "filtered", error: "error" };

// One model call's usage, small and to the side.
function renderStepFinish(part) {
  const reason = str(part.reason);
  const items = ["step " + (lookup(STEP_REASONS, reason) || reason || "finished")];
  items.push(...tokenItems(part.tokens));
  if (typeof part.cost === "number") items.push(formatCost(part.cost));
  return el("div", "step-finish", items.join(" · "));
}

function renderPatch(part, message) {
  const files = Array.isArray(part.files) ? part.files.map(str).filter(Boolean) : [];
  const root = rootOf(message);
  const box = el("div", "patch-part");
  box.append(el("span", "patch-label", files.length === 1 ? "File touched: " : "Files touched: "));
  files.forEach((file, i) => {
    if (i) box.append(", ");
    box.append(el("span", "file", relPath(file, root)));
  });
  if (!files.length) box.append("none");
  if (part.hash) box.title = "snapshot " + str(part.hash);
  return box;
}

function renderCompaction(part) {
  let text = "Context compacted";
  if (part.auto === true) text += " automatically";
  if (part.overflow === true) text += " (the context window was full)";
  const box = el("div", "compaction");
  box.append(el("span", "", text));
  return box;
}

// A command run as a sub-agent task (opencode's `subtask: true` commands).
function renderSubtask(part) {
  const box = el("div", "subtask");
  const head = el("div", "subtask-head");
  head.append(el("span", "subtask-label", "Subtask"));
  if (part.agent) head.append(el("span", "agent-chip", "@" + str(part.agent)));
  if (part.command) head.append(el("span", "command-chip", "/" + str(part.command)));
  if (part.description) head.append(el("span", "subtask-description", str(part.description)));
  const model = obj(part.model);
  if (model.modelID) head.append(el("span", "model", str(model.modelID)));
  box.append(head);
  if (part.prompt) box.append(el("div", "subtask-prompt", str(part.prompt)));
  return box;
}

// "@name" in a prompt: the user asked for that agent.
function renderAgentMention(part) {
  const box = el("div", "agent-mention");
  box.append(el("span", "agent-chip", "@" + str(part.name)), el("span", "muted", " agent mentioned"));
  return box;
}

// The provider failed and the call was tried again.
function renderRetry(part) {
  const error = obj(part.error);
  const data = obj(error.data);
  let text = "Retry " + (num(part.attempt) || "") + " · " + (str(error.name) || "error");
  if (typeof data.statusCode === "number") text += " " + data.statusCode;
  if (data.message) text += ": " + str(data.message);
  const box = el("div", "retry", text);
  const created = obj(part.time).created;
  if (typeof created === "number") box.title = formatTime(created);
  return box;
}

// ---- messages ----

function roleLabel(role) {
  if (role === "user") return "User";
  if (role === "assistant") return "Assistant";
  return role || "Message";
}

function renderMessageNode(id, message, partNode) {
  const info = obj(message.info);
  const role = str(info.role);
  const article = el("article", "message role-" + (role.replace(/[^a-z]/g, "") || "other"));
  article.dataset.id = id;
  const head = el("div", "message-head");
  head.append(el("span", "role", roleLabel(role)));
  // opencode's summary of the conversation so far, written when it compacts.
  if (role === "assistant" && info.summary === true) head.append(el("span", "tag", "summary"));
  const agent = str(info.agent);
  if (agent && agent !== "build" && role === "assistant") head.append(el("span", "tag", agent));
  const model = str(info.modelID) || str(obj(info.model).modelID);
  if (model && role === "assistant") head.append(el("span", "model", model));
  const time = obj(info.time);
  if (typeof time.created === "number") head.append(el("time", "time", formatTime(time.created)));
  if (role === "assistant" && info.tokens && typeof info.tokens === "object") {
    const usage = el("span", "usage", tokenItems(info.tokens).slice(0, 2).join(" · "));
    usage.title = tokenItems(info.tokens).join(" · ");
    head.append(usage);
  }
  if (role === "assistant" && typeof info.cost === "number" && info.cost > 0) head.append(el("span", "cost", formatCost(info.cost)));
  article.append(head);
  for (const part of sortedParts(message.parts.values())) {
    const node = partNode(part);
    if (node) article.append(node);
  }
  const diffs = obj(info.summary).diffs;
  if (role === "user" && Array.isArray(diffs) && diffs.length) {
    const { additions, deletions } = totalsOf(diffs);
    const summary = el("span", "", "Changes in this turn · " + plural(diffs.length, "file", "files") + " · ");
    summary.append(stats(additions, deletions));
    const box = el("div", "turn-diffs");
    box.append(collapsible(id + ":diffs", summary, fileDiffList(diffs, id), false));
    article.append(box);
  }
  if (info.error && typeof info.error === "object") {
    const name = str(info.error.name) || "Error";
    const detail = str(obj(info.error.data).message);
    article.append(el("div", "message-error", detail ? name + ": " + detail : name));
  }
  return article;
}
