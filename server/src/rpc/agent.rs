//! `Agent`: creates shares, and lists and revokes the ones it created.

use std::rc::Rc;

use capsync_shared::capsync_capnp::agent;
use capsync_shared::limits::MAX_RECORD_ID_BYTES;
use capsync_shared::{ShareId, TokenKind};

use super::context::Context;
use super::shares::{self, outcome};
use super::wire;
use super::writer::WriterImpl;
use crate::error::ServerError;
use crate::ledger::{AuditEvent, Authority, NewShare};

/// Longest share title accepted, in bytes.
pub(super) const MAX_TITLE_BYTES: usize = 1024;

pub struct AgentImpl {
    ctx: Rc<Context>,
    auth: Authority,
}

impl AgentImpl {
    pub fn new(ctx: Rc<Context>, auth: Authority) -> Self {
        Self { ctx, auth }
    }
}

pub(super) fn read_new_share(
    p: agent::create_share_params::Reader<'_>,
    now: i64,
) -> Result<(NewShare, Option<i64>), ServerError> {
    let share = NewShare {
        share_id: ShareId::random(),
        session_id: wire::text(p.get_session_id())?,
        project_id: wire::text(p.get_project_id())?,
        parent_session_id: wire::text(p.get_parent_session_id())?,
        title: wire::text(p.get_title())?,
    };
    if share.session_id.is_empty() {
        return Err(ServerError::invalid("sessionId is required"));
    }
    for (name, value) in [
        ("sessionId", &share.session_id),
        ("projectId", &share.project_id),
        ("parentSessionId", &share.parent_session_id),
    ] {
        if value.len() > MAX_RECORD_ID_BYTES {
            return Err(ServerError::too_large(format!(
                "{name} is longer than {MAX_RECORD_ID_BYTES} bytes"
            )));
        }
    }
    if share.title.len() > MAX_TITLE_BYTES {
        return Err(ServerError::too_large(format!(
            "title is longer than {MAX_TITLE_BYTES} bytes"
        )));
    }
    let viewer_expires_at = wire::optional_time(p.get_viewer_expires_at(), "viewerExpiresAt", now)?;
    Ok((share, viewer_expires_at))
}

impl agent::Server for AgentImpl {
    async fn create_share(
        self: Rc<Self>,
        params: agent::CreateShareParams,
        mut results: agent::CreateShareResults,
    ) -> Result<(), capnp::Error> {
        let created = async {
            let p = params.get()?;
            let join_existing = p.get_join_existing();
            let (share, viewer_expires_at) =
                read_new_share(p, self.ctx.ledger.clock().now_millis())?;
            let hasher = &self.ctx.hasher;
            let (writer_token, writer_row) =
                hasher.mint(TokenKind::Writer, None, String::new()).await?;
            let (viewer_token, viewer_row) = hasher
                .mint(TokenKind::Viewer, viewer_expires_at, String::new())
                .await?;
            let ledger = &self.ctx.ledger;
            let auth = self.auth.clone();
            let (info, joined) = if join_existing {
                ledger
                    .create_or_join_share(auth, share, writer_row, viewer_row)
                    .await?
            } else {
                (
                    ledger
                        .create_share(auth, share, writer_row, viewer_row)
                        .await?,
                    false,
                )
            };
            let minted = (writer_token, viewer_token, viewer_expires_at);
            Ok::<_, ServerError>((info, joined, minted))
        }
        .await;
        self.ctx.audit(AuditEvent {
            action: "create_share",
            token_id: Some(self.auth.token_id.clone()),
            share_id: created.as_ref().ok().map(|c| c.0.state.share_id.clone()),
            outcome: match &created {
                Ok((_, true, _)) => "joined",
                _ => outcome(&created),
            }
            .to_owned(),
            detail: String::new(),
        });
        let result = results.get().init_result();
        match created {
            Ok((info, joined, (writer_token, viewer_token, viewer_expires_at))) => {
                let mut ok = result.init_ok();
                let writer_auth = Authority {
                    token_id: writer_token.id.clone(),
                    kind: TokenKind::Writer,
                    share: Some((info.state.share_id.clone(), info.state.writer_epoch)),
                };
                ok.set_writer(capnp_rpc::new_client(WriterImpl::new(
                    self.ctx.clone(),
                    writer_auth,
                    None,
                )));
                wire::fill_minted(
                    &writer_token.expose(),
                    writer_token.id.as_str(),
                    None,
                    ok.reborrow().init_writer_token(),
                );
                wire::fill_minted(
                    &viewer_token.expose(),
                    viewer_token.id.as_str(),
                    viewer_expires_at,
                    ok.reborrow().init_viewer_token(),
                );
                wire::fill_info(&info, ok.reborrow().init_info());
                ok.set_joined(joined);
            }
            Err(err) => err.fill(result.init_failure()),
        }
        Ok(())
    }

    async fn list_shares(
        self: Rc<Self>,
        params: agent::ListSharesParams,
        mut results: agent::ListSharesResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let out = results.get().init_result();
        let (after, limit) = (p.get_after(), p.get_limit());
        shares::list(
            &self.ctx,
            &self.auth,
            after,
            limit,
            p.get_include_archived(),
            out,
        )
        .await;
        Ok(())
    }

    async fn revoke_share(
        self: Rc<Self>,
        params: agent::RevokeShareParams,
        mut results: agent::RevokeShareResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let out = results.get().init_result();
        shares::revoke(&self.ctx, &self.auth, p.get_share_id(), p.get_scope(), out).await;
        Ok(())
    }

    async fn mint_writer(
        self: Rc<Self>,
        params: agent::MintWriterParams,
        mut results: agent::MintWriterResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let out = results.get().init_result();
        let (share_id, expires_at) = (p.get_share_id(), p.get_expires_at());
        shares::mint(
            &self.ctx,
            &self.auth,
            share_id,
            expires_at,
            TokenKind::Writer,
            out,
        )
        .await;
        Ok(())
    }

    async fn mint_viewer(
        self: Rc<Self>,
        params: agent::MintViewerParams,
        mut results: agent::MintViewerResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let out = results.get().init_result();
        let (share_id, expires_at) = (p.get_share_id(), p.get_expires_at());
        shares::mint(
            &self.ctx,
            &self.auth,
            share_id,
            expires_at,
            TokenKind::Viewer,
            out,
        )
        .await;
        Ok(())
    }
}
