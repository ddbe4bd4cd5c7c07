//! The shipper: sends what capsync's opencode plugin journals to the server, exactly
//! once, one share per opencode session.
//!
//! Its directory holds the journal (`journal/`, segments the plugin writes), its
//! state file (`shipper.db`: how far each segment was read, each session's share and
//! tokens), one outbox per session (`outbox/<session>.<generation>.db`) and the lock
//! (`shipper.lock`) that makes it the only shipper of that journal.
//!
//! Each round it:
//! 1. reads the new whole lines of every segment, oldest first, maps each event to ops
//!    ([`capsync_shared::opencode::map_event`], op ids from event ids, so an event read
//!    twice is a duplicate) and queues them in the session's outbox, durably, before it
//!    records how far it read. A segment read to its end whose process has ended (or
//!    that the plugin sealed) is deleted: its ops live on in the outboxes;
//! 2. creates a share for each session it ships (with the agent token, joining the
//!    agent's share of that session if opencode's own share client made one first; a
//!    sub-agent session names its parent, so its share is the parent's child);
//! 3. runs a syncer per shipped session (the outbox's retry, backoff and resume);
//! 4. deletes a session's outbox once everything in it is acked and nothing new came
//!    for a while (at once when no opencode is running).
//!
//! Which sessions it ships: every one ([`ShareMode::Auto`]), or those opencode shows a
//! share link for (`/share`) and their sub-agent sessions ([`ShareMode::Manual`]); the
//! others wait in their outboxes until they are shared. It ends when no opencode process
//! writes the journal any more and everything is sent; while the server is unreachable it
//! keeps trying, for up to [`ShipperOptions::linger`] after the last writer ended.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsync_shared::opencode::map_event;
use capsync_shared::ops::OpSpec;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::journal::{self, Segment};
use super::state::{SessionRow, ShareTokens, ShipperState, StateError};
use crate::connection::{ClientOptions, Connection, connect_any, connect_with};
use crate::error::ClientError;
use crate::outbox::{Outbox, OutboxError};
use crate::server_addr::ServerList;
use crate::syncer::backoff::Backoff;
use crate::{AgentClient, NewShare, SyncError, SyncOptions, SyncState, Syncer, spawn_syncer};

/// How much of a segment one read takes, at most (about).
const READ_BYTES: usize = 1 << 20;

/// How long a new shipper waits for the lock held by one that is about to end.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Which sessions are shipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareMode {
    /// Every session, sub-agent sessions included.
    Auto,
    /// Sessions shared in opencode (`/share`), with their sub-agent sessions.
    Manual,
}

impl ShareMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Manual => "manual",
        }
    }
}

/// What the shipper needs.
#[derive(Clone)]
pub struct ShipperOptions {
    /// The shipper's directory (state, outboxes, lock).
    pub dir: PathBuf,
    /// The journal directory the plugin writes (default `<dir>/journal`).
    pub journal: PathBuf,
    /// The server's RPC address, or several separated by commas (the nodes of one
    /// deployment, [`ServerList`]): the first that answers is used.
    pub server: String,
    /// The agent token shares are created with.
    pub agent_token: String,
    pub share: ShareMode,
    pub connection: ClientOptions,
    pub call_timeout: Duration,
    /// How often the journal is looked at.
    pub poll: Duration,
    /// How long, after the last opencode process ended, to keep trying to send.
    pub linger: Duration,
    /// How long a drained session's outbox is kept while opencode runs (new events
    /// for the session would reuse it).
    pub keep_drained: Duration,
    /// The server's per-op limit, above which an inlined attachment is left out.
    pub max_op_bytes: usize,
}

impl std::fmt::Debug for ShipperOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShipperOptions")
            .field("dir", &self.dir)
            .field("journal", &self.journal)
            .field("server", &self.server)
            .field("agent_token", &"<redacted>")
            .field("share", &self.share)
            .field("poll", &self.poll)
            .field("linger", &self.linger)
            .finish_non_exhaustive()
    }
}

