//! The share API of opencode's built-in share client, so an unmodified opencode
//! shares to capsync once its `enterprise.url` points here.
//!
//! opencode's `enterprise.url` is `<origin>/opencode/<agent token>`: the agent
//! token travels in the URL path, because the client sends no credential of its
//! own. It is checked on every call under that prefix; the share's writer token
//! (the `secret` create answers) is checked on every sync as well.
//!
//! | route | what |
//! |---|---|
//! | `POST /opencode/{agent}/api/share` `{"sessionID"}` | the share of that session: `{"id", "url", "secret"}` ([`create`]) |
//! | `POST /opencode/{agent}/api/share/{id}/sync` `{"secret", "data": [...]}` | applies the items ([`sync`]) |
//! | `DELETE /opencode/{agent}/api/share/{id}` | unshare: the share is deleted ([`unshare`]) |
//! | `GET /share/{viewer token}` | the share link: on to the share page |
//! | `GET /api/share/{viewer token}/data` | the share as items, for `opencode import` ([`data`]) |
//!
//! The share link carries a viewer token in its path, because `opencode
//! import` only takes links of the form `<origin>/share/<id>` and fetches
//! `<origin>/api/share/<id>/data`. So it reaches whatever logs request paths
//! (this server logs none; a proxy in front may), while `Referrer-Policy:
//! no-referrer` keeps it out of `Referer` headers and the page moves it into
//! the URL fragment at once. Unsharing or revoking the share kills the link.

use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use capsync_shared::{ShareId, SturdyRef, TokenKind};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{Level, info};

use super::api::read_snapshot;
use super::auth::viewer;
use super::error::ApiError;
use super::{AppState, JsonBody, off_the_executor};
use crate::error::ServerError;
use crate::ledger::oversize::append_within_limit;
use crate::ledger::{
    AuditEvent, Authority, BatchIn, LedgerError, NewShare, OpIn, OpOutcome, OpResult, Operator,
    RecordKind, RejectReason,
};
use crate::lifecycle;
use crate::redeem::Via;

use capsync_shared::opencode::{Mapped, item_record_id, map_item};

/// The routes whose bodies stay small (under `--http-max-body-bytes`).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/opencode/{agent}/api/share", post(create))
        .route(
            "/opencode/{agent}/api/share/{id}",
            axum::routing::delete(unshare),
        )
        .route("/share/{token}", get(link))
        .route("/api/share/{token}/data", get(data))
}

/// The sync route: its body has its own limit, read only once the agent
/// token has been checked, so no one without one makes the server buffer it.
pub fn sync_routes() -> Router<AppState> {
    Router::new()
        .route("/opencode/{agent}/api/share/{id}/sync", post(sync))
        .layer(DefaultBodyLimit::disable())
}

/// The agent of the token in the path: any failure is the same `401`.
async fn agent(
    app: &AppState,
    token: &str,
    peer: SocketAddr,
    via: Via,
) -> Result<Authority, ApiError> {
    if token
        .parse::<SturdyRef>()
        .is_ok_and(|t| t.kind != TokenKind::Agent)
    {
        return Err(ApiError::Unauthorized);
    }
    let redeemed = app.redeemer.redeem(token, peer, via).await?;
    if redeemed.token.kind != TokenKind::Agent {
        return Err(ApiError::Unauthorized);
    }
    Ok(redeemed.authority())
}

