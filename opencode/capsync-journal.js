// capsync's opencode plugin: writes every change to a session, as opencode
// publishes it, to a local journal before opencode moves on, and starts the
// shipper (`capsync opencode ship`), which sends the journal to the server
// exactly once: entries carry opencode's event ids. `capsync opencode install`
// writes this file, with its settings in INSTALLED below.
//
// The journal is a directory of segments, one file per plugin instance
// (`<start ms>-<pid>-<random>.jsonl`), so a segment whose process has ended is
// complete and the shipper can delete it once it has read it. A segment that
// reaches SEGMENT_BYTES ends with a `{"sealed": true}` line and the next one
// begins. Every other line is {"at": <Unix ms>, "event": {id, type, properties}}.
//
// The write and its fsync are synchronous, on purpose: opencode does not await
// the event hook, so only work done before returning is sure to happen. No
// other work is done per event, and no signal handler is installed (one would
// keep opencode from exiting on SIGTERM). Only `node:` built-ins.
//
// Settings, each from the plugin's options in opencode.json, else INSTALLED,
// else the default:
// - `journal`: the journal directory (else CAPSYNC_OPENCODE_JOURNAL, else
//   <project>/.opencode/capsync/journal)
// - `shipper`: the command that ships the journal, an argv list; started
//   detached at load (it exits at once if another one ships this journal)
// - `log`: where the shipper's output goes
// - `tokenFile` and `shareOrigin`: opencode's own share client (`/share`) is
//   pointed at capsync's drop-in API, `<shareOrigin>/opencode/<token>`, so the
//   link opencode shows is capsync's; the token is read from the file, never
//   written into a config
// - `share`: "auto" also turns on opencode's auto-sharing; "manual" leaves it
// - `segmentBytes`: when a segment is sealed (default 16 MiB)

import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  appendFileSync,
  closeSync,
  fsyncSync,
  mkdirSync,
  openSync,
  readFileSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";

const INSTALLED = {};

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

const SEGMENT_BYTES = 16 * 1024 * 1024;

export const CapsyncJournal = async (input, options) => {
  const given = options && typeof options === "object" ? options : {};
  const setting = (name) => (name in given ? given[name] : INSTALLED[name]);
  const dir =
    setting("journal") ||
    process.env.CAPSYNC_OPENCODE_JOURNAL ||
    join(input.directory, ".opencode", "capsync", "journal");
  const segmentBytes = Number(setting("segmentBytes")) || SEGMENT_BYTES;
  mkdirSync(dir, { recursive: true, mode: 0o700 });

  // Readable by the user only: it holds the whole session. Never closed but
  // when sealed: events still arrive while opencode disposes of its plugins,
  // and the process's end closes it.
  let fd = -1;
  let written = 0;
  // Segments are read in name order: a segment that follows a sealed one must start
  // at a later ms, even when both began within the same one.
  let started = 0;
  const openSegment = () => {
    started = Math.max(Date.now(), started + 1);
    const name = `${started}-${process.pid}-${randomBytes(4).toString("hex")}.jsonl`;
    fd = openSync(join(dir, name), "ax", 0o600);
    written = 0;
  };
  const append = (line) => {
    writeSync(fd, line);
    fsyncSync(fd);
    written += Buffer.byteLength(line);
  };
  openSegment();
  startShipper(setting("shipper"), setting("log"));

  const hooks = {
    event: ({ event }) => {
      if (!event || !JOURNALED.has(event.type)) return;
      append(JSON.stringify({ at: Date.now(), event }) + "\n");
      if (written >= segmentBytes) {
        append('{"sealed":true}\n');
        closeSync(fd);
        openSegment();
      }
    },
  };
  const shareUrl = enterpriseUrl(setting("shareOrigin"), setting("tokenFile"));
  if (shareUrl) {
    hooks.config = async (config) => {
      config.enterprise = { ...(config.enterprise || {}), url: shareUrl };
      if (setting("share") === "auto") config.share = "auto";
    };
  }
  return hooks;
};

// capsync's drop-in share API for opencode, or undefined without a token.
function enterpriseUrl(origin, tokenFile) {
  if (typeof origin !== "string" || typeof tokenFile !== "string") return undefined;
  let token;
  try {
    token = readFileSync(tokenFile, "utf8").split("\n")[0].trim();
  } catch {
    return undefined;
  }
  return token ? `${origin.replace(/\/+$/, "")}/opencode/${token}` : undefined;
}

// Starts the shipper in its own session, so it outlives opencode and finishes
// sending after opencode exits. A failure to start is written to the log and
// never stops opencode: the journal keeps everything for the next start.
function startShipper(argv, log) {
  if (!Array.isArray(argv) || argv.length === 0) return;
  let out = "ignore";
  try {
    if (typeof log === "string") out = openSync(log, "a", 0o600);
  } catch {
    out = "ignore";
  }
  const failed = (error) => {
    if (typeof log !== "string") return;
    try {
      appendFileSync(log, `${new Date().toISOString()} capsync plugin: cannot start the shipper ${argv[0]}: ${error.message}\n`);
    } catch {}
  };
  try {
    const child = spawn(argv[0], argv.slice(1), { detached: true, stdio: ["ignore", out, out] });
    child.on("error", failed);
    child.unref();
  } catch (error) {
    failed(error);
  }
  if (typeof out === "number") closeSync(out);
}