impl ShipperOptions {
    /// Options with the defaults: journal in `<dir>/journal`, polled every 100 ms,
    /// lingering 24 hours, drained outboxes kept 60 s, the server's default 1 MiB op limit.
    pub fn new(dir: impl Into<PathBuf>, server: impl Into<String>, agent_token: String) -> Self {
        let dir = dir.into();
        Self {
            journal: dir.join("journal"),
            dir,
            server: server.into(),
            agent_token,
            share: ShareMode::Manual,
            connection: ClientOptions::default(),
            call_timeout: Duration::from_secs(30),
            poll: Duration::from_millis(100),
            linger: Duration::from_secs(24 * 3600),
            keep_drained: Duration::from_secs(60),
            max_op_bytes: capsync_shared::limits::DEFAULT_MAX_OP_BYTES,
        }
    }
}

/// How a shipper run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ShipperEnd {
    /// No opencode writes the journal any more and everything shipped is acked.
    Drained,
    /// Another shipper ships this journal.
    Busy,
    /// The server stayed unreachable for `linger` after the last opencode ended; the
    /// next start resumes.
    GaveUp,
    /// Asked to stop (a signal); the next start resumes.
    Stopped,
}

/// Why the shipper cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ShipperError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Io(String),
    #[error("the outbox of session {session}: {error}")]
    Outbox { session: String, error: OutboxError },
    /// The agent token is refused: nothing can be shared.
    #[error(
        "the server refused the agent token ({0}); mint a new one and run `capsync opencode install` again"
    )]
    AgentRefused(ClientError),
}

/// One session's outbox, open, and its syncer once it ships.
struct Shipping {
    outbox: Outbox,
    syncer: Option<Syncer>,
    /// When ops were last queued in it.
    last_queued: Instant,
}

/// Runs the shipper until it ends (see [`ShipperEnd`]) or `stop` resolves. Must run on
/// a tokio `LocalSet`, like the syncers it starts.
pub async fn ship(
    options: ShipperOptions,
    stop: impl Future<Output = ()>,
) -> Result<ShipperEnd, ShipperError> {
    let Some(lock) = lock(&options.dir).await? else {
        return Ok(ShipperEnd::Busy);
    };
    let state = {
        let path = options.dir.join("shipper.db");
        tokio::task::spawn_blocking(move || ShipperState::open(&path))
            .await
            .map_err(|e| ShipperError::Io(e.to_string()))??
    };
    let mut shipper = Shipper::new(options, state).await?;
    let end = shipper.run(stop).await;
    shipper.stop_syncers().await;
    drop(lock);
    end
}

/// Takes `<dir>/shipper.lock`, waiting up to [`LOCK_WAIT`] for a shipper that is ending;
/// `None` if another keeps it.
async fn lock(dir: &Path) -> Result<Option<std::fs::File>, ShipperError> {
    let io = |what: &str, e: std::io::Error| ShipperError::Io(format!("{what}: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| io(&dir.display().to_string(), e))?;
    let path = dir.join("shipper.lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io(&path.display().to_string(), e))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => {
                // Who holds it, for `capsync opencode status` (and whoever must stop it).
                let mut holder = &file;
                let _ = file
                    .set_len(0)
                    .and_then(|()| writeln!(holder, "{}", std::process::id()));
                return Ok(Some(file));
            }
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io(&path.display().to_string(), e));
            }
        }
    }
}

struct Shipper {
    options: ShipperOptions,
    state: ShipperState,
    sessions: HashMap<String, SessionRow>,
    open: HashMap<String, Shipping>,
    /// The agent capability, while connected.
    agent: Option<(Connection, AgentClient)>,
    agent_backoff: Backoff,
    /// No connect attempt before this.
    agent_retry_at: Instant,
    /// When a running opencode last wrote to (or held) the journal.
    last_writer: Instant,
    /// How far each segment was read, as stored in the state file: only this shipper
    /// writes it, so it is read from the file once per segment, not on every poll.
    offsets: HashMap<String, u64>,
}

