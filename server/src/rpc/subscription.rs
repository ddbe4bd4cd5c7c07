//! Live subscriptions (`ShareViewer.subscribe`): one task per subscriber on the
//! `LocalSet` that pulls ops from a [`Follower`] and pushes them to the
//! subscriber's `OpListener`.
//!
//! Flow control is the listener's answers: at most `window` `ops` calls are
//! unanswered at any time, and while the window is full the task neither reads
//! the ledger nor buffers more than the one page it already holds. So a slow or
//! stalled listener costs the server a bounded amount of memory and nothing
//! else: writers and other subscribers never wait for it (the share's feed
//! keeps its latest ops for every follower, and each pulls at its own pace).
//!
//! A call unanswered for `timeout`, or a call that fails, ends the subscription
//! with `ended(lagged, cursor)`, where `cursor` is the last op the listener
//! acknowledged: `subscribe(cursor)` resumes exactly after it. The ledger
//! refusing the viewer ends it with `revoked` or `notFound`, ledger compaction
//! overtaking it with `snapshotRequired`, server shutdown with `shutdown`.
//! Dropping the `Subscription` capability (or the connection that holds it)
//! aborts the task at once, without a goodbye.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capsync_shared::Cursor;
use capsync_shared::capsync_capnp::{EndReason, op_listener, subscription};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::context::{Context, SubscriptionGuard};
use super::wire;
use crate::follow::{FeedOp, Follower};
use crate::ledger::{Authority, LedgerError};

/// Most ops per `ops` call. With the default window of 8 a subscriber holds at
/// most 8 × 256 ops (plus one page read ahead) of the server's memory.
pub const PAGE: u32 = 256;

/// The `Subscription` capability: the task lives exactly as long as the
/// subscriber holds this (or until the task ends by itself).
struct SubscriptionImpl {
    /// Aborts the task when the subscriber lets go.
    task: AbortHandle,
}

impl subscription::Server for SubscriptionImpl {}

impl Drop for SubscriptionImpl {
    fn drop(&mut self) {
        // Aborting drops the in-flight calls (the peer gets a Finish for each)
        // and the listener capability; a finished task ignores it.
        self.task.abort();
    }
}

/// Starts following the share of `auth` from after `from`, pushing to
/// `listener`; returns the handle whose drop ends it.
pub fn start(
    ctx: &Rc<Context>,
    guard: SubscriptionGuard,
    auth: Authority,
    from: Cursor,
    listener: op_listener::Client,
) -> subscription::Client {
    let follower = Follower::new(&ctx.feeds, auth, from, PAGE);
    let limits = Limits {
        window: ctx.subscriber_window.max(1),
        timeout: ctx.subscriber_timeout,
    };
    let task = tokio::task::spawn_local(run(follower, listener, limits, guard));
    capnp_rpc::new_client(SubscriptionImpl {
        task: task.abort_handle(),
    })
}

/// The per-subscriber bounds.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Most `ops` calls unanswered at once.
    window: usize,
    /// How long one call may stay unanswered.
    timeout: Duration,
}

/// Why a subscription ended, as sent in `ended`.
#[derive(Debug)]
struct End {
    reason: EndReason,
    message: String,
}

