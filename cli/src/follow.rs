//! `capsync follow`: print a share as it happens (the snapshot, then each op as it
//! commits), reconnecting and resuming after a dropped connection without printing
//! anything twice or skipping anything.

use std::time::Duration;

use capsync_shared::{ErrorCode, TokenKind};
use serde_json::Value;

use super::link_status::LinkStatus;
use super::live_text::LiveText;
use super::output::Output;
use super::render;
use super::{Global, finish};
use capsync_client::connection::Connection;
use capsync_client::error::ClientError;
use capsync_client::resume::Rebased;
use capsync_client::subscribe::{EndReason, LiveEvent};
use capsync_client::syncer::backoff::Backoff;
use capsync_client::viewer::{LoggedOp, ViewerClient};

/// First wait after a failure; doubles up to [`BACKOFF_MAX`] (with jitter).
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Print a share as it happens, until interrupted (viewer or writer token)
///
/// First the current state, as `capsync snapshot` prints it, then each change as the
/// agent makes it: new messages, tool calls as their status changes, and text as it
/// streams in. When the connection drops, the server restarts or this viewer falls
/// behind, it reconnects (backing off up to 5s, or longer when the server asks) and
/// continues right after the last op it printed: nothing is printed twice or skipped.
/// Meanwhile stderr says "connection lost: ...; retrying" once, and "reconnected after
/// N attempts (Xs)" when it is back (on a terminal: one line, redrawn with each attempt;
/// with --json: nothing). Connecting and reading the snapshot are bounded by
/// --connect-timeout and --call-timeout; waiting for the next change is not. When the
/// ops it needs next were compacted on the server (`capsync admin compact`), it says so
/// on stderr, takes a new snapshot and continues from it, printing only what changed in
/// between. A revoked link or a deleted share ends it with exit code 1.
///
/// With --json: JSON Lines. The first line is the snapshot document (as `capsync snapshot
/// --json` prints it), then one line per op: {"cursor", "opId", "kind", "payload",
/// "appliedAt"}. With --after there is no snapshot line, and the output is an ops file
/// that `capsync push` accepts (into another share, say). After compacted ops, the new
/// snapshot document is a line of its own (it has no "opId"), and ops continue after it.
///
/// Examples:
///   CAPSYNC_TOKEN=$VIEWER capsync follow
///   capsync follow --token-file viewer.token --after 120 --json > ops.jsonl
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct FollowArgs {
    /// The viewer (or writer) token, if not given by --token, --token-file or
    /// CAPSYNC_TOKEN (those are safer: arguments show up in `ps`)
    #[arg(value_name = "TOKEN")]
    pub token: Option<String>,
    /// Skip the snapshot: print the ops after this cursor, then follow
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<u64>,
    /// Exit (code 0) once the op at this cursor has been printed
    #[arg(long, value_name = "CURSOR")]
    pub until: Option<u64>,
}

pub async fn run(global: &Global, out: &Output, args: &FollowArgs) -> Result<u8, ClientError> {
    const KINDS: [TokenKind; 2] = [TokenKind::Viewer, TokenKind::Writer];
    let token = match &args.token {
        Some(token) => super::check_token(token.trim().to_owned(), &KINDS)?,
        None => global.token(&KINDS)?,
    };
    let mut follow = Follow {
        out,
        text: (!out.is_json()).then(LiveText::default),
        cursor: args.after,
        until: args.until,
        backoff: Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX),
        link: LinkStatus::new(out),
    };
    loop {
        let stop = follow.connection(global, &token).await;
        follow.end_line()?;
        let (why, retry_after) = match stop {
            Stop::Done => {
                follow.link.close();
                return Ok(super::EXIT_OK);
            }
            Stop::Fatal(error) => {
                follow.link.close();
                // Reported here so that with --json it stays one line of the stream.
                out.error_line(&error);
                return Ok(super::EXIT_ERROR);
            }
            Stop::Lagged => (LAGGED.to_owned(), None),
            Stop::SnapshotRequired => (COMPACTED.to_owned(), None),
            Stop::Retry { why, retry_after } => (why, retry_after),
        };
        let delay = follow.backoff.next_delay(retry_after);
        follow.link.failed(&why, delay);
        tokio::time::sleep(delay).await;
    }
}

