//! Checks an [`Authority`] against the token and share rows, inside the caller's transaction.

use capsync_shared::{Cursor, Epoch, ShareId, TokenId, TokenKind};
use rusqlite::{Connection, OptionalExtension, Row};

use super::convert::cursor_column;
use super::errors::corrupt;
use crate::ledger::{Authority, LedgerError, LedgerResult, Operator, ShareInfo, ShareState};

/// A share row as stored.
#[derive(Clone, Debug)]
pub(super) struct ShareRow {
    pub id: ShareId,
    /// Session-scoped payloads must name this session.
    pub session_id: String,
    pub project_id: String,
    pub parent_session_id: String,
    pub title: String,
    /// The agent token that created the share: only it (or an admin) may revoke it.
    pub owner_token_id: TokenId,
    pub cursor: Cursor,
    pub writer_epoch: Epoch,
    pub viewer_epoch: Epoch,
    pub created_at: i64,
    pub updated_at: i64,
    /// When an admin archived the share; `None` while it is not. Archived shares refuse appends.
    pub archived_at: Option<i64>,
    /// Ops up to this cursor lost their payload to ledger compaction.
    pub compacted_through: Cursor,
}

/// Columns of `shares` in the order [`ShareRow::from_row`] reads them.
pub(super) const SHARE_COLUMNS: &str = "id, session_id, project_id, parent_session_id, title, \
     owner_token_id, cursor, writer_epoch, viewer_epoch, created_at, updated_at, archived_at, \
     compacted_through";

/// The condition every read of `shares` adds: a share whose deletion has begun is gone.
pub(super) const VISIBLE: &str = "deleting_at IS NULL";

impl ShareRow {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: ShareId(row.get(0)?),
            session_id: row.get(1)?,
            project_id: row.get(2)?,
            parent_session_id: row.get(3)?,
            title: row.get(4)?,
            owner_token_id: TokenId(row.get(5)?),
            cursor: cursor_column(row, 6)?,
            writer_epoch: Epoch(row.get(7)?),
            viewer_epoch: Epoch(row.get(8)?),
            created_at: row.get(9)?,
            updated_at: row.get(10)?,
            archived_at: row.get(11)?,
            compacted_through: cursor_column(row, 12)?,
        })
    }

    /// Whether this share holds a session that `parent`'s session started (a
    /// sub-agent's), shared by the same owner. A viewer of `parent` may read it:
    /// a sub-agent's work is part of the session it was started for, and
    /// revoking `parent`'s viewers ends that too.
    pub fn is_child_of(&self, parent: &ShareRow) -> bool {
        !parent.session_id.is_empty()
            && self.parent_session_id == parent.session_id
            && self.owner_token_id == parent.owner_token_id
            && self.id != parent.id
    }

    pub fn state(&self) -> ShareState {
        ShareState {
            share_id: self.id.clone(),
            cursor: self.cursor,
            writer_epoch: self.writer_epoch,
            viewer_epoch: self.viewer_epoch,
            updated_at: self.updated_at,
        }
    }

    pub fn info(&self) -> ShareInfo {
        ShareInfo {
            state: self.state(),
            session_id: self.session_id.clone(),
            project_id: self.project_id.clone(),
            parent_session_id: self.parent_session_id.clone(),
            title: self.title.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            owner_token_id: self.owner_token_id.clone(),
            archived_at: self.archived_at,
        }
    }
}

/// The share with this id, unless it does not exist or its deletion has begun.
pub(super) fn load_share(conn: &Connection, id: &ShareId) -> LedgerResult<Option<ShareRow>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SHARE_COLUMNS} FROM shares WHERE id = ?1 AND {VISIBLE}"
    ))?;
    Ok(stmt
        .query_row([id.as_str()], ShareRow::from_row)
        .optional()?)
}

/// What a share-scoped call needs from its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    /// Appending and minting: writers only.
    Write,
    /// State, snapshots and catch-up: writers and viewers.
    Read,
}

/// The parts of a token row that decide whether it still grants anything.
struct TokenRow {
    kind: TokenKind,
    share_id: Option<ShareId>,
    expires_at: Option<i64>,
    revoked: bool,
}

