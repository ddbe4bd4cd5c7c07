//! What the HTTP API answers when a request fails: a status and a short JSON
//! body written for people, never internals. Every kind of bad, revoked,
//! expired or mismatched token is the same `401`; ops that ledger compaction
//! dropped are `410 Gone`, with the cursor to take a snapshot from.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use capsync_shared::{Cursor, ErrorCode, TokenKind};
use serde_json::json;

use crate::error::ServerError;
use crate::ledger::LedgerError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// No token, or one that is not (or no longer) good for this share.
    Unauthorized,
    /// A token of another kind than viewer (its own prefix says so).
    NotAViewerToken(TokenKind),
    /// Too many failed redeems (from this address, or for this token); retry after the wait.
    RateLimited(Duration),
    /// Shutting down, database busy, or too many live streams: retry later.
    Unavailable,
    /// The server's storage is full; retry after the wait.
    StorageFull(Duration),
    BadRequest(String),
    /// A body over the limit (in bytes) of its route.
    TooLarge(usize),
    /// The ops asked for were compacted; carries the share's compaction point.
    SnapshotRequired(Cursor),
    /// Details are in the server log.
    Internal,
}

impl From<ServerError> for ApiError {
    fn from(err: ServerError) -> Self {
        match err.code {
            ErrorCode::PermissionDenied | ErrorCode::Revoked | ErrorCode::NotFound => {
                Self::Unauthorized
            }
            ErrorCode::RateLimited => {
                Self::RateLimited(err.retry_after.unwrap_or(Duration::from_secs(1)))
            }
            ErrorCode::Overloaded => Self::Unavailable,
            ErrorCode::StorageFull => {
                Self::StorageFull(err.retry_after.unwrap_or(Duration::from_secs(1)))
            }
            ErrorCode::InvalidArgument | ErrorCode::TooLarge => Self::BadRequest(err.message),
            ErrorCode::SnapshotRequired => Self::SnapshotRequired(err.cursor),
            _ => Self::Internal,
        }
    }
}

impl From<LedgerError> for ApiError {
    fn from(err: LedgerError) -> Self {
        // Through ServerError, which logs storage details and hides them.
        ServerError::from(err).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let cursor = match &self {
            Self::SnapshotRequired(point) => Some(point.0),
            _ => None,
        };
        // `Retry-After` is in whole seconds: round up, so a client never comes back early.
        let retry_after = match &self {
            Self::RateLimited(wait) | Self::StorageFull(wait) => {
                Some(wait.as_millis().div_ceil(1000).max(1))
            }
            Self::Unavailable => Some(1),
            _ => None,
        };
        let (status, code, message) = match self {
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "This link is not valid: it was revoked, has expired, or is incomplete.".to_owned(),
            ),
            Self::RateLimited(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rateLimited",
                "Too many invalid links tried; try again shortly.".to_owned(),
            ),
            Self::StorageFull(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "storageFull",
                "The server's storage is full; try again later.".to_owned(),
            ),
            Self::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "The server is busy or shutting down; try again shortly.".to_owned(),
            ),
            Self::NotAViewerToken(kind) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!(
                    "This is {} {kind} token, which stays with its owner: share links and \
                     this API take viewer tokens (csviewer_…). Mint one with `capsync mint-viewer` \
                     or `capsync share mint-viewer`.",
                    if kind == TokenKind::Admin || kind == TokenKind::Agent {
                        "an"
                    } else {
                        "a"
                    }
                ),
            ),
            Self::BadRequest(why) => (StatusCode::BAD_REQUEST, "invalidArgument", why),
            Self::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "tooLarge",
                format!("The request body is over this server's limit of {limit} bytes."),
            ),
            Self::SnapshotRequired(point) => (
                StatusCode::GONE,
                "snapshotRequired",
                snapshot_required_message(point),
            ),
            Self::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error; see the server log.".to_owned(),
            ),
        };
        let mut body = json!({"error": code, "message": message});
        if let Some(cursor) = cursor {
            body["cursor"] = cursor.into();
        }
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds as u64));
        }
        response
    }
}

/// What a reader below the compaction point is told, over the API and the event stream alike.
pub fn snapshot_required_message(point: Cursor) -> String {
    format!(
        "Ops up to cursor {point} were compacted: read the snapshot, then follow from its cursor."
    )
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;
    use serde_json::Value;

    use super::*;

    async fn status_and_body(err: ApiError) -> (StatusCode, Value) {
        let response = err.into_response();
        let status = response.status();
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn compacted_ops_are_gone_with_the_compaction_point() {
        let err = ApiError::from(LedgerError::SnapshotRequired(Cursor(42)));
        assert_eq!(err, ApiError::SnapshotRequired(Cursor(42)));
        let (status, body) = status_and_body(err).await;
        assert_eq!(status, StatusCode::GONE);
        assert_eq!(body["error"], "snapshotRequired");
        assert_eq!(body["cursor"], 42);
        assert!(
            body["message"].as_str().unwrap().contains("snapshot"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn limited_callers_are_told_when_to_retry() {
        let err = ApiError::from(ServerError::rate_limited(
            "from this address",
            Duration::from_millis(5200),
        ));
        assert_eq!(err, ApiError::RateLimited(Duration::from_millis(5200)));
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "6");
    }

    #[tokio::test]
    async fn other_errors_carry_no_cursor() {
        let (status, body) = status_and_body(ApiError::Unavailable).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"], "unavailable");
        assert!(body.get("cursor").is_none(), "{body}");
    }
}
