//! Bearer token → read access to one share, through the same redeem as RPC.
//!
//! The share page keeps its token in the URL fragment (never sent to the
//! server, so never in an access log or a `Referer`) and sends it as
//! `Authorization: Bearer …`. No header is ever logged.

use std::net::SocketAddr;

use axum::http::{HeaderMap, header};
use capsync_shared::{ShareId, SturdyRef, TokenKind};

use super::AppState;
use super::error::ApiError;
use crate::ledger::{Authority, ShareState};
use crate::redeem::Via;

/// A request allowed to read one share.
#[derive(Clone, Debug)]
pub struct ShareReader {
    /// Re-checked by the ledger on every read, so a revocation stops this reader too.
    pub authority: Authority,
    pub state: ShareState,
    /// Whether the token is the share's own (not its parent's): only then are
    /// its child shares readable with it as well.
    pub own_share: bool,
}

/// The token of `Authorization: Bearer <token>`, if there is one.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Checks the request's bearer token for reading `share`. A viewer token of
/// that share passes, and one of its parent share (see `Backend::child_shares`). Another kind of token is told so (its prefix says what
/// it is, so that tells the caller nothing it did not send); any other failure
/// is the same `401`.
///
/// Writer tokens are refused although they may read over RPC: a share link is
/// handed around, and a writer token in one would give write access to
/// everyone it reaches.
pub async fn share_reader(
    app: &AppState,
    headers: &HeaderMap,
    peer: SocketAddr,
    share: &str,
) -> Result<ShareReader, ApiError> {
    // No token is not a guess: it costs no argon2 and no failed-redeem count.
    let token = bearer(headers).ok_or(ApiError::Unauthorized)?;
    let reader = viewer(app, token, peer).await?;
    let share = ShareId::from(share);
    if reader.state.share_id == share {
        return Ok(reader);
    }
    // A child share (a sub-agent's session) of the token's share: the ledger
    // decides, and checks the parent's viewer epoch on every later read too.
    let authority = Authority {
        share: reader.authority.share.map(|(_, epoch)| (share, epoch)),
        ..reader.authority
    };
    let state = app
        .ledger
        .share_state(authority.clone())
        .await
        .map_err(|_| ApiError::Unauthorized)?;
    Ok(ShareReader {
        authority,
        state,
        own_share: false,
    })
}

/// Checks `token` as a viewer token of any share (the share link carries one).
/// Another kind of token is told so; any other failure is the same `401`.
pub async fn viewer(
    app: &AppState,
    token: &str,
    peer: SocketAddr,
) -> Result<ShareReader, ApiError> {
    if let Ok(sturdy) = token.parse::<SturdyRef>()
        && sturdy.kind != TokenKind::Viewer
    {
        return Err(ApiError::NotAViewerToken(sturdy.kind));
    }
    let redeemed = app.redeemer.redeem(token, peer, Via::Http).await?;
    let Some(state) = redeemed.state.clone() else {
        return Err(ApiError::Unauthorized);
    };
    if redeemed.token.kind != TokenKind::Viewer {
        return Err(ApiError::Unauthorized);
    }
    Ok(ShareReader {
        authority: redeemed.authority(),
        state,
        own_share: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn reads_bearer_tokens_only() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&headers), None);
    }
}
