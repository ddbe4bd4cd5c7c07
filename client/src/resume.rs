//! Following a share from a cursor across ledger compaction
//! ([`ViewerClient::resume`]): subscribe from the cursor, or, when the ops after it
//! were compacted away on the server, take a fresh snapshot and subscribe from its
//! cursor instead, so the caller gets a state to continue from rather than a gap.

use capsync_shared::ErrorCode;

use crate::error::ClientError;
use crate::subscribe::LiveOps;
use crate::viewer::{SNAPSHOT_ATTEMPTS, Snapshot, ViewerClient};

/// What [`ViewerClient::resume`] started.
#[derive(Debug)]
pub struct Resumed {
    /// The live ops: right after the cursor asked for, or, when `rebased` is set,
    /// right after the new snapshot's cursor.
    pub live: LiveOps,
    /// Set when the ops after the cursor asked for were compacted: the state to
    /// continue from.
    pub rebased: Option<Rebased>,
}

/// A fresh snapshot, taken because the ops after a cursor were compacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebased {
    /// The share's compaction point: ops up to this cursor lost their payload, so
    /// only a snapshot at or past it shows what they did.
    pub compacted_up_to: u64,
    /// The share's state now; [`Resumed::live`] continues right after its cursor.
    pub snapshot: Snapshot,
}

impl ViewerClient {
    /// [`ViewerClient::subscribe`] from `cursor`, recovering from ledger compaction:
    /// when the server answers `snapshotRequired` (the ops after `cursor` were
    /// compacted), takes a snapshot and subscribes from its cursor, and says so in
    /// [`Resumed::rebased`]. A subscription that ends with
    /// [`EndReason::SnapshotRequired`](crate::EndReason::SnapshotRequired) is
    /// recovered by calling this again with its [`Ended::cursor`](crate::Ended::cursor).
    ///
    /// Compaction racing the snapshot is retried, up to [`SNAPSHOT_ATTEMPTS`]
    /// snapshots; then the `snapshotRequired` failure is returned.
    pub async fn resume(&self, cursor: u64) -> Result<Resumed, ClientError> {
        let mut from = cursor;
        let mut rebased = None;
        let mut snapshots = 0;
        loop {
            match self.subscribe(from).await {
                Ok(live) => return Ok(Resumed { live, rebased }),
                Err(ClientError::Remote {
                    code: ErrorCode::SnapshotRequired,
                    cursor: compacted_up_to,
                    ..
                }) if snapshots < SNAPSHOT_ATTEMPTS => {
                    snapshots += 1;
                    let snapshot = self.snapshot().await?;
                    from = snapshot.cursor;
                    rebased = Some(Rebased {
                        compacted_up_to,
                        snapshot,
                    });
                }
                Err(error) => return Err(error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use capsync_shared::capsync_capnp::{RecordKind, share_viewer, subscription};

    use super::*;
    use crate::types::ShareState;

    /// A share viewer whose ledger is compacted up to `compacted_up_to`, at `cursor`.
    struct CompactedViewer {
        compacted_up_to: Rc<Cell<u64>>,
        cursor: u64,
        /// Moves the compaction point this far on each snapshot, to race it.
        compact_on_snapshot: u64,
    }

    struct Subscription;
    impl subscription::Server for Subscription {}

    impl share_viewer::Server for CompactedViewer {
        async fn snapshot(
            self: Rc<Self>,
            _params: share_viewer::SnapshotParams,
            mut results: share_viewer::SnapshotResults,
        ) -> Result<(), capnp::Error> {
            let point = self.compacted_up_to.get() + self.compact_on_snapshot;
            self.compacted_up_to.set(point);
            let mut page = results.get().init_result().init_ok();
            page.set_cursor(self.cursor);
            let mut record = page.init_records(1).get(0);
            record.set_kind(RecordKind::Session);
            record.set_json(r#"{"id":"ses_1","title":"t"}"#);
            Ok(())
        }

        async fn subscribe(
            self: Rc<Self>,
            params: share_viewer::SubscribeParams,
            mut results: share_viewer::SubscribeResults,
        ) -> Result<(), capnp::Error> {
            let from = params.get()?.get_from_cursor();
            let point = self.compacted_up_to.get();
            let mut result = results.get().init_result();
            if from < point {
                let mut failure = result.init_failure();
                failure.set_code(ErrorCode::SnapshotRequired.into());
                failure.set_message("ops were compacted");
                failure.set_cursor(point);
            } else {
                result.set_ok(capnp_rpc::new_client(Subscription));
            }
            Ok(())
        }
    }

    fn viewer(compacted_up_to: u64, cursor: u64, compact_on_snapshot: u64) -> ViewerClient {
        let cap: share_viewer::Client = capnp_rpc::new_client(CompactedViewer {
            compacted_up_to: Rc::new(Cell::new(compacted_up_to)),
            cursor,
            compact_on_snapshot,
        });
        let state = ShareState {
            share_id: "sh_1".into(),
            cursor,
            writer_epoch: 0,
            viewer_epoch: 0,
        };
        ViewerClient::new(cap, None, None, state)
    }

    async fn on_local_set<F: std::future::Future>(future: F) -> F::Output {
        tokio::task::LocalSet::new().run_until(future).await
    }

    #[tokio::test]
    async fn a_cursor_still_served_subscribes_without_a_snapshot() {
        on_local_set(async {
            let resumed = viewer(5, 20, 0).resume(5).await.unwrap();
            assert!(resumed.rebased.is_none());
            assert_eq!(resumed.live.cursor(), 5);
        })
        .await;
    }

    #[tokio::test]
    async fn a_compacted_cursor_continues_from_a_fresh_snapshot() {
        on_local_set(async {
            let resumed = viewer(8, 20, 0).resume(3).await.unwrap();
            let rebased = resumed.rebased.expect("a snapshot was needed");
            assert_eq!(rebased.compacted_up_to, 8);
            assert_eq!(rebased.snapshot.cursor, 20);
            assert_eq!(rebased.snapshot.to_document().title(), "t");
            assert_eq!(
                resumed.live.cursor(),
                20,
                "live continues after the snapshot"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn compaction_overtaking_every_snapshot_ends_in_snapshot_required() {
        on_local_set(async {
            // Each snapshot moves the compaction point past the snapshot's cursor.
            let error = viewer(8, 20, 100).resume(3).await.unwrap_err();
            assert_eq!(error.code(), Some(ErrorCode::SnapshotRequired), "{error}");
        })
        .await;
    }
}
