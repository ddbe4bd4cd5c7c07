# capsync wire contract.
#
# This file is the only place interfaces are defined. The Rust code in
# shared/src/generated/ is generated from it and checked in; after editing this
# file run `REGEN=1 cargo test -p capsync-shared --test schema_drift` (needs the
# `capnp` compiler) and commit both.
#
# Conventions:
# - Application errors travel in results (a `Failure` with an `ErrorCode`), not
#   as exceptions. An exception (failed / overloaded / disconnected /
#   unimplemented) means a transport-level problem; callers branch on its kind
#   only.
# - Times are Unix milliseconds (Int64); 0 means "none" (no expiry, not set).
#   An expiry must lie in the future.
# - Ids are text. Share ids are server-chosen; op, message, part and session
#   ids are the agent's own.
# - Ordinals are never reused; new fields and methods are only appended.

@0xa5984990ece29bfb;

# ---------------------------------------------------------------------------
# Errors

enum ErrorCode {
  internal @0;          # something failed inside the server; details are in its log only
  revoked @1;           # the capability's epoch was bumped (or its token revoked); mint or redeem a new one
  permissionDenied @2;  # unknown token, wrong secret, expired, or not allowed; deliberately vague
  notFound @3;          # the share (or token) does not exist (any more)
  invalidArgument @4;   # the request is malformed; `message` says what
  tooLarge @5;          # a limit was exceeded; `message` names the limit
  cursorConflict @6;    # `expectedCursor` did not match; `cursor` holds the current one
  rateLimited @7;       # too many failed attempts from this address; retry later
  overloaded @8;        # the server is shutting down, at capacity or the database is busy; retry with backoff
  snapshotRequired @9;  # the ops asked for were compacted; take a snapshot, then follow from its cursor.
                        # `cursor` is the compaction point: the lowest `after` still served.
  storageFull @10;      # the server's storage is full (disk or configured size limit): nothing of the
                        # request was stored; retry with backoff, it recovers once space is freed
  outOfOrder @11;       # a pipelined batch (`Batch.after`) did not follow its `after` batch applied on
                        # this capability: nothing of it was applied; send it again after that one
}

struct Failure {
  code @0 :ErrorCode;
  message @1 :Text;     # for people; never contains internal details or secrets
  cursor @2 :UInt64;    # `cursorConflict`: the share's current cursor; `snapshotRequired`: the compaction point;
                        # `invalidArgument` for a cursor beyond the share's: the share's current cursor
  retryAfterMs @3 :UInt64;  # `rateLimited`, `overloaded`, `storageFull`: wait at least this long before
                            # retrying (0 = no hint; back off as usual)
}

# The result of a call that returns nothing but may fail.
struct Outcome {
  union {
    ok @0 :Void;
    failure @1 :Failure;
  }
}

# ---------------------------------------------------------------------------
# Shares and tokens

# Which capabilities of a share a revocation applies to.
enum Scope {
  writers @0;
  viewers @1;
  all @2;
}

# The live state of a share. The cursor counts applied ops: it starts at 0 and
# advances by exactly one per applied op, without gaps.
struct ShareState {
  shareId @0 :Text;
  cursor @1 :UInt64;
  writerEpoch @2 :UInt32;
  viewerEpoch @3 :UInt32;
}

struct ShareInfo {
  state @0 :ShareState;
  sessionId @1 :Text;        # the agent's session this share mirrors
  projectId @2 :Text;
  parentSessionId @3 :Text;  # "" for a root session
  title @4 :Text;
  createdAt @5 :Int64;
  updatedAt @6 :Int64;       # time of the last applied op (createdAt before any)
  ownerTokenId @7 :Text;     # id of the agent token that created the share
  archivedAt @8 :Int64;      # when an admin archived the share; 0 = not archived
}

struct ShareList {
  shares @0 :List(ShareInfo);
  nextAfter @1 :Text;        # pass as `after` for the next page; "" when there is none
}

struct ShareListResult {
  union {
    ok @0 :ShareList;
    failure @1 :Failure;
  }
}

struct ShareStateResult {
  union {
    ok @0 :ShareState;
    failure @1 :Failure;
  }
}