/// Where share links start: `--public-url`, else `http://` and the host the
/// request was sent to.
fn origin(app: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    if let Some(url) = &app.public_url {
        return Ok(url.clone());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .ok_or_else(|| ApiError::BadRequest("the request has no usable Host header".into()))?;
    Ok(format!("http://{host}"))
}

#[derive(Deserialize)]
struct CreateBody {
    #[serde(rename = "sessionID")]
    session_id: String,
}

/// `POST /opencode/{agent}/api/share`: the agent's share of the session, with
/// a new writer token (`secret`) and a link holding a new viewer token. A
/// repeat create for a session the agent shares already (opencode sends two at
/// once with auto-share) answers the same share with tokens of its own, so
/// whichever answer the client keeps, its secret works.
async fn create(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(agent_token): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let issuer = agent(&app, &agent_token, peer, Via::Http).await?;
    let body: CreateBody = serde_json::from_slice(&body)
        .map_err(|_| ApiError::BadRequest("expected {\"sessionID\": \"...\"}".into()))?;
    let origin = origin(&app, &headers)?;
    let (writer, writer_row) = app
        .hasher
        .mint(TokenKind::Writer, None, String::new())
        .await?;
    let (viewer, viewer_row) = app
        .hasher
        .mint(TokenKind::Viewer, None, String::new())
        .await?;
    let share = NewShare {
        share_id: ShareId::random(),
        session_id: body.session_id,
        project_id: String::new(),
        parent_session_id: String::new(),
        title: String::new(),
    };
    let created = app
        .ledger
        .create_or_join_share(issuer.clone(), share, writer_row, viewer_row)
        .await;
    app.ledger.audit(AuditEvent {
        action: "create_share",
        token_id: Some(issuer.token_id),
        share_id: created
            .as_ref()
            .ok()
            .map(|(info, _)| info.state.share_id.clone()),
        outcome: match &created {
            Ok((_, false)) => "ok".into(),
            Ok((_, true)) => "joined".into(),
            Err(err) => ServerError::from(err.clone()).code.as_str().into(),
        },
        detail: format!("peer={peer} via=opencode"),
    });
    let (info, _) = created?;
    Ok(Json(json!({
        "id": info.state.share_id.as_str(),
        "url": format!("{origin}/share/{}", viewer.expose()),
        "secret": writer.expose(),
    })))
}

#[derive(Deserialize)]
struct SyncBody {
    secret: String,
    data: Vec<Value>,
}

/// The ops of opencode's sync items, and for each item its ops' places in them
/// or why it was refused.
type MappedItems = (Vec<OpIn>, Vec<Result<std::ops::Range<usize>, String>>);

fn map_items(items: &[Value], max_op_bytes: usize) -> MappedItems {
    let mut ops = Vec::new();
    let mut places = Vec::new();
    for item in items {
        match map_item(item, max_op_bytes) {
            Mapped::Ops(mapped) => {
                let start = ops.len();
                ops.extend(mapped.into_iter().map(|op| OpIn {
                    op_id: op.op_id,
                    kind: op.kind,
                    payload: op.payload,
                    depends_on: Vec::new(),
                }));
                places.push(Ok(start..ops.len()));
            }
            Mapped::Refused(why) => places.push(Err(why)),
        }
    }
    (ops, places)
}

/// `POST /opencode/{agent}/api/share/{id}/sync`: applies the items, each a
/// full snapshot of one record. The client never sends a batch again, so an
/// item that cannot be kept is refused alone and the answer is `200`
/// whenever the secret is good: `{"cursor", "applied", "duplicate",
/// "rejected": [{"index", "type", "id", "reason", "detail"}]}`.
async fn sync(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((agent_token, share)): Path<(String, String)>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    agent(&app, &agent_token, peer, Via::HttpSync).await?;
    let body = axum::body::to_bytes(request.into_body(), app.sync_max_body_bytes)
        .await
        .map_err(|_| ApiError::TooLarge(app.sync_max_body_bytes))?;
    // Parsing and mapping up to --sync-max-body-bytes of JSON is CPU work: off
    // the executor that serves RPC and the other requests.
    let max_op_bytes = app.max_op_bytes;
    let (body, ops, places) = off_the_executor(move || {
        let body: SyncBody = serde_json::from_slice(&body).map_err(|_| {
            ApiError::BadRequest("expected {\"secret\": \"...\", \"data\": [...]}".into())
        })?;
        let (ops, places) = map_items(&body.data, max_op_bytes);
        Ok::<_, ApiError>((body, ops, places))
    })
    .await??;
    let writer = app
        .redeemer
        .redeem(&body.secret, peer, Via::HttpSync)
        .await?;
    let share_id = ShareId::from(share);
    if redeemed_share(&writer) != Some(&share_id) || writer.token.kind != TokenKind::Writer {
        return Err(ApiError::Unauthorized);
    }
    app.metrics.opencode_sync();
    app.presence.writer_synced(&share_id);

    let batch = BatchIn {
        batch_id: format!("opencode-sync-{}", share_id.as_str()),
        ops,
        expected_cursor: None,
        follows: None,
        link: None,
    };
    let started = std::time::Instant::now();
    let ack = append_within_limit(&app.ledger, writer.authority(), batch, app.max_op_bytes).await?;
    app.metrics.batch_committed(started.elapsed(), &ack);

    let (mut applied, mut duplicate, mut rejected) = (0, 0, Vec::new());
    for (index, (item, place)) in body.data.iter().zip(places).enumerate() {
        match item_outcome(place.map(|range| &ack.results[range])) {
            ItemOutcome::Applied => {
                app.metrics.opencode_item("applied");
                applied += 1;
            }
            ItemOutcome::Duplicate => {
                app.metrics.opencode_item("duplicate");
                duplicate += 1;
            }
            ItemOutcome::Rejected { reason, detail } => {
                app.metrics.opencode_item("rejected");
                let item_type = item.get("type").and_then(Value::as_str).unwrap_or("");
                if app.logs.allow("opencode_item_rejected", Level::INFO) {
                    info!(share = %share_id, index, item_type, reason, detail,
                        "an opencode sync item was not kept (further ones are summarised)");
                }
                rejected.push(json!({
                    "index": index,
                    "type": item_type,
                    "id": item_record_id(item),
                    "reason": reason,
                    "detail": detail,
                }));
            }
        }
    }
    Ok(Json(json!({
        "cursor": ack.cursor.0,
        "applied": applied,
        "duplicate": duplicate,
        "rejected": rejected,
    })))
}

/// What became of one sync item.
#[derive(Debug, PartialEq, Eq)]
enum ItemOutcome {
    /// Some of its ops applied (or it had none: an empty model list).
    Applied,
    /// Every op of it was in the share already.
    Duplicate,
    Rejected {
        reason: &'static str,
        detail: String,
    },
}

/// The outcome of an item from its ops' results, or from why it could not be mapped.
fn item_outcome(results: Result<&[OpResult], String>) -> ItemOutcome {
    let results = match results {
        Ok(results) => results,
        Err(detail) => {
            return ItemOutcome::Rejected {
                reason: "invalid",
                detail,
            };
        }
    };
    if let Some((reason, detail)) = results.iter().find_map(|r| match &r.outcome {
        OpOutcome::Rejected { reason, detail } => Some((*reason, detail)),
        _ => None,
    }) {
        return ItemOutcome::Rejected {
            reason: reject_reason(reason),
            detail: detail.clone(),
        };
    }
    let all_duplicates = !results.is_empty()
        && results
            .iter()
            .all(|r| matches!(r.outcome, OpOutcome::Duplicate(_)));
    if all_duplicates {
        ItemOutcome::Duplicate
    } else {
        ItemOutcome::Applied
    }
}

fn redeemed_share(redeemed: &crate::redeem::Redeemed) -> Option<&ShareId> {
    redeemed.state.as_ref().map(|state| &state.share_id)
}

/// A reject reason as the schema spells it.
fn reject_reason(reason: RejectReason) -> &'static str {
    match reason {
        RejectReason::MissingDependency => "missingDependency",
        RejectReason::Invalid => "invalid",
        RejectReason::StaleTransition => "staleTransition",
        RejectReason::OpIdReused => "opIdReused",
        RejectReason::TooLarge => "tooLarge",
    }
}

