//! Following a share live ([`ViewerClient::subscribe`](crate::ViewerClient::subscribe)):
//! [`LiveOps`], fed by an `OpListener` capability this library implements and passes to
//! the server.
//!
//! Flow control: the server keeps a bounded window of `ops` calls in flight, and a call
//! counts as acknowledged when it returns. The listener returns only once the page is
//! queued here with fewer than [`QUEUED_PAGES`] pages ahead of it, so a consumer that
//! stops calling [`LiveOps::next`] soon stops the server from sending (and, after the
//! server's timeout, is dropped with [`EndReason::Lagged`]). Memory stays bounded by the
//! server's window whatever the consumer does.
//!
//! Pages are put in cursor order here, not in the order their calls happened to be
//! dispatched, so [`LiveOps`] yields ops strictly in cursor order with no repeat.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use capsync_shared::capsync_capnp::{
    EndReason as WireEndReason, op_listener, share_viewer, subscribe_result, subscription,
};
use serde::Serialize;
use tokio::sync::Notify;

use crate::error::ClientError;
use crate::types::LoggedOp;
use crate::wire::{self, ok_or_fail};

/// Pages that may wait in the queue ahead of an `ops` call before the call returns.
pub const QUEUED_PAGES: usize = 2;

/// Why a subscription ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EndReason {
    /// The listener fell too far behind (or a call to it failed): subscribe again from
    /// the cursor.
    Lagged,
    /// The viewer was revoked or its token expired or was revoked: following is over
    /// until the owner mints a new link.
    Revoked,
    /// The share was deleted.
    NotFound,
    /// The server is shutting down: reconnect later and subscribe again from the cursor.
    Shutdown,
    /// The ops after the cursor were compacted away: take a snapshot and subscribe
    /// again from its cursor.
    SnapshotRequired,
    /// The connection was lost without a word from the server (or the server released
    /// the listener without saying why): reconnect and subscribe again from the cursor.
    Disconnected,
}

impl EndReason {
    /// Whether subscribing again (after reconnecting, for `Shutdown` and `Disconnected`)
    /// can continue: false for `Revoked` and `NotFound`.
    pub fn is_resumable(self) -> bool {
        !matches!(self, Self::Revoked | Self::NotFound)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lagged => "lagged",
            Self::Revoked => "revoked",
            Self::NotFound => "notFound",
            Self::Shutdown => "shutdown",
            Self::SnapshotRequired => "snapshotRequired",
            Self::Disconnected => "disconnected",
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<WireEndReason> for EndReason {
    fn from(reason: WireEndReason) -> Self {
        match reason {
            WireEndReason::Lagged => Self::Lagged,
            WireEndReason::Revoked => Self::Revoked,
            WireEndReason::NotFound => Self::NotFound,
            WireEndReason::Shutdown => Self::Shutdown,
            WireEndReason::SnapshotRequired => Self::SnapshotRequired,
        }
    }
}

/// The end of a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ended {
    pub reason: EndReason,
    /// The cursor of the last op [`LiveOps`] yielded (or the starting cursor):
    /// `subscribe(cursor)` continues exactly after it.
    pub cursor: u64,
    /// The server's explanation, for people; empty for `Disconnected`.
    pub message: String,
}

/// What [`LiveOps::next`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEvent {
    /// The next ops, in cursor order, continuing right after the previous ones.
    Ops(Vec<LoggedOp>),
    /// The subscription is over; [`LiveOps::next`] returns `None` from now on.
    Ended(Ended),
}

/// A live subscription to a share's ops. Dropping it ends the subscription on the server.
///
/// Must stay on the `LocalSet` of the connection it came from.
pub struct LiveOps {
    shared: Rc<Shared>,
    /// The server-side subscription lives exactly as long as this capability is held.
    _subscription: subscription::Client,
    /// Set once `Ended` was yielded.
    finished: bool,
}