# A freshly minted sturdy ref. `token` is the whole secret string, shown once:
# the server keeps only an argon2id hash of its secret part.
struct MintedToken {
  token @0 :Text;
  tokenId @1 :Text;
  expiresAt @2 :Int64;
}

struct MintResult {
  union {
    ok @0 :MintedToken;
    failure @1 :Failure;
  }
}

# ---------------------------------------------------------------------------
# Bootstrap

# The bootstrap capability of every connection. It carries no authority:
# everything starts by redeeming a sturdy ref.
interface Gateway {
  # Turns a sturdy ref (admin, agent, writer or viewer token) into its live
  # capability. Unknown id, wrong secret, expired and revoked tokens all give
  # `permissionDenied`; repeated failures from one address give `rateLimited`.
  redeem @0 (token :Text) -> (result :RedeemResult);
}

struct RedeemResult {
  union {
    ok @0 :Redeemed;
    failure @1 :Failure;
  }
}

struct Redeemed {
  capability :union {
    admin @0 :Admin;
    agent @1 :Agent;
    writer @2 :ShareWriter;
    viewer @3 :ShareViewer;
  }
  tokenId @4 :Text;
  expiresAt @5 :Int64;
  # Set for writer and viewer capabilities: the share's state at redeem time.
  state @6 :ShareState;
  # Set for writer capabilities of a server that honours `Batch.after`.
  ordersPipelinedBatches @7 :Bool;
}

# ---------------------------------------------------------------------------
# Admin

interface Admin {
  # Mints an agent token (may create shares). `label` is free text for people.
  mintAgent @0 (label :Text, expiresAt :Int64) -> (result :MintResult);

  # Bumps the epoch of the given scope: every older token and every live
  # capability of that scope fails with `revoked` from its next call on.
  revokeShare @1 (shareId :Text, scope :Scope) -> (result :ShareStateResult);

  # Revokes one token; live capabilities redeemed from it fail with `revoked`.
  revokeToken @2 (tokenId :Text) -> (result :Outcome);

  # All shares, ordered by share id, paged. Archived shares are left out
  # unless `includeArchived` is set.
  listShares @3 (after :Text, limit :UInt32, includeArchived :Bool) -> (result :ShareListResult);

  # Deletes a share with its records, ledger and tokens.
  deleteShare @4 (shareId :Text) -> (result :Outcome);

  # Archives a share: it drops out of listings (unless asked for) and becomes
  # read-only. Viewers, snapshots, catch-up and subscriptions keep working;
  # `appendOps` fails with `invalidArgument` ("share is archived; unarchive it
  # to append") until it is unarchived. Archiving an archived share is a no-op
  # that keeps the first `archivedAt`. `notFound` for an unknown share.
  archiveShare @5 (shareId :Text) -> (result :ShareInfoResult);

  # Undoes `archiveShare`; a no-op on a share that is not archived.
  unarchiveShare @6 (shareId :Text) -> (result :ShareInfoResult);

  # Sizes and counts of the whole database, computed with SQL aggregates.
  stats @7 () -> (result :StatsResult);

  # Deletes root shares inactive for longer than `options.olderThanMs` (see
  # `PruneOptions`), each with its records, ledger rows and tokens; live
  # capabilities of a deleted share fail with `notFound`. With `dryRun` nothing
  # is deleted and the report says exactly what would be. Shares are deleted
  # one at a time, in bounded steps, so writers of other shares are not held up.
  # `progress` (may be null) hears about each share.
  prune @8 (options :PruneOptions, progress :ProgressListener) -> (result :PruneResult);

  # `wal_checkpoint(TRUNCATE)`, then `VACUUM`: rewrites the database file
  # without free pages. Blocks every write while it runs. `overloaded`
  # ("database busy, try again") when another connection keeps the log busy.
  vacuum @9 () -> (result :VacuumResult);

  # Clears output and attachments of tool parts already marked compacted (their
  # state has `time.compacted`), for parts stored before the server's `reclaim`
  # setting was on. Nothing else is touched. `dryRun` counts without clearing.
  reclaim @10 (dryRun :Bool, progress :ProgressListener) -> (result :ReclaimResult);

  # Drops the payload of ledger ops applied more than `olderThanMs` ago; their
  # op ids stay, so dedupe is unchanged. `opsSince` and `subscribe` below a
  # share's compaction point answer `snapshotRequired`. `dryRun` counts only.
  compactLedger @11 (olderThanMs :Int64, dryRun :Bool, progress :ProgressListener)
      -> (result :CompactResult);
}

