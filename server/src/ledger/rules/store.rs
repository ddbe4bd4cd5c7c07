//! The narrow storage interface the rules run on: rows as the rules see them, and
//! [`LedgerTx`], the reads and writes of one transaction.
//!
//! An engine opens a transaction, hands the rules a [`LedgerTx`] over it, and
//! commits when they return `Ok` (an `Err` rolls everything back). Every method
//! works inside that transaction; none commits.

use capsync_shared::{Cursor, Epoch, OpId, OpKind, ShareId, TokenId, TokenKind};

use super::batch_order::TransactionId;
use crate::ledger::{
    AuditEvent, LedgerResult, LoggedOp, NewToken, ShareFootprint, ShareInfo, ShareState,
};

/// A share row as stored.
#[derive(Clone, Debug)]
pub struct ShareRow {
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

impl ShareRow {
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

/// The parts of a token row that decide whether it still grants anything.
#[derive(Clone, Debug)]
pub struct TokenGrant {
    pub kind: TokenKind,
    /// Set for writer and viewer tokens.
    pub share_id: Option<ShareId>,
    /// Unix ms; `None` never expires.
    pub expires_at: Option<i64>,
    pub revoked: bool,
}

/// Where a new token row sits in the attenuation chain.
pub struct StoredToken<'a> {
    pub kind: TokenKind,
    /// Set for writer and viewer tokens.
    pub share_id: Option<&'a ShareId>,
    /// The share's epoch of the token's scope when it was minted.
    pub epoch: Epoch,
    /// Who minted it, for the audit trail; `None` for the bootstrap admin token.
    pub issued_by: Option<&'a TokenId>,
}

/// An op to record in a share's ledger at a cursor.
pub struct LedgerEntry<'a> {
    pub cursor: Cursor,
    pub op_id: &'a OpId,
    pub kind: OpKind,
    /// What is stored: the agent's payload, or with reclaim, a compacted tool part cleared.
    pub payload: &'a str,
    /// The writer token that applied it.
    pub token_id: &'a TokenId,
    pub batch_id: &'a str,
    pub applied_at: i64,
    /// The digest of the op's content as sent (see the append rules).
    pub digest: &'a [u8],
}

/// Where an op sits and what it weighs, for compaction.
pub struct OpFootprint {
    pub cursor: Cursor,
    pub applied_at: i64,
    pub payload_bytes: u64,
}

/// What decides whether a snapshot of a part may be stored, read in one go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartStanding {
    /// The part was removed from the share.
    pub removed: bool,
    /// Its message was removed from the share.
    pub message_removed: bool,
    /// Whether the stored part is finished; `None` when it is not stored.
    pub finished: Option<bool>,
}

/// What decides whether a snapshot of a message may be stored, read in one go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageStanding {
    /// The message was removed from the share.
    pub removed: bool,
    /// Whether the stored message is terminal; `None` when it is not stored.
    pub terminal: Option<bool>,
}

/// What a `part.delta` to one string field of a part reads before it writes, in one go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartTextEnd {
    pub finished: bool,
    /// The field's last chunk of appended text: its number and its size in bytes;
    /// `None` when no delta was appended to the field since the part's snapshot.
    pub last_chunk: Option<(i64, i64)>,
}

/// Where a delta's text goes among a field's chunks (see [`LedgerTx::write_part_chunk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkWrite {
    /// A new chunk with this number, holding the text.
    Start(i64),
    /// The end of the chunk with this number, the field's last.
    Extend(i64),
}

/// A piece of text that deltas appended to a string field of a part, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartChunk {
    pub part_id: String,
    pub field: String,
    pub text: String,
}

/// What the records rule of an op reads before it writes (see [`super::records::probe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe<'a> {
    /// The op reads nothing stored (removals, diffs, models, invalid ops).
    Nothing,
    /// The session's `updated` time.
    Session,
    /// The [`MessageStanding`] of a message.
    Message(&'a str),
    /// The [`PartStanding`] of a part in a message.
    Part { id: &'a str, message_id: &'a str },
    /// The [`PartTextEnd`] of a field of a part, to append to it.
    PartText { id: &'a str, field: &'a str },
}

/// The answer to a [`Probe`], variant for variant.
pub enum Standing {
    Nothing,
    Session(Option<Option<i64>>),
    Message(MessageStanding),
    Part(PartStanding),
    /// `None` when the part is not stored.
    PartText(Option<PartTextEnd>),
}

