//! Writer presence per share: whether a writer capability is live right now,
//! and since when none has been.
//!
//! A `ShareWriter` counts as connected for as long as its capability object
//! lives (it holds a [`WriterPresence`] guard), so a dropped connection
//! disconnects its writers without any explicit call. A writer over HTTP
//! (opencode's share client) has no connection to watch: it counts as
//! connected for [`HTTP_WRITER_WINDOW_MS`] after each sync. Viewers read this to show
//! whether the session is still being written, and to show tool calls of a
//! share whose writer left long ago as interrupted. Display only: nothing here
//! changes stored records, and it is not persisted (after a restart, "gone
//! since" falls back to the share's last change).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use capsync_shared::ShareId;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::ledger::ShareState;

/// Live writer counts of every share, shared by the RPC side (which counts)
/// and the HTTP gateway (which reads). Cheap to clone.
#[derive(Clone)]
pub struct Presence {
    board: Arc<dyn PresenceBoard>,
    /// When writers connect, disconnect and sync.
    clock: Clock,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

/// How long an HTTP writer counts as connected after its last sync. opencode
/// syncs within a second of any change, and a turn rarely goes a minute
/// without one.
pub const HTTP_WRITER_WINDOW_MS: i64 = 60_000;

/// Where writer presence is kept: in this process's memory ([`LocalPresence`]);
/// see [`crate::node`] for what several processes serving one database need.
/// Times are Unix ms from the server's clock.
pub trait PresenceBoard: Send + Sync + 'static {
    /// One more writer of `share` is connected.
    fn connected(&self, share: &ShareId);
    /// One writer of `share` went away at `at`.
    fn disconnected(&self, share: &ShareId, at: i64);
    /// An HTTP writer of `share` synced at `at`; `true` when it was not counted
    /// as connected just before.
    fn synced(&self, share: &ShareId, at: i64) -> bool;
    fn status(&self, share: &ShareId) -> WriterStatus;
    /// Changes on every connect, disconnect and newly counted sync.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// Presence in this process's memory.
#[derive(Debug)]
pub struct LocalPresence {
    shares: Mutex<HashMap<ShareId, Entry>>,
    /// Bumped on every change, so followers can wait for one.
    changed: watch::Sender<u64>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    writers: usize,
    /// Unix ms when the count last dropped to zero.
    last_disconnect: Option<i64>,
    /// Unix ms of the last sync from an HTTP writer.
    last_sync: Option<i64>,
}

/// A share's writer presence at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterStatus {
    pub writers: usize,
    /// Unix ms when the last writer went away; `None` if none did since the server started.
    pub last_disconnect: Option<i64>,
    /// Unix ms of the last sync from an HTTP writer; `None` if none since the server started.
    pub last_sync: Option<i64>,
}