# Told how a long admin operation is getting on. The server keeps at most one
# call in flight and skips intermediate updates when the listener is slow.
interface ProgressListener {
  # `done` of `total` units of `stage` (e.g. "delete": shares; "reclaim": parts scanned).
  progress @0 (stage :Text, done :UInt64, total :UInt64) -> ();
}

struct PruneOptions {
  # Root shares whose last change (`updatedAt`) is older than this many
  # milliseconds are pruned. Required (> 0); the CLI defaults to 30 days. A root
  # is a share whose parent session is not held by any share on this server.
  olderThanMs @0 :Int64;
  # Also prune the child sessions of every pruned share, transitively, found by
  # parent session id whatever their project and age. Without it children stay
  # and are listed in `PruneReport.keptChildren`.
  children @1 :Bool;
  # Only archived roots.
  archivedOnly @2 :Bool;
  dryRun @3 :Bool;
  # After deleting, run `vacuum` and report it in `PruneReport.vacuum`.
  vacuum @4 :Bool;
}

enum PruneReason {
  inactive @0;  # a root inactive past the cutoff
  child @1;     # a child (or further descendant) of a pruned share
}

struct PrunedShare {
  info @0 :ShareInfo;
  reason @1 :PruneReason;
  messages @2 :UInt64;
  parts @3 :UInt64;
  ops @4 :UInt64;           # ledger rows
  tokens @5 :UInt64;
  bytes @6 :UInt64;         # JSON of its records plus its ledger payloads
}

struct PruneTotals {
  shares @0 :UInt64;
  messages @1 :UInt64;
  parts @2 :UInt64;
  ops @3 :UInt64;
  tokens @4 :UInt64;
  bytes @5 :UInt64;
}

struct PruneReport {
  dryRun @0 :Bool;
  cutoff @1 :Int64;                 # Unix ms: roots last changed before this were selected
  shares @2 :List(PrunedShare);     # deleted (in a dry run: would be), each once
  totals @3 :PruneTotals;           # sums over `shares`
  keptChildren @4 :List(ShareInfo); # children of pruned shares left in place (without `children`)
  # Selected, but changed between planning and deleting, so left alone.
  skipped @5 :List(ShareInfo);
  vacuum @6 :VacuumReport;          # set when `vacuum` was asked for (and not a dry run)
  vacuumed @7 :Bool;
}

struct PruneResult {
  union {
    ok @0 :PruneReport;
    failure @1 :Failure;
  }
}

struct VacuumReport {
  bytesBefore @0 :UInt64;   # database file plus log, before the checkpoint
  bytesAfter @1 :UInt64;    # the same, after the vacuum and a final checkpoint
  durationMs @2 :UInt64;
}

struct VacuumResult {
  union {
    ok @0 :VacuumReport;
    failure @1 :Failure;
  }
}

struct ReclaimReport {
  dryRun @0 :Bool;
  partsScanned @1 :UInt64;  # tool parts marked compacted
  partsCleared @2 :UInt64;  # of those, ones that still held output or attachments
  bytesReclaimed @3 :UInt64; # stored JSON bytes saved (in a dry run: would be)
}

struct ReclaimResult {
  union {
    ok @0 :ReclaimReport;
    failure @1 :Failure;
  }
}

struct CompactReport {
  dryRun @0 :Bool;
  cutoff @1 :Int64;         # Unix ms: ops applied before this lost their payload
  shares @2 :UInt64;        # shares whose compaction point moved
  ops @3 :UInt64;           # ops whose payload was dropped
  bytes @4 :UInt64;         # payload bytes dropped
}

struct CompactResult {
  union {
    ok @0 :CompactReport;
    failure @1 :Failure;
  }
}

struct ShareInfoResult {
  union {
    ok @0 :ShareInfo;
    failure @1 :Failure;
  }
}

