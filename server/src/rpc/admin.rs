//! `Admin`: mints agents, revokes and deletes shares, lists everything.

use std::rc::Rc;

use capsync_shared::capsync_capnp::admin;
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
        shares::list(&self.ctx, &self.auth, p.get_after(), p.get_limit(), out).await;
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
}
