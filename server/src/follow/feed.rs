//! One followed share's feed on this server: each commit's ops read from the
//! ledger once, kept in a bounded buffer, and handed to every follower of the
//! share; and the one signal its followers wait on.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use capsync_shared::{Cursor, Epoch, ShareId};
use tokio::sync::{Notify, watch};
use tracing::debug;

use crate::ledger::{Ledger, LoggedOp};

/// Most ops per read of the ledger.
const READ_PAGE: u32 = 256;

/// What followers of a share wait on: any change of it wakes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Head {
    /// The last cursor the feed has read (`None` before its first read).
    pub cursor: Option<Cursor>,
    /// Bumped whenever authority over the share may have changed, or the feed
    /// could not read: each follower then reads the ledger under its own authority.
    pub checks: u64,
    /// The ledger closed: no more ops will come.
    pub closed: bool,
}

/// A share's feed, shared by its followers (and its task, see [`Feed::run`]).
pub(super) struct Feed {
    pub share: ShareId,
    buffer: Mutex<Buffer>,
    head: watch::Sender<Head>,
    /// Poked for every commit to the share: the feed's task reads what is new.
    wake: Notify,
}

impl Feed {
    pub fn new(share: ShareId, max_bytes: usize) -> Self {
        Self {
            share,
            buffer: Mutex::new(Buffer::new(max_bytes)),
            head: watch::Sender::new(Head::default()),
            wake: Notify::new(),
        }
    }

    /// A follower's view of the head; the feed lives at least as long as one is held.
    pub fn subscribe(&self) -> watch::Receiver<Head> {
        self.head.subscribe()
    }

    /// Whether no follower holds a view of the head any more.
    pub fn unfollowed(&self) -> bool {
        self.head.receiver_count() == 0
    }

    /// The ops after `after`, at most `limit`, from memory: `None` when the
    /// buffer does not reach back to `after` (the caller reads the ledger).
    pub fn after(&self, after: Cursor, limit: usize) -> Option<Vec<Arc<LoggedOp>>> {
        self.buffer().after(after, limit)
    }

    /// New ops were committed: read them.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Authority over the share may have changed: every follower checks its own.
    pub fn recheck(&self) {
        self.head.send_modify(|head| head.checks += 1);
    }

    /// The ledger closed.
    pub fn close(&self) {
        self.head.send_modify(|head| head.closed = true);
    }

    /// The feed's task: reads after every wake, at most once per `interval`,
    /// until no follower is left and `forget` (which takes the feeds' registry
    /// lock, so no follower joins meanwhile) agrees to drop it.
    pub async fn run(
        self: Arc<Self>,
        ledger: Ledger,
        interval: Duration,
        forget: impl Fn(&Arc<Self>) -> bool,
    ) {
        loop {
            tokio::select! {
                () = self.wake.notified() => {
                    self.read_new(&ledger).await;
                    // A commit after a quiet spell goes out at once; the commits
                    // of a busy share meanwhile wait to go out together, one page
                    // per follower instead of one per commit.
                    tokio::time::sleep(interval).await;
                }
                () = self.head.closed() => if forget(&self) {
                    return;
                },
            }
        }
    }

    /// Reads everything committed after the buffer's head and announces it.
    async fn read_new(&self, ledger: &Ledger) {
        loop {
            let after = self.buffer().head();
            let read = ledger.feed_ops(self.share.clone(), after, READ_PAGE).await;
            let page = match read {
                Ok(page) => page,
                Err(err) => {
                    // Deleted, compacted past, or the ledger failed: start again from
                    // the share's cursor on the next commit, and let each follower
                    // read (and hear the error) under its own authority.
                    debug!(share = %self.share, %err, "the share's feed could not read the ledger");
                    self.buffer().clear();
                    self.head.send_modify(|head| {
                        head.cursor = None;
                        head.checks += 1;
                    });
                    return;
                }
            };
            let full = page.ops.len() >= READ_PAGE as usize;
            let epochs = (page.state.writer_epoch, page.state.viewer_epoch);
            let (cursor, revoked) = {
                let mut buffer = self.buffer();
                match after {
                    None => buffer.start_at(page.state.cursor),
                    Some(_) => buffer.extend(page.ops),
                }
                // Read in the same transaction as the ops: a follower checks its
                // authority before it is handed any op committed after a revocation,
                // even before the revocation's announcement arrives.
                let revoked = buffer
                    .epochs
                    .replace(epochs)
                    .is_some_and(|was| was != epochs);
                (buffer.head(), revoked)
            };
            self.head.send_if_modified(|head| {
                let moved = head.cursor != cursor;
                head.cursor = cursor;
                if revoked {
                    head.checks += 1;
                }
                moved || revoked
            });
            if !full {
                return;
            }
        }
    }

    fn buffer(&self) -> MutexGuard<'_, Buffer> {
        // Nothing panics while holding it; a poisoned buffer is still consistent.
        self.buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The share's latest ops, oldest first, at most `max_bytes` of them.
struct Buffer {
    ops: VecDeque<Arc<LoggedOp>>,
    /// The cursor the buffer reaches back to: it holds every op after it.
    /// `None` until the feed's first read.
    from: Option<Cursor>,
    /// The share's writer and viewer epochs at the last read.
    epochs: Option<(Epoch, Epoch)>,
    bytes: usize,
    max_bytes: usize,
}

impl Buffer {
    fn new(max_bytes: usize) -> Self {
        Self {
            ops: VecDeque::new(),
            from: None,
            epochs: None,
            bytes: 0,
            max_bytes,
        }
    }

