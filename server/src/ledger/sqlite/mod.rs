//! Embedded SQLite backend of the ledger: one writer thread with group commit, plus read connections.
//!
//! - [`schema`]: connection pragmas and versioned migrations.
//! - [`writer`]: the writer thread and its group-commit loop.
//! - [`pool`]: read-only connections lent to blocking tasks.
//! - [`authority`]: token, share and epoch checks, run inside each call's transaction.
//! - [`apply`], [`payload`], [`records`]: append semantics, payload validation, materialized records.
//! - [`tokens`], [`shares`], [`audit`]: the other writes.
//! - [`reads`], [`snapshot`]: the other reads, and snapshot paging.

mod apply;
mod audit;
mod authority;
mod convert;
mod errors;
mod payload;
mod pool;
mod reads;
mod records;
mod schema;
mod shares;
mod snapshot;
mod tokens;
mod writer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

use capsync_shared::{Cursor, ShareId, TokenId, TokenKind, now_millis};
use futures::FutureExt;
use futures::future::BoxFuture;

use self::pool::ReadPool;
use self::writer::Writer;
use super::{
    Ack, AuditEvent, Authority, Backend, BatchIn, Changed, Ledger, LedgerError, LedgerResult,
    Minted, NewShare, NewToken, OpOutcome, OpsPage, RevokeScope, ShareInfo, ShareState,
    SnapshotPage, Stats, StoredToken,
};

/// How hard a commit waits for the disk before the ack is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: an acked batch survives power loss. The default,
    /// because the ack promises durability.
    #[default]
    Full,
    /// `synchronous=NORMAL`: in WAL mode an acked batch survives a process crash
    /// but the last commits may be lost on power loss or an OS crash.
    Normal,
}

/// Settings of the SQLite backend.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// The database file; created with its parent directory if missing.
    pub path: PathBuf,
    pub durability: Durability,
    /// Read connections for snapshots, catch-up and token lookups.
    pub read_connections: usize,
    /// Most commands one group-commit transaction takes.
    pub max_group_commit: usize,
}

impl SqliteOptions {
    /// Defaults for a database at `path`: full durability, 4 readers, groups of up to 256.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::Full,
            read_connections: 4,
            max_group_commit: 256,
        }
    }
}

/// Opens (creating and migrating if needed) the database and starts the writer thread.
pub fn open(options: SqliteOptions) -> Result<Ledger, LedgerError> {
    SqliteBackend::open(&options).map(Ledger::new)
}

/// The [`Backend`] over one SQLite file. Writes go to the writer thread, reads
/// to the pool; both check the caller's authority in their own transaction.
struct SqliteBackend {
    /// All writes, in call order, group-committed.
    writer: Writer,
    /// Announces committed changes to live subscribers.
    changes: tokio::sync::broadcast::Sender<Changed>,
    /// All reads, concurrent with each other and with the writer (WAL).
    reads: Arc<ReadPool>,
    /// The database file, for `stats` (file sizes are not visible through SQL).
    path: Arc<PathBuf>,
}

impl SqliteBackend {
    fn open(options: &SqliteOptions) -> LedgerResult<Self> {
        let conn = schema::open_writer(&options.path, options.durability)?;
        // Readers open after the writer has created and migrated the file.
        let reads = ReadPool::open(&options.path, options.read_connections)?;
        let writer = Writer::start(conn, options.max_group_commit)?;
        // Subscribers that fall this far behind get `Lagged` and recheck everything.
        let (changes, _) = tokio::sync::broadcast::channel(1024);
        Ok(Self {
            writer,
            changes,
            reads,
            path: Arc::new(options.path.clone()),
        })
    }

    /// Resolves like `work`; once it has committed, announces what it changed.
    fn announce<T: Send + 'static>(
        &self,
        work: BoxFuture<'static, LedgerResult<T>>,
        change: impl FnOnce(&T) -> Option<Changed> + Send + 'static,
    ) -> BoxFuture<'static, LedgerResult<T>> {
        let changes = self.changes.clone();
        async move {
            let result = work.await;
            if let Some(changed) = result.as_ref().ok().and_then(change) {
                // No receivers is fine: nobody is subscribed.
                let _ = changes.send(changed);
            }
            result
        }
        .boxed()
    }

    /// Runs `write` on the writer thread in the next group transaction.
    fn write<T, F>(&self, write: F) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, i64) -> LedgerResult<T> + Send + 'static,
    {
        // The clock is read when the command runs, so expiry is judged at the
        // moment the work happens, not when it was queued.
        self.writer
            .submit(move |conn| write(conn, now_millis()))
            .boxed()
    }

    /// Runs `read` in one read transaction on a pooled connection.
    fn read<T, F>(&self, read: F) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, i64) -> LedgerResult<T> + Send + 'static,
    {
        if self.writer.is_closing() {
            return futures::future::ready(Err(LedgerError::Closed)).boxed();
        }
        self.reads
            .read(move |conn| read(conn, now_millis()))
            .boxed()
    }
}

