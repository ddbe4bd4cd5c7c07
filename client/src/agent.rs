//! `AgentClient`: an agent's capability (create shares; list, revoke and mint tokens for the ones it made).

use capsync_shared::capsync_capnp::{
    agent, create_share_result, mint_result, share_list_result, share_state_result,
};

use crate::error::ClientError;
use crate::types::{MintedToken, Scope, ShareInfo, ShareList, ShareState, wire_time};
use crate::wire::{self, ok_or_fail};
use crate::writer::WriterClient;

/// A live `Agent` capability.
#[derive(Clone)]
pub struct AgentClient {
    /// The capability itself.
    cap: agent::Client,
    /// Id of the agent token it was redeemed from; shares it creates name it as owner.
    token_id: String,
    /// When that token expires, if ever.
    expires_at: Option<i64>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("token_id", &self.token_id)
            .finish_non_exhaustive()
    }
}

/// What a new share mirrors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewShare {
    /// The agent's session id; the share's `session.upsert` must carry this id.
    pub session_id: String,
    pub project_id: String,
    /// `None` for a root session.
    pub parent_session_id: Option<String>,
    pub title: String,
    /// When the viewer token minted with the share expires (Unix ms); `None` for never.
    pub viewer_expires_at: Option<i64>,
    /// Return the share of `session_id` this agent token already created, if there is
    /// one (visible and not archived), with new tokens for it, instead of a second share.
    pub join_existing: bool,
}

/// A freshly created share: its live writer plus its two sturdy refs.
#[derive(Debug, Clone)]
pub struct CreatedShare {
    /// Live at once; no need to redeem `writer_token` on this connection.
    pub writer: WriterClient,
    /// Sturdy ref of the writer, to redeem after a reconnect or a restart.
    pub writer_token: MintedToken,
    /// A read-only link to hand to people.
    pub viewer_token: MintedToken,
    pub info: ShareInfo,
    /// The share existed already ([`NewShare::join_existing`]).
    pub joined: bool,
}

impl AgentClient {
    pub(crate) fn new(cap: agent::Client, token_id: String, expires_at: Option<i64>) -> Self {
        Self {
            cap,
            token_id,
            expires_at,
        }
    }

    /// The raw capability, for calls this library does not wrap.
    pub fn capability(&self) -> agent::Client {
        self.cap.clone()
    }

    pub fn token_id(&self) -> &str {
        &self.token_id
    }

    pub fn expires_at(&self) -> Option<i64> {
        self.expires_at
    }

    /// Creates a share for one agent session.
    pub async fn create_share(&self, share: NewShare) -> Result<CreatedShare, ClientError> {
        let mut request = self.cap.create_share_request();
        {
            let mut params = request.get();
            params.set_session_id(share.session_id.as_str());
            params.set_project_id(share.project_id.as_str());
            params.set_parent_session_id(share.parent_session_id.as_deref().unwrap_or(""));
            params.set_title(share.title.as_str());
            params.set_viewer_expires_at(wire_time(share.viewer_expires_at));
            params.set_join_existing(share.join_existing);
        }
        let response = request.send().promise.await?;
        let created = ok_or_fail!(create_share_result, response.get()?.get_result()?);
        let info = wire::share_info(created.get_info()?)?;
        let writer_token = wire::minted_token(created.get_writer_token()?)?;
        let viewer_token = wire::minted_token(created.get_viewer_token()?)?;
        let writer = WriterClient::new(
            created.get_writer()?,
            writer_token.token_id.clone(),
            writer_token.expires_at,
            info.state.clone(),
            false,
        );
        Ok(CreatedShare {
            writer,
            writer_token,
            viewer_token,
            info,
            joined: created.get_joined(),
        })
    }

    /// One page of the shares this agent token created, ordered by share id (archived
    /// ones only with `include_archived`). Start with
    /// `after = ""`; `limit = 0` asks for the server's default page size.
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

    /// Revokes a share this agent created, without the share's own token (the owner
    /// unshares). Returns the new state.
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

    /// Mints a writer token for a share this agent created, at the share's current
    /// writer epoch: how the owner writes again after revoking writers.
    pub async fn mint_writer(
        &self,
        share_id: &str,
        expires_at: Option<i64>,
    ) -> Result<MintedToken, ClientError> {
        let mut request = self.cap.mint_writer_request();
        request.get().set_share_id(share_id);
        request.get().set_expires_at(wire_time(expires_at));
        let response = request.send().promise.await?;
        wire::minted_token(ok_or_fail!(mint_result, response.get()?.get_result()?))
    }

    /// Mints a viewer token (a new share link) for a share this agent created, at the
    /// share's current viewer epoch.
    pub async fn mint_viewer(
        &self,
        share_id: &str,
        expires_at: Option<i64>,
    ) -> Result<MintedToken, ClientError> {
        let mut request = self.cap.mint_viewer_request();
        request.get().set_share_id(share_id);
        request.get().set_expires_at(wire_time(expires_at));
        let response = request.send().promise.await?;
        wire::minted_token(ok_or_fail!(mint_result, response.get()?.get_result()?))
    }
}