impl std::fmt::Debug for LiveOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveOps")
            .field("cursor", &self.cursor())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl LiveOps {
    /// The cursor of the last op yielded, or the cursor subscribed from.
    pub fn cursor(&self) -> u64 {
        self.shared.inbox.borrow().taken
    }

    /// The next event: ops in cursor order, then once `Ended`, then `None`.
    pub async fn next(&mut self) -> Option<LiveEvent> {
        if self.finished {
            return None;
        }
        loop {
            let notified = self.shared.to_consumer.notified();
            if let Some(event) = self.shared.inbox.borrow_mut().take() {
                match event {
                    LiveEvent::Ops(_) => self.shared.to_listener.notify_waiters(),
                    LiveEvent::Ended(_) => self.finished = true,
                }
                return Some(event);
            }
            notified.await;
        }
    }
}

impl Drop for LiveOps {
    fn drop(&mut self) {
        // Calls waiting for room fail, so the server stops at once even if it still
        // holds the subscription for a moment.
        self.shared.inbox.borrow_mut().consumer_gone = true;
        self.shared.to_listener.notify_waiters();
    }
}

/// What the listener and [`LiveOps`] share.
struct Shared {
    inbox: RefCell<Inbox>,
    /// Wakes [`LiveOps::next`] (one consumer: a stored permit is never lost).
    to_consumer: Notify,
    /// Wakes `ops` calls waiting for room in the queue.
    to_listener: Notify,
}

struct Inbox {
    /// Pages received and not yet taken, by the cursor of their first op.
    pages: BTreeMap<u64, Vec<LoggedOp>>,
    /// The cursor of the last op taken by the consumer (starts at the subscribed cursor).
    taken: u64,
    /// What the server said in `ended`.
    ended: Option<(EndReason, String)>,
    /// The server released the listener (the subscription is over, or the connection is gone).
    listener_gone: bool,
    /// The [`LiveOps`] was dropped.
    consumer_gone: bool,
}

impl Inbox {
    /// The next event in cursor order, if one is ready.
    fn take(&mut self) -> Option<LiveEvent> {
        while let Some(entry) = self.pages.first_entry() {
            if *entry.key() > self.taken + 1 {
                // A gap: the page in between has not arrived (yet).
                break;
            }
            let taken = self.taken;
            let ops: Vec<LoggedOp> = entry
                .remove()
                .into_iter()
                .filter(|op| op.cursor.0 > taken)
                .collect();
            if let Some(last) = ops.last() {
                self.taken = last.cursor.0;
                return Some(LiveEvent::Ops(ops));
            }
        }
        let (reason, message) = match self.ended.take() {
            Some(ended) => ended,
            None if self.listener_gone => (EndReason::Disconnected, String::new()),
            None => return None,
        };
        // Pages past a gap can never be yielded in order: the resume cursor covers them.
        self.pages.clear();
        Some(LiveEvent::Ended(Ended {
            reason,
            cursor: self.taken,
            message,
        }))
    }

    /// Pages waiting ahead of the one starting at `first`.
    fn ahead_of(&self, first: u64) -> usize {
        self.pages.range(..first).count()
    }
}

/// The `OpListener` the server calls.
struct Listener {
    shared: Rc<Shared>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shared.inbox.borrow_mut().listener_gone = true;
        self.shared.to_consumer.notify_one();
    }
}

