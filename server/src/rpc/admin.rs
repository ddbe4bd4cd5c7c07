//! `Admin`: mints agents, revokes, archives and deletes shares, lists everything, reports stats.

use std::rc::Rc;

use capsync_shared::capsync_capnp::{admin, share_info_result};
use capsync_shared::{ShareId, TokenId, TokenKind};

use super::context::Context;
use super::shares::{self, outcome};
use super::wire;
use crate::error::ServerError;
use crate::ledger::{AuditEvent, Authority};

pub struct AdminImpl {
    ctx: Rc<Context>,
    auth: Authority,
}

impl AdminImpl {
    pub fn new(ctx: Rc<Context>, auth: Authority) -> Self {
        Self { ctx, auth }
    }

    fn audit(
        &self,
        action: &'static str,
        share_id: Option<ShareId>,
        outcome: &str,
        detail: String,
    ) {
        self.ctx.audit(AuditEvent {
            action,
            token_id: Some(self.auth.token_id.clone()),
            share_id,
            outcome: outcome.to_owned(),
            detail,
        });
    }

    /// Archives or unarchives the share named in the call, audits it, and answers with its info.
    async fn set_archived(
        &self,
        share_id: capnp::Result<capnp::text::Reader<'_>>,
        archived: bool,
        out: share_info_result::Builder<'_>,
    ) {
        let share_id = wire::text(share_id).map(ShareId);
        let done = async {
            let share_id = share_id.clone()?;
            Ok::<_, ServerError>(
                self.ctx
                    .ledger
                    .set_archived(self.auth.clone(), share_id, archived)
                    .await?,
            )
        }
        .await;
        let action = if archived {
            "archive_share"
        } else {
            "unarchive_share"
        };
        self.audit(action, share_id.ok(), outcome(&done), String::new());
        match done {
            Ok(info) => wire::fill_info(&info, out.init_ok()),
            Err(err) => err.fill(out.init_failure()),
        }
    }
}

impl admin::Server for AdminImpl {
    async fn mint_agent(
        self: Rc<Self>,
        params: admin::MintAgentParams,
        mut results: admin::MintAgentResults,
    ) -> Result<(), capnp::Error> {
        let request = (|| {
            let p = params.get()?;
            Ok::<_, ServerError>((
                wire::text(p.get_label())?,
                wire::optional_time(p.get_expires_at(), "expiresAt")?,
            ))
        })();
        let minted = async {
            let (label, expires_at) = request?;
            let (token, row) = self
                .ctx
                .hasher
                .mint(TokenKind::Agent, expires_at, label)
                .await?;
            self.ctx
                .ledger
                .mint_token(self.auth.clone(), TokenKind::Agent, row)
                .await?;
            Ok::<_, ServerError>((token, expires_at))
        }
        .await;
        let detail = match &minted {
            Ok((token, _)) => format!("new_token={}", token.id),
            Err(_) => String::new(),
        };
        self.audit("mint", None, outcome(&minted), detail);
        let result = results.get().init_result();
        match minted {
            Ok((token, expires_at)) => wire::fill_minted(
                &token.expose(),
                token.id.as_str(),
                expires_at,
                result.init_ok(),
            ),
            Err(err) => err.fill(result.init_failure()),
        }
        Ok(())
    }

    async fn revoke_share(
        self: Rc<Self>,
        params: admin::RevokeShareParams,
        mut results: admin::RevokeShareResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let out = results.get().init_result();
        shares::revoke(&self.ctx, &self.auth, p.get_share_id(), p.get_scope(), out).await;
        Ok(())
    }

    async fn revoke_token(
        self: Rc<Self>,
        params: admin::RevokeTokenParams,
        mut results: admin::RevokeTokenResults,
    ) -> Result<(), capnp::Error> {
        let mut target = String::new();
        let revoked = async {
            let token_id = TokenId(wire::text(params.get()?.get_token_id())?);
            target = format!("target={token_id}");
            self.ctx
                .ledger
                .revoke_token(self.auth.clone(), token_id)
                .await
                .map_err(|err| match err {
                    crate::ledger::LedgerError::NotFound => {
                        ServerError::new(capsync_shared::ErrorCode::NotFound, "token not found")
                    }
                    other => other.into(),
                })
        }
        .await;
        self.audit("revoke_token", None, outcome(&revoked), target);
        let mut result = results.get().init_result();
        match revoked {
            Ok(()) => result.set_ok(()),
            Err(err) => err.fill(result.init_failure()),
        }
        Ok(())
    }

    async fn list_shares(
        self: Rc<Self>,
        params: admin::ListSharesParams,
        mut results: admin::ListSharesResults,
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

    async fn delete_share(
        self: Rc<Self>,
        params: admin::DeleteShareParams,
        mut results: admin::DeleteShareResults,
    ) -> Result<(), capnp::Error> {
        let mut share = None;
        let deleted = async {
            let share_id = ShareId(wire::text(params.get()?.get_share_id())?);
            share = Some(share_id.clone());
            Ok::<_, ServerError>(
                self.ctx
                    .ledger
                    .delete_share(self.auth.clone(), share_id)
                    .await?,
            )
        }
        .await;
        self.audit("delete_share", share, outcome(&deleted), String::new());
        let mut result = results.get().init_result();
        match deleted {
            Ok(()) => result.set_ok(()),
            Err(err) => err.fill(result.init_failure()),
        }
        Ok(())
    }

    async fn archive_share(
        self: Rc<Self>,
        params: admin::ArchiveShareParams,
        mut results: admin::ArchiveShareResults,
    ) -> Result<(), capnp::Error> {
        let share_id = params.get()?.get_share_id();
        self.set_archived(share_id, true, results.get().init_result())
            .await;
        Ok(())
    }

    async fn unarchive_share(
        self: Rc<Self>,
        params: admin::UnarchiveShareParams,
        mut results: admin::UnarchiveShareResults,
    ) -> Result<(), capnp::Error> {
        let share_id = params.get()?.get_share_id();
        self.set_archived(share_id, false, results.get().init_result())
            .await;
        Ok(())
    }

    async fn stats(
        self: Rc<Self>,
        _: admin::StatsParams,
        mut results: admin::StatsResults,
    ) -> Result<(), capnp::Error> {
        let stats = self
            .ctx
            .ledger
            .stats(self.auth.clone())
            .await
            .map_err(ServerError::from);
        let result = results.get().init_result();
        match stats {
            Ok(stats) => wire::fill_stats(&stats, result.init_ok()),
            Err(err) => err.fill(result.init_failure()),
        }
        Ok(())
    }
}