impl End {
    fn new(reason: EndReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// The ledger refused to read on: what the subscriber is told.
    fn from_ledger(err: LedgerError) -> Self {
        match err {
            // An expired token reads as PermissionDenied: to a subscriber it is
            // the same as a revoked one, its link no longer works.
            LedgerError::Revoked | LedgerError::PermissionDenied => Self::new(
                EndReason::Revoked,
                "this viewer was revoked (or its token expired); the share's owner can mint a new link",
            ),
            LedgerError::NotFound => Self::new(EndReason::NotFound, "the share was deleted"),
            LedgerError::Closed => Self::new(EndReason::Shutdown, "the server is shutting down"),
            // Compaction overtook a subscriber that was behind: the ops it needs
            // next have no payload any more, and a gap must never pass silently.
            LedgerError::SnapshotRequired(point) => Self::new(
                EndReason::SnapshotRequired,
                format!(
                    "ops up to cursor {point} were compacted; take a snapshot and subscribe from its cursor"
                ),
            ),
            // Transient (busy) or internal: the subscriber can resubscribe from its
            // cursor, which is what `lagged` asks of it.
            other => {
                warn!(error = %other, "subscription could not read the ledger; ending it as lagged");
                Self::new(
                    EndReason::Lagged,
                    "the server could not read the share; subscribe again from the cursor",
                )
            }
        }
    }
}

/// How one `ops` call ended, other than acknowledged.
#[derive(Debug)]
enum CallFailed {
    TimedOut,
    Failed(capnp::Error),
}

/// The task: push until something ends it, then say why (best effort).
async fn run(
    follower: Follower,
    listener: op_listener::Client,
    limits: Limits,
    mut guard: SubscriptionGuard,
) {
    let mut acked = follower.cursor();
    let end = push(follower, &listener, limits, &mut guard, &mut acked).await;
    debug!(reason = ?end.reason, cursor = acked.0, "subscription ended");
    let mut request = listener.ended_request();
    {
        let mut params = request.get();
        params.set_reason(end.reason);
        params.set_cursor(acked.0);
        params.set_message(end.message.as_str());
    }
    // Bounded like any other call, so a stalled listener cannot hold up
    // shutdown (which waits for this task) for longer than the timeout.
    let _ = tokio::time::timeout(limits.timeout, request.send().promise).await;
    drop(guard);
}

/// Sends pages as the window allows. Returns why it stopped; `acked` is the
/// cursor of the last op the listener acknowledged.
async fn push(
    follower: Follower,
    listener: &op_listener::Client,
    limits: Limits,
    guard: &mut SubscriptionGuard,
    acked: &mut Cursor,
) -> End {
    // A stream keeps a read (or a wait for the next commit) in progress across
    // loop turns: the select below may poll it many times before it yields.
    let pages = futures::stream::unfold(follower, |mut follower| async move {
        let page = follower.next().await;
        Some((page, follower))
    });
    let mut pages = std::pin::pin!(pages);
    // The next page to send, read ahead while calls are in flight.
    let mut ready: Option<Vec<Arc<FeedOp>>> = None;
    // Unanswered calls, oldest first; each resolves to the cursor it acknowledges.
    let mut in_flight = FuturesOrdered::new();
    loop {
        if in_flight.len() < limits.window
            && let Some(ops) = ready.take()
        {
            in_flight.push_back(send_ops(listener, &ops, limits.timeout));
            continue;
        }
        tokio::select! {
            // Shutdown first, so a busy subscription still ends promptly.
            biased;
            _ = guard.shutting_down.wait_for(|shutting_down| *shutting_down) => {
                return End::new(EndReason::Shutdown, "the server is shutting down");
            }
            Some(answer) = in_flight.next() => match answer {
                Ok(cursor) => *acked = cursor,
                Err(CallFailed::TimedOut) => {
                    return End::new(
                        EndReason::Lagged,
                        format!(
                            "an ops call went unanswered for {:?}; subscribe again from the cursor",
                            limits.timeout
                        ),
                    );
                }
                Err(CallFailed::Failed(err)) => {
                    debug!(%err, "ops call failed");
                    return End::new(
                        EndReason::Lagged,
                        "an ops call failed; subscribe again from the cursor",
                    );
                }
            },
            page = pages.next(), if ready.is_none() => match page {
                Some(Ok(ops)) => ready = Some(ops),
                Some(Err(err)) => return End::from_ledger(err),
                None => unreachable!("the follower stream never ends"),
            },
        }
    }
}

/// Sends one `ops` call now; the future resolves to the cursor of its last op
/// once answered, or fails after `timeout`.
fn send_ops(
    listener: &op_listener::Client,
    ops: &[Arc<FeedOp>],
    timeout: Duration,
) -> impl Future<Output = Result<Cursor, CallFailed>> + use<> {
    let last = ops.last().map_or(Cursor(0), |op| op.op.cursor);
    let mut request = listener.ops_request();
    let logged = ops.iter().map(|op| &op.op);
    wire::fill_logged_list(logged, request.get().init_ops(ops.len() as u32));
    let deadline = Instant::now() + timeout;
    // Sent here, not when the future is first polled: calls leave in cursor order.
    let promise = request.send().promise;
    async move {
        match tokio::time::timeout_at(deadline, promise).await {
            Ok(Ok(_)) => Ok(last),
            Ok(Err(err)) => Err(CallFailed::Failed(err)),
            Err(_) => Err(CallFailed::TimedOut),
        }
    }
}

#[cfg(test)]
mod tests {
    use capsync_shared::capsync_capnp::{ErrorCode, share_viewer, subscribe_result};
    use tokio::sync::{mpsc, oneshot};
    use tokio::task::LocalSet;

    use super::*;
    use crate::config::Config;
    use crate::follow::test_share::TestShare;
    use crate::rpc::viewer::ViewerImpl;
    use crate::secret_hasher::SecretHasher;

    /// What the test listener heard, in order.
    enum Heard {
        /// The cursors of one `ops` call, and the answer it waits for.
        Ops(Vec<u64>, oneshot::Sender<()>),
        Ended(EndReason, u64, String),
    }

    /// An `OpListener` that answers each `ops` call only when the test says so.
    struct Listener(mpsc::UnboundedSender<Heard>);

    impl op_listener::Server for Listener {
        async fn ops(
            self: Rc<Self>,
            params: op_listener::OpsParams,
            _: op_listener::OpsResults,
        ) -> Result<(), capnp::Error> {
            let cursors = params.get()?.get_ops()?.iter().map(|op| op.get_cursor());
            let (answer, answered) = oneshot::channel();
            let _ = self.0.send(Heard::Ops(cursors.collect(), answer));
            // Dropping the sender answers too; a test that wants a call to
            // stay unanswered keeps it.
            let _ = answered.await;
            Ok(())
        }