impl op_listener::Server for Listener {
    async fn ops(
        self: Rc<Self>,
        params: op_listener::OpsParams,
        _results: op_listener::OpsResults,
    ) -> Result<(), capnp::Error> {
        let ops = wire::logged_ops(params.get()?.get_ops()?).map_err(to_capnp)?;
        let Some(first) = ops.first().map(|op| op.cursor.0) else {
            return Ok(());
        };
        {
            let mut inbox = self.shared.inbox.borrow_mut();
            if inbox.consumer_gone {
                return Err(gone());
            }
            if ops.last().is_some_and(|op| op.cursor.0 > inbox.taken) {
                inbox.pages.insert(first, ops);
            }
        }
        self.shared.to_consumer.notify_one();
        // Returning is the acknowledgement: hold it while the queue ahead is full.
        loop {
            let notified = self.shared.to_listener.notified();
            {
                let inbox = self.shared.inbox.borrow();
                if inbox.consumer_gone {
                    return Err(gone());
                }
                if inbox.ahead_of(first) < QUEUED_PAGES {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    async fn ended(
        self: Rc<Self>,
        params: op_listener::EndedParams,
        _results: op_listener::EndedResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        // An unknown reason from a newer server: resubscribing is the safe reading.
        let reason = p.get_reason().map_or(EndReason::Lagged, EndReason::from);
        let message = wire::text(p.get_message()).unwrap_or_default();
        let mut inbox = self.shared.inbox.borrow_mut();
        if inbox.ended.is_none() {
            inbox.ended = Some((reason, message));
        }
        drop(inbox);
        self.shared.to_consumer.notify_one();
        Ok(())
    }
}

fn gone() -> capnp::Error {
    capnp::Error::disconnected("the subscriber stopped listening".into())
}

fn to_capnp(err: ClientError) -> capnp::Error {
    match err {
        ClientError::Rpc(err) => err,
        other => capnp::Error::failed(other.to_string()),
    }
}

/// Sends `subscribe` on `viewer` with a fresh listener.
pub(crate) async fn subscribe(
    viewer: &share_viewer::Client,
    from_cursor: u64,
) -> Result<LiveOps, ClientError> {
    let shared = Rc::new(Shared {
        inbox: RefCell::new(Inbox {
            pages: BTreeMap::new(),
            taken: from_cursor,
            ended: None,
            listener_gone: false,
            consumer_gone: false,
        }),
        to_consumer: Notify::new(),
        to_listener: Notify::new(),
    });
    let listener: op_listener::Client = capnp_rpc::new_client(Listener {
        shared: shared.clone(),
    });
    let mut request = viewer.subscribe_request();
    request.get().set_from_cursor(from_cursor);
    request.get().set_listener(listener);
    let response = request.send().promise.await?;
    let subscription = ok_or_fail!(subscribe_result, response.get()?.get_result()?);
    Ok(LiveOps {
        shared,
        _subscription: subscription,
        finished: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsync_shared::ops::OpKind;

    fn op(cursor: u64) -> LoggedOp {
        LoggedOp {
            cursor: capsync_shared::Cursor(cursor),
            op_id: format!("op{cursor}").into(),
            kind: OpKind::PartDelta,
            payload: "{}".into(),
            applied_at: 0,
        }
    }

    fn inbox(taken: u64) -> Inbox {
        Inbox {
            pages: BTreeMap::new(),
            taken,
            ended: None,
            listener_gone: false,
            consumer_gone: false,
        }
    }

    fn cursors(event: Option<LiveEvent>) -> Vec<u64> {
        match event {
            Some(LiveEvent::Ops(ops)) => ops.iter().map(|op| op.cursor.0).collect(),
            other => panic!("expected ops, got {other:?}"),
        }
    }

    #[test]
    fn pages_come_out_in_cursor_order_without_repeats() {
        let mut inbox = inbox(2);
        inbox.pages.insert(5, vec![op(5), op(6)]);
        assert_eq!(inbox.take(), None, "3 and 4 have not arrived");
        inbox.pages.insert(1, vec![op(1), op(2), op(3), op(4)]);
        assert_eq!(cursors(inbox.take()), vec![3, 4]);
        assert_eq!(cursors(inbox.take()), vec![5, 6]);
        assert_eq!(inbox.take(), None);
        assert_eq!(inbox.taken, 6);
    }

    #[test]
    fn the_end_comes_after_the_ops_in_order_and_drops_pages_past_a_gap() {
        let mut inbox = inbox(0);
        inbox.pages.insert(1, vec![op(1)]);
        inbox.pages.insert(3, vec![op(3)]);
        inbox.ended = Some((EndReason::Lagged, "slow".into()));
        assert_eq!(cursors(inbox.take()), vec![1]);
        assert_eq!(
            inbox.take(),
            Some(LiveEvent::Ended(Ended {
                reason: EndReason::Lagged,
                cursor: 1,
                message: "slow".into()
            }))
        );
        assert!(inbox.pages.is_empty());
    }

    #[test]
    fn a_released_listener_without_a_word_is_a_disconnect() {
        let mut inbox = inbox(7);
        inbox.listener_gone = true;
        match inbox.take() {
            Some(LiveEvent::Ended(ended)) => {
                assert_eq!(ended.reason, EndReason::Disconnected);
                assert_eq!(ended.cursor, 7);
            }
            other => panic!("{other:?}"),
        }
    }
}