    /// The cursor of the last op read.
    fn head(&self) -> Option<Cursor> {
        self.ops.back().map(|op| op.cursor).or(self.from)
    }

    fn after(&self, after: Cursor, limit: usize) -> Option<Vec<Arc<LoggedOp>>> {
        if after < self.from? {
            return None;
        }
        let first = self.ops.partition_point(|op| op.cursor <= after);
        Some(self.ops.range(first..).take(limit).cloned().collect())
    }

    /// Empty, holding every op after `cursor` (none yet).
    fn start_at(&mut self, cursor: Cursor) {
        self.clear();
        self.from = Some(cursor);
    }

    fn clear(&mut self) {
        self.ops.clear();
        self.from = None;
        self.epochs = None;
        self.bytes = 0;
    }

    /// Appends ops read after the head, dropping the oldest beyond `max_bytes`.
    fn extend(&mut self, ops: Vec<LoggedOp>) {
        for op in ops {
            self.bytes += footprint(&op);
            self.ops.push_back(Arc::new(op));
        }
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.ops.pop_front() else {
                break;
            };
            self.bytes -= footprint(&oldest);
            self.from = Some(oldest.cursor);
        }
    }
}

/// What an op costs the buffer's memory.
fn footprint(op: &LoggedOp) -> usize {
    std::mem::size_of::<LoggedOp>() + op.payload.len() + op.op_id.as_str().len()
}

#[cfg(test)]
mod tests {
    use capsync_shared::{OpId, OpKind};

    use super::*;

    fn op(cursor: u64, payload_bytes: usize) -> LoggedOp {
        LoggedOp {
            cursor: Cursor(cursor),
            op_id: OpId::from(format!("op_{cursor}").as_str()),
            kind: OpKind::ModelUpsert,
            payload: "x".repeat(payload_bytes),
            applied_at: 0,
        }
    }

    fn cursors(ops: Option<Vec<Arc<LoggedOp>>>) -> Option<Vec<u64>> {
        ops.map(|ops| ops.iter().map(|op| op.cursor.0).collect())
    }

    #[test]
    fn the_buffer_hands_out_what_follows_a_cursor_it_reaches_back_to() {
        let mut buffer = Buffer::new(1 << 20);
        assert_eq!(
            cursors(buffer.after(Cursor(0), 10)),
            None,
            "before any read"
        );
        buffer.start_at(Cursor(4));
        assert_eq!(cursors(buffer.after(Cursor(4), 10)), Some(vec![]));
        buffer.extend((5..=9).map(|c| op(c, 10)).collect());
        assert_eq!(buffer.head(), Some(Cursor(9)));
        assert_eq!(cursors(buffer.after(Cursor(3), 10)), None, "behind it");
        assert_eq!(cursors(buffer.after(Cursor(4), 2)), Some(vec![5, 6]));
        assert_eq!(cursors(buffer.after(Cursor(7), 10)), Some(vec![8, 9]));
        // A follower that read the ledger ahead of the feed waits for it.
        assert_eq!(cursors(buffer.after(Cursor(12), 10)), Some(vec![]));
    }

    #[test]
    fn the_buffer_drops_its_oldest_ops_beyond_its_bytes() {
        let one = footprint(&op(1, 100));
        let mut buffer = Buffer::new(3 * one);
        buffer.start_at(Cursor(0));
        buffer.extend((1..=5).map(|c| op(c, 100)).collect());
        assert_eq!(buffer.ops.len(), 3);
        assert_eq!(cursors(buffer.after(Cursor(1), 10)), None);
        assert_eq!(cursors(buffer.after(Cursor(2), 10)), Some(vec![3, 4, 5]));
        // One op larger than the whole buffer is not kept: its followers read the ledger.
        buffer.extend(vec![op(6, 4 * one)]);
        assert!(buffer.ops.is_empty());
        assert_eq!(buffer.head(), Some(Cursor(6)));
        assert_eq!(cursors(buffer.after(Cursor(5), 10)), None);
        assert_eq!(cursors(buffer.after(Cursor(6), 10)), Some(vec![]));
    }

    #[tokio::test]
    async fn ops_read_with_a_revocation_ask_every_follower_to_check_first() {
        let mut share = crate::follow::test_share::TestShare::new().await;
        let feed = Feed::new(ShareId::from("sh_1"), 1 << 20);
        let head = feed.subscribe();
        feed.read_new(&share.ledger).await;
        share.append(1).await;
        feed.read_new(&share.ledger).await;
        assert_eq!(
            *head.borrow(),
            Head {
                cursor: Some(Cursor(1)),
                checks: 0,
                closed: false
            }
        );

        // No announcement is dispatched here: the read itself sees the new epoch.
        share
            .ledger
            .revoke_share(
                share.agent.clone(),
                ShareId::from("sh_1"),
                crate::ledger::RevokeScope::Viewers,
            )
            .await
            .unwrap();
        share.append(1).await;
        feed.read_new(&share.ledger).await;
        assert_eq!(
            *head.borrow(),
            Head {
                cursor: Some(Cursor(2)),
                checks: 1,
                closed: false
            }
        );
    }
}
