//! `AdminClient`: the operator's capability (mint agent tokens, revoke, list, archive,
//! delete shares, storage stats, and the lifecycle: prune, vacuum, reclaim, ledger
//! compaction).

use std::time::Duration;

use capsync_shared::capsync_capnp::{
    admin, compact_result, mint_result, prune_result, reclaim_result, share_info_result,
    share_list_result, share_state_result, stats_result, vacuum_result,
};

use crate::error::ClientError;
use crate::progress_listener::{ProgressFn, ProgressRelay};
use crate::types::{
    CompactReport, MintedToken, PruneOptions, PruneReport, ReclaimReport, Scope, ShareInfo,
    ShareList, ShareState, Stats, VacuumReport, wire_millis, wire_time,
};
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
        wire::stats(ok_or_fail!(stats_result, response.get()?.get_result()?))
    }

    /// Deletes root shares inactive for longer than `options.older_than` (see
    /// [`PruneOptions`]), each with its records, ledger and tokens; live capabilities
    /// of a deleted share fail with `notFound`. With `dry_run` nothing is deleted and
    /// the report lists exactly what would be: a real prune right after deletes the
    /// same shares, except any that changed in between ([`PruneReport::skipped`]).
    /// `on_progress` hears about each share deleted.
    pub async fn prune(
        &self,
        options: &PruneOptions,
        on_progress: Option<ProgressFn>,
    ) -> Result<PruneReport, ClientError> {
        let relay = ProgressRelay::new(on_progress);
        let mut request = self.cap.prune_request();
        {
            let mut wire_options = request.get().init_options();
            wire_options.set_older_than_ms(positive_millis(options.older_than)?);
            wire_options.set_children(options.children);
            wire_options.set_archived_only(options.archived_only);
            wire_options.set_dry_run(options.dry_run);
            wire_options.set_vacuum(options.vacuum);
        }
        if let Some(listener) = relay.client() {
            request.get().set_progress(listener);
        }
        let response = request.send().promise.await?;
        wire::prune_report(ok_or_fail!(prune_result, response.get()?.get_result()?))
    }

    /// Checkpoints the log and rewrites the database file without its free pages.
    /// Every write waits while it runs; when the database is busy the server answers
    /// `overloaded` ("database busy; try again").
    pub async fn vacuum(&self) -> Result<VacuumReport, ClientError> {
        let response = self.cap.vacuum_request().send().promise.await?;
        Ok(wire::vacuum_report(ok_or_fail!(
            vacuum_result,
            response.get()?.get_result()?
        )))
    }

    /// Clears the output and attachments of tool parts already marked compacted
    /// (stored before the server's `reclaim` setting was on). Nothing else is touched;
    /// `dry_run` only counts. `on_progress` hears about the parts scanned.
    pub async fn reclaim(
        &self,
        dry_run: bool,
        on_progress: Option<ProgressFn>,
    ) -> Result<ReclaimReport, ClientError> {
        let relay = ProgressRelay::new(on_progress);
        let mut request = self.cap.reclaim_request();
        request.get().set_dry_run(dry_run);
        if let Some(listener) = relay.client() {
            request.get().set_progress(listener);
        }
        let response = request.send().promise.await?;
        Ok(wire::reclaim_report(ok_or_fail!(
            reclaim_result,
            response.get()?.get_result()?
        )))
    }

    /// Drops the payload of ledger ops applied more than `older_than` ago; their op
    /// ids stay, so dedupe is unchanged. Viewers asking for ops below a share's new
    /// compaction point are told `snapshotRequired`. `dry_run` only counts.
    /// `on_progress` hears about the shares visited.
    pub async fn compact_ledger(
        &self,
        older_than: Duration,
        dry_run: bool,
        on_progress: Option<ProgressFn>,
    ) -> Result<CompactReport, ClientError> {
        let relay = ProgressRelay::new(on_progress);
        let mut request = self.cap.compact_ledger_request();
        request
            .get()
            .set_older_than_ms(positive_millis(older_than)?);
        request.get().set_dry_run(dry_run);
        if let Some(listener) = relay.client() {
            request.get().set_progress(listener);
        }
        let response = request.send().promise.await?;
        Ok(wire::compact_report(ok_or_fail!(
            compact_result,
            response.get()?.get_result()?
        )))
    }
}

/// An age as the wire's milliseconds; refused here when it rounds to zero, which the
/// server would refuse anyway, so the caller learns which argument was wrong.
fn positive_millis(age: Duration) -> Result<i64, ClientError> {
    match wire_millis(age) {
        0 => Err(ClientError::invalid(
            "the age must be at least one millisecond (e.g. 30d, 12h)",
        )),
        ms => Ok(ms),
    }
}