/// What is said when the server drops this viewer for falling behind.
const LAGGED: &str = "this viewer fell behind the share";

/// What is said when a subscription ends because the ops it would send next were compacted.
const COMPACTED: &str = "the ops to follow were compacted";

/// Why one connection's work ended.
#[derive(Debug)]
enum Stop {
    /// `--until` was reached.
    Done,
    /// Nothing will get better by retrying: report it, exit 1.
    Fatal(ClientError),
    /// The server dropped this viewer for falling behind: the connection is fine, so
    /// subscribe again on it (after a pause, in case this machine is the slow part).
    Lagged,
    /// The subscription reached ops that were compacted: subscribe again on the same
    /// connection, which takes a new snapshot.
    SnapshotRequired,
    /// Back off (at least `retry_after`, the server's hint, if it gave one), reconnect and
    /// continue from the cursor.
    Retry {
        why: String,
        retry_after: Option<Duration>,
    },
}

impl Stop {
    fn retry(why: impl Into<String>) -> Self {
        Self::Retry {
            why: why.into(),
            retry_after: None,
        }
    }
}

impl From<ClientError> for Stop {
    fn from(error: ClientError) -> Self {
        let retry = match &error {
            // `snapshotRequired` gets here only when compaction overtook every new
            // snapshot: starting over later can still succeed.
            ClientError::Remote { code, .. } => matches!(
                code,
                ErrorCode::Overloaded
                    | ErrorCode::RateLimited
                    | ErrorCode::StorageFull
                    | ErrorCode::Internal
                    | ErrorCode::SnapshotRequired
            ),
            ClientError::Rpc(e) => e.kind != capnp::ErrorKind::Unimplemented,
            ClientError::Connect { .. }
            | ClientError::Timeout { .. }
            | ClientError::Io(_)
            | ClientError::SnapshotUnstable { .. } => true,
            // What listens at the address will not turn into a capsync server.
            ClientError::NotCapsync { .. }
            | ClientError::WrongKind { .. }
            | ClientError::InvalidInput(_)
            | ClientError::Outbox { .. }
            | ClientError::Sync(_) => false,
        };
        if retry {
            Self::Retry {
                why: error.to_string(),
                retry_after: error.retry_after(),
            }
        } else {
            Self::Fatal(error)
        }
    }
}

/// The state that survives reconnects.
struct Follow<'a> {
    out: &'a Output,
    /// Readable output; `None` with `--json`.
    text: Option<LiveText>,
    /// The last op printed (or the snapshot's cursor); `None` before the snapshot.
    cursor: Option<u64>,
    until: Option<u64>,
    backoff: Backoff,
    /// Says on stderr when the connection is lost and when it is back.
    link: LinkStatus<'a>,
}