/// Checks that `who`'s token is live and may act as `who.kind`.
///
/// A missing row means the token was deleted with its share (the share-scoped
/// callers check the share first and answer `NotFound` for that), so it reads
/// as revoked.
fn check_token(conn: &Connection, who: &Authority, now: i64) -> LedgerResult<TokenRow> {
    let mut stmt = conn.prepare_cached(
        "SELECT kind, share_id, expires_at, revoked_at IS NOT NULL FROM tokens WHERE id = ?1",
    )?;
    let row = stmt
        .query_row([who.token_id.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })
        .optional()?;
    let Some((kind, share_id, expires_at, revoked)) = row else {
        return Err(LedgerError::Revoked);
    };
    let token = TokenRow {
        kind: TokenKind::parse(&kind).ok_or_else(|| corrupt(format!("token kind {kind:?}")))?,
        share_id: share_id.map(ShareId),
        expires_at,
        revoked,
    };
    if token.revoked {
        return Err(LedgerError::Revoked);
    }
    if token.expires_at.is_some_and(|at| at < now) {
        return Err(LedgerError::PermissionDenied);
    }
    // A viewer derived from a writer capability carries the writer's token id;
    // nothing else may claim more (or other) authority than its token grants.
    let compatible = token.kind == who.kind
        || (who.kind == TokenKind::Viewer && token.kind == TokenKind::Writer);
    if !compatible {
        return Err(LedgerError::PermissionDenied);
    }
    Ok(token)
}

/// Checks an admin or agent authority of exactly `kind`.
pub(super) fn check_global(
    conn: &Connection,
    who: &Authority,
    kind: TokenKind,
    now: i64,
) -> LedgerResult<()> {
    if who.kind != kind {
        return Err(LedgerError::PermissionDenied);
    }
    check_token(conn, who, now).map(|_| ())
}

/// Checks who runs a lifecycle call: an admin's token, or the server itself.
/// An owner may only delete its own shares (see [`check_deleter`]).
pub(super) fn check_operator(conn: &Connection, op: &Operator, now: i64) -> LedgerResult<()> {
    match op {
        Operator::Admin(who) => check_global(conn, who, TokenKind::Admin, now),
        Operator::Scheduler => Ok(()),
        Operator::Owner(_) => Err(LedgerError::PermissionDenied),
    }
}

/// Checks who deletes a share owned by `owner` (`None`: no such share): an
/// operator, or that owner. Another agent's share is `NotFound`, as for
/// revocations, so an agent learns nothing about shares it does not own.
pub(super) fn check_deleter(
    conn: &Connection,
    op: &Operator,
    owner: Option<&TokenId>,
    now: i64,
) -> LedgerResult<()> {
    match op {
        Operator::Owner(who) => {
            check_global(conn, who, TokenKind::Agent, now)?;
            match owner {
                Some(owner) if owner != &who.token_id => Err(LedgerError::NotFound),
                _ => Ok(()),
            }
        }
        op => check_operator(conn, op, now),
    }
}

/// Checks an admin or agent authority, whichever it claims to be.
pub(super) fn check_admin_or_agent(
    conn: &Connection,
    who: &Authority,
    now: i64,
) -> LedgerResult<()> {
    match who.kind {
        TokenKind::Admin | TokenKind::Agent => check_token(conn, who, now).map(|_| ()),
        TokenKind::Writer | TokenKind::Viewer => Err(LedgerError::PermissionDenied),
    }
}

/// Checks a writer or viewer authority and returns its share as of this transaction.
pub(super) fn check_share(
    conn: &Connection,
    who: &Authority,
    access: Access,
    now: i64,
) -> LedgerResult<ShareRow> {
    let allowed = match access {
        Access::Write => who.kind == TokenKind::Writer,
        Access::Read => matches!(who.kind, TokenKind::Writer | TokenKind::Viewer),
    };
    if !allowed {
        return Err(LedgerError::PermissionDenied);
    }
    let Some((share_id, epoch)) = &who.share else {
        return Err(LedgerError::PermissionDenied);
    };
    let share = load_share(conn, share_id)?.ok_or(LedgerError::NotFound)?;
    let token = check_token(conn, who, now)?;
    // Whose epochs the capability answers to: its own share's, or, for a
    // viewer token reading a child share, its parent's.
    let issued_for = if token.share_id.as_ref() == Some(share_id) {
        share.clone()
    } else {
        let parent = match (&token.share_id, access, token.kind) {
            (Some(parent), Access::Read, TokenKind::Viewer) => load_share(conn, parent)?,
            _ => None,
        };
        parent
            .filter(|parent| share.is_child_of(parent))
            .ok_or(LedgerError::PermissionDenied)?
    };
    let current = match who.kind {
        TokenKind::Writer => issued_for.writer_epoch,
        _ => issued_for.viewer_epoch,
    };
    if *epoch != current {
        return Err(LedgerError::Revoked);
    }
    Ok(share)
}

/// Visible shares of the sessions `parent` started (sub-agents), with the same
/// owner: what `parent`'s viewers may read along with it.
pub(super) fn children(conn: &Connection, parent: &ShareRow) -> LedgerResult<Vec<ShareRow>> {
    if parent.session_id.is_empty() {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SHARE_COLUMNS} FROM shares
         WHERE parent_session_id = ?1 AND owner_token_id = ?2 AND {VISIBLE}
         ORDER BY session_id, id"
    ))?;
    let rows = stmt.query_map(
        rusqlite::params![parent.session_id, parent.owner_token_id.as_str()],
        ShareRow::from_row,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}
