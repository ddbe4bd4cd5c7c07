//! The JSON API of a share: its whole document, and its applied ops after a cursor.
//!
//! `GET /api/shares/{share}/snapshot` and `GET /api/shares/{share}/ops?after=N&limit=M`,
//! both with `Authorization: Bearer <viewer token>`.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::HeaderMap;
use capsync_shared::limits::{DEFAULT_OPS_PAGE, DEFAULT_SNAPSHOT_PAGE_BYTES, MAX_OPS_PAGE};
use capsync_shared::{Cursor, ShareId, now_millis};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::share_reader;
use super::document;
use super::error::ApiError;
use crate::ledger::{Authority, Ledger, Record};
use crate::presence::{PresenceView, last_change};

/// How often a snapshot is read again when the share changed between its pages.
const SNAPSHOT_ATTEMPTS: usize = 5;

/// The share's whole document (see [`document::document`]) with `shareId` and `presence`.
pub async fn snapshot(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(share): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let reader = share_reader(&app, &headers, peer, &share).await?;
    let (cursor, records) = read_snapshot(&app.ledger, &reader.authority).await?;
    let mut doc = document::document(cursor, &records);
    let last_change = last_change(&app.ledger, &reader.authority, cursor).await?;
    doc["shareId"] = share.clone().into();
    doc["presence"] = presence(&app, &ShareId::from(share), last_change);
    Ok(Json(doc))
}

#[derive(Debug, Deserialize)]
pub struct OpsQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: u32,
}

/// `{"cursor": share's cursor, "ops": [...]}`: ops after `after`, at most `limit`
/// (default 1000, at most 10000). More follow while the last op's cursor is below `cursor`.
pub async fn ops(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(share): Path<String>,
    Query(query): Query<OpsQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let reader = share_reader(&app, &headers, peer, &share).await?;
    let limit = match query.limit {
        0 => DEFAULT_OPS_PAGE,
        n => n.min(MAX_OPS_PAGE),
    };
    let page = app
        .ledger
        .ops_since(reader.authority, Cursor(query.after), limit)
        .await?;
    let ops: Vec<Value> = page.ops.iter().map(document::op_json).collect();
    Ok(Json(json!({"cursor": page.cursor.0, "ops": ops})))
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
    let now = now_millis();
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