impl Follow<'_> {
    /// Connects, redeems, and follows until something stops it.
    async fn connection(&mut self, global: &Global, token: &str) -> Stop {
        let conn = match global.connect().await {
            Ok(conn) => conn,
            Err(error) => return error.into(),
        };
        let stop = self.follow_on(global, &conn, token).await;
        finish(conn).await;
        stop
    }

    async fn follow_on(&mut self, global: &Global, conn: &Connection, token: &str) -> Stop {
        let viewer = match conn.redeem(token).await.and_then(|r| r.into_reader()) {
            Ok(viewer) => viewer,
            Err(error) => return error.into(),
        };
        let cursor = match self.cursor {
            Some(cursor) => cursor,
            None => match self.snapshot(global, conn, &viewer).await {
                Ok(cursor) => {
                    // The share is on screen: following has begun, so a loss from here
                    // on is a lost connection, even before the subscription is made.
                    self.link.connected();
                    cursor
                }
                Err(stop) => return stop,
            },
        };
        if self.until.is_some_and(|until| cursor >= until) {
            return Stop::Done;
        }
        self.backoff.reset();
        loop {
            let before = self.cursor;
            match self.subscription(global, conn, &viewer).await {
                // Subscribing again takes the new snapshot; only a subscription that
                // got nowhere waits first, so a server that keeps ending this way is
                // not asked again and again at once.
                Stop::SnapshotRequired if self.cursor != before => {}
                Stop::SnapshotRequired => {
                    let delay = self.backoff.next_delay(None);
                    self.end_line_quietly();
                    self.out.note(format!(
                        "{COMPACTED}; resubscribing in {:.1}s",
                        delay.as_secs_f64()
                    ));
                    tokio::time::sleep(delay).await;
                }
                Stop::Lagged => {
                    let delay = self.backoff.next_delay(None);
                    self.end_line_quietly();
                    self.out.note(format!(
                        "{LAGGED}; resubscribing in {:.1}s",
                        delay.as_secs_f64()
                    ));
                    tokio::time::sleep(delay).await;
                }
                stop => return stop,
            }
        }
    }

    /// Reads and prints the snapshot; returns its cursor.
    async fn snapshot(
        &mut self,
        global: &Global,
        conn: &Connection,
        viewer: &ViewerClient,
    ) -> Result<u64, Stop> {
        let snapshot = global.call(conn, viewer.snapshot()).await?;
        let document = snapshot.to_document();
        let text = match &mut self.text {
            Some(live) => {
                let text = render::document_text(&document, viewer.share_id());
                *live = LiveText::from_snapshot(document);
                text
            }
            None => json_line(&document),
        };
        self.print(&text)?;
        self.cursor = Some(snapshot.cursor);
        Ok(snapshot.cursor)
    }

    /// One subscription from the cursor (or from a new snapshot, when the ops after
    /// the cursor were compacted), until it ends.
    async fn subscription(
        &mut self,
        global: &Global,
        conn: &Connection,
        viewer: &ViewerClient,
    ) -> Stop {
        let from = self.cursor.unwrap_or(0);
        let resumed = match global.call(conn, viewer.resume(from)).await {
            Ok(resumed) => resumed,
            Err(error) => return error.into(),
        };
        // Subscribed: following works, whatever comes next.
        self.link.connected();
        let mut live = resumed.live;
        if let Some(rebased) = resumed.rebased {
            if let Err(stop) = self.rebase(rebased) {
                return stop;
            }
            if self.until.is_some_and(|until| live.cursor() >= until) {
                return Stop::Done;
            }
        }
        while let Some(event) = live.next().await {
            match event {
                LiveEvent::Ops(ops) => {
                    self.backoff.reset();
                    for op in &ops {
                        match self.op(op) {
                            Ok(true) => return Stop::Done,
                            Ok(false) => {}
                            Err(stop) => return stop,
                        }
                    }
                }
                LiveEvent::Ended(ended) => {
                    return match ended.reason {
                        EndReason::Lagged => Stop::Lagged,
                        EndReason::Revoked => Stop::Fatal(ClientError::Remote {
                            code: ErrorCode::Revoked,
                            message: ended.message,
                            cursor: 0,
                            retry_after: None,
                        }),
                        EndReason::NotFound => Stop::Fatal(ClientError::Remote {
                            code: ErrorCode::NotFound,
                            message: ended.message,
                            cursor: 0,
                            retry_after: None,
                        }),
                        EndReason::SnapshotRequired => Stop::SnapshotRequired,
                        EndReason::Shutdown => Stop::retry("the server is shutting down"),
                        EndReason::Disconnected => Stop::retry("disconnected from the server"),
                    };
                }
            }
        }
        Stop::retry("the subscription ended")
    }

    /// Continues from a new snapshot after the ops before it were compacted: says so,
    /// then prints what changed since the last op printed (with `--json`, the new
    /// snapshot document as a line of its own).
    fn rebase(&mut self, rebased: Rebased) -> Result<(), Stop> {
        self.end_line().map_err(Stop::Fatal)?;
        self.out.note(compacted_note(rebased.compacted_up_to));
        let cursor = rebased.snapshot.cursor;
        let document = rebased.snapshot.to_document();
        let text = match &mut self.text {
            Some(live) => live.rebase(document),
            None => json_line(&document),
        };
        self.print(&text)?;
        self.cursor = Some(cursor);
        Ok(())
    }

    /// Prints one op unless it was printed before; `Ok(true)` once `--until` is reached.
    fn op(&mut self, op: &LoggedOp) -> Result<bool, Stop> {
        let cursor = self.cursor.unwrap_or(0);
        if op.cursor.0 <= cursor {
            return Ok(false);
        }
        if op.cursor.0 != cursor + 1 {
            // Cursors have no gaps, so the server skipped something: ask again from here.
            return Err(Stop::retry(format!(
                "expected the op at cursor {} but got {}",
                cursor + 1,
                op.cursor
            )));
        }
        let text = match &mut self.text {
            Some(live) => live.op(op),
            None => json_line(&op_json(op)),
        };
        self.print(&text)?;
        self.cursor = Some(op.cursor.0);
        Ok(self.until.is_some_and(|until| op.cursor.0 >= until))
    }

    fn print(&self, text: &str) -> Result<(), Stop> {
        self.out
            .text(text)
            .map_err(|e| Stop::Fatal(ClientError::Io(e)))
    }

    /// [`Follow::end_line`] where a failure to print is noticed by the next print anyway.
    fn end_line_quietly(&mut self) {
        let _ = self.end_line();
    }

    /// Ends a line left open by streamed text, before anything else is said.
    fn end_line(&mut self) -> Result<(), ClientError> {
        if let Some(live) = &mut self.text {
            let mut text = String::new();
            live.close(&mut text);
            self.out.text(&text)?;
        }
        Ok(())
    }
}