/// The records whose removal is final: once removed, an id of this kind stays removed
/// in its share (see [`super::records`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removable {
    Message,
    Part,
}

impl Removable {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Message => "message",
            Self::Part => "part",
        }
    }
}

/// A share as its deletion sees it, hidden or not.
pub struct ShareBeingDeleted {
    pub cursor: Cursor,
    pub owner: TokenId,
    /// Its deletion has begun: no call finds it any more.
    pub hidden: bool,
}

/// Where an ordered read of records starts: at a key (a page's resume
/// position), or just after one (the next batch of the same page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyFrom<K> {
    AtLeast(K),
    After(K),
}

/// The reads and writes of one transaction, as the engine-neutral rules use them.
///
/// Shares and tokens: only visible shares (a share whose deletion has begun is
/// gone). Records: keyed by share and record id. Ids compare as bytes wherever
/// an order is asked for (SQLite's `BINARY`; PostgreSQL needs `COLLATE "C"`),
/// which the contract suite checks.
pub trait LedgerTx {
    /// This transaction, among all the process runs (see [`super::batch_order`]).
    fn transaction(&self) -> TransactionId;

    /// The visible share with this id.
    fn share(&mut self, id: &ShareId) -> LedgerResult<Option<ShareRow>>;

    /// [`LedgerTx::share`], and holds the share's lock until the transaction ends,
    /// so no other transaction appends to it (assigns cursors) meanwhile. An engine
    /// that runs one write transaction at a time needs no more than a read.
    fn lock_share(&mut self, id: &ShareId) -> LedgerResult<Option<ShareRow>>;

    /// The share ([`LedgerTx::lock_share`] when `lock`, else [`LedgerTx::share`])
    /// and the grant of `token`: what every share-scoped call checks first, in one
    /// step where a statement costs a round trip.
    fn share_and_grant(
        &mut self,
        id: &ShareId,
        lock: bool,
        token: &TokenId,
    ) -> LedgerResult<(Option<ShareRow>, Option<TokenGrant>)> {
        let share = if lock {
            self.lock_share(id)?
        } else {
            self.share(id)?
        };
        Ok((share, self.token_grant(token)?))
    }

    /// Visible shares of the sessions `parent` started (sub-agents), with its
    /// owner, other than `parent` itself, ordered by session id then share id.
    fn children(&mut self, parent: &ShareRow) -> LedgerResult<Vec<ShareRow>>;

    /// Visible shares ordered by id after `after`, at most `limit`: those of
    /// `owner` only when given, archived ones only with `include_archived`.
    fn list_shares(
        &mut self,
        owner: Option<&TokenId>,
        after: &str,
        limit: u32,
        include_archived: bool,
    ) -> LedgerResult<Vec<ShareRow>>;

    // Lifecycle.

    /// Visible shares last changed before `before` (archived ones only, if asked).
    fn inactive_shares(&mut self, before: i64, archived_only: bool) -> LedgerResult<Vec<ShareRow>>;

    /// Ids of visible, unarchived shares last changed before `before`, oldest
    /// first (then by id), at most `limit`.
    fn unarchived_inactive(&mut self, before: i64, limit: u32) -> LedgerResult<Vec<ShareId>>;

    /// Whether a visible share holds `session_id`.
    fn session_is_shared(&mut self, session_id: &str) -> LedgerResult<bool>;

    /// Visible shares whose parent session is `session_id`, whoever owns them.
    fn shares_of_parent_session(&mut self, session_id: &str) -> LedgerResult<Vec<ShareRow>>;

    /// What deleting the share removes, from aggregates.
    fn footprint(&mut self, share: &ShareId) -> LedgerResult<ShareFootprint>;

    /// The share, visible or with its deletion begun.
    fn share_being_deleted(&mut self, share: &ShareId) -> LedgerResult<Option<ShareBeingDeleted>>;

    /// Begins a deletion: hides the share from every call and deletes its tokens.
    fn hide_share(&mut self, share: &ShareId, now: i64) -> LedgerResult<()>;

    /// Deletes at most `max_rows` rows of a hidden share's records and ledger;
    /// when none are left, the share itself (`true`).
    fn delete_share_rows(&mut self, share: &ShareId, max_rows: u32) -> LedgerResult<bool>;

    /// Shares whose deletion began but did not finish, by id.
    fn hidden_shares(&mut self) -> LedgerResult<Vec<ShareId>>;

    /// How many shares are visible.
    fn visible_share_count(&mut self) -> LedgerResult<u64>;

