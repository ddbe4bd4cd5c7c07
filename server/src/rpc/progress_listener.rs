//! Forwarding a long admin call's progress to the caller's `ProgressListener`.
//!
//! The driver publishes into a [`ProgressSink`] (latest value only); a task on
//! the `LocalSet` sends that value to the listener with at most one call in
//! flight, and whatever was published meanwhile collapses into the newest
//! value. So a slow listener sees fewer updates but never slows the work, and
//! a failing one (gone, or a null capability) only stops the updates.

use std::future::Future;
use std::time::Duration;

use capsync_shared::capsync_capnp::progress_listener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::lifecycle::{Progress, ProgressSink};

/// How long an admin call waits, after its work is done, for the listener to
/// take the last update. The update is a courtesy: a stalled listener must not
/// hold up the answer.
const FINAL_UPDATE_WAIT: Duration = Duration::from_secs(5);

/// A sink for a driver and, when the caller passed a listener, the task that
/// forwards to it.
pub struct Forwarder {
    sink: ProgressSink,
    task: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Starts forwarding to `listener`; without one, updates are dropped.
    /// Must run on the `LocalSet`, where capabilities live.
    pub fn start(listener: Option<progress_listener::Client>) -> Self {
        let Some(listener) = listener else {
            return Self {
                sink: ProgressSink::none(),
                task: None,
            };
        };
        let (sink, updates) = ProgressSink::channel();
        let task = tokio::task::spawn_local(forward_latest(updates, move |progress| {
            send_progress(&listener, progress)
        }));
        Self {
            sink,
            task: Some(task),
        }
    }

    /// Runs `work` reporting into a sink forwarded to `listener`, then lets the
    /// last update reach the listener (see [`Forwarder::finish`]) before returning.
    pub async fn run<T>(
        listener: Option<progress_listener::Client>,
        work: impl AsyncFnOnce(&ProgressSink) -> T,
    ) -> T {
        let forwarder = Self::start(listener);
        let result = work(forwarder.sink()).await;
        forwarder.finish().await;
        result
    }

    /// Where the driver reports.
    pub fn sink(&self) -> &ProgressSink {
        &self.sink
    }

    /// Closes the sink and lets the last update reach the listener (waiting at
    /// most [`FINAL_UPDATE_WAIT`]), so the caller sees it before the answer.
    pub async fn finish(self) {
        let Self { sink, task } = self;
        drop(sink);
        let Some(mut task) = task else { return };
        if tokio::time::timeout(FINAL_UPDATE_WAIT, &mut task)
            .await
            .is_err()
        {
            debug!("progress listener did not take the last update in time; giving up on it");
            task.abort();
        }
    }
}

/// One `progress` call, sent now; resolves when the listener answers.
fn send_progress(
    listener: &progress_listener::Client,
    progress: Progress,
) -> impl Future<Output = Result<(), capnp::Error>> + use<> {
    let mut request = listener.progress_request();
    {
        let mut params = request.get();
        params.set_stage(progress.stage);
        params.set_done(progress.done);
        params.set_total(progress.total);
    }
    let promise = request.send().promise;
    async move { promise.await.map(drop) }
}

