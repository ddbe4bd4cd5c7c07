//! The JSON API of a share: its whole document, and its applied ops after a cursor.
//!
//! `GET /api/shares/{share}/snapshot` and `GET /api/shares/{share}/ops?after=N&limit=M`,
//! both with `Authorization: Bearer <viewer token>`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::HeaderMap;
use capsync_shared::limits::{DEFAULT_OPS_PAGE, DEFAULT_SNAPSHOT_PAGE_BYTES, MAX_OPS_PAGE};
use capsync_shared::{Cursor, ShareId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::share_reader;
use super::error::ApiError;
use super::page_data::{self, ReadOp};
use super::{AppState, JsonBody, off_the_executor};
use crate::ledger::{Authority, Ledger, Record};
use crate::presence::{PresenceView, last_change};

/// How often a snapshot is read again when the share changed between its pages.
const SNAPSHOT_ATTEMPTS: usize = 5;

/// The share's whole document (see [`page_data::document`]) with `shareId`, `presence`
/// and `children` (sub-agents' sessions shared along with it: session id → share id).
pub async fn snapshot(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(share): Path<String>,
    headers: HeaderMap,
) -> Result<JsonBody, ApiError> {
    let reader = share_reader(&app, &headers, peer, &share).await?;
    let (cursor, records) = read_snapshot(&app.ledger, &reader.authority).await?;
    // Rendering every text part's markdown is CPU work: off the thread that
    // serves RPC and the other requests.
    let mut doc = off_the_executor(move || page_data::document(cursor, &records)).await?;
    // The state read with the token check; the snapshot may be a few ops newer.
    let last_change = last_change(&reader.state);
    doc["shareId"] = share.clone().into();
    // Sub-agents' sessions shared along with this one, by session id: the page
    // links their task calls there (the same token reads them).
    let children = if reader.own_share {
        app.ledger.child_shares(reader.authority.clone()).await?
    } else {
        Vec::new()
    };
    doc["children"] = children
        .into_iter()
        .map(|child| (child.session_id, Value::from(child.state.share_id.0)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    doc["presence"] = presence(&app, &ShareId::from(share), last_change);
    JsonBody::of(move || doc).await
}

#[derive(Debug, Deserialize)]
pub struct OpsQuery {
    #[serde(default)]
    pub(super) after: u64,
    #[serde(default)]
    pub(super) limit: u32,
}

/// The page size of an ops request: 0 means the default, and anything above the cap is capped.
pub(super) fn ops_limit(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_OPS_PAGE,
        n => n.min(MAX_OPS_PAGE),
    }
}

/// `{"cursor": share's cursor, "ops": [...]}`: ops after `after`, at most `limit`
/// (default 1000, at most 10000). More follow while the last op's cursor is below `cursor`.
/// An `after` below the share's compaction point is `410 Gone` (see
/// [`ApiError::SnapshotRequired`]): those ops lost their payload, and the
/// snapshot is where their effect is.
pub async fn ops(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(share): Path<String>,
    Query(query): Query<OpsQuery>,
    headers: HeaderMap,
) -> Result<JsonBody, ApiError> {
    let reader = share_reader(&app, &headers, peer, &share).await?;
    let limit = ops_limit(query.limit);
    let page = app
        .ledger
        .ops_since(reader.authority, Cursor(query.after), limit)
        .await?;
    // Up to 10,000 payloads parsed and rebuilt, then written out: off the executor too.
    JsonBody::of(move || {
        let ops: Vec<Value> = page.ops.iter().map(|op| ReadOp::new(op).json).collect();
        json!({"cursor": page.cursor.0, "ops": ops})
    })
    .await
}

/// Every record of the share at one cursor: pages are read until they all
/// report the same cursor (a commit between two pages means starting over).
pub async fn read_snapshot(
    ledger: &Ledger,
    who: &Authority,
) -> Result<(Cursor, Vec<Record>), ApiError> {
    'attempt: for _ in 0..SNAPSHOT_ATTEMPTS {
        let first = ledger
            .snapshot_page(who.clone(), String::new(), DEFAULT_SNAPSHOT_PAGE_BYTES)
            .await?;
        let cursor = first.cursor;
        let mut records = first.records;
        let mut next = first.next_page;
        while !next.is_empty() {
            let page = ledger
                .snapshot_page(who.clone(), next.clone(), DEFAULT_SNAPSHOT_PAGE_BYTES)
                .await?;
            if page.cursor != cursor {
                continue 'attempt;
            }
            if page.next_page == next {
                tracing::error!("the ledger returned the same snapshot page twice");
                return Err(ApiError::Internal);
            }
            records.extend(page.records);
            next = page.next_page;
        }
        return Ok((cursor, records));
    }
    // The share changes faster than it can be read; the page retries later.
    Err(ApiError::Unavailable)
}

/// The share's writer presence as the page shows it:
/// `{"writerConnected", "lastChange", "writerGoneSince", "interrupted",
///   "interruptedAfterMs", "serverTime"}` (times in Unix ms).
pub fn presence(app: &AppState, share: &ShareId, last_change: Option<i64>) -> Value {
    let now = app.presence.clock().now_millis();
    let view = PresenceView::new(
        app.presence.status(share),
        last_change,
        app.interrupted_after_ms(),
        now,
    );
    json!({
        "writerConnected": view.writer_connected,
        "lastChange": view.last_change,
        "writerGoneSince": view.writer_gone_since,
        "interrupted": view.interrupted,
        "interruptedAfterMs": app.interrupted_after_ms(),
        "serverTime": now,
    })
}

/// Whether running tool calls of a share whose writer is gone since `gone_since`
/// show as interrupted at `now`.
pub fn is_interrupted(app: &AppState, gone_since: Option<i64>, now: i64) -> bool {
    crate::presence::is_interrupted(gone_since, app.interrupted_after_ms(), now)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use capsync_shared::TokenKind;

    use super::*;
    use crate::follow::test_share::TestShare;
    use crate::secret_hasher::SecretHasher;

    #[tokio::test]
    async fn ops_below_the_compaction_point_are_gone_and_at_it_are_served() {
        let mut share = TestShare::new().await;
        share.append(5).await;
        let point = share.compact().await;
        share.append(2).await;
        let share_id = share.state().await.share_id;
        let (token, row) = SecretHasher::new(256, 1)
            .unwrap()
            .mint(TokenKind::Viewer, None, String::new())
            .await
            .unwrap();
        share
            .ledger
            .mint_for_share(
                share.agent.clone(),
                share_id.clone(),
                TokenKind::Viewer,
                row,
            )
            .await
            .unwrap();
        let mut headers = HeaderMap::new();
        let bearer = format!("Bearer {}", token.expose());
        headers.insert("authorization", HeaderValue::from_str(&bearer).unwrap());
        let app = AppState::for_tests(share.ledger.clone());
        let read = |after: u64| {
            ops(
                State(app.clone()),
                ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9))),
                Path(share_id.to_string()),
                Query(OpsQuery { after, limit: 0 }),
                headers.clone(),
            )
        };

        let below = read(point.0 - 1).await;
        assert_eq!(below.err(), Some(ApiError::SnapshotRequired(point)));

        let at_point: Value = serde_json::from_slice(&read(point.0).await.unwrap().0).unwrap();
        let cursors: Vec<&Value> = at_point["ops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|op| &op["cursor"])
            .collect();
        assert_eq!(cursors, [6, 7]);
    }
}