/// The note on stderr when following continues from a new snapshot.
fn compacted_note(compacted_up_to: u64) -> String {
    format!("ops up to cursor {compacted_up_to} were compacted; continuing from a new snapshot")
}

fn json_line<T: serde::Serialize>(value: &T) -> String {
    let mut line = serde_json::to_string(value).unwrap_or_else(|e| {
        serde_json::json!({"error": {"code": "internal", "message": e.to_string()}}).to_string()
    });
    line.push('\n');
    line
}

/// An op as a JSON line: the ops-file form (payload as JSON) plus its cursor and time.
fn op_json(op: &LoggedOp) -> Value {
    let payload =
        serde_json::from_str(&op.payload).unwrap_or_else(|_| Value::String(op.payload.clone()));
    serde_json::json!({
        "cursor": op.cursor,
        "opId": op.op_id,
        "kind": op.kind,
        "payload": payload,
        "appliedAt": op.applied_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsync_shared::ops::OpKind;
    use serde_json::json;

    #[test]
    fn json_op_lines_are_an_ops_file() {
        let op = LoggedOp {
            cursor: capsync_shared::Cursor(7),
            op_id: "o7".into(),
            kind: OpKind::PartDelta,
            payload: json!({"partID": "p", "delta": "x"}).to_string(),
            applied_at: 5,
        };
        let line = json_line(&op_json(&op));
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap(),
            json!({"cursor": 7, "opId": "o7", "kind": "part.delta", "payload": {"partID": "p", "delta": "x"}, "appliedAt": 5})
        );
        let ops = capsync_client::parse_ops(&format!("{line}{line}")).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].op_id, "o7");
        assert_eq!(ops[0].kind, OpKind::PartDelta);
    }
}
