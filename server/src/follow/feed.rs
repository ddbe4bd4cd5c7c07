//! One followed share's feed on this server: each commit's ops, handed over by
//! the commit when it was this node's or else read from the ledger once, kept in
//! a bounded buffer and handed to every follower of the share; and the one signal
//! its followers wait on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use capsync_shared::{Cursor, ShareId};
use tokio::sync::{Notify, watch};
use tracing::debug;

use super::buffer::{Buffer, FeedOp};
use super::prepare::{self, Prepare, Preparer};
use crate::ledger::{Ledger, LoggedOp};
use crate::metrics::GaugeGuard;

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
    /// Poked for every commit to the share: the feed's task takes what is new.
    wake: Notify,
    /// Set when what is new must be read from the ledger: another node's commit, a
    /// revocation, missed announcements. Otherwise this node's commits hand their
    /// ops over ([`Feed::offer`]).
    must_read: AtomicBool,
    /// Ops this node's commits handed over, oldest first, not taken yet.
    offered: Mutex<Offered>,
    /// Followers that want ops prepared (see [`Prepare`]).
    preparing: AtomicUsize,
    /// Counts the feed in `capsync_followed_shares` while it lives.
    _counted: GaugeGuard,
}

/// A follower's wish for prepared ops, for as long as it is held.
pub(super) struct Preparing(Arc<Feed>);

