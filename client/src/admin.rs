//! `AdminClient`: the operator's capability (mint agent tokens, revoke, list, archive,
//! delete shares, storage stats).

use capsync_shared::capsync_capnp::{
    admin, mint_result, share_info_result, share_list_result, share_state_result, stats_result,
};

use crate::error::ClientError;
use crate::types::{MintedToken, Scope, ShareInfo, ShareList, ShareState, Stats, wire_time};
use crate::wire::{self, ok_or_fail};

/// A live `Admin` capability.
#[derive(Clone)]
pub struct AdminClient {
    /// The capability itself.
    cap: admin::Client,
    /// Id of the admin token it was redeemed from, for messages and audit.
    token_id: String,
    /// When that token expires, if ever.
    expires_at: Option<i64>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("token_id", &self.token_id)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    pub(crate) fn new(cap: admin::Client, token_id: String, expires_at: Option<i64>) -> Self {
        Self {
            cap,
            token_id,
            expires_at,
        }
    }

    /// The raw capability, for calls this library does not wrap.
    pub fn capability(&self) -> admin::Client {
        self.cap.clone()
    }

    pub fn token_id(&self) -> &str {
        &self.token_id
    }

    pub fn expires_at(&self) -> Option<i64> {
        self.expires_at
    }

    /// Mints an agent token (it may create shares). `label` is free text for people;
    /// `expires_at` is Unix milliseconds, `None` for never.
    pub async fn mint_agent(
        &self,
        label: &str,
        expires_at: Option<i64>,
    ) -> Result<MintedToken, ClientError> {
        let mut request = self.cap.mint_agent_request();
        request.get().set_label(label);
        request.get().set_expires_at(wire_time(expires_at));
        let response = request.send().promise.await?;
        wire::minted_token(ok_or_fail!(mint_result, response.get()?.get_result()?))
    }

    /// Bumps the share's epoch for `scope`: older tokens and live capabilities of that
    /// scope fail with `revoked` from their next call. Returns the new state.
    pub async fn revoke_share(
        &self,
        share_id: &str,
        scope: Scope,
    ) -> Result<ShareState, ClientError> {
        let mut request = self.cap.revoke_share_request();
        request.get().set_share_id(share_id);
        request.get().set_scope(scope.into());
        let response = request.send().promise.await?;
        wire::share_state(ok_or_fail!(
            share_state_result,
            response.get()?.get_result()?
        ))
    }

    /// Revokes one token by id; capabilities redeemed from it fail with `revoked`.
    pub async fn revoke_token(&self, token_id: &str) -> Result<(), ClientError> {
        let mut request = self.cap.revoke_token_request();
        request.get().set_token_id(token_id);
        let response = request.send().promise.await?;
        wire::outcome(response.get()?.get_result()?)
    }

    /// One page of all shares, ordered by share id (archived ones only with
    /// `include_archived`). Start with `after = ""`;
    /// `limit = 0` asks for the server's default page size.
    pub async fn list_shares(
        &self,
        after: &str,
        limit: u32,
        include_archived: bool,
    ) -> Result<ShareList, ClientError> {
        let mut request = self.cap.list_shares_request();
        request.get().set_after(after);
        request.get().set_limit(limit);
        request.get().set_include_archived(include_archived);
        let response = request.send().promise.await?;
        wire::share_list(ok_or_fail!(
            share_list_result,
            response.get()?.get_result()?
        ))
    }

    /// Deletes a share with its records, ledger and tokens.
    pub async fn delete_share(&self, share_id: &str) -> Result<(), ClientError> {
        let mut request = self.cap.delete_share_request();
        request.get().set_share_id(share_id);
        let response = request.send().promise.await?;
        wire::outcome(response.get()?.get_result()?)
    }

    /// Archives a share: it leaves listings (unless asked for) and becomes read-only;
    /// viewers keep working, appends fail with `invalidArgument`. Idempotent.
    pub async fn archive_share(&self, share_id: &str) -> Result<ShareInfo, ClientError> {
        let mut request = self.cap.archive_share_request();
        request.get().set_share_id(share_id);
        let response = request.send().promise.await?;
        wire::share_info(ok_or_fail!(
            share_info_result,
            response.get()?.get_result()?
        ))
    }

    /// Undoes [`archive_share`](Self::archive_share). Idempotent.
    pub async fn unarchive_share(&self, share_id: &str) -> Result<ShareInfo, ClientError> {
        let mut request = self.cap.unarchive_share_request();
        request.get().set_share_id(share_id);
        let response = request.send().promise.await?;
        wire::share_info(ok_or_fail!(
            share_info_result,
            response.get()?.get_result()?
        ))
    }

    /// Sizes and counts of the server's whole store.
    pub async fn stats(&self) -> Result<Stats, ClientError> {
        let response = self.cap.stats_request().send().promise.await?;
        Ok(wire::stats(ok_or_fail!(
            stats_result,
            response.get()?.get_result()?
        )))
    }
}
