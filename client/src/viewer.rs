//! `ViewerClient`: read a share's state (paged snapshot), its applied ops, and its cursor.

use capsync_shared::capsync_capnp::{
    ops_result, presence_result, share_state_result, share_viewer, snapshot_result,
};
use capsync_shared::limits::DEFAULT_SNAPSHOT_PAGE_BYTES;
use serde::Serialize;

use crate::document::SessionDocument;
use crate::error::ClientError;
use crate::subscribe::LiveOps;
use crate::types::ShareState;
pub use crate::types::{LoggedOp, Record, RecordKind};
use crate::wire::{self, ok_or_fail};

/// How many times [`ViewerClient::snapshot`] starts over when the share changes under it.
pub const SNAPSHOT_ATTEMPTS: u32 = 4;

/// A live `ShareViewer` capability. Cheap to clone: clones share the capability.
#[derive(Clone)]
pub struct ViewerClient {
    /// The capability itself.
    cap: share_viewer::Client,
    /// Id of the viewer token it was redeemed from; `None` when it came from
    /// [`WriterClient::viewer`](crate::WriterClient::viewer).
    token_id: Option<String>,
    /// When that token expires, if ever.
    expires_at: Option<i64>,
    /// The share's state when the capability was obtained (for a viewer derived from a
    /// writer: the writer's).
    state: ShareState,
}

impl std::fmt::Debug for ViewerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewerClient")
            .field("token_id", &self.token_id)
            .field("share_id", &self.state.share_id)
            .finish_non_exhaustive()
    }
}

/// One page of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotPage {
    /// The share's cursor when this page was read.
    pub cursor: u64,
    /// In the fixed order: session, models, diffs, then each message followed by its parts.
    pub records: Vec<Record>,
    /// Pass as `page` for the next one; `None` at the end.
    pub next_page: Option<String>,
}

/// The whole state of a share at one cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Every record reflects exactly the ops up to this cursor.
    pub cursor: u64,
    pub records: Vec<Record>,
}

impl Snapshot {
    /// The records as one structured document (session, models, diffs, messages with their
    /// parts in order), for display and for comparing states.
    pub fn to_document(&self) -> SessionDocument {
        SessionDocument::from_records(capsync_shared::Cursor(self.cursor), &self.records)
    }
}

/// A page of applied ops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpsPage {
    /// Cursor order, starting right after the requested cursor.
    pub ops: Vec<LoggedOp>,
    /// The share's cursor when read: more ops exist while the last op's cursor is below it.
    pub cursor: u64,
}

impl OpsPage {
    /// Whether the server has ops past this page.
    pub fn has_more(&self) -> bool {
        self.ops.last().is_some_and(|op| op.cursor.0 < self.cursor)
    }
}

impl ViewerClient {
    pub(crate) fn new(
        cap: share_viewer::Client,
        token_id: Option<String>,
        expires_at: Option<i64>,
        state: ShareState,
    ) -> Self {
        Self {
            cap,
            token_id,
            expires_at,
            state,
        }
    }

    /// The raw capability, for calls this library does not wrap.
    pub fn capability(&self) -> share_viewer::Client {
        self.cap.clone()
    }

    /// Id of the viewer token this was redeemed from; `None` for a viewer derived from a writer.
    pub fn token_id(&self) -> Option<&str> {
        self.token_id.as_deref()
    }

    /// Expiry of the token this was redeemed from; `None` for never, or when derived.
    pub fn expires_at(&self) -> Option<i64> {
        self.expires_at
    }

    /// The share's state when this capability was obtained (not refreshed).
    pub fn state_at_redeem(&self) -> &ShareState {
        &self.state
    }

    pub fn share_id(&self) -> &str {
        &self.state.share_id
    }