/// Sends the newest value of `updates` through `send`, one call at a time,
/// skipping values published while a call was in flight and values equal to
/// the last one sent. Ends once the sink is gone and its final value was sent,
/// or at the first failed call.
async fn forward_latest<F, Fut>(mut updates: watch::Receiver<Progress>, mut send: F)
where
    F: FnMut(Progress) -> Fut,
    Fut: Future<Output = Result<(), capnp::Error>>,
{
    // The channel starts at the default, which says nothing (no stage yet):
    // never send it, e.g. when a dry run reports no progress at all.
    let mut sent = Progress::default();
    loop {
        // An error means the sink is gone: the value it left is the final one.
        let sink_gone = updates.changed().await.is_err();
        let latest = *updates.borrow_and_update();
        if sent != latest {
            if let Err(err) = send(latest).await {
                debug!(%err, "progress listener failed; no more progress updates for this call");
                return;
            }
            sent = latest;
        }
        if sink_gone {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use tokio::sync::{mpsc, oneshot};
    use tokio::task::LocalSet;

    use super::*;

    /// A call the forwarder made, held until the test answers it.
    type Call = (Progress, oneshot::Sender<Result<(), capnp::Error>>);

    fn progress(done: u64) -> Progress {
        Progress {
            stage: "delete",
            done,
            total: 10,
        }
    }

    /// Starts `forward_latest` on the local set with a `send` that hands each
    /// call to the test; the returned receiver ends when the forwarder ends.
    fn forwarder() -> (ProgressSink, mpsc::UnboundedReceiver<Call>) {
        let (sink, updates) = ProgressSink::channel();
        let (calls_tx, calls) = mpsc::unbounded_channel::<Call>();
        tokio::task::spawn_local(forward_latest(updates, move |progress| {
            let (answer, answered) = oneshot::channel();
            calls_tx.send((progress, answer)).unwrap();
            async move { answered.await.unwrap() }
        }));
        (sink, calls)
    }

    /// Lets every other local task run until it waits again.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn one_call_in_flight_and_updates_in_between_collapse_into_the_newest() {
        LocalSet::new()
            .run_until(async {
                let (sink, mut calls) = forwarder();
                sink.report("delete", 1, 10);
                let (first, answer) = calls.recv().await.unwrap();
                assert_eq!(first, progress(1));
                for done in 2..=4 {
                    sink.report("delete", done, 10);
                }
                settle().await;
                assert!(
                    calls.try_recv().is_err(),
                    "a second call started before the first was answered"
                );
                answer.send(Ok(())).unwrap();
                let (second, answer) = calls.recv().await.unwrap();
                assert_eq!(second, progress(4), "2 and 3 should have been skipped");
                answer.send(Ok(())).unwrap();
                drop(sink);
                assert!(calls.recv().await.is_none(), "the forwarder should end");
            })
            .await;
    }

    #[tokio::test]
    async fn the_final_value_is_sent_after_the_sink_is_dropped() {
        LocalSet::new()
            .run_until(async {
                let (sink, mut calls) = forwarder();
                sink.report("delete", 1, 10);
                let (_, answer) = calls.recv().await.unwrap();
                sink.report("delete", 10, 10);
                drop(sink);
                answer.send(Ok(())).unwrap();
                let (last, answer) = calls.recv().await.unwrap();
                assert_eq!(last, progress(10));
                answer.send(Ok(())).unwrap();
                assert!(calls.recv().await.is_none(), "the forwarder should end");
            })
            .await;
    }

    #[tokio::test]
    async fn an_unchanged_value_is_not_sent_again() {
        LocalSet::new()
            .run_until(async {
                let (sink, mut calls) = forwarder();
                sink.report("delete", 1, 10);
                let (_, answer) = calls.recv().await.unwrap();
                answer.send(Ok(())).unwrap();
                settle().await;
                sink.report("delete", 1, 10);
                drop(sink);
                assert!(calls.recv().await.is_none(), "the repeated value was sent");
            })
            .await;
    }

    #[tokio::test]
    async fn work_that_reports_nothing_sends_nothing() {
        LocalSet::new()
            .run_until(async {
                let (sink, mut calls) = forwarder();
                drop(sink);
                assert!(
                    calls.recv().await.is_none(),
                    "the empty start value was sent"
                );
            })
            .await;
    }

    #[tokio::test]
    async fn a_failed_call_stops_the_updates_but_not_the_sink() {
        LocalSet::new()
            .run_until(async {
                let (sink, mut calls) = forwarder();
                sink.report("delete", 1, 10);
                let (_, answer) = calls.recv().await.unwrap();
                answer
                    .send(Err(capnp::Error::disconnected("gone".into())))
                    .unwrap();
                assert!(calls.recv().await.is_none(), "the forwarder should stop");
                // The driver goes on reporting into a sink nobody reads.
                sink.report("delete", 2, 10);
            })
            .await;
    }

    /// Records what it is told; answers with an error when `fail` is set.
    struct Listener {
        seen: Rc<RefCell<Vec<(String, u64, u64)>>>,
        fail: bool,
    }

    impl progress_listener::Server for Listener {
        async fn progress(
            self: Rc<Self>,
            params: progress_listener::ProgressParams,
            _: progress_listener::ProgressResults,
        ) -> Result<(), capnp::Error> {
            let p = params.get()?;
            let stage = p.get_stage()?.to_string().unwrap();
            self.seen
                .borrow_mut()
                .push((stage, p.get_done(), p.get_total()));
            if self.fail {
                return Err(capnp::Error::failed("listener broke".into()));
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_last_update_reaches_a_listener_capability_before_finish_returns() {
        LocalSet::new()
            .run_until(async {
                let seen = Rc::new(RefCell::new(Vec::new()));
                let listener: progress_listener::Client = capnp_rpc::new_client(Listener {
                    seen: seen.clone(),
                    fail: false,
                });
                let forwarder = Forwarder::start(Some(listener));
                forwarder.sink().report("reclaim", 3, 7);
                forwarder.sink().report("reclaim", 7, 7);
                forwarder.finish().await;
                let seen = seen.borrow();
                assert_eq!(seen.last(), Some(&("reclaim".to_owned(), 7, 7)));
                assert!(seen.len() <= 2, "more calls than updates: {seen:?}");
            })
            .await;
    }

    #[tokio::test]
    async fn a_failing_listener_capability_only_stops_the_updates() {
        LocalSet::new()
            .run_until(async {
                let seen = Rc::new(RefCell::new(Vec::new()));
                let listener: progress_listener::Client = capnp_rpc::new_client(Listener {
                    seen: seen.clone(),
                    fail: true,
                });
                let forwarder = Forwarder::start(Some(listener));
                forwarder.sink().report("compact", 1, 3);
                settle().await;
                forwarder.sink().report("compact", 3, 3);
                forwarder.finish().await;
                assert_eq!(*seen.borrow(), [("compact".to_owned(), 1, 3)]);
            })
            .await;
    }
}
