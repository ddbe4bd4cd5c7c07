//! Live updates of a share as Server-Sent Events, built on [`Follower`].
//!
//! `GET /api/shares/{share}/events` with the bearer token, starting after the
//! cursor in `Last-Event-ID` (or `?after=N`, or 0). Events:
//! - `hello`: `{"cursor", "presence"}` once, first;
//! - `ops` (`id:` the cursor of its last op): `{"ops": [...]}` in cursor order,
//!   each op as in the ops API plus `html` for text parts (see [`LiveHtml`]);
//!   a reconnect with the last id seen resumes exactly after it;
//! - `presence`: whenever the writer connects, leaves, or has been gone long
//!   enough for running tool calls to count as interrupted;
//! - `revoked`: the link stopped working (revoked, expired, or the share was
//!   deleted); the stream then ends and reconnecting gets `401`;
//! - `snapshotRequired`: `{"message", "cursor"}`, the ops after the stream's
//!   cursor were compacted (it started, or fell, below the share's compaction
//!   point `cursor`); the stream then ends, and the page reads the snapshot again
//!   and follows from the snapshot's cursor.
//!
//! Nothing is buffered per stream beyond one page of ops: the stream pulls its
//! next page (from its share's feed, or the ledger when it is behind) only when
//! the connection has taken the last event. Ops from the feed come rendered
//! once for all of the share's streams; a stream renders only what it reads
//! from the ledger itself.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use capsync_shared::{Cursor, ShareId};
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::api::{self, is_interrupted};
use super::auth::{ShareReader, share_reader};
use super::error::{ApiError, snapshot_required_message};
use super::live_html::{LiveHtml, Lookup, lookups};
use super::page_data::ReadOp;
use super::{AppState, off_the_executor};
use crate::clock::Clock;
use crate::follow::{FeedOp, Follower};
use crate::ledger::{Authority, LedgerError, LedgerResult};
use crate::metrics::{GaugeGuard, SubscriberVia};
use crate::presence::last_change;

/// Most ops in one `ops` event.
const OPS_PER_EVENT: u32 = 500;
/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    pub(super) after: Option<u64>,
}

pub async fn events(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(share): Path<String>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let reader = share_reader(&app, &headers, peer, &share).await?;
    let after = start_after(&headers, &query)?;
    // The same rule as the ops API and RPC: a cursor the share never reached is an error.
    if after > reader.state.cursor.0 {
        return Err(LedgerError::CursorAhead {
            asked: Cursor(after),
            cursor: reader.state.cursor,
        }
        .into());
    }
    let permit = app
        .streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Unavailable)?;
    let last_change = last_change(&reader.state);
    let live = Live::new(app, reader, Cursor(after), last_change, permit);
    Ok(Sse::new(live.into_stream())
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// The cursor a stream starts after: `Last-Event-ID` (a reconnect), else `?after=`, else 0.
pub(super) fn start_after(headers: &HeaderMap, query: &EventsQuery) -> Result<u64, ApiError> {
    Ok(last_event_id(headers)?.or(query.after).unwrap_or(0))
}

/// `Last-Event-ID`, which this stream sets to a cursor.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let not_a_cursor =
        || ApiError::BadRequest("Last-Event-ID must be a cursor (a whole number)".into());
    // Bytes beyond ASCII are no cursor either, not a header to ignore.
    let text = value.to_str().map_err(|_| not_a_cursor())?.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| not_a_cursor())
}

/// The follower's pull in progress, owning the follower until it answers. Kept
/// across steps, so a presence change does not cancel (and repeat) a ledger read.
type NextOps = Pin<Box<dyn Future<Output = (Follower, LedgerResult<Vec<Arc<FeedOp>>>)> + Send>>;

fn next_ops(mut follower: Follower) -> NextOps {
    Box::pin(async move {
        let ops = follower.next().await;
        (follower, ops)
    })
}