# Storage statistics. Sizes are bytes.
struct Stats {
  dbFileBytes @0 :UInt64;        # the main database file
  walFileBytes @1 :UInt64;       # the -wal file (0 if absent)
  pageSize @2 :UInt64;
  pageCount @3 :UInt64;
  freePages @4 :UInt64;          # pages on the freelist
  reclaimableBytes @5 :UInt64;   # freePages * pageSize: what an (incremental) vacuum gives back
  rootShares @6 :UInt64;         # shares whose session has no parent
  childShares @7 :UInt64;        # shares of a child (sub-agent) session
  archivedShares @8 :UInt64;     # archived shares (also counted as root or child)
  messages @9 :UInt64;
  parts @10 :UInt64;
  ledgerOps @11 :UInt64;         # applied ops kept in the ledger
  ledgerPayloadBytes @12 :UInt64; # sum of the ledger's op payload lengths
  compactedOps @13 :UInt64;      # ledger ops whose payload was dropped by compaction
  reclaimableOutputBytes @14 :UInt64; # output and attachments still stored in compacted tool parts
  engine @15 :Text;              # "sqlite" or "postgres": which of the fields above and below apply
  # PostgreSQL (the five SQLite fields above stay 0):
  databaseBytes @16 :UInt64;     # the whole database (pg_database_size), other schemas included
  tables @17 :List(TableStats);  # capsync's tables, by name
}

struct TableStats {
  name @0 :Text;
  totalBytes @1 :UInt64;         # the table with its indexes and TOAST data
  indexBytes @2 :UInt64;
  liveRows @3 :UInt64;           # PostgreSQL's estimate
  deadRows @4 :UInt64;           # deleted or updated rows autovacuum has not cleaned yet
}

struct StatsResult {
  union {
    ok @0 :Stats;
    failure @1 :Failure;
  }
}

# ---------------------------------------------------------------------------
# Agent

interface Agent {
  # Creates a share for one agent session. The writer capability is live at
  # once; the two tokens are its sturdy refs (writer, and a read-only viewer).
  # With `joinExisting`, a visible, unarchived share of `sessionId` that this
  # agent token already created is returned instead (with new tokens for it,
  # `joined` set): a client that lost the answer to an earlier call, or that
  # shares a session another client of the same agent shared (opencode's
  # built-in share client and capsync's plugin), gets the same share.
  createShare @0 (sessionId :Text, projectId :Text, parentSessionId :Text,
                  title :Text, viewerExpiresAt :Int64, joinExisting :Bool)
              -> (result :CreateShareResult);

  # The shares this agent token created, ordered by share id, paged. Archived
  # shares are left out unless `includeArchived` is set.
  listShares @1 (after :Text, limit :UInt32, includeArchived :Bool) -> (result :ShareListResult);

  # Revokes a share this agent created, without needing the share's own token.
  revokeShare @2 (shareId :Text, scope :Scope) -> (result :ShareStateResult);

  # Mints a writer token for a share this agent created, at the current writer
  # epoch: how the owner gets a writer again after revoking writers.
  mintWriter @3 (shareId :Text, expiresAt :Int64) -> (result :MintResult);

  # Mints a viewer token (a share link) for a share this agent created, at the
  # current viewer epoch.
  mintViewer @4 (shareId :Text, expiresAt :Int64) -> (result :MintResult);
}

struct CreateShareResult {
  union {
    ok @0 :CreatedShare;
    failure @1 :Failure;
  }
}

struct CreatedShare {
  writer @0 :ShareWriter;
  writerToken @1 :MintedToken;
  viewerToken @2 :MintedToken;
  info @3 :ShareInfo;
  joined @4 :Bool;   # an existing share was returned (`joinExisting`)
}

# ---------------------------------------------------------------------------
# Ops

enum OpKind {
  sessionUpsert @0;  # "session.upsert": the session record (its id must be the share's session)
  messageUpsert @1;  # "message.upsert": a message record; terminal messages do not move back
  messageRemove @2;  # "message.remove": {"id"} or {"messageID"}; removes the message and its parts for good (applied even if absent)
  partUpsert @3;     # "part.upsert": a part record; one that arrives before its message is kept until the message does
  partRemove @4;     # "part.remove": {"id"} or {"partID"}; removes the part for good (applied even if absent)
  partDelta @5;      # "part.delta": {"partID", "delta", "field"?}: appends text to a part's field (default "text")
  diffSet @6;        # "diff.set": {"diffs": [...]}, or a bare array: replaces the session's file diffs
  modelUpsert @7;    # "model.upsert": a model record with an "id"
}

