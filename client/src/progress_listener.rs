//! The `ProgressListener` capability the client hands to long admin calls (prune,
//! reclaim, ledger compaction): the server calls it, and it passes each update on to
//! the caller's callback.

use std::cell::RefCell;
use std::rc::Rc;

use capsync_shared::capsync_capnp::progress_listener;

use crate::types::ProgressUpdate;

/// A callback that hears how a long admin call is getting on. It runs on the
/// connection's `LocalSet`, between RPC messages, so it must return quickly.
pub type ProgressFn = Box<dyn FnMut(ProgressUpdate)>;

/// The callback, shared by the listener the server holds and the call that made it.
type Slot = Rc<RefCell<Option<ProgressFn>>>;

/// The listener of one call. Dropping it (once the call has answered) detaches the
/// callback: an update the server still had in flight is then dropped, so a progress
/// display never moves after the final report is in, and whatever the callback holds
/// is released even while the server keeps its reference to the listener.
pub(crate) struct ProgressRelay {
    slot: Slot,
    /// `None` when the caller asked for no progress: the request then carries a null
    /// capability, and the server sends nothing.
    client: Option<progress_listener::Client>,
}

impl ProgressRelay {
    pub(crate) fn new(on_progress: Option<ProgressFn>) -> Self {
        let listening = on_progress.is_some();
        let slot: Slot = Rc::new(RefCell::new(on_progress));
        let client = listening.then(|| capnp_rpc::new_client(Listener { slot: slot.clone() }));
        Self { slot, client }
    }

    /// The capability to put in the request, if the caller listens.
    pub(crate) fn client(&self) -> Option<progress_listener::Client> {
        self.client.clone()
    }
}

impl Drop for ProgressRelay {
    fn drop(&mut self) {
        self.slot.borrow_mut().take();
    }
}

/// The `ProgressListener` the server calls.
struct Listener {
    slot: Slot,
}

impl progress_listener::Server for Listener {
    async fn progress(
        self: Rc<Self>,
        params: progress_listener::ProgressParams,
        _results: progress_listener::ProgressResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let update = ProgressUpdate {
            stage: params.get_stage()?.to_str()?.to_owned(),
            done: params.get_done(),
            total: params.get_total(),
        };
        if let Some(callback) = self.slot.borrow_mut().as_mut() {
            callback(update);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls the listener's `progress` the way the server does, over a local capability.
    async fn send(client: &progress_listener::Client, stage: &str, done: u64, total: u64) {
        let mut request = client.progress_request();
        request.get().set_stage(stage);
        request.get().set_done(done);
        request.get().set_total(total);
        request.send().promise.await.expect("progress call");
    }

    #[tokio::test]
    async fn updates_reach_the_callback_until_the_call_is_over() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let seen = Rc::new(RefCell::new(Vec::new()));
                let sink = seen.clone();
                let relay = ProgressRelay::new(Some(Box::new(move |update| {
                    sink.borrow_mut().push(update);
                })));
                let client = relay.client().expect("a listener when asked for");
                send(&client, "delete", 1, 3).await;
                send(&client, "delete", 3, 3).await;
                drop(relay);
                // The server may still hold the listener: a late update goes nowhere.
                send(&client, "delete", 9, 9).await;
                let seen = seen.borrow();
                assert_eq!(
                    *seen,
                    vec![
                        ProgressUpdate {
                            stage: "delete".into(),
                            done: 1,
                            total: 3
                        },
                        ProgressUpdate {
                            stage: "delete".into(),
                            done: 3,
                            total: 3
                        },
                    ]
                );
            })
            .await;
    }

    #[test]
    fn no_callback_sends_no_listener() {
        assert!(ProgressRelay::new(None).client().is_none());
    }
}