    /// The first visible share from `from` in id order, with its compaction point.
    fn next_share(&mut self, from: &KeyFrom<String>) -> LedgerResult<Option<(ShareId, Cursor)>>;

    /// The ops after `after` in cursor order, at most `limit`: where each is and what it weighs.
    fn op_footprints(
        &mut self,
        share: &ShareId,
        after: Cursor,
        limit: u32,
    ) -> LedgerResult<Vec<OpFootprint>>;

    /// Empties the payloads of the share's ops in `(after, through]` and moves
    /// its compaction point to `through`.
    fn drop_payloads(
        &mut self,
        share: &ShareId,
        after: Cursor,
        through: Cursor,
    ) -> LedgerResult<()>;

    /// The agent's oldest visible, unarchived share of `session_id`.
    fn open_share_of_session(
        &mut self,
        owner: &TokenId,
        session_id: &str,
    ) -> LedgerResult<Option<ShareId>>;

    /// Holds a lock on the agent's session until the transaction ends, so two
    /// transactions cannot both find no share of it and each create one.
    fn lock_session(&mut self, owner: &TokenId, session_id: &str) -> LedgerResult<()>;

    /// Stores a new share (its cursor 0, epochs 0).
    fn insert_share(&mut self, share: &ShareRow) -> LedgerResult<()>;

    fn set_epochs(&mut self, share: &ShareId, writers: Epoch, viewers: Epoch) -> LedgerResult<()>;

    fn set_archived_at(&mut self, share: &ShareId, archived_at: Option<i64>) -> LedgerResult<()>;

    /// What the token with this id grants; `None` if it does not exist (any more).
    fn token_grant(&mut self, id: &TokenId) -> LedgerResult<Option<TokenGrant>>;

    fn insert_token(
        &mut self,
        token: &NewToken,
        stored: &StoredToken<'_>,
        now: i64,
    ) -> LedgerResult<()>;

    /// Marks the token revoked (keeping an earlier revocation time); `false` if
    /// there is no such token.
    fn revoke_token(&mut self, id: &TokenId, now: i64) -> LedgerResult<bool>;

    /// Marks every live admin token revoked.
    fn revoke_admin_tokens(&mut self, now: i64) -> LedgerResult<()>;

    /// Whether an unrevoked admin token that has not expired by `now` exists.
    fn has_live_admin_token(&mut self, now: i64) -> LedgerResult<bool>;

    /// Holds the bootstrap lock until the transaction ends, so two servers
    /// starting at once cannot both find no admin token and each create one.
    fn lock_bootstrap(&mut self) -> LedgerResult<()>;

    // The ledger of ops.

    /// Records `entry` unless the share already has an op with its id (`None`): the
    /// "already?" answer and the record are one step. When recorded, what `probe` asks of
    /// the op's record, read in the same step where a statement costs a round trip
    /// (PostgreSQL); the read is unaffected by the claim, which only writes the ledger.
    fn claim_op_and_probe(
        &mut self,
        share: &ShareId,
        entry: &LedgerEntry<'_>,
        probe: Probe<'_>,
    ) -> LedgerResult<Option<Standing>>;

    /// What `probe` asks of a record of the share.
    fn probe(&mut self, share: &ShareId, probe: Probe<'_>) -> LedgerResult<Standing> {
        Ok(match probe {
            Probe::Nothing => Standing::Nothing,
            Probe::Session => Standing::Session(self.session_updated(share)?),
            Probe::Message(id) => Standing::Message(self.message_standing(share, id)?),
            Probe::Part { id, message_id } => {
                Standing::Part(self.part_standing(share, id, message_id)?)
            }
            Probe::PartText { id, field } => {
                Standing::PartText(self.part_text_end(share, id, field)?)
            }
        })
    }

    /// Removes the op recorded at `cursor` (a claim whose op was then refused).
    fn release_op(&mut self, share: &ShareId, cursor: Cursor) -> LedgerResult<()>;

    /// The cursor and content digest of an op id in the share's ledger (the
    /// digest is `None` for ops recorded before digests were kept).
    fn logged_op(
        &mut self,
        share: &ShareId,
        op_id: &OpId,
    ) -> LedgerResult<Option<(Cursor, Option<Vec<u8>>)>>;

    /// Logged ops with cursor > `after`, in cursor order, at most `limit`.
    fn ops_after(
        &mut self,
        share: &ShareId,
        after: Cursor,
        limit: u32,
    ) -> LedgerResult<Vec<LoggedOp>>;