/// One live stream's state, advanced one step at a time as the connection pulls.
struct Live {
    app: AppState,
    share: ShareId,
    authority: Authority,
    next_ops: NextOps,
    text: LiveHtml,
    presence: watch::Receiver<u64>,
    /// False once the presence sender is gone (shutdown): stop waiting on it.
    presence_open: bool,
    /// The presence last sent, to send only changes.
    presence_sent: Option<Value>,
    last_change: Option<i64>,
    /// Events ready to go out before the next step.
    pending: VecDeque<Event>,
    done: bool,
    /// Counts against the gateway's stream limit while the stream lives.
    _permit: OwnedSemaphorePermit,
    _subscriber: GaugeGuard,
}

impl Live {
    fn new(
        app: AppState,
        reader: ShareReader,
        after: Cursor,
        last_change: Option<i64>,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        let follower =
            Follower::new(&app.feeds, reader.authority.clone(), after, OPS_PER_EVENT).prepared();
        let mut live = Self {
            share: reader.state.share_id.clone(),
            authority: reader.authority,
            next_ops: next_ops(follower),
            text: LiveHtml::default(),
            presence: app.presence.subscribe(),
            presence_open: true,
            presence_sent: None,
            last_change,
            pending: VecDeque::new(),
            done: false,
            _permit: permit,
            _subscriber: app.metrics.subscriber(SubscriberVia::Sse),
            app,
        };
        let presence = live.presence_now();
        live.presence_sent = Some(presence_key(&presence));
        live.pending.push_back(json_event(
            "hello",
            &json!({"cursor": reader.state.cursor.0, "presence": presence}),
        ));
        live
    }

    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        futures::stream::unfold(self, |mut live| async move {
            loop {
                if let Some(event) = live.pending.pop_front() {
                    return Some((Ok(event), live));
                }
                if live.done {
                    return None;
                }
                live.step().await;
            }
        })
    }

    /// Waits for the next thing to tell the page, and queues it.
    async fn step(&mut self) {
        let deadline = self.interrupt_deadline();
        tokio::select! {
            () = self.app.shutdown.cancelled() => self.done = true,
            changed = self.presence.changed(), if self.presence_open => {
                if changed.is_err() {
                    self.presence_open = false;
                }
                self.send_presence_if_changed();
            }
            () = sleep_until_ms(self.app.presence.clock(), deadline.unwrap_or(0)), if deadline.is_some() => {
                self.send_presence_if_changed();
            }
            (follower, ops) = &mut self.next_ops => match ops {
                Ok(ops) => {
                    self.next_ops = next_ops(follower);
                    self.send_ops(ops).await;
                }
                Err(err) => self.end(err),
            },
        }
    }

    async fn send_ops(&mut self, ops: Vec<Arc<FeedOp>>) {
        let Some(last) = ops.last() else { return };
        let id = last.op.cursor.0.to_string();
        self.last_change = Some(last.op.applied_at);
        let data = match ops
            .iter()
            .map(|op| op.prepared.as_deref())
            .collect::<Option<Vec<&str>>>()
        {
            // Rendered once by the share's feed for all of its streams. The
            // stream's own memory of part texts missed these ops: it starts over.
            Some(prepared) => {
                self.text = LiveHtml::default();
                format!(r#"{{"ops":[{}]}}"#, prepared.join(","))
            }
            None => match self.render(&ops).await {
                Ok(data) => data,
                // Rendering failed (a bug, logged): the page reconnects from its
                // last event id.
                Err(_) => {
                    self.done = true;
                    return;
                }
            },
        };
        self.pending
            .push_back(Event::default().event("ops").data(data).id(id));
        self.send_presence_if_changed();
    }

    /// The data of an `ops` event rendered by this stream itself: ops it read
    /// from the ledger (catching up) or that its feed did not prepare. Parsing and
    /// rendering run on blocking threads, off the executor that serves RPC.
    async fn render(&mut self, ops: &[Arc<FeedOp>]) -> Result<String, ApiError> {
        let logged = ops.to_vec();
        let mut ops = off_the_executor(move || {
            let ops: Vec<ReadOp> = logged.iter().map(|op| ReadOp::new(&op.op)).collect();
            ops
        })
        .await?;
        let unknown = self.text.unknown_parts(&ops);
        if !unknown.is_empty() {
            match look_up_parts(&self.app, &self.authority, &unknown).await {
                Ok((found, as_of)) => self.text.learn(unknown, found, as_of),
                // Without the lookup those deltas just go without HTML; the
                // next read tells whether the authority still holds.
                Err(err) => tracing::debug!(%err, "could not look up parts for live text"),
            }
        }
        let mut text = std::mem::take(&mut self.text);
        let (text, data) = off_the_executor(move || {
            text.apply_all(&mut ops);
            let ops: Vec<Value> = ops.into_iter().map(|op| op.json).collect();
            (text, json!({"ops": ops}).to_string())
        })
        .await?;
        self.text = text;
        Ok(data)
    }

    fn end(&mut self, err: LedgerError) {
        self.done = true;
        match ending(&err) {
            Some((name, data)) => self.pending.push_back(json_event(name, &data)),
            // Shutting down: the page reconnects with its last event id.
            None if matches!(err, LedgerError::Closed) => {}
            None => tracing::warn!(%err, share = %self.share, "live stream ended"),
        }
    }

    fn presence_now(&self) -> Value {
        api::presence(&self.app, &self.share, self.last_change)
    }

    fn send_presence_if_changed(&mut self) {
        let presence = self.presence_now();
        let key = presence_key(&presence);
        if self.presence_sent.as_ref() != Some(&key) {
            self.presence_sent = Some(key);
            self.pending.push_back(json_event("presence", &presence));
        }
    }

    /// When (Unix ms) the presence changes by itself: an HTTP writer's window
    /// ends, or running tool calls count as interrupted (if they do not yet and
    /// no writer is connected).
    fn interrupt_deadline(&self) -> Option<i64> {
        let status = self.app.presence.status(&self.share);
        let now = self.app.presence.clock().now_millis();
        if let Some(until) = status.connected_until(now) {
            return Some(until);
        }
        let gone = status.gone_since(self.last_change, now)?;
        (!is_interrupted(&self.app, Some(gone), now))
            .then(|| gone.saturating_add(self.app.interrupted_after_ms()))
    }
}