struct Op {
  opId @0 :Text;              # client-chosen, unique within the share forever; at most 128 bytes
  kind @1 :OpKind;
  payload @2 :Text;           # a JSON document as the agent produces it
  dependsOn @3 :List(Text);   # op ids that must already be applied in this share
}

struct Batch {
  batchId @0 :Text;           # client-chosen; logged and audited, for tracing retries
  ops @1 :List(Op);           # applied in this order, in one transaction
  # When `hasExpectedCursor` is set and the share's cursor differs from
  # `expectedCursor`, the whole batch is refused with `cursorConflict`.
  expectedCursor @2 :UInt64;
  hasExpectedCursor @3 :Bool;
  # Pipelining (several batches in flight on one ShareWriter, in order): the id of the
  # batch sent just before this one on the same capability. This batch then applies only
  # after that one, and only if that call was this batch id and its batch applied (is
  # acked: an ack whose ops were rejected counts); otherwise it is refused whole with
  # `outOfOrder`, nothing applied, and so, in turn, is every batch naming it. So a batch
  # that fails never has the batches sent after it applied before it. The two may commit
  # together (one group commit), and then are durable, or fail, together. Empty: no
  # condition, and the batch may run alongside earlier calls. A server that honours this
  # says so at redeem (`Redeemed.ordersPipelinedBatches`).
  after @4 :Text;
}

enum RejectReason {
  missingDependency @0;  # a `dependsOn` op is not applied yet: retry after it is
  invalid @1;            # the op can never apply as sent: `detail` says why
  staleTransition @2;    # would move a record back: an older snapshot of it than the one stored
                         # (a finished message, tool call, text or reasoning part back to unfinished;
                         # a session to an older `time.updated`), or a snapshot of a removed message or
                         # part, or of a part of a removed message. See README, "Out-of-order snapshots".
  opIdReused @3;         # the op id was already applied in this share with other content (kind, payload
                         # or dependsOn); an op id names one change forever. The first op stays applied.
  tooLarge @4;           # the op's payload is over the server's per-op limit (`--max-op-bytes`);
                         # only this op is refused, the rest of the batch applies
}

struct OpResult {
  opId @0 :Text;
  union {
    applied @1 :UInt64;     # applied now, at this cursor
    duplicate @2 :UInt64;   # already in the ledger, applied at this cursor; nothing changed
    rejected @3 :Rejection;
  }
}

struct Rejection {
  reason @0 :RejectReason;
  detail @1 :Text;
}

# Sent only after the batch's transaction is durable.
struct Ack {
  cursor @0 :UInt64;           # the share's cursor after this batch
  results @1 :List(OpResult);  # one per op, in batch order
}

struct AppendResult {
  union {
    ack @0 :Ack;
    failure @1 :Failure;
  }
}

# ---------------------------------------------------------------------------
# Writers and viewers

interface ShareWriter {
  # Applies a batch exactly once per op id; see `Ack`.
  appendOps @0 (batch :Batch) -> (result :AppendResult);

  # Mints a read-only viewer token for this share (at the current viewer epoch).
  mintViewer @1 (expiresAt :Int64) -> (result :MintResult);

  # A sturdy ref to this capability: a new writer token at the same epoch and
  # with the same expiry, to redeem after a reconnect or a restart.
  save @2 () -> (result :MintResult);

  state @3 () -> (result :ShareStateResult);

  # A read-only view of the same share (attenuation: writer -> viewer), bound
  # to the current viewer epoch. Returns a capability, not a result: on a
  # revoked writer it fails with an exception whose text starts with the code.
  viewer @4 () -> (viewer :ShareViewer);
}

# A stored record of the session, as the agent last wrote it.
enum RecordKind {
  session @0;
  model @1;
  diffs @2;     # the whole diff list, as one JSON array
  message @3;
  part @4;
}

struct Record {
  kind @0 :RecordKind;
  id @1 :Text;          # record id ("" for session and diffs)
  messageId @2 :Text;   # set for parts
  json @3 :Text;
}

# One page of a snapshot: records in a fixed order (session, models, diffs,
# then each message followed by its parts, by id). Pages are bounded in bytes.
struct SnapshotPage {
  cursor @0 :UInt64;          # the share's cursor when this page was read
  records @1 :List(Record);
  nextPage @2 :Text;          # pass as `page` for the next one; "" at the end
}