    /// One page of the share's current state. Start with `page = ""`; `max_bytes = 0`
    /// asks for the server's default budget.
    pub async fn snapshot_page(
        &self,
        page: &str,
        max_bytes: u32,
    ) -> Result<SnapshotPage, ClientError> {
        let mut request = self.cap.snapshot_request();
        request.get().set_page(page);
        request.get().set_max_bytes(max_bytes);
        let response = request.send().promise.await?;
        let page = ok_or_fail!(snapshot_result, response.get()?.get_result()?);
        let records = page
            .get_records()?
            .iter()
            .map(|r| {
                Ok(Record {
                    kind: r.get_kind()?.into(),
                    id: wire::text(r.get_id())?,
                    message_id: wire::text(r.get_message_id())?,
                    json: wire::text(r.get_json())?,
                })
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        Ok(SnapshotPage {
            cursor: page.get_cursor(),
            records,
            next_page: crate::types::nonempty(wire::text(page.get_next_page())?),
        })
    }

    /// The whole current state, read page by page with the default page budget.
    ///
    /// If a later page reports another cursor than the first, the share changed in between
    /// and the pages do not fit together: start over, up to [`SNAPSHOT_ATTEMPTS`] times,
    /// then fail with [`ClientError::SnapshotUnstable`].
    pub async fn snapshot(&self) -> Result<Snapshot, ClientError> {
        self.snapshot_with(DEFAULT_SNAPSHOT_PAGE_BYTES).await
    }

    /// [`ViewerClient::snapshot`] with an explicit byte budget per page.
    pub async fn snapshot_with(&self, max_bytes: u32) -> Result<Snapshot, ClientError> {
        'attempt: for _ in 0..SNAPSHOT_ATTEMPTS {
            let first = self.snapshot_page("", max_bytes).await?;
            let cursor = first.cursor;
            let mut records = first.records;
            let mut next = first.next_page;
            while let Some(page) = next {
                let more = self.snapshot_page(&page, max_bytes).await?;
                if more.cursor != cursor {
                    continue 'attempt;
                }
                if more.next_page.as_deref() == Some(page.as_str()) {
                    // A server bug would otherwise make this loop forever.
                    return Err(ClientError::Rpc(capnp::Error::failed(
                        "the server returned the same snapshot page twice".into(),
                    )));
                }
                records.extend(more.records);
                next = more.next_page;
            }
            return Ok(Snapshot { cursor, records });
        }
        Err(ClientError::SnapshotUnstable {
            attempts: SNAPSHOT_ATTEMPTS,
        })
    }

    /// Applied ops with cursor > `after`, at most `limit` (0 = server default).
    ///
    /// `after` below the share's compaction point (older ops lost their payload to
    /// ledger compaction) fails with `snapshotRequired`, the point in the failure's
    /// cursor: take a [`Snapshot`] and continue from its cursor.
    pub async fn ops_since(&self, after: u64, limit: u32) -> Result<OpsPage, ClientError> {
        let mut request = self.cap.ops_since_request();
        request.get().set_after(after);
        request.get().set_limit(limit);
        let response = request.send().promise.await?;
        let page = ok_or_fail!(ops_result, response.get()?.get_result()?);
        Ok(OpsPage {
            ops: wire::logged_ops(page.get_ops()?)?,
            cursor: page.get_cursor(),
        })
    }

    /// Follows the share live: first every op after `from_cursor`, then each op as it
    /// commits, in cursor order with no gap and no repeat (see [`LiveOps`]).
    ///
    /// `from_cursor` may not be past the share's cursor (`invalidArgument`); a revoked
    /// viewer gets `revoked` here rather than a subscription that ends at once. Below
    /// the share's compaction point it gets `snapshotRequired`, and a subscription
    /// that reaches compacted ops ends with that reason: [`ViewerClient::resume`]
    /// recovers from both with a fresh snapshot.
    ///
    /// To rebuild the share's state, take a [`Snapshot`] and subscribe from its
    /// cursor: applying the ops to [`SessionDocument`] keeps it equal to the writer's.
    pub async fn subscribe(&self, from_cursor: u64) -> Result<LiveOps, ClientError> {
        crate::subscribe::subscribe(&self.cap, from_cursor).await
    }

    /// The share's current state.
    pub async fn state(&self) -> Result<ShareState, ClientError> {
        let request = self.cap.state_request();
        let response = request.send().promise.await?;
        wire::share_state(ok_or_fail!(
            share_state_result,
            response.get()?.get_result()?
        ))
    }

    /// Whether a writer is connected now, and when the share last changed.
    pub async fn presence(&self) -> Result<Presence, ClientError> {
        let request = self.cap.presence_request();
        let response = request.send().promise.await?;
        let presence = ok_or_fail!(presence_result, response.get()?.get_result()?);
        let time = |t: i64| (t != 0).then_some(t);
        Ok(Presence {
            writer_connected: presence.get_writer_connected(),
            last_change: time(presence.get_last_change()),
            writer_gone_since: time(presence.get_writer_gone_since()),
            interrupted: presence.get_interrupted(),
        })
    }
}

/// A share's writer presence (display only; see `Presence` in the schema).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Presence {
    /// A writer capability of the share is live now.
    pub writer_connected: bool,
    /// Unix ms of the last applied op.
    pub last_change: Option<i64>,
    /// Unix ms since when no writer is connected (`None` while one is, or if unknown).
    pub writer_gone_since: Option<i64>,
    /// No writer for longer than the server's `--interrupted-after`: running tool
    /// calls will not finish and should be shown as interrupted.
    pub interrupted: bool,
}