impl Default for LocalPresence {
    fn default() -> Self {
        Self {
            shares: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl LocalPresence {
    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ShareId, Entry>> {
        // Counts stay usable even if a holder panicked: they are display only.
        self.shares.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LocalPresence {
    /// Every share this process has seen a writer of, with its status.
    pub fn all(&self) -> Vec<(ShareId, WriterStatus)> {
        self.lock()
            .iter()
            .map(|(share, entry)| {
                (
                    share.clone(),
                    WriterStatus {
                        writers: entry.writers,
                        last_disconnect: entry.last_disconnect,
                        last_sync: entry.last_sync,
                    },
                )
            })
            .collect()
    }
}

impl PresenceBoard for LocalPresence {
    fn connected(&self, share: &ShareId) {
        self.lock().entry(share.clone()).or_default().writers += 1;
        self.bump();
    }

    fn disconnected(&self, share: &ShareId, at: i64) {
        {
            let mut shares = self.lock();
            if let Some(entry) = shares.get_mut(share) {
                entry.writers = entry.writers.saturating_sub(1);
                if entry.writers == 0 {
                    entry.last_disconnect = Some(at);
                }
            }
        }
        self.bump();
    }

    fn synced(&self, share: &ShareId, at: i64) -> bool {
        let newly = {
            let mut shares = self.lock();
            let entry = shares.entry(share.clone()).or_default();
            let was = entry.last_sync.is_some_and(|last| within_window(last, at));
            entry.last_sync = Some(at);
            !was
        };
        if newly {
            self.bump();
        }
        newly
    }

    fn status(&self, share: &ShareId) -> WriterStatus {
        let entry = self.lock().get(share).copied().unwrap_or_default();
        WriterStatus {
            writers: entry.writers,
            last_disconnect: entry.last_disconnect,
            last_sync: entry.last_sync,
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

impl Default for Presence {
    fn default() -> Self {
        Self::new(Clock::system())
    }
}

impl Presence {
    /// No writers yet, kept in this process ([`LocalPresence`]); times read from `clock`.
    pub fn new(clock: Clock) -> Self {
        Self::on(Arc::new(LocalPresence::default()), clock)
    }

    /// Presence kept on `board`.
    pub fn on(board: Arc<dyn PresenceBoard>, clock: Clock) -> Self {
        Self { board, clock }
    }

    /// The clock presence times are read from.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Counts one writer of `share` as connected until the guard drops.
    pub fn writer_connected(&self, share: ShareId) -> WriterPresence {
        self.board.connected(&share);
        WriterPresence {
            presence: self.clone(),
            share,
        }
    }

    /// Counts an HTTP writer of `share` as connected for the next
    /// [`HTTP_WRITER_WINDOW_MS`]. Followers hear of it only when it was not
    /// connected already: one sync a second must not wake every stream.
    pub fn writer_synced(&self, share: &ShareId) {
        self.board.synced(share, self.clock.now_millis());
    }

    /// The writer status of `share` now.
    pub fn status(&self, share: &ShareId) -> WriterStatus {
        self.board.status(share)
    }

    /// Wakes on every connect or disconnect of any share's writers.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.board.subscribe()
    }

    fn disconnected(&self, share: &ShareId) {
        self.board.disconnected(share, self.clock.now_millis());
    }
}

/// A share's presence as viewers see it (the page, its JSON, and `ShareViewer.presence`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresenceView {
    pub writer_connected: bool,
    /// Unix ms of the last applied op.
    pub last_change: Option<i64>,
    /// Unix ms since when no writer is connected.
    pub writer_gone_since: Option<i64>,
    /// No writer for at least `interrupted_after`: running tool calls will not finish.
    pub interrupted: bool,
}

impl PresenceView {
    pub fn new(
        status: WriterStatus,
        last_change: Option<i64>,
        interrupted_after_ms: i64,
        now: i64,
    ) -> Self {
        let writer_gone_since = status.gone_since(last_change, now);
        Self {
            writer_connected: status.connected(now),
            last_change,
            writer_gone_since,
            interrupted: is_interrupted(writer_gone_since, interrupted_after_ms, now),
        }
    }
}

/// Whether tool calls still running count as interrupted at `now`: no writer since
/// `gone_since`, for at least `interrupted_after_ms`.
pub fn is_interrupted(gone_since: Option<i64>, interrupted_after_ms: i64, now: i64) -> bool {
    gone_since.is_some_and(|gone| now.saturating_sub(gone) >= interrupted_after_ms)
}

/// When the share last changed (Unix ms): when its last op was applied, `None`
/// before the first. From the share's state rather than its last op, whose
/// payload ledger compaction may have dropped.
pub fn last_change(state: &ShareState) -> Option<i64> {
    (state.cursor.0 > 0).then_some(state.updated_at)
}

/// One connected writer; dropping it disconnects it.
#[derive(Debug)]
pub struct WriterPresence {
    presence: Presence,
    share: ShareId,
}

impl Drop for WriterPresence {
    fn drop(&mut self) {
        self.presence.disconnected(&self.share);
    }
}

fn within_window(synced_at: i64, now: i64) -> bool {
    now.saturating_sub(synced_at) < HTTP_WRITER_WINDOW_MS
}

impl WriterStatus {
    /// Whether a writer counts as connected at `now`: a live capability, or an
    /// HTTP writer's sync within the window.
    pub fn connected(&self, now: i64) -> bool {
        self.writers > 0 || self.last_sync.is_some_and(|at| within_window(at, now))
    }

    /// When (Unix ms) an HTTP writer that counts as connected now stops counting,
    /// if no live capability keeps the share connected anyway.
    pub fn connected_until(&self, now: i64) -> Option<i64> {
        let at = self.last_sync?;
        (self.writers == 0 && within_window(at, now)).then(|| at + HTTP_WRITER_WINDOW_MS)
    }

    /// Since when (Unix ms) no writer has been connected, given the share's last
    /// change: a change means a writer was there then, as does a sync. `None`
    /// while one is connected.
    pub fn gone_since(&self, last_change: Option<i64>, now: i64) -> Option<i64> {
        if self.connected(now) {
            return None;
        }
        [self.last_disconnect, last_change, self.last_sync]
            .into_iter()
            .flatten()
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_writers_until_their_guards_drop() {
        let presence = Presence::default();
        let share = ShareId::from("sh_1");
        let changes = presence.subscribe();
        let a = presence.writer_connected(share.clone());
        let b = presence.writer_connected(share.clone());
        assert!(changes.has_changed().unwrap());
        assert_eq!(presence.status(&share).writers, 2);
        drop(a);
        assert_eq!(presence.status(&share).writers, 1);
        assert_eq!(presence.status(&share).last_disconnect, None);
        drop(b);
        let status = presence.status(&share);
        assert_eq!(status.writers, 0);
        let gone = status.last_disconnect.expect("disconnect time");
        assert_eq!(status.gone_since(Some(gone - 10), gone), Some(gone));
        assert_eq!(status.gone_since(Some(gone + 10), gone), Some(gone + 10));
        assert_eq!(presence.status(&ShareId::from("other")).writers, 0);
    }

    #[test]
    fn gone_since_falls_back_to_the_last_change() {
        let status = WriterStatus {
            writers: 0,
            last_disconnect: None,
            last_sync: None,
        };
        assert_eq!(status.gone_since(Some(5), 10), Some(5));
        assert_eq!(status.gone_since(None, 10), None);
        let connected = WriterStatus {
            writers: 1,
            last_disconnect: Some(1),
            last_sync: None,
        };
        assert_eq!(connected.gone_since(Some(5), 10), None);
    }

    #[test]
    fn an_http_writer_counts_as_connected_for_a_while_after_each_sync() {
        let presence = Presence::default();
        let share = ShareId::from("sh_1");
        let mut changes = presence.subscribe();
        presence.writer_synced(&share);
        assert!(changes.has_changed().unwrap(), "the first sync is news");
        changes.mark_unchanged();
        presence.writer_synced(&share);
        assert!(
            !changes.has_changed().unwrap(),
            "later ones within the window are not"
        );

        let status = presence.status(&share);
        let synced = status.last_sync.expect("sync time");
        assert!(status.connected(synced));
        assert_eq!(status.gone_since(Some(synced - 5), synced), None);
        assert_eq!(
            status.connected_until(synced),
            Some(synced + HTTP_WRITER_WINDOW_MS)
        );
        let later = synced + HTTP_WRITER_WINDOW_MS;
        assert!(!status.connected(later));
        assert_eq!(status.connected_until(later), None);
        assert_eq!(status.gone_since(Some(synced - 5), later), Some(synced));
        assert_eq!(
            PresenceView::new(status, Some(synced - 5), 1000, later + 1000),
            PresenceView {
                writer_connected: false,
                last_change: Some(synced - 5),
                writer_gone_since: Some(synced),
                interrupted: true,
            }
        );
    }
}