impl Backend for SqliteBackend {
    fn find_token(&self, id: TokenId) -> BoxFuture<'static, LedgerResult<Option<StoredToken>>> {
        self.read(move |conn, _| reads::find_token(conn, &id))
    }

    fn mint_token(
        &self,
        issuer: Authority,
        kind: TokenKind,
        token: NewToken,
    ) -> BoxFuture<'static, LedgerResult<Minted>> {
        self.write(move |conn, now| tokens::mint(conn, &issuer, kind, &token, now))
    }

    fn mint_for_share(
        &self,
        issuer: Authority,
        share_id: ShareId,
        kind: TokenKind,
        token: NewToken,
    ) -> BoxFuture<'static, LedgerResult<Minted>> {
        self.write(move |conn, now| {
            tokens::mint_for_share(conn, &issuer, &share_id, kind, &token, now)
        })
    }

    fn replace_admin_token(&self, token: NewToken) -> BoxFuture<'static, LedgerResult<()>> {
        self.write(move |conn, now| tokens::replace_admin(conn, &token, now))
    }

    fn has_admin_token(&self) -> BoxFuture<'static, LedgerResult<bool>> {
        self.read(reads::has_admin_token)
    }

    fn create_share(
        &self,
        issuer: Authority,
        share: NewShare,
        writer: NewToken,
        viewer: NewToken,
    ) -> BoxFuture<'static, LedgerResult<ShareInfo>> {
        self.write(move |conn, now| shares::create(conn, &issuer, &share, &writer, &viewer, now))
    }

    fn append(&self, writer: Authority, batch: BatchIn) -> BoxFuture<'static, LedgerResult<Ack>> {
        let share = writer.share.as_ref().map(|(id, _)| id.clone());
        let work = self.write(move |conn, now| apply::append(conn, &writer, &batch, now));
        self.announce(work, move |ack| {
            let applied = ack
                .results
                .iter()
                .any(|r| matches!(r.outcome, OpOutcome::Applied(_)));
            share.filter(|_| applied).map(Changed::Share)
        })
    }

    fn share_state(&self, who: Authority) -> BoxFuture<'static, LedgerResult<ShareState>> {
        self.read(move |conn, now| reads::share_state(conn, &who, now))
    }

    fn list_shares(
        &self,
        who: Authority,
        after: String,
        limit: u32,
        include_archived: bool,
    ) -> BoxFuture<'static, LedgerResult<Vec<ShareInfo>>> {
        self.read(move |conn, now| {
            reads::list_shares(conn, &who, &after, limit, include_archived, now)
        })
    }

    fn set_archived(
        &self,
        who: Authority,
        share_id: ShareId,
        archived: bool,
    ) -> BoxFuture<'static, LedgerResult<ShareInfo>> {
        self.write(move |conn, now| shares::set_archived(conn, &who, &share_id, archived, now))
    }

    fn stats(&self, who: Authority) -> BoxFuture<'static, LedgerResult<Stats>> {
        let path = Arc::clone(&self.path);
        self.read(move |conn, now| reads::stats(conn, &who, &path, now))
    }

    fn revoke_share(
        &self,
        who: Authority,
        share_id: ShareId,
        scope: RevokeScope,
    ) -> BoxFuture<'static, LedgerResult<ShareState>> {
        let changed = Changed::Share(share_id.clone());
        let work = self.write(move |conn, now| shares::revoke(conn, &who, &share_id, scope, now));
        self.announce(work, move |_| Some(changed))
    }

    fn revoke_token(
        &self,
        who: Authority,
        token_id: TokenId,
    ) -> BoxFuture<'static, LedgerResult<()>> {
        let work = self.write(move |conn, now| tokens::revoke(conn, &who, &token_id, now));
        self.announce(work, |_| Some(Changed::Tokens))
    }

    fn delete_share(
        &self,
        who: Authority,
        share_id: ShareId,
    ) -> BoxFuture<'static, LedgerResult<()>> {
        let changed = Changed::Share(share_id.clone());
        let work = self.write(move |conn, now| shares::delete(conn, &who, &share_id, now));
        self.announce(work, move |_| Some(changed))
    }

    fn snapshot_page(
        &self,
        who: Authority,
        page: String,
        max_bytes: u32,
    ) -> BoxFuture<'static, LedgerResult<SnapshotPage>> {
        self.read(move |conn, now| snapshot::page(conn, &who, &page, max_bytes, now))
    }

    fn ops_since(
        &self,
        who: Authority,
        after: Cursor,
        limit: u32,
    ) -> BoxFuture<'static, LedgerResult<OpsPage>> {
        self.read(move |conn, now| reads::ops_since(conn, &who, after, limit, now))
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Changed> {
        self.changes.subscribe()
    }

    fn audit(&self, event: AuditEvent) {
        self.writer.audit(event);
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let stopped = self.writer.close();
        let reads = Arc::clone(&self.reads);
        async move {
            stopped.await;
            reads.close();
        }
        .boxed()
    }
}
