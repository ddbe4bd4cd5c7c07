//! What the HTTP API answers when a request fails: a status and a short JSON
//! body written for people, never internals. Every kind of bad, revoked,
//! expired or mismatched token is the same `401`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use capsync_shared::ErrorCode;
use serde_json::json;

use crate::error::ServerError;
use crate::ledger::LedgerError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// No token, or one that is not (or no longer) good for this share.
    Unauthorized,
    /// Too many failed redeems from this address.
    RateLimited,
    /// Shutting down, database busy, or too many live streams: retry later.
    Unavailable,
    BadRequest(String),
    /// Details are in the server log.
    Internal,
}

impl From<ServerError> for ApiError {
    fn from(err: ServerError) -> Self {
        match err.code {
            ErrorCode::PermissionDenied | ErrorCode::Revoked | ErrorCode::NotFound => {
                Self::Unauthorized
            }
            ErrorCode::RateLimited => Self::RateLimited,
            ErrorCode::Overloaded => Self::Unavailable,
            ErrorCode::InvalidArgument | ErrorCode::TooLarge => Self::BadRequest(err.message),
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
        let (status, code, message) = match self {
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "This link is not valid: it was revoked, has expired, or is incomplete.".to_owned(),
            ),
            Self::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "rateLimited",
                "Too many invalid links from this address; try again later.".to_owned(),
            ),
            Self::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "The server is busy or shutting down; try again shortly.".to_owned(),
            ),
            Self::BadRequest(why) => (StatusCode::BAD_REQUEST, "invalidArgument", why),
            Self::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error; see the server log.".to_owned(),
            ),
        };
        let mut response =
            (status, Json(json!({"error": code, "message": message}))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
