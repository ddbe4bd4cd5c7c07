//! What a storage engine provides, and how any engine becomes the [`Backend`].
//!
//! An [`Engine`] runs work in transactions over its [`LedgerTx`] and owns what is its
//! own: token lookup for redeeming, storage statistics, reclaim positions, maintenance
//! and closing. [`RulesBackend`] is the one [`Backend`]: each method is one transaction
//! that runs one of the engine-neutral [`rules`], so every engine applies the same
//! authority, exactly-once and record rules.

use capsync_shared::{Cursor, ShareId, TokenId, TokenKind};
use futures::future::{BoxFuture, FutureExt, TryFutureExt};
use std::sync::Arc;
use std::time::Duration;

use super::rules;
use super::rules::append::Appended;
use super::rules::store::LedgerTx;
use super::{
    Ack, AuditEvent, Authority, Backend, BatchIn, Changed, CompactPosition, CompactStep,
    DeleteStep, FeedPage, LedgerResult, Minted, NewShare, NewToken, Operator, OpsPage, PruneFilter,
    PrunePlan, ReclaimStep, RevokeScope, ShareInfo, ShareState, SnapshotPage, Stats, StoredParts,
    StoredToken, VacuumReport,
};

/// A storage engine: transactions over its [`LedgerTx`], and what only it knows.
///
/// Work passed to [`Engine::write`] and [`Engine::read`] gets the transaction and the
/// clock's time in Unix ms, read when the work runs. It is `Fn` because an engine may
/// run it again after a transaction it could not commit (PostgreSQL's serialization
/// failures and deadlocks); it only ever commits once.
///
/// As [`Backend`] requires, work starts when the method is called and is not cancelled
/// by dropping the returned future.
pub(crate) trait Engine: Send + Sync + 'static {
    type Tx<'t>: LedgerTx;

    /// Runs `work` in a write transaction holding `bytes` of payload while it waits;
    /// once committed, announces what `change` says changed, whether or not the caller
    /// still waits. Writes naming the same share in `order` run in the order they were
    /// called (a client's pipelined batches apply in the order it sent them), and
    /// `change` is asked once per commit, on the engine's thread, before any later
    /// write naming the same share runs (what [`rules::batch_order`] counts on).
    fn write<T, F, C>(
        &self,
        order: Option<&ShareId>,
        bytes: usize,
        work: F,
        change: C,
    ) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: for<'t> Fn(&mut Self::Tx<'t>, i64) -> LedgerResult<T> + Send + 'static,
        C: Fn(&T) -> Option<Changed> + Send + Sync + 'static;

    /// Runs `work` in one read-only transaction that sees one state of the store.
    fn read<T, F>(&self, work: F) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: for<'t> Fn(&mut Self::Tx<'t>, i64) -> LedgerResult<T> + Send + 'static;

    /// See [`Backend::find_token`].
    fn find_token(&self, id: TokenId) -> BoxFuture<'static, LedgerResult<Option<StoredToken>>>;
    /// See [`Backend::stats`].
    fn stats(&self, who: Authority) -> BoxFuture<'static, LedgerResult<Stats>>;
    /// See [`Backend::reclaim_step`]; positions are the engine's own.
    fn reclaim_step(
        &self,
        op: Operator,
        after: i64,
        max_parts: u32,
        dry_run: bool,
    ) -> BoxFuture<'static, LedgerResult<ReclaimStep>>;
    /// See [`Backend::vacuum`].
    fn vacuum(&self, op: Operator) -> BoxFuture<'static, LedgerResult<VacuumReport>>;
    /// See [`Backend::upkeep`].
    fn upkeep(&self, budget: Duration) -> BoxFuture<'static, LedgerResult<()>>;
    /// See [`Backend::changes`].
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Changed>;
    /// See [`Backend::audit`].
    fn audit(&self, event: AuditEvent);
    /// See [`Backend::close`].
    fn close(&self) -> BoxFuture<'static, ()>;
}

/// Work that announces nothing.
fn silent<T>(_: &T) -> Option<Changed> {
    None
}

/// The [`Backend`] over an engine: the rules, one transaction per call.
pub(crate) struct RulesBackend<E> {
    engine: E,
    /// Whether appends store compacted tool parts without their output (the server's
    /// `reclaim` setting).
    reclaim_compacted: bool,
}

impl<E: Engine> RulesBackend<E> {
    pub(crate) fn new(engine: E, reclaim_compacted: bool) -> Self {
        Self {
            engine,
            reclaim_compacted,
        }
    }
}

/// The engine's own methods (an engine's tests reach its internals this way).
impl<E> std::ops::Deref for RulesBackend<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.engine
    }
}