impl Shipper {
    async fn new(options: ShipperOptions, state: ShipperState) -> Result<Self, ShipperError> {
        let sessions = state
            .sessions()
            .await?
            .into_iter()
            .map(|row| (row.session_id.clone(), row))
            .collect();
        let mut shipper = Self {
            options,
            state,
            sessions,
            open: HashMap::new(),
            agent: None,
            agent_backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            agent_retry_at: Instant::now(),
            last_writer: Instant::now(),
            offsets: HashMap::new(),
        };
        // Outboxes a previous run left with ops in them.
        let ids: Vec<String> = shipper.sessions.keys().cloned().collect();
        for id in ids {
            if outbox_path(&shipper.options.dir, &shipper.sessions[&id]).exists() {
                shipper.outbox(&id).await?;
            }
        }
        Ok(shipper)
    }

    async fn run(&mut self, stop: impl Future<Output = ()>) -> Result<ShipperEnd, ShipperError> {
        tokio::pin!(stop);
        loop {
            let writers = self.ingest().await?;
            if writers.running {
                self.last_writer = Instant::now();
            }
            self.create_shares().await?;
            self.tend_syncers().await?;
            let keep = if writers.running {
                self.options.keep_drained
            } else {
                Duration::ZERO
            };
            self.drop_drained(keep).await;
            if !writers.running && writers.left == 0 && !self.anything_to_send() {
                tracing::info!("no opencode writes the journal and everything is sent");
                return Ok(ShipperEnd::Drained);
            }
            if !writers.running && self.last_writer.elapsed() >= self.options.linger {
                tracing::warn!(
                    linger = ?self.options.linger,
                    "giving up until the next opencode start: the server has been unreachable since the last opencode ended"
                );
                return Ok(ShipperEnd::GaveUp);
            }
            tokio::select! {
                () = &mut stop => return Ok(ShipperEnd::Stopped),
                () = tokio::time::sleep(self.options.poll) => {}
            }
        }
    }

    /// Reads every segment's new lines into the outboxes; deletes finished segments.
    async fn ingest(&mut self) -> Result<Writers, ShipperError> {
        let journal_dir = self.options.journal.clone();
        let segments = tokio::task::spawn_blocking(move || journal::segments(&journal_dir))
            .await
            .map_err(|e| ShipperError::Io(e.to_string()))?
            .map_err(|e| {
                ShipperError::Io(format!(
                    "the journal {}: {e}",
                    self.options.journal.display()
                ))
            })?;
        let mut writers = Writers::default();
        for segment in segments {
            // Asked before reading: a segment whose writer had ended is complete once read.
            let running = segment.writer_running();
            let (offset, sealed) = self.read_segment(&segment).await?;
            if sealed || !running {
                self.finish_segment(&segment, offset).await?;
            } else {
                writers.running = true;
                writers.left += 1;
            }
        }
        Ok(writers)
    }

    /// Reads `segment` to its last whole line; returns where that ends and whether the
    /// segment is sealed.
    async fn read_segment(&mut self, segment: &Segment) -> Result<(u64, bool), ShipperError> {
        let mut offset = match self.offsets.get(&segment.name) {
            Some(&offset) => offset,
            None => self.state.offset(&segment.name).await?,
        };
        loop {
            let path = segment.path.clone();
            let read = tokio::task::spawn_blocking(move || {
                journal::read_journal(&path, offset, READ_BYTES)
            })
            .await
            .map_err(|e| ShipperError::Io(e.to_string()))?
            .map_err(|e| ShipperError::Io(format!("{}: {e}", segment.path.display())))?;
            for (at, why) in &read.unreadable {
                tracing::warn!(segment = %segment.name, at, why, "a journal line that is not an event was passed over");
            }
            let mut queued: Vec<(String, Vec<OpSpec>)> = Vec::new();
            for entry in &read.entries {
                self.absorb(&entry.event, &mut queued).await?;
            }
            for (session, ops) in queued {
                self.enqueue(&session, ops).await?;
            }
            let progressed = read.next > offset;
            if progressed {
                self.state.set_offset(&segment.name, read.next).await?;
                self.offsets.insert(segment.name.clone(), read.next);
                offset = read.next;
            }
            if read.sealed || !progressed {
                return Ok((offset, read.sealed));
            }
        }
    }