        async fn ended(
            self: Rc<Self>,
            params: op_listener::EndedParams,
            _: op_listener::EndedResults,
        ) -> Result<(), capnp::Error> {
            let p = params.get()?;
            let message = p.get_message()?.to_string().unwrap();
            let _ = self
                .0
                .send(Heard::Ended(p.get_reason()?, p.get_cursor(), message));
            Ok(())
        }
    }

    async fn next(heard: &mut mpsc::UnboundedReceiver<Heard>) -> Heard {
        tokio::time::timeout(Duration::from_secs(10), heard.recv())
            .await
            .expect("the listener heard nothing for 10 s")
            .expect("the listener is gone")
    }

    /// A viewer capability of `share` on a server context with a window of `window` calls.
    fn viewer(share: &TestShare, window: usize) -> share_viewer::Client {
        let config = Config {
            subscriber_window: window,
            subscriber_timeout: Duration::from_secs(60),
            ..Config::for_tests(share.dir.path())
        };
        let hasher = SecretHasher::new(config.argon2_memory_kib, config.argon2_iterations).unwrap();
        let ctx = Rc::new(Context::new(
            share.ledger.clone(),
            hasher,
            &config,
            Default::default(),
        ));
        capnp_rpc::new_client(ViewerImpl::new(ctx, share.viewer.clone()))
    }

    async fn subscribe(
        viewer: &share_viewer::Client,
        from: u64,
    ) -> (
        Result<subscription::Client, (ErrorCode, u64)>,
        mpsc::UnboundedReceiver<Heard>,
    ) {
        let (heard_tx, heard) = mpsc::unbounded_channel();
        let mut request = viewer.subscribe_request();
        request.get().set_from_cursor(from);
        request
            .get()
            .set_listener(capnp_rpc::new_client(Listener(heard_tx)));
        let response = request.send().promise.await.unwrap();
        let started = match response
            .get()
            .unwrap()
            .get_result()
            .unwrap()
            .which()
            .unwrap()
        {
            subscribe_result::Ok(handle) => Ok(handle.unwrap()),
            subscribe_result::Failure(failure) => {
                let failure = failure.unwrap();
                Err((failure.get_code().unwrap(), failure.get_cursor()))
            }
        };
        (started, heard)
    }

    #[tokio::test]
    async fn subscribing_below_the_compaction_point_fails_with_snapshot_required() {
        LocalSet::new()
            .run_until(async {
                let mut share = TestShare::new().await;
                share.append(5).await;
                let point = share.compact().await;
                share.append(2).await;
                let viewer = viewer(&share, 8);

                let (below, _) = subscribe(&viewer, point.0 - 3).await;
                assert_eq!(below.err(), Some((ErrorCode::SnapshotRequired, point.0)));

                let (at_point, mut heard) = subscribe(&viewer, point.0).await;
                let _handle = at_point.expect("subscribing at the compaction point works");
                match next(&mut heard).await {
                    Heard::Ops(cursors, _) => assert_eq!(cursors, [6, 7]),
                    Heard::Ended(reason, ..) => panic!("ended at once: {reason:?}"),
                }
            })
            .await;
    }

    #[tokio::test]
    async fn a_lagging_subscriber_overtaken_by_compaction_ends_with_snapshot_required() {
        LocalSet::new()
            .run_until(async {
                let mut share = TestShare::new().await;
                let cursor = share.append(2 * PAGE as usize + 10).await;
                // A window of one call: while the first page waits for its
                // answer, the subscription reads at most one page ahead.
                let viewer = viewer(&share, 1);
                let (started, mut heard) = subscribe(&viewer, 0).await;
                let _handle = started.expect("subscribing from 0 works before compaction");
                let Heard::Ops(first, answer) = next(&mut heard).await else {
                    panic!("expected the first page");
                };
                assert_eq!(first.last(), Some(&u64::from(PAGE)));

                assert_eq!(share.compact().await, cursor);
                let _ = answer.send(());
                // Later pages stay unanswered: what ends the subscription is
                // the ledger refusing to read below its compaction point.
                let mut unanswered = Vec::new();
                let (reason, acked, message) = loop {
                    match next(&mut heard).await {
                        Heard::Ops(_, answer) => unanswered.push(answer),
                        Heard::Ended(reason, acked, message) => break (reason, acked, message),
                    }
                };
                assert_eq!(reason, EndReason::SnapshotRequired, "{message}");
                // The last acknowledged cursor: the first page's, unless the
                // read-ahead of the second page already failed before the
                // first answer arrived.
                assert!(acked == u64::from(PAGE) || acked == 0, "acked {acked}");
                assert!(message.contains(&cursor.0.to_string()), "{message}");
            })
            .await;
    }
}