impl<E: Engine> Backend for RulesBackend<E> {
    fn find_token(&self, id: TokenId) -> BoxFuture<'static, LedgerResult<Option<StoredToken>>> {
        self.engine.find_token(id)
    }

    fn mint_token(
        &self,
        issuer: Authority,
        kind: TokenKind,
        token: NewToken,
    ) -> BoxFuture<'static, LedgerResult<Minted>> {
        self.engine.write(
            None,
            0,
            move |tx, now| rules::tokens::mint(tx, &issuer, kind, &token, now),
            silent,
        )
    }

    fn mint_for_share(
        &self,
        issuer: Authority,
        share_id: ShareId,
        kind: TokenKind,
        token: NewToken,
    ) -> BoxFuture<'static, LedgerResult<Minted>> {
        self.engine.write(
            None,
            0,
            move |tx, now| rules::tokens::mint_for_share(tx, &issuer, &share_id, kind, &token, now),
            silent,
        )
    }

    fn replace_admin_token(&self, token: NewToken) -> BoxFuture<'static, LedgerResult<()>> {
        self.engine.write(
            None,
            0,
            move |tx, now| rules::tokens::replace_admin(tx, &token, now),
            silent,
        )
    }

    fn has_admin_token(&self) -> BoxFuture<'static, LedgerResult<bool>> {
        self.engine.read(|tx, now| tx.has_live_admin_token(now))
    }

    fn create_first_admin_token(&self, token: NewToken) -> BoxFuture<'static, LedgerResult<bool>> {
        self.engine.write(
            None,
            0,
            move |tx, now| rules::tokens::create_first_admin(tx, &token, now),
            silent,
        )
    }

    fn create_share(
        &self,
        issuer: Authority,
        share: NewShare,
        writer: NewToken,
        viewer: NewToken,
    ) -> BoxFuture<'static, LedgerResult<ShareInfo>> {
        self.engine.write(
            None,
            0,
            move |tx, now| rules::shares::create(tx, &issuer, &share, &writer, &viewer, now),
            silent,
        )
    }

    fn create_or_join_share(
        &self,
        issuer: Authority,
        share: NewShare,
        writer: NewToken,
        viewer: NewToken,
    ) -> BoxFuture<'static, LedgerResult<(ShareInfo, bool)>> {
        self.engine.write(
            None,
            0,
            move |tx, now| {
                rules::shares::create_or_join(tx, &issuer, &share, &writer, &viewer, now)
            },
            silent,
        )
    }

    fn append(&self, writer: Authority, batch: BatchIn) -> BoxFuture<'static, LedgerResult<Ack>> {
        let share = writer.share.as_ref().map(|(id, _)| id.clone());
        let bytes = batch.ops.iter().map(|op| op.payload.len()).sum();
        let reclaim_compacted = self.reclaim_compacted;
        let order = share.clone();
        let link = batch.link.clone();
        self.engine
            .write(
                order.as_ref(),
                bytes,
                move |tx, now| rules::append::append(tx, &writer, &batch, reclaim_compacted, now),
                move |appended: &Appended| {
                    if let Some(link) = &link {
                        link.committed();
                    }
                    let share = share.clone().filter(|_| !appended.ops.is_empty())?;
                    Some(Changed::Ops {
                        share,
                        applied: Some(Arc::clone(&appended.ops)),
                    })
                },
            )
            .map_ok(|appended| appended.ack)
            .boxed()
    }

    fn share_state(&self, who: Authority) -> BoxFuture<'static, LedgerResult<ShareState>> {
        self.engine
            .read(move |tx, now| rules::reads::share_state(tx, &who, now))
    }

    fn child_shares(&self, who: Authority) -> BoxFuture<'static, LedgerResult<Vec<ShareInfo>>> {
        self.engine
            .read(move |tx, now| rules::reads::child_shares(tx, &who, now))
    }

    fn list_shares(
        &self,
        who: Authority,
        after: String,
        limit: u32,
        include_archived: bool,
    ) -> BoxFuture<'static, LedgerResult<Vec<ShareInfo>>> {
        self.engine.read(move |tx, now| {
            rules::reads::list_shares(tx, &who, &after, limit, include_archived, now)
        })
    }

    fn set_archived(
        &self,
        who: Authority,
        share_id: ShareId,
        archived: bool,
    ) -> BoxFuture<'static, LedgerResult<ShareInfo>> {
        let order = share_id.clone();
        self.engine.write(
            Some(&order),
            0,
            move |tx, now| rules::shares::set_archived(tx, &who, &share_id, archived, now),
            silent,
        )
    }

    fn stats(&self, who: Authority) -> BoxFuture<'static, LedgerResult<Stats>> {
        self.engine.stats(who)
    }

    fn revoke_share(
        &self,
        who: Authority,
        share_id: ShareId,
        scope: RevokeScope,
    ) -> BoxFuture<'static, LedgerResult<ShareState>> {
        let changed = Changed::Share(share_id.clone());
        let order = share_id.clone();
        self.engine.write(
            Some(&order),
            0,
            move |tx, now| rules::shares::revoke(tx, &who, &share_id, scope, now),
            move |_| Some(changed.clone()),
        )
    }

    fn revoke_token(
        &self,
        who: Authority,
        token_id: TokenId,
    ) -> BoxFuture<'static, LedgerResult<()>> {
        self.engine.write(
            None,
            0,
            move |tx, now| rules::tokens::revoke(tx, &who, &token_id, now),
            |_| Some(Changed::Tokens),
        )
    }

    fn snapshot_page(
        &self,
        who: Authority,
        page: String,
        max_bytes: u32,
    ) -> BoxFuture<'static, LedgerResult<SnapshotPage>> {
        self.engine
            .read(move |tx, now| rules::snapshot::page(tx, &who, &page, max_bytes, now))
    }

    fn ops_since(
        &self,
        who: Authority,
        after: Cursor,
        limit: u32,
    ) -> BoxFuture<'static, LedgerResult<OpsPage>> {
        self.engine
            .read(move |tx, now| rules::reads::ops_since(tx, &who, after, limit, now))
    }

    fn feed_ops(
        &self,
        share: ShareId,
        after: Option<Cursor>,
        limit: u32,
    ) -> BoxFuture<'static, LedgerResult<FeedPage>> {
        self.engine
            .read(move |tx, _| rules::reads::feed_ops(tx, &share, after, limit))
    }

    fn parts(
        &self,
        who: Authority,
        parts: Vec<String>,
    ) -> BoxFuture<'static, LedgerResult<StoredParts>> {
        self.engine
            .read(move |tx, now| rules::reads::parts(tx, &who, &parts, now))
    }

    fn feed_parts(
        &self,
        share: ShareId,
        parts: Vec<String>,
    ) -> BoxFuture<'static, LedgerResult<StoredParts>> {
        self.engine
            .read(move |tx, _| rules::reads::feed_parts(tx, &share, &parts))
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Changed> {
        self.engine.changes()
    }

    fn plan_prune(
        &self,
        op: Operator,
        filter: PruneFilter,
    ) -> BoxFuture<'static, LedgerResult<PrunePlan>> {
        self.engine
            .read(move |tx, now| rules::prune::plan(tx, &op, &filter, now))
    }

    fn delete_share_step(
        &self,
        op: Operator,
        share_id: ShareId,
        expect_cursor: Option<Cursor>,
        max_rows: u32,
    ) -> BoxFuture<'static, LedgerResult<DeleteStep>> {
        let changed = Changed::Share(share_id.clone());
        let order = share_id.clone();
        // Every step announces: the first one hid the share, and its followers
        // must learn it is gone; later announcements cost a recheck at most.
        self.engine.write(
            Some(&order),
            0,
            move |tx, now| {
                rules::prune::delete_step(tx, &op, &share_id, expect_cursor, max_rows, now)
            },
            move |step| (*step != DeleteStep::Changed).then(|| changed.clone()),
        )
    }

    fn unfinished_deletions(&self) -> BoxFuture<'static, LedgerResult<Vec<ShareId>>> {
        self.engine.read(|tx, _| tx.hidden_shares())
    }

    fn archive_inactive(
        &self,
        op: Operator,
        inactive_before: i64,
        limit: u32,
    ) -> BoxFuture<'static, LedgerResult<Vec<ShareId>>> {
        self.engine.write(
            None,
            0,
            move |tx, now| rules::prune::archive_inactive(tx, &op, inactive_before, limit, now),
            silent,
        )
    }

    fn reclaim_step(
        &self,
        op: Operator,
        after: i64,
        max_parts: u32,
        dry_run: bool,
    ) -> BoxFuture<'static, LedgerResult<ReclaimStep>> {
        self.engine.reclaim_step(op, after, max_parts, dry_run)
    }

    fn compact_step(
        &self,
        op: Operator,
        applied_before: i64,
        from: Option<CompactPosition>,
        max_ops: u32,
        dry_run: bool,
    ) -> BoxFuture<'static, LedgerResult<CompactStep>> {
        let step = move |tx: &mut E::Tx<'_>, now| {
            rules::compact::step(
                tx,
                &op,
                applied_before,
                from.as_ref(),
                max_ops,
                dry_run,
                now,
            )
        };
        // A dry run only reads.
        if dry_run {
            self.engine.read(step)
        } else {
            self.engine.write(None, 0, step, silent)
        }
    }

    fn vacuum(&self, op: Operator) -> BoxFuture<'static, LedgerResult<VacuumReport>> {
        self.engine.vacuum(op)
    }

    fn upkeep(&self, budget: Duration) -> BoxFuture<'static, LedgerResult<()>> {
        self.engine.upkeep(budget)
    }

    fn audit(&self, event: AuditEvent) {
        self.engine.audit(event)
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        self.engine.close()
    }
}