struct SnapshotResult {
  union {
    ok @0 :SnapshotPage;
    failure @1 :Failure;
  }
}

# One applied op, as the ledger keeps it.
struct LoggedOp {
  cursor @0 :UInt64;
  opId @1 :Text;
  kind @2 :OpKind;
  payload @3 :Text;
  appliedAt @4 :Int64;
}

struct OpsPage {
  ops @0 :List(LoggedOp);     # cursor order, starting right after the requested cursor
  cursor @1 :UInt64;          # the share's cursor when read; more ops exist while the last op's cursor is below it
}

struct OpsResult {
  union {
    ok @0 :OpsPage;
    failure @1 :Failure;
  }
}

interface ShareViewer {
  # A page of the share's current state. Start with page = ""; if a later page
  # reports a different cursor than the first, the share changed in between:
  # start again (or use `opsSince` from the first page's cursor).
  snapshot @0 (page :Text, maxBytes :UInt32) -> (result :SnapshotResult);

  # Applied ops with cursor > `after`, at most `limit` (0 = server default).
  # `after` equal to the share's cursor gives an empty page; `after` beyond it
  # is `invalidArgument` with the share's cursor in `failure.cursor` (a client
  # that is ahead of the server is talking to another, or a restored, server).
  # Below the compaction point it is `snapshotRequired`.
  opsSince @1 (after :UInt64, limit :UInt32) -> (result :OpsResult);

  state @2 () -> (result :ShareStateResult);

  # Follows the share live: the server first sends every applied op with
  # cursor > `fromCursor`, then each op as it commits, in cursor order, with no
  # gap and no repeat, through `listener.ops`. It keeps a bounded number of
  # `ops` calls in flight per subscriber, each with a timeout: a listener that
  # falls further behind is dropped with `ended(lagged, cursor)`, so a slow
  # viewer never slows writers or other viewers. Dropping the returned
  # `Subscription` (or disconnecting) ends it; revoking viewers ends it with
  # `ended(revoked, …)`. `fromCursor` follows the same rule as `opsSince`'s
  # `after`: beyond the share's cursor is `invalidArgument` (with the cursor),
  # below the compaction point `snapshotRequired`.
  subscribe @3 (fromCursor :UInt64, listener :OpListener) -> (result :SubscribeResult);

  # Whether the agent is writing right now, and when the share last changed.
  presence @4 () -> (result :PresenceResult);
}

# A share's writer presence. Display only: nothing stored changes with it, and
# it is not persisted (after a server restart, "gone since" falls back to the
# last change).
struct Presence {
  writerConnected @0 :Bool;   # a ShareWriter capability of the share is live now
  lastChange @1 :Int64;       # when the last op was applied; 0 if none yet
  writerGoneSince @2 :Int64;  # since when no writer is connected; 0 while one is, or if unknown
  # No writer for longer than the server's `--interrupted-after`: tool calls
  # still marked running will not finish and should be shown as interrupted.
  interrupted @3 :Bool;
}

struct PresenceResult {
  union {
    ok @0 :Presence;
    failure @1 :Failure;
  }
}

# Implemented by the subscriber (a capability the viewer passes to `subscribe`).
interface OpListener {
  # The next ops, continuing right after the last cursor delivered before.
  # Returning is the acknowledgement the server's flow control counts.
  ops @0 (ops :List(LoggedOp)) -> ();

  # The subscription is over. `cursor` is the last cursor the listener
  # acknowledged: `subscribe(cursor)` resumes exactly after it.
  ended @1 (reason :EndReason, cursor :UInt64, message :Text) -> ();
}

enum EndReason {
  lagged @0;     # the listener fell too far behind (or stopped answering)
  revoked @1;    # the viewer's epoch was bumped or its token revoked or expired
  notFound @2;   # the share was deleted
  shutdown @3;   # the server is shutting down
  snapshotRequired @4;  # the ops to send next were compacted: take a snapshot and subscribe from its cursor
}

# The live subscription; it ends when this capability is dropped.
interface Subscription {}

struct SubscribeResult {
  union {
    ok @0 :Subscription;
    failure @1 :Failure;
  }
}