impl Drop for Preparing {
    fn drop(&mut self) {
        self.0.preparing.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Feed {
    pub fn new(share: ShareId, max_bytes: usize, counted: GaugeGuard) -> Self {
        Self {
            share,
            buffer: Mutex::new(Buffer::new(max_bytes)),
            head: watch::Sender::new(Head::default()),
            wake: Notify::new(),
            must_read: AtomicBool::new(true),
            offered: Mutex::new(Offered {
                commits: VecDeque::new(),
                bytes: 0,
                max_bytes,
            }),
            preparing: AtomicUsize::new(0),
            _counted: counted,
        }
    }

    /// Prepares the ops read from now on for followers that want them, until
    /// the returned wish is dropped.
    pub fn prepare_for(self: &Arc<Self>) -> Preparing {
        self.preparing.fetch_add(1, Ordering::Relaxed);
        Preparing(Arc::clone(self))
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
    pub fn after(&self, after: Cursor, limit: usize) -> Option<Vec<Arc<FeedOp>>> {
        self.buffer().after(after, limit)
    }

    /// Something was committed that the feed must read from the ledger.
    pub fn wake(&self) {
        self.must_read.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// This node committed `ops` to the share: the feed takes them as they are,
    /// unless it must read anyway.
    pub fn offer(&self, ops: Arc<[LoggedOp]>) {
        {
            let mut offered = lock(&self.offered);
            offered.bytes += ops.iter().map(|op| op.payload.len()).sum::<usize>();
            offered.commits.push_back(ops);
            // A feed whose task is this far behind reads instead: what waits here
            // stays within the buffer's bound.
            if offered.bytes > offered.max_bytes {
                offered.commits.clear();
                offered.bytes = 0;
                self.must_read.store(true, Ordering::Release);
            }
        }
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
        preparer: Option<Preparer>,
        forget: impl Fn(&Arc<Self>) -> bool,
    ) {
        let mut reader = Reader {
            ledger,
            preparer,
            state: None,
        };
        loop {
            tokio::select! {
                () = self.wake.notified() => {
                    self.read_new(&mut reader).await;
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

    /// Takes everything committed after the buffer's head, from what commits
    /// offered or else from the ledger, and announces it.
    async fn read_new(&self, reader: &mut Reader) {
        let offered = lock(&self.offered).take();
        let head = self.buffer().head();
        if !self.must_read.swap(false, Ordering::AcqRel)
            && let Some(after) = head
            && let Some(ops) = continuing(after, offered)
        {
            let ops = self.prepared(reader, ops).await;
            let cursor = {
                let mut buffer = self.buffer();
                buffer.extend(ops);
                buffer.head()
            };
            self.publish(cursor, false);
            return;
        }
        loop {
            let after = self.buffer().head();
            let read = reader
                .ledger
                .feed_ops(self.share.clone(), after, READ_PAGE)
                .await;
            let page = match read {
                Ok(page) => page,
                Err(err) => {
                    // Deleted, compacted past, or the ledger failed: start again from
                    // the share's cursor on the next commit, and let each follower
                    // read (and hear the error) under its own authority.
                    debug!(share = %self.share, %err, "the share's feed could not read the ledger");
                    self.buffer().clear();
                    self.must_read.store(true, Ordering::Release);
                    reader.state = None;
                    self.head.send_modify(|head| {
                        head.cursor = None;
                        head.checks += 1;
                    });
                    return;
                }
            };
            let full = page.ops.len() >= READ_PAGE as usize;
            let ops = self.prepared(reader, page.ops).await;
            let epochs = (page.state.writer_epoch, page.state.viewer_epoch);
            let (cursor, revoked) = {
                let mut buffer = self.buffer();
                match after {
                    None => buffer.start_at(page.state.cursor),
                    Some(_) => buffer.extend(ops),
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
            self.publish(cursor, revoked);
            if !full {
                return;
            }
        }
    }

    /// Moves the head to `cursor` (waking followers only if it moved), and asks
    /// every follower to check its authority first if `revoked`.
    fn publish(&self, cursor: Option<Cursor>, revoked: bool) {
        self.head.send_if_modified(|head| {
            let moved = head.cursor != cursor;
            head.cursor = cursor;
            if revoked {
                head.checks += 1;
            }
            moved || revoked
        });
    }

    /// `ops` with what was prepared for them, while any follower wants that.
    async fn prepared(&self, reader: &mut Reader, ops: Vec<LoggedOp>) -> Vec<FeedOp> {
        let wanted = self.preparing.load(Ordering::Relaxed) > 0;
        let (Some(preparer), true, false) = (&reader.preparer, wanted, ops.is_empty()) else {
            if !wanted {
                // Nobody to prepare for: a later wish starts from a fresh state.
                reader.state = None;
            }
            return ops.into_iter().map(FeedOp::from).collect();
        };
        let state = reader.state.take().unwrap_or_else(|| preparer());
        let ops = Arc::new(ops);
        let (state, prepared) =
            prepare::prepare(&reader.ledger, &self.share, state, Arc::clone(&ops)).await;
        reader.state = state;
        // The blocking task is done with its clone by now.
        let ops = Arc::try_unwrap(ops).unwrap_or_else(|shared| shared.as_ref().clone());
        match prepared {
            Some(prepared) => ops
                .into_iter()
                .zip(prepared)
                .map(|(op, prepared)| FeedOp {
                    op,
                    prepared: Some(prepared),
                })
                .collect(),
            None => ops.into_iter().map(FeedOp::from).collect(),
        }
    }

    fn buffer(&self) -> MutexGuard<'_, Buffer> {
        // Nothing panics while holding it; a poisoned buffer is still consistent.
        self.buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Ops that commits handed over and the feed has not taken yet.
struct Offered {
    commits: VecDeque<Arc<[LoggedOp]>>,
    /// Their payloads' bytes, at most `max_bytes` (the buffer's bound).
    bytes: usize,
    max_bytes: usize,
}

impl Offered {
    fn take(&mut self) -> VecDeque<Arc<[LoggedOp]>> {
        self.bytes = 0;
        std::mem::take(&mut self.commits)
    }
}

/// Nothing panics while holding the feed's locks; what they guard stays consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The offered ops after `after`, if they follow it without a gap (`None`
/// otherwise: then the feed reads the ledger).
fn continuing(after: Cursor, offered: VecDeque<Arc<[LoggedOp]>>) -> Option<Vec<LoggedOp>> {
    let mut ops = Vec::new();
    let mut next = after.0 + 1;
    for op in offered.iter().flat_map(|ops| ops.iter()) {
        if op.cursor.0 < next {
            continue;
        }
        if op.cursor.0 != next {
            return None;
        }
        ops.push(op.clone());
        next += 1;
    }
    Some(ops)
}

/// What the feed's task reads and prepares with.
struct Reader {
    ledger: Ledger,
    preparer: Option<Preparer>,
    /// The preparation state, while followers want prepared ops and it has seen
    /// every op read since it started.
    state: Option<Box<dyn Prepare>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::follow::test_share::TestShare;
    use crate::metrics::Metrics;

    /// A feed task's reader of `share`'s ledger, preparing nothing.
    fn reader(share: &TestShare) -> Reader {
        Reader {
            ledger: share.ledger.clone(),
            preparer: None,
            state: None,
        }
    }

    #[tokio::test]
    async fn ops_read_with_a_revocation_ask_every_follower_to_check_first() {
        let mut share = TestShare::new().await;
        let feed = Feed::new(
            ShareId::from("sh_1"),
            1 << 20,
            Metrics::default().followed_share(),
        );
        let head = feed.subscribe();
        let mut reader = reader(&share);
        feed.wake();
        feed.read_new(&mut reader).await;
        share.append(1).await;
        feed.wake();
        feed.read_new(&mut reader).await;
        assert_eq!(
            *head.borrow(),
            Head {
                cursor: Some(Cursor(1)),
                checks: 0,
                closed: false
            }
        );

        // No announcement is dispatched here: the read itself sees the new epoch.
        share.revoke_viewers().await;
        share.append(1).await;
        feed.wake();
        feed.read_new(&mut reader).await;
        assert_eq!(
            *head.borrow(),
            Head {
                cursor: Some(Cursor(2)),
                checks: 1,
                closed: false
            }
        );
    }

    fn logged(cursor: u64) -> LoggedOp {
        LoggedOp {
            cursor: Cursor(cursor),
            op_id: capsync_shared::OpId::from(format!("offered_{cursor}").as_str()),
            kind: capsync_shared::OpKind::ModelUpsert,
            payload: "{}".into(),
            applied_at: 0,
        }
    }

    fn buffered(feed: &Feed) -> Vec<String> {
        feed.after(Cursor(0), 100)
            .unwrap()
            .iter()
            .map(|op| op.op.op_id.as_str().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn ops_a_commit_offers_are_taken_as_they_are_unless_they_leave_a_gap() {
        let mut share = TestShare::new().await;
        let feed = Feed::new(
            ShareId::from("sh_1"),
            1 << 20,
            Metrics::default().followed_share(),
        );
        let _head = feed.subscribe();
        let mut reader = reader(&share);
        feed.wake();
        feed.read_new(&mut reader).await;

        // Offered ops that continue the buffer are taken without reading: these
        // two are not even in the ledger.
        feed.offer(vec![logged(1)].into());
        feed.offer(vec![logged(1), logged(2)].into());
        feed.read_new(&mut reader).await;
        assert_eq!(buffered(&feed), ["offered_1", "offered_2"]);

        // A gap (cursor 4 after 2): the feed reads the ledger instead, after 2.
        share.append(4).await;
        feed.offer(vec![logged(4)].into());
        feed.read_new(&mut reader).await;
        assert_eq!(
            buffered(&feed),
            ["offered_1", "offered_2", "op_2", "op_3"],
            "the ledger's ops 3 and 4"
        );
    }

    #[tokio::test]
    async fn more_offered_than_the_buffer_holds_is_dropped_and_read_instead() {
        let mut share = TestShare::new().await;
        // Room for the ledger's small op, not for the two offered ones.
        let feed = Feed::new(
            ShareId::from("sh_1"),
            200,
            Metrics::default().followed_share(),
        );
        let _head = feed.subscribe();
        let mut reader = reader(&share);
        feed.wake();
        feed.read_new(&mut reader).await;
        share.append(1).await;
        let mut big = logged(1);
        big.payload = "x".repeat(120);
        feed.offer(vec![big.clone()].into());
        feed.offer(vec![big].into());
        feed.read_new(&mut reader).await;
        assert_eq!(buffered(&feed), ["op_0"], "read from the ledger");
    }
}