/// `DELETE /opencode/{agent}/api/share/{id}`: unshare. The share is deleted,
/// which revokes every token and live capability of it in the same
/// transaction (open pages say the link stopped working). `200` also when it
/// is gone already, as the client must be able to forget it; another agent's
/// share is left alone and answered the same.
async fn unshare(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((agent_token, share)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let owner = agent(&app, &agent_token, peer, Via::Http).await?;
    let share_id = ShareId::from(share);
    let deleted = lifecycle::delete_share(
        &app.ledger,
        &Operator::Owner(owner.clone()),
        &share_id,
        None,
    )
    .await;
    let outcome = match &deleted {
        Ok(_) => "ok",
        Err(LedgerError::NotFound) => "not_found",
        Err(err) => ServerError::from(err.clone()).code.as_str(),
    };
    app.ledger.audit(AuditEvent {
        action: "delete_share",
        token_id: Some(owner.token_id),
        share_id: Some(share_id),
        outcome: outcome.into(),
        detail: format!("peer={peer} via=opencode"),
    });
    match deleted {
        Ok(_) | Err(LedgerError::NotFound) => Ok(Json(json!({}))),
        Err(err) => Err(err.into()),
    }
}

/// `GET /share/{viewer token}`: the share link. On to the share page, with the
/// token moved into the URL fragment (never sent again); a dead link says so.
async fn link(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
) -> Response {
    match viewer(&app, &token, peer).await {
        Ok(reader) => {
            Redirect::to(&format!("/s/{}#{token}", reader.state.share_id.as_str())).into_response()
        }
        Err(ApiError::RateLimited(wait)) => ApiError::RateLimited(wait).into_response(),
        Err(_) => (
            StatusCode::NOT_FOUND,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            "This share link no longer works: the session was unshared, or the link was \
             revoked or never existed.\n",
        )
            .into_response(),
    }
}

/// `GET /api/share/{viewer token}/data`: the share's records as opencode's
/// items, for `opencode import`: the session, each message followed by its
/// parts, the diff list, the models. Parts whose message has not arrived are
/// left out (opencode could not store them).
async fn data(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
) -> Result<JsonBody, ApiError> {
    let reader = viewer(&app, &token, peer).await?;
    let (_, records) = read_snapshot(&app.ledger, &reader.authority).await?;
    JsonBody::of(move || share_items(&records)).await
}

/// Records in snapshot order as opencode's `{type, data}` items.
fn share_items(records: &[crate::ledger::Record]) -> Vec<Value> {
    let parse = |json: &str| serde_json::from_str::<Value>(json).unwrap_or(Value::Null);
    let mut items = Vec::new();
    let mut models = Vec::new();
    let mut diffs = None;
    let mut messages = std::collections::HashSet::new();
    for record in records {
        match record.kind {
            RecordKind::Session => {
                items.push(json!({"type": "session", "data": parse(&record.json)}))
            }
            RecordKind::Message => {
                messages.insert(record.id.as_str());
                items.push(json!({"type": "message", "data": parse(&record.json)}));
            }
            RecordKind::Part if messages.contains(record.message_id.as_str()) => {
                items.push(json!({"type": "part", "data": parse(&record.json)}));
            }
            RecordKind::Part => {}
            RecordKind::Diffs => diffs = Some(parse(&record.json)),
            RecordKind::Model => models.push(parse(&record.json)),
        }
    }
    if let Some(diffs) = diffs {
        items.push(json!({"type": "session_diff", "data": diffs}));
    }
    if !models.is_empty() {
        items.push(json!({"type": "model", "data": models}));
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Record;
    use capsync_shared::Cursor;

    fn result(outcome: OpOutcome) -> OpResult {
        OpResult {
            op_id: capsync_shared::OpId("x".into()),
            outcome,
        }
    }

    #[test]
    fn an_item_is_applied_duplicate_or_rejected_by_its_ops() {
        let applied = result(OpOutcome::Applied(Cursor(3)));
        let duplicate = result(OpOutcome::Duplicate(Cursor(1)));
        let stale = result(OpOutcome::Rejected {
            reason: RejectReason::StaleTransition,
            detail: "older".into(),
        });
        assert_eq!(
            item_outcome(Ok(&[applied.clone(), duplicate.clone()])),
            ItemOutcome::Applied
        );
        assert_eq!(
            item_outcome(Ok(&[duplicate.clone(), duplicate.clone()])),
            ItemOutcome::Duplicate
        );
        assert_eq!(item_outcome(Ok(&[])), ItemOutcome::Applied);
        assert_eq!(
            item_outcome(Ok(&[applied, stale])),
            ItemOutcome::Rejected {
                reason: "staleTransition",
                detail: "older".into()
            }
        );
        assert_eq!(
            item_outcome(Err("unknown item type".into())),
            ItemOutcome::Rejected {
                reason: "invalid",
                detail: "unknown item type".into()
            }
        );
    }

    #[test]
    fn share_items_put_parts_after_their_message_and_leave_out_waiting_ones() {
        let record = |kind, id: &str, message_id: &str, json: &str| Record {
            kind,
            id: id.into(),
            message_id: message_id.into(),
            json: json.into(),
        };
        let records = [
            record(RecordKind::Session, "", "", r#"{"id":"s"}"#),
            record(RecordKind::Model, "p/m", "", r#"{"id":"m"}"#),
            record(RecordKind::Diffs, "", "", r#"[{"file":"a"}]"#),
            record(RecordKind::Message, "m1", "", r#"{"id":"m1"}"#),
            record(RecordKind::Part, "p1", "m1", r#"{"id":"p1"}"#),
            record(RecordKind::Part, "p9", "m9", r#"{"id":"p9"}"#),
        ];
        let types: Vec<(String, Value)> = share_items(&records)
            .into_iter()
            .map(|item| {
                (
                    item["type"].as_str().unwrap().to_owned(),
                    item["data"].clone(),
                )
            })
            .collect();
        assert_eq!(
            types,
            [
                ("session".into(), json!({"id": "s"})),
                ("message".into(), json!({"id": "m1"})),
                ("part".into(), json!({"id": "p1"})),
                ("session_diff".into(), json!([{"file": "a"}])),
                ("model".into(), json!([{"id": "m"}])),
            ]
        );
    }
}
