//! Progress of a long operation, published as the latest value only: a slow
//! listener skips updates instead of slowing the work.

use tokio::sync::watch;

/// `done` of `total` units of `stage` (e.g. "delete": shares).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub stage: &'static str,
    pub done: u64,
    pub total: u64,
}

/// Where a driver reports progress; [`ProgressSink::none`] when nobody listens.
#[derive(Clone, Debug, Default)]
pub struct ProgressSink(Option<watch::Sender<Progress>>);

impl ProgressSink {
    /// A sink that drops every update.
    pub fn none() -> Self {
        Self(None)
    }

    /// A sink and the receiver that sees its latest update.
    pub fn channel() -> (Self, watch::Receiver<Progress>) {
        let (tx, rx) = watch::channel(Progress::default());
        (Self(Some(tx)), rx)
    }

    pub fn report(&self, stage: &'static str, done: u64, total: u64) {
        if let Some(tx) = &self.0 {
            // No receiver left means nobody is listening any more: fine.
            tx.send_replace(Progress { stage, done, total });
        }
    }
}