    /// Moves the share's cursor (and its last-change time) after an append.
    fn set_cursor(&mut self, share: &ShareId, cursor: Cursor, updated_at: i64) -> LedgerResult<()>;

    // The records of a share's session.

    /// `Some(updated)` when the session record exists (`updated` may be unknown).
    fn session_updated(&mut self, share: &ShareId) -> LedgerResult<Option<Option<i64>>>;
    fn put_session(
        &mut self,
        share: &ShareId,
        updated: Option<i64>,
        json: &str,
    ) -> LedgerResult<()>;

    /// Whether message `id` was removed, and how far along it is stored.
    fn message_standing(&mut self, share: &ShareId, id: &str) -> LedgerResult<MessageStanding>;
    fn put_message(
        &mut self,
        share: &ShareId,
        id: &str,
        terminal: bool,
        json: &str,
    ) -> LedgerResult<()>;
    /// Removes a message and every part stored under it, with their appended text.
    fn remove_message(&mut self, share: &ShareId, id: &str) -> LedgerResult<()>;

    /// Whether part `id` or its message `message_id` was removed, and how far along
    /// the part is stored.
    fn part_standing(
        &mut self,
        share: &ShareId,
        id: &str,
        message_id: &str,
    ) -> LedgerResult<PartStanding>;
    /// The part's JSON as its last snapshot stored it, without the text appended since
    /// (see [`super::part_text`]).
    fn part(&mut self, share: &ShareId, id: &str) -> LedgerResult<Option<String>>;
    /// Whether the part is stored and finished, and the last chunk of `field`'s
    /// appended text.
    fn part_text_end(
        &mut self,
        share: &ShareId,
        id: &str,
        field: &str,
    ) -> LedgerResult<Option<PartTextEnd>>;
    /// Stores a part (replacing one with its id, which may have had another message),
    /// dropping the text appended to the one it replaces.
    fn put_part(
        &mut self,
        share: &ShareId,
        id: &str,
        message_id: &str,
        finished: bool,
        json: &str,
    ) -> LedgerResult<()>;
    /// Writes `text` appended to `field` of a stored part into its chunk `chunk` names.
    fn write_part_chunk(
        &mut self,
        share: &ShareId,
        id: &str,
        field: &str,
        chunk: ChunkWrite,
        text: &str,
    ) -> LedgerResult<()>;
    /// The appended text of those of `parts` that have any, ordered by part id (as
    /// bytes), field, then chunk number.
    fn part_chunks(&mut self, share: &ShareId, parts: &[&str]) -> LedgerResult<Vec<PartChunk>>;
    /// Removes a part, with its appended text.
    fn remove_part(&mut self, share: &ShareId, id: &str) -> LedgerResult<()>;

    fn put_diffs(&mut self, share: &ShareId, json: &str) -> LedgerResult<()>;

    /// Records that `id` was removed from the share, for good.
    fn mark_removed(&mut self, share: &ShareId, kind: Removable, id: &str) -> LedgerResult<()>;

    // Records in snapshot order, a batch at a time.

    fn session_json(&mut self, share: &ShareId) -> LedgerResult<Option<String>>;
    fn diffs_json(&mut self, share: &ShareId) -> LedgerResult<Option<String>>;
    /// Models by id: `(id, json)`.
    fn models_from(
        &mut self,
        share: &ShareId,
        from: &KeyFrom<String>,
        limit: u32,
    ) -> LedgerResult<Vec<(String, String)>>;
    /// Messages by id: `(id, json)`.
    fn messages_from(
        &mut self,
        share: &ShareId,
        from: &KeyFrom<String>,
        limit: u32,
    ) -> LedgerResult<Vec<(String, String)>>;
    /// One message's parts by id: `(id, json)`.
    fn parts_from(
        &mut self,
        share: &ShareId,
        message_id: &str,
        from: &KeyFrom<String>,
        limit: u32,
    ) -> LedgerResult<Vec<(String, String)>>;
    /// Parts whose message is not stored, by message id then id: `(message id, id, json)`.
    fn orphan_parts_from(
        &mut self,
        share: &ShareId,
        from: &KeyFrom<(String, String)>,
        limit: u32,
    ) -> LedgerResult<Vec<(String, String, String)>>;
    fn put_model(&mut self, share: &ShareId, id: &str, json: &str) -> LedgerResult<()>;

    /// Adds an audit line, committed with the transaction.
    fn audit(&mut self, event: &AuditEvent, at: i64) -> LedgerResult<()>;
}