/// The event (name and data) that tells the page why its stream ends, when the
/// page can do something about it; `None` for endings it just reconnects after.
fn ending(err: &LedgerError) -> Option<(&'static str, Value)> {
    match err {
        LedgerError::Revoked | LedgerError::PermissionDenied | LedgerError::NotFound => Some((
            "revoked",
            json!({"message": "This link was revoked or has expired."}),
        )),
        LedgerError::SnapshotRequired(point) => Some((
            "snapshotRequired",
            json!({"message": snapshot_required_message(*point), "cursor": point.0}),
        )),
        _ => None,
    }
}

/// The parts of a presence that are worth an event (not the clock).
fn presence_key(presence: &Value) -> Value {
    json!([
        presence["writerConnected"],
        presence["writerGoneSince"],
        presence["interrupted"]
    ])
}

async fn sleep_until_ms(clock: &Clock, at: i64) {
    let wait = at.saturating_sub(clock.now_millis()).max(0);
    // Rounded up so the deadline has surely passed on waking.
    tokio::time::sleep(Duration::from_millis(wait.unsigned_abs() + 1)).await;
}

fn json_event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The stored text of the parts in `ids` that the share holds (those a delta
/// appends to but whose upsert came before this stream), and the cursor read at.
async fn look_up_parts(
    app: &AppState,
    who: &Authority,
    ids: &[String],
) -> Result<(HashMap<String, Lookup>, Cursor), LedgerError> {
    let read = app.ledger.parts(who.clone(), ids.to_vec()).await?;
    Ok((lookups(read.parts, read.cursor), read.cursor))
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;

    use super::*;
    use crate::follow::test_share::TestShare;

    #[test]
    fn a_stream_below_the_compaction_point_ends_with_snapshot_required() {
        let (name, data) = ending(&LedgerError::SnapshotRequired(Cursor(17))).unwrap();
        assert_eq!(name, "snapshotRequired");
        assert_eq!(data["cursor"], 17);
        assert!(data["message"].as_str().unwrap().contains("17"), "{data}");
    }

    #[test]
    fn a_link_that_stopped_working_ends_with_revoked() {
        for err in [
            LedgerError::Revoked,
            LedgerError::PermissionDenied,
            LedgerError::NotFound,
        ] {
            let (name, data) = ending(&err).unwrap();
            assert_eq!(name, "revoked", "{err}");
            assert!(data.get("cursor").is_none());
        }
    }

    #[test]
    fn shutdown_and_transient_errors_end_without_an_event() {
        for err in [
            LedgerError::Closed,
            LedgerError::Busy,
            LedgerError::Storage("disk on fire".into()),
        ] {
            assert!(ending(&err).is_none(), "{err}");
        }
    }

    /// Everything a stream sends until it ends, as `(event name, data)` pairs.
    async fn events_until_the_end(live: Live) -> Vec<(String, Value)> {
        let response = Sse::new(live.into_stream()).into_response();
        let body = tokio::time::timeout(
            Duration::from_secs(10),
            to_bytes(response.into_body(), usize::MAX),
        )
        .await
        .expect("the stream did not end within 10 s")
        .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        text.split("\n\n")
            .filter(|event| !event.trim().is_empty())
            .map(|event| {
                let field = |name: &str| {
                    event
                        .lines()
                        .find_map(|line| line.strip_prefix(name))
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                };
                let data = serde_json::from_str(&field("data:")).unwrap();
                (field("event:"), data)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_stream_below_the_compaction_point_says_hello_then_snapshot_required_and_ends() {
        let mut share = TestShare::new().await;
        share.append(5).await;
        let point = share.compact().await;
        share.append(2).await;
        let app = AppState::for_tests(share.ledger.clone());
        let permit = app.streams.clone().try_acquire_owned().unwrap();
        let reader = ShareReader {
            authority: share.viewer.clone(),
            state: share.state().await,
            own_share: true,
        };
        // As resumed with `Last-Event-ID: 2`, an id from before the compaction.
        let live = Live::new(app, reader, Cursor(2), None, permit);

        let events = events_until_the_end(live).await;
        let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["hello", "snapshotRequired"]);
        assert_eq!(events[1].1["cursor"], point.0);
    }

    #[tokio::test]
    async fn a_stream_looks_up_the_parts_it_needs_under_its_own_authority() {
        use capsync_shared::{OpId, OpKind};

        use crate::ledger::{BatchIn, OpIn};

        let share = TestShare::new().await;
        let part = json!({"id": "prt_1", "messageID": "msg_1", "sessionID": "ses_1",
            "type": "text", "text": "hello"});
        let batch = BatchIn {
            batch_id: "b".into(),
            ops: vec![OpIn {
                op_id: OpId::from("p1"),
                kind: OpKind::PartUpsert,
                payload: part.to_string(),
                depends_on: Vec::new(),
            }],
            expected_cursor: None,
            follows: None,
            link: None,
        };
        share
            .ledger
            .append(share.writer.clone(), batch)
            .await
            .unwrap();
        let app = AppState::for_tests(share.ledger.clone());
        let ids = ["prt_1".to_owned(), "prt_none".to_owned()];

        let (found, as_of) = look_up_parts(&app, &share.viewer, &ids).await.unwrap();
        assert_eq!(as_of, Cursor(1));
        assert_eq!(found.len(), 1, "an unknown part is not found");
        assert_eq!(found["prt_1"].message_id, "msg_1");
        assert_eq!(found["prt_1"].part["text"], "hello");

        share.revoke_viewers().await;
        let refused = look_up_parts(&app, &share.viewer, &ids).await;
        assert!(matches!(refused, Err(LedgerError::Revoked)), "{refused:?}");
    }
}
