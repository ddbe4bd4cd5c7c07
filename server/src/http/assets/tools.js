// capsync share page, 2 of 3: tool calls. Each well-known tool of opencode
// has a view made from the fields its implementation fills in (its `input`,
// and the `metadata` and `output` of its result); any other tool gets the
// general view: its input, then its output.
//
// A tool part is {tool, callID, state}. Its state is one of
//   pending   {input: {}, raw}            the model is still writing the call
//   running   {input, title?, metadata?, time: {start}}
//   completed {input, output, title, metadata, time: {start, end, compacted?}, attachments?}
//   error     {input, error, metadata?, time: {start, end}}

// The input's simple fields on one line ("command: pytest -q · path: src"),
// each cut to its first line; the whole input is in the collapsible JSON.
// A link to a sub-agent's share, opened with this page's own token (the
// server lets a share's viewers read its children).
function childLink(shareId) {
  const link = el("a", "chip child-link", "open its session");
  link.href = "/s/" + encodeURIComponent(shareId) + "#" + encodeURIComponent(token);
  return link;
}

function inputSummary(input, title) {
  const items = [];
  for (const [key, value] of Object.entries(obj(input))) {
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

// The one input field that says what a call of an unknown tool did.
function inputLine(input) {
  const i = obj(input);
  for (const key of ["command", "filePath", "pattern", "path", "url", "query", "description", "name"]) {
    if (typeof i[key] === "string" && i[key]) return i[key];
  }
  return "";
}

// Output in a fold titled with its size; open when it is short enough to read at a glance.
function outputBlock(key, label, text, openUpTo) {
  const lines = lineCount(text);
  const pre = el("pre", "tool-output", text);
  return collapsible(key, label + " · " + plural(lines, "line", "lines"), pre, lines <= openUpTo);
}

// At most `max` lines of `text`, numbered from `first`, and what was left out.
function excerpt(text, first, max, total) {
  const lines = String(text).replace(/\n$/, "").split("\n");
  const shown = lines.slice(0, max);
  const width = String(first + shown.length - 1).length;
  const pre = el("pre", "excerpt");
  shown.forEach((line, i) => {
    const row = el("span", "row");
    row.append(el("span", "ln", String(first + i).padStart(width, " ")), el("span", "", " " + line + "\n"));
    pre.append(row);
  });
  const box = el("div", "excerpt-box");
  box.append(pre);
  const all = Math.max(num(total), lines.length);
  if (all > shown.length) box.append(el("div", "muted small", "showing " + shown.length + " of " + plural(all, "line", "lines")));
  return box;
}

// LSP errors opencode reported for a file it changed ({path: [diagnostic]}).
function diagnosticsFor(metadata, path) {
  const list = obj(obj(metadata).diagnostics)[path];
  if (!Array.isArray(list)) return null;
  const errors = list.filter((d) => obj(d).severity === 1);
  if (!errors.length) return null;
  const box = el("ul", "diagnostics");
  for (const d of errors.slice(0, 10)) {
    const start = obj(obj(obj(d).range).start);
    box.append(el("li", "", "error [" + (num(start.line) + 1) + ":" + (num(start.character) + 1) + "] " + str(d.message)));
  }
  return box;
}

function chips(...items) {
  const row = el("div", "chips");
  for (const item of items) if (item) row.append(item instanceof Node ? item : el("span", "chip", item));
  return row.childNodes.length ? row : null;
}

// ---- the views: each takes the call and gives its title and body ----

const TOOL_VIEWS = {
  bash(c) {
    const command = str(c.input.command);
    const nodes = [];
    if (command || c.status !== "pending") nodes.push(el("pre", "bash-command", "$ " + command));
    // While it runs, opencode streams the output into metadata.output.
    const output = c.output || (c.compacted ? "" : str(c.metadata.output));
    if (output) nodes.push(outputBlock(c.id + ":output", "Output", output, 25));
    const notes = [];
    // A failing command is worth a look; success is the usual case and goes unsaid.
    if (typeof c.metadata.exit === "number" && c.metadata.exit !== 0) {
      notes.push(el("span", "chip exit-nonzero", "exit " + c.metadata.exit));
    }
    if (c.metadata.truncated === true) notes.push("output truncated");
    if (c.input.workdir) notes.push("in " + relPath(c.input.workdir, c.root));
    nodes.push(chips(...notes));
    return { title: str(c.input.description), nodes };
  },

  edit(c) {
    const path = str(c.input.filePath);
    const filediff = obj(c.metadata.filediff);
    let diff = str(filediff.patch) || str(c.metadata.diff);
    if (!diff && (c.input.oldString !== undefined || c.input.newString !== undefined)) {
      // Not applied yet (or failed): what the call asked to change.
      const lines = (text, sign) => (text === "" ? [] : text.split("\n").map((l) => sign + l));
      diff = ["@@ requested change @@", ...lines(str(c.input.oldString), "-"), ...lines(str(c.input.newString), "+")].join("\n");
    }
    const nodes = [];
    if (diff) {
      const counted = diffStats(diff);
      const added = typeof filediff.additions === "number" ? filediff.additions : counted.additions;
      const removed = typeof filediff.deletions === "number" ? filediff.deletions : counted.deletions;
      const label = el("span", "", "Diff ");
      label.append(stats(added, removed));
      nodes.push(collapsible(c.id + ":diff", label, renderDiff(diff), true));
    }
    if (c.input.replaceAll === true) nodes.push(chips("every occurrence"));
    nodes.push(diagnosticsFor(c.metadata, path));
    return { title: relPath(path, c.root), nodes };
  },

  write(c) {
    const path = str(c.input.filePath);
    const content = str(c.input.content);
    const nodes = [];
    const what = c.metadata.exists === true ? "overwrote" : c.metadata.exists === false ? "new file" : "";
    nodes.push(chips(what, plural(lineCount(content), "line", "lines")));
    if (content) nodes.push(collapsible(c.id + ":content", "Content", excerpt(content, 1, 40, 0), true));
    nodes.push(diagnosticsFor(c.metadata, path));
    return { title: relPath(path, c.root), nodes };
  },

  read(c) {
    const path = str(c.input.filePath);
    const display = obj(c.metadata.display);
    const range = [];
    if (c.input.offset) range.push("from line " + count(c.input.offset));
    if (c.input.limit) range.push(plural(c.input.limit, "line", "lines") + " at most");
    const nodes = [chips(...range)];
    if (display.type === "directory" && Array.isArray(display.entries)) {
      nodes.push(excerpt(display.entries.map(str).join("\n"), num(display.offset) || 1, 20, display.totalEntries));
    } else {
      // opencode keeps the lines read in display.text (1.18) or their first 20 in preview.
      const text = str(display.text) || str(c.metadata.preview);
      const isNote = /^(Image|PDF) read successfully$/.test(text);
      if (text && !isNote && !c.compacted) {
        nodes.push(excerpt(text, num(display.lineStart) || num(c.input.offset) || 1, 12, display.totalLines));
      } else if (!text && c.output) {
        // Older agents keep no excerpt: their output, numbered lines and all.
        nodes.push(outputBlock(c.id + ":output", "Output", c.output, 0));
      }
    }
    return { title: relPath(path, c.root), nodes };
  },

  grep(c) {
    const where = [];
    if (c.input.path) where.push("in " + (relPath(c.input.path, c.root) || "."));
    if (c.input.include) where.push(str(c.input.include));
    if (typeof c.metadata.matches === "number") where.push(plural(c.metadata.matches, "match", "matches"));
    if (c.metadata.truncated === true) where.push("truncated");
    const nodes = [chips(...where)];
    if (c.output) nodes.push(outputBlock(c.id + ":output", "Matches", stripRoot(c.output, c.root), 30));
    return { title: str(c.input.pattern), titleClass: "pattern", nodes };
  },

  glob(c) {
    const where = [];
    if (c.input.path) where.push("in " + (relPath(c.input.path, c.root) || "."));
    if (typeof c.metadata.count === "number") where.push(plural(c.metadata.count, "file", "files"));
    if (c.metadata.truncated === true) where.push("truncated");
    const nodes = [chips(...where)];
    if (c.output) nodes.push(outputBlock(c.id + ":output", "Files", stripRoot(c.output, c.root), 30));
    return { title: str(c.input.pattern), titleClass: "pattern", nodes };
  },

  list(c) {
    const nodes = [];
    if (c.output) nodes.push(outputBlock(c.id + ":output", "Entries", c.output, 30));
    return { title: relPath(str(c.input.path), c.root) || ".", nodes };
  },

  todowrite(c) {
    const todos = Array.isArray(c.input.todos) ? c.input.todos : Array.isArray(c.metadata.todos) ? c.metadata.todos : [];
    return { title: planTitle(todos), nodes: [todoList(todos)] };
  },

  todoread(c) {
    const todos = Array.isArray(c.metadata.todos) ? c.metadata.todos : [];
    return { title: planTitle(todos), nodes: todos.length ? [todoList(todos)] : [] };
  },

  // A sub-agent's run. Its messages are a session of their own (metadata.sessionId).
  task(c) {
    const model = obj(c.metadata.model);
    const session = str(c.metadata.sessionId);
    const nodes = [chips(
      c.input.subagent_type ? el("span", "agent-chip", "@" + str(c.input.subagent_type)) : null,
      model.modelID ? str(model.modelID) : null,
      session ? el("span", "chip mono", "session " + session) : null,
      session && doc.children.has(session) ? childLink(doc.children.get(session)) : null,
    )];
    if (c.input.prompt) nodes.push(collapsible(c.id + ":prompt", "Prompt", el("div", "plain", str(c.input.prompt)), false));
    const result = taskResult(c.output);
    if (result) nodes.push(collapsible(c.id + ":result", "Result", el("div", "plain task-result", result), true));
    return { title: str(c.input.description), nodes };
  },

  apply_patch(c) {
    const files = Array.isArray(c.metadata.files) ? c.metadata.files.map(obj) : [];
    const nodes = [];
    if (files.length) {
      const list = el("ul", "file-diffs");
      for (const f of files) {
        const li = el("li", "file-diff");
        const line = el("span", "file-line");
        const type = str(f.type);
        line.append(
          el("span", "file-op op-" + (type.replace(/[^a-z]/g, "") || "update"), lookup(PATCH_OPS, type) || "M"),
          el("span", "file", str(f.relativePath) || relPath(f.filePath, c.root)),
          " ",
        );
        const patch = str(f.patch) || str(f.diff);
        const counted = diffStats(patch);
        line.append(stats(typeof f.additions === "number" ? f.additions : counted.additions,
          typeof f.deletions === "number" ? f.deletions : counted.deletions));
        if (f.movePath) line.append(el("span", "muted", " → " + relPath(f.movePath, c.root)));
        li.append(patch ? collapsible(c.id + ":" + str(f.filePath), line, renderDiff(patch), files.length <= 2) : line);
        list.append(li);
      }
      nodes.push(list);
    } else if (c.input.patchText) {
      nodes.push(collapsible(c.id + ":patch", "Patch", renderDiff(str(c.input.patchText)), true));
    }
    return { title: files.length ? plural(files.length, "file", "files") : "", nodes };
  },

  webfetch(c) {
    const url = str(c.input.url);
    const nodes = [chips(c.input.format ? str(c.input.format) : null)];
    if (c.output) nodes.push(outputBlock(c.id + ":output", "Content", c.output, 0));
    return { title: url, titleLink: url, nodes };
  },

  websearch(c) {
    const nodes = [];
    if (c.output) nodes.push(outputBlock(c.id + ":output", "Results", c.output, 0));
    return { title: str(c.input.query), nodes };
  },

  skill(c) {
    const nodes = [];
    if (c.output) nodes.push(outputBlock(c.id + ":output", "Instructions", c.output, 0));
    return { title: str(c.input.name), nodes };
  },
};
TOOL_VIEWS.codesearch = TOOL_VIEWS.websearch;
TOOL_VIEWS.patch = TOOL_VIEWS.apply_patch;

const PATCH_OPS = { add: "A", update: "M", delete: "D", move: "R" };

function stripRoot(text, root) {
  const r = str(root).replace(/\/+$/, "");
  return r ? text.split(r + "/").join("") : text;
}

function planTitle(todos) {
  const done = todos.filter((t) => obj(t).status === "completed").length;
  return todos.length ? "Plan · " + done + " of " + todos.length + " done" : "Plan";
}

const TODO_MARKS = { completed: "✓", in_progress: "◐", cancelled: "✕", pending: "○" };

// The agent's plan as a checklist; each item keeps its status for styling (and tests).
function todoList(todos) {
  const list = el("ul", "todo-list");
  for (const todo of todos) {
    const t = obj(todo);
    const status = str(t.status) || "pending";
    const li = el("li", "todo");
    li.dataset.status = status;
    li.append(el("span", "todo-mark", lookup(TODO_MARKS, status) || "○"), el("span", "todo-content", str(t.content)));
    if (t.priority === "high") li.append(el("span", "todo-priority", "high"));
    li.title = status.replace("_", " ");
    list.append(li);
  }
  return list;
}

// The sub-agent's answer inside opencode's <task …><task_result>…</task_result></task> wrapper.
function taskResult(output) {
  const text = str(output);
  const match = /<task_(?:result|error)>\n?([\s\S]*?)\n?<\/task_(?:result|error)>/.exec(text);
  return match ? match[1] : text;
}

// The general view, for tools without one of their own.
function generalView(c) {
  const title = str(c.state.title) || inputLine(c.input);
  const nodes = [];
  const args = inputSummary(c.input, title);
  if (args) nodes.push(el("div", "tool-args", args));
  if (Object.keys(c.input).length) {
    nodes.push(collapsible(c.id + ":input", "Input (JSON)", el("pre", "tool-input", JSON.stringify(c.input, null, 2)), false));
  }
  const diff = str(c.metadata.diff);
  if (diff) nodes.push(collapsible(c.id + ":diff", "Diff", renderDiff(diff), true));
  if (c.output) nodes.push(outputBlock(c.id + ":output", "Output", c.output, 0));
  return { title, nodes };
}

function renderTool(part, message) {
  const state = obj(part.state);
  const name = str(part.tool) || "tool";
  let status = ["pending", "running", "completed", "error"].includes(state.status) ? state.status : "pending";
  if ((status === "running" || status === "pending") && presence && presence.interrupted === true) status = "interrupted";
  const time = obj(state.time);
  const call = {
    id: idOf(part),
    state,
    status,
    input: obj(state.input),
    metadata: obj(state.metadata),
    output: str(state.output),
    // Output dropped when the agent compacted its context (capsync may have cleared it too).
    compacted: typeof time.compacted === "number",
    root: rootOf(message),
  };
  const view = lookup(TOOL_VIEWS, name) || generalView;
  const { title, titleClass, titleLink, nodes } = view(call);

  const box = el("div", "tool status-" + status);
  box.dataset.tool = name;
  const head = el("div", "tool-head");
  head.append(el("span", "tool-name", name), el("span", "badge " + status, status));
  const shownTitle = title || (view === generalView ? "" : str(state.title));
  if (shownTitle) {
    let node = el("span", "tool-title" + (titleClass ? " " + titleClass : ""), shownTitle);
    if (titleLink && /^https?:\/\//i.test(titleLink)) {
      node = el("a", "tool-title", shownTitle);
      node.href = titleLink;
      node.target = "_blank";
      node.rel = "noopener noreferrer";
    }
    head.append(node);
  }
  if (typeof time.start === "number" && typeof time.end === "number") {
    head.append(el("span", "tool-time", formatDuration(time.end - time.start)));
  }
  box.append(head);
  if (status === "pending" || (status === "interrupted" && state.status === "pending")) {
    // The model is still writing the call: its arguments so far, as they came.
    if (state.raw) box.append(el("pre", "tool-raw", str(state.raw)));
  }
  for (const node of nodes) if (node) box.append(node);
  if (state.status === "error") {
    box.append(el("pre", "tool-error", typeof state.error === "string" ? state.error : JSON.stringify(state.error, null, 2)));
  }
  if (call.compacted) box.append(el("div", "muted small", "output cleared when the session was compacted"));
  if (Array.isArray(state.attachments) && state.attachments.length) {
    const files = el("div", "tool-attachments");
    for (const file of state.attachments) files.append(renderFile(file));
    box.append(files);
  }
  if (status === "interrupted") {
    box.append(el("div", "interrupted-note", "The agent disconnected before this call finished."));
  }
  return box;
}