    /// Deletes a segment read to its end: its ops are in the outboxes.
    async fn finish_segment(&mut self, segment: &Segment, offset: u64) -> Result<(), ShipperError> {
        let path = segment.path.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let len = std::fs::metadata(&path).map_or(0, |m| m.len());
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(len),
            }
        })
        .await
        .map_err(|e| ShipperError::Io(e.to_string()))?;
        let len =
            removed.map_err(|e| ShipperError::Io(format!("{}: {e}", segment.path.display())))?;
        if len > offset {
            tracing::warn!(
                segment = %segment.name,
                bytes = len - offset,
                "the journal ends in an unfinished line (opencode was killed while writing it); it is dropped"
            );
        }
        self.state.forget_segment(&segment.name).await?;
        self.offsets.remove(&segment.name);
        tracing::debug!(segment = %segment.name, "journal segment shipped to the outboxes and deleted");
        Ok(())
    }

    /// Takes one journaled event: what it says about its session, and its ops.
    async fn absorb(
        &mut self,
        event: &Value,
        queued: &mut Vec<(String, Vec<OpSpec>)>,
    ) -> Result<(), ShipperError> {
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        let info = event.pointer("/properties/info");
        match (kind, info) {
            ("session.created" | "session.updated", Some(info)) => self.note_session(info).await?,
            ("session.deleted", Some(info)) => {
                if let Some(id) = info.get("id").and_then(Value::as_str) {
                    self.session_deleted(id).await?;
                }
            }
            _ => {}
        }
        let mapped = match map_event(event, self.options.max_op_bytes) {
            None => return Ok(()),
            Some(Err(why)) => {
                let id = event.get("id").and_then(Value::as_str).unwrap_or("");
                tracing::warn!(
                    event = id,
                    kind,
                    why,
                    "a journaled event that cannot be shipped"
                );
                return Ok(());
            }
            Some(Ok(mapped)) => mapped,
        };
        self.row(&mapped.session_id).await?;
        let ops = mapped.ops.into_iter().filter_map(|op| {
            let payload = serde_json::from_str(&op.payload).ok()?;
            Some(OpSpec::new(op.op_id.0, op.kind, payload))
        });
        match queued.iter_mut().find(|(id, _)| *id == mapped.session_id) {
            Some((_, list)) => list.extend(ops),
            None => queued.push((mapped.session_id, ops.collect())),
        }
        Ok(())
    }

    /// The session's row, created (and stored) on first sight.
    async fn row(&mut self, session_id: &str) -> Result<&mut SessionRow, ShipperError> {
        if !self.sessions.contains_key(session_id) {
            let row = SessionRow {
                session_id: session_id.to_owned(),
                ..SessionRow::default()
            };
            self.state.save(&row).await?;
            self.sessions.insert(session_id.to_owned(), row);
        }
        Ok(self.sessions.get_mut(session_id).expect("inserted above"))
    }

    /// What a session's info says: its parent, project and title, and the share link
    /// opencode shows for it.
    ///
    /// A link that is new for the session means opencode's share client made a new share
    /// (`/share`, or auto-sharing): it is shipped to (again, after an unshare). A missing
    /// link says nothing: opencode keeps publishing its in-memory session, link and all,
    /// after an unshare, and before a share the link is not there yet either. Whether a
    /// share still exists is the server's to say (the syncer stops when it is gone).
    async fn note_session(&mut self, info: &Value) -> Result<(), ShipperError> {
        let Some(id) = info.get("id").and_then(Value::as_str) else {
            return Ok(());
        };
        let text = |name: &str| {
            info.get(name)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let url = info
            .pointer("/share/url")
            .and_then(Value::as_str)
            .unwrap_or("");
        let before = self.row(id).await?.clone();
        let mut row = before.clone();
        row.project_id = text("projectID");
        row.parent_id = text("parentID");
        row.title = text("title");
        if !url.is_empty() && url != before.opencode_share_url {
            row.opencode_share_url = url.to_owned();
            if before.share.is_some() || before.stopped.is_some() {
                // Shared anew: a new share, fed from a new outbox (the old one is bound
                // to the old share).
                tracing::info!(session = id, "shared again in opencode");
                self.close(id, true).await;
                row.share = None;
                row.stopped = None;
                row.generation += 1;
            }
        }
        if row != before {
            self.state.save(&row).await?;
            self.sessions.insert(id.to_owned(), row);
        }
        Ok(())
    }

    async fn session_deleted(&mut self, id: &str) -> Result<(), ShipperError> {
        let mut row = self.row(id).await?.clone();
        if !row.deleted {
            row.deleted = true;
            self.state.save(&row).await?;
            self.sessions.insert(id.to_owned(), row);
        }
        Ok(())
    }

    /// Queues `ops` in the session's outbox, durably.
    async fn enqueue(&mut self, session: &str, ops: Vec<OpSpec>) -> Result<(), ShipperError> {
        if ops.is_empty() {
            return Ok(());
        }
        let outbox = self.outbox(session).await?;
        let outcome = outbox.enqueue_all(ops.clone()).await;
        if let Err(error) = outcome {
            if !matches!(
                error,
                OutboxError::Invalid(_) | OutboxError::Conflict { .. }
            ) {
                return Err(ShipperError::Outbox {
                    session: session.to_owned(),
                    error,
                });
            }
            // One op the outbox refuses must not hold back the others: one at a time.
            for op in ops {
                let op_id = op.op_id.clone();
                match outbox.enqueue(op).await {
                    Ok(_) => {}
                    Err(error @ (OutboxError::Invalid(_) | OutboxError::Conflict { .. })) => {
                        tracing::warn!(session, op = %op_id, %error, "an op that cannot be queued was left out");
                    }
                    Err(error) => {
                        return Err(ShipperError::Outbox {
                            session: session.to_owned(),
                            error,
                        });
                    }
                }
            }
        }
        if let Some(open) = self.open.get_mut(session) {
            open.last_queued = Instant::now();
        }
        Ok(())
    }

    /// The session's outbox, opened on first use.
    async fn outbox(&mut self, session: &str) -> Result<Outbox, ShipperError> {
        if let Some(open) = self.open.get(session) {
            return Ok(open.outbox.clone());
        }
        let row = self.row(session).await?.clone();
        let path = outbox_path(&self.options.dir, &row);
        let outbox = tokio::task::spawn_blocking(move || Outbox::open(path))
            .await
            .map_err(|e| ShipperError::Io(e.to_string()))?
            .map_err(|error| ShipperError::Outbox {
                session: session.to_owned(),
                error,
            })?;
        self.open.insert(
            session.to_owned(),
            Shipping {
                outbox: outbox.clone(),
                syncer: None,
                last_queued: Instant::now(),
            },
        );
        Ok(outbox)
    }

    /// Whether the session is shipped now.
    fn wanted(&self, row: &SessionRow) -> bool {
        if row.deleted || row.stopped.is_some() {
            return false;
        }
        match self.options.share {
            ShareMode::Auto => true,
            ShareMode::Manual => {
                // Shared in opencode, or started by a session that is (a sub-agent).
                let mut current = row;
                for _ in 0..32 {
                    if !current.opencode_share_url.is_empty() {
                        return true;
                    }
                    match self.sessions.get(&current.parent_id) {
                        Some(parent) if !current.parent_id.is_empty() => current = parent,
                        _ => return false,
                    }
                }
                false
            }
        }
    }

    /// Creates (or joins) the share of every shipped session that has ops and no share.
    async fn create_shares(&mut self) -> Result<(), ShipperError> {
        let needed: Vec<SessionRow> = self
            .open
            .keys()
            .filter_map(|id| self.sessions.get(id))
            .filter(|row| row.share.is_none() && self.wanted(row))
            .cloned()
            .collect();
        for row in needed {
            if Instant::now() < self.agent_retry_at {
                return Ok(());
            }
            let agent = match self.agent().await {
                Ok(agent) => agent,
                Err(error) => return self.agent_failed(error),
            };
            let created = match &self.agent {
                Some((conn, _)) => {
                    conn.with_call_timeout(self.options.call_timeout, obtain_share(&agent, &row))
                        .await
                }
                None => obtain_share(&agent, &row).await,
            };
            match created {
                Ok(Some(share)) => {
                    self.agent_backoff.reset();
                    tracing::info!(
                        session = %row.session_id,
                        share = %share.share_id,
                        "shipping the session to its share"
                    );
                    let mut row = row;
                    row.share = Some(share);
                    self.state.save(&row).await?;
                    self.sessions.insert(row.session_id.clone(), row);
                }
                Ok(None) => {
                    self.agent_backoff.reset();
                    tracing::info!(session = %row.session_id, "the share opencode made for the session is gone (unshared); not shipped");
                    let mut row = row;
                    row.stopped = Some("its share was deleted (unshared in opencode)".to_owned());
                    self.state.save(&row).await?;
                    self.sessions.insert(row.session_id.clone(), row);
                }
                Err(error) if error.is_transient() => return self.agent_failed(error),
                Err(error @ ClientError::Remote { .. })
                    if matches!(
                        error.code(),
                        Some(
                            capsync_shared::ErrorCode::PermissionDenied
                                | capsync_shared::ErrorCode::Revoked
                        )
                    ) =>
                {
                    return Err(ShipperError::AgentRefused(error));
                }
                Err(error) => {
                    // This session can never be shared as it is (an id too long, ...).
                    tracing::warn!(session = %row.session_id, %error, "the session cannot be shared");
                    let mut row = row;
                    row.stopped = Some(format!("the server refused to create its share: {error}"));
                    self.state.save(&row).await?;
                    self.sessions.insert(row.session_id.clone(), row);
                }
            }
        }
        Ok(())
    }

    /// The agent capability, connecting (and redeeming the token) if needed.
    async fn agent(&mut self) -> Result<AgentClient, ClientError> {
        if let Some((_, agent)) = &self.agent {
            return Ok(agent.clone());
        }
        let conn = match self.options.server.parse::<ServerList>() {
            Ok(servers) => connect_any(&servers, 0, &self.options.connection).await?.0,
            // Not addresses: connecting to the text says why.
            Err(_) => connect_with(self.options.server.as_str(), &self.options.connection).await?,
        };
        let agent = conn.redeem(&self.options.agent_token).await?.into_agent()?;
        self.agent = Some((conn, agent.clone()));
        Ok(agent)
    }

    /// After a failed connect or create: drop the connection, back off.
    fn agent_failed(&mut self, error: ClientError) -> Result<(), ShipperError> {
        if !error.is_transient()
            && matches!(
                error.code(),
                Some(
                    capsync_shared::ErrorCode::PermissionDenied
                        | capsync_shared::ErrorCode::Revoked
                )
            )
        {
            return Err(ShipperError::AgentRefused(error));
        }
        if let Some((conn, _)) = self.agent.take() {
            tokio::task::spawn_local(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.disconnect()).await;
            });
        }
        let delay = self.agent_backoff.next_delay(error.retry_after());
        tracing::warn!(%error, retry_in = ?delay, "cannot reach the server to create shares; will retry");
        self.agent_retry_at = Instant::now() + delay;
        Ok(())
    }

    /// Starts a syncer for each shipped session with a share; stops those whose session
    /// is no longer shipped; records the ones that stopped for good.
    async fn tend_syncers(&mut self) -> Result<(), ShipperError> {
        let ids: Vec<String> = self.open.keys().cloned().collect();
        for id in ids {
            let row = self.sessions[&id].clone();
            let wanted = self.wanted(&row);
            let open = self.open.get_mut(&id).expect("listed above");
            if let Some(syncer) = &open.syncer
                && let Some(fatal) = syncer.fatal()
            {
                open.syncer = None;
                if let SyncError::Busy(why) = &fatal {
                    tracing::warn!(session = %id, why, "the session's outbox is busy; will retry");
                    continue;
                }
                tracing::warn!(session = %id, error = %fatal, "shipping the session stopped for good");
                let mut row = row;
                row.stopped = Some(fatal.to_string());
                self.state.save(&row).await?;
                self.sessions.insert(id, row);
                continue;
            }
            match (&open.syncer, wanted, &row.share) {
                (None, true, Some(share)) => {
                    let mut sync =
                        SyncOptions::new(self.options.server.clone(), share.writer_token.clone());
                    sync.connection = self.options.connection.clone();
                    sync.call_timeout = self.options.call_timeout;
                    open.syncer = Some(spawn_syncer(open.outbox.clone(), sync));
                }
                (Some(_), false, _) => {
                    if let Some(syncer) = open.syncer.take() {
                        syncer.stop().await;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Closes (and deletes) the outboxes with nothing left to send that have had nothing
    /// new for `keep`, and those of sessions that will never ship.
    async fn drop_drained(&mut self, keep: Duration) {
        let ids: Vec<String> = self.open.keys().cloned().collect();
        for id in ids {
            let row = &self.sessions[&id];
            let never = row.deleted || row.stopped.is_some();
            let open = &self.open[&id];
            let drained = open.syncer.as_ref().is_some_and(|syncer| {
                let status = syncer.status();
                status.state == SyncState::Idle
                    && status.pending == 0
                    && status.in_flight == 0
                    && status.waiting == 0
            }) && open.last_queued.elapsed() >= keep;
            if never || drained {
                self.close(&id, true).await;
            }
        }
    }

    /// Stops the session's syncer and closes its outbox; with `delete`, deletes the file.
    async fn close(&mut self, id: &str, delete: bool) {
        let Some(open) = self.open.remove(id) else {
            return;
        };
        if let Some(syncer) = open.syncer {
            let status = syncer.stop().await;
            if status.rejected > 0 {
                match open.outbox.rejected().await {
                    Ok(rejected) => {
                        for entry in rejected {
                            tracing::warn!(session = id, op = %entry.op_id, reason = %entry.reason, detail = %entry.detail, "the server rejected an op");
                        }
                    }
                    Err(error) => tracing::warn!(session = id, %error, "cannot list rejected ops"),
                }
            }
            tracing::info!(session = id, acked = status.acked, rejected = status.rejected, cursor = ?status.last_acked_cursor, "session shipped");
        }
        let path = open.outbox.path().to_owned();
        drop(open.outbox);
        if delete {
            remove_outbox_files(&path);
        }
    }

    /// Whether a shipped session still has ops that are not acked.
    fn anything_to_send(&self) -> bool {
        self.open
            .keys()
            .any(|id| self.sessions.get(id).is_some_and(|row| self.wanted(row)))
    }

    async fn stop_syncers(&mut self) {
        let ids: Vec<String> = self.open.keys().cloned().collect();
        for id in ids {
            if let Some(syncer) = self.open.get_mut(&id).and_then(|open| open.syncer.take()) {
                syncer.stop().await;
            }
        }
        if let Some((conn, _)) = self.agent.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.disconnect()).await;
        }
    }
}

/// The share `row` ships to, with tokens for the shipper. A session opencode shows a
/// share link for ships to that share (opencode's share client made it with the same
/// agent token): `None` when it no longer exists, since a share deleted by an unshare must
/// not come back. Any other session gets the agent's share of it, created if needed.
async fn obtain_share(
    agent: &AgentClient,
    row: &SessionRow,
) -> Result<Option<ShareTokens>, ClientError> {
    if row.opencode_share_url.is_empty() {
        let created = agent
            .create_share(NewShare {
                session_id: row.session_id.clone(),
                project_id: row.project_id.clone(),
                parent_session_id: Some(row.parent_id.clone()).filter(|p| !p.is_empty()),
                title: row.title.clone(),
                viewer_expires_at: None,
                join_existing: true,
            })
            .await?;
        return Ok(Some(ShareTokens {
            share_id: created.info.state.share_id,
            writer_token: created.writer_token.token,
            viewer_token: created.viewer_token.token,
        }));
    }
    let mut after = String::new();
    loop {
        let page = agent.list_shares(&after, 0, false).await?;
        if let Some(found) = page
            .shares
            .iter()
            .find(|share| share.session_id == row.session_id)
        {
            let share_id = found.state.share_id.clone();
            let writer = agent.mint_writer(&share_id, None).await?;
            let viewer = agent.mint_viewer(&share_id, None).await?;
            return Ok(Some(ShareTokens {
                share_id,
                writer_token: writer.token,
                viewer_token: viewer.token,
            }));
        }
        match page.next_after {
            Some(next) => after = next,
            None => return Ok(None),
        }
    }
}

/// What [`Shipper::ingest`] found.
#[derive(Debug, Default)]
struct Writers {
    /// A running opencode still writes a segment.
    running: bool,
    /// Segments kept for their running writers.
    left: usize,
}

/// `<dir>/outbox/<session>.<generation>.db`; a session id that is not a plain file name
/// is replaced by its hash.
fn outbox_path(dir: &Path, row: &SessionRow) -> PathBuf {
    let id = &row.session_id;
    let plain = !id.is_empty()
        && id.len() <= 100
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let name = if plain {
        id.clone()
    } else {
        format!("h{}", hex::encode(&Sha256::digest(id.as_bytes())[..16]))
    };
    dir.join("outbox")
        .join(format!("{name}.{}.db", row.generation))
}

/// Deletes an outbox file and its companions (WAL, shared memory, syncer lock).
fn remove_outbox_files(path: &Path) {
    for suffix in ["", "-wal", "-shm", ".sync-lock"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = ?file, error = %e, "cannot delete a drained outbox file")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_shipper_per_directory_and_the_second_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).await.unwrap().expect("the lock is free");
        let holder = std::fs::read_to_string(dir.path().join("shipper.lock")).unwrap();
        assert_eq!(
            holder.trim(),
            std::process::id().to_string(),
            "names its holder"
        );
        let started = Instant::now();
        assert!(lock(dir.path()).await.unwrap().is_none(), "taken");
        assert!(
            started.elapsed() >= LOCK_WAIT,
            "it waited for the first to end"
        );
        drop(first);
        assert!(lock(dir.path()).await.unwrap().is_some(), "free again");
    }

    #[test]
    fn outbox_names_are_plain_file_names() {
        let row = |id: &str, generation| SessionRow {
            session_id: id.into(),
            generation,
            ..SessionRow::default()
        };
        let dir = Path::new("/s");
        assert_eq!(
            outbox_path(dir, &row("ses_1aB-x", 0)),
            Path::new("/s/outbox/ses_1aB-x.0.db")
        );
        assert_eq!(
            outbox_path(dir, &row("ses_1", 3)),
            Path::new("/s/outbox/ses_1.3.db")
        );
        let odd = outbox_path(dir, &row("../etc/passwd", 0));
        assert_eq!(odd.parent(), Some(Path::new("/s/outbox")));
        assert!(odd.file_name().unwrap().to_str().unwrap().starts_with('h'));
    }
}
