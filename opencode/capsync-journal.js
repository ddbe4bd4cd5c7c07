// capsync's opencode plugin: writes every change to a session, as opencode
// publishes it, to a local journal before opencode moves on, so that nothing
// is lost whatever fails afterwards. `capsync` ships the journal to the server
// (exactly once: entries carry opencode's event ids).
//
// One JSON line per event: {"at": <Unix ms>, "event": {id, type, properties}}.
// The write and its fsync are synchronous, on purpose: opencode does not await
// the event hook, so only work done before returning is sure to happen. No
// other work is done here, and no signal handler is installed (one would keep
// opencode from exiting on SIGTERM). Only `node:` built-ins.
//
// Where the journal goes: the plugin option `journal`, else the environment
// variable CAPSYNC_OPENCODE_JOURNAL, else <project>/.opencode/capsync/journal.jsonl.

import { fsyncSync, mkdirSync, openSync, writeSync } from "node:fs";
import { dirname, join } from "node:path";

// The events that change what a share holds; the rest (status, files, the
// catalog, …) is left out.
const JOURNALED = new Set([
  "session.created",
  "session.updated",
  "session.deleted",
  "session.diff",
  "message.updated",
  "message.removed",
  "message.part.updated",
  "message.part.removed",
  "message.part.delta",
]);

export const CapsyncJournal = async (input, options) => {
  const settings = options && typeof options === "object" ? options : {};
  const path =
    (typeof settings.journal === "string" && settings.journal) ||
    process.env.CAPSYNC_OPENCODE_JOURNAL ||
    join(input.directory, ".opencode", "capsync", "journal.jsonl");
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  // Readable by the user only: it holds the whole session. Never closed:
  // events still arrive while opencode disposes of its plugins, and the
  // process's end closes it.
  const fd = openSync(path, "a", 0o600);
  return {
    event: ({ event }) => {
      if (!event || !JOURNALED.has(event.type)) return;
      writeSync(fd, JSON.stringify({ at: Date.now(), event }) + "\n");
      fsyncSync(fd);
    },
  };
};
