//! A feed's memory: the share's latest ops, each with what was prepared for it.

use std::collections::VecDeque;
use std::sync::Arc;

use capsync_shared::{Cursor, Epoch};

use crate::ledger::LoggedOp;

/// An op as a feed hands it to followers.
#[derive(Debug)]
pub struct FeedOp {
    pub op: LoggedOp,
    /// What the feed prepared for followers that want it (see [`super::Prepare`]);
    /// `None` for ops read by a follower itself, or before anyone wanted it.
    pub prepared: Option<Arc<str>>,
}

impl From<LoggedOp> for FeedOp {
    fn from(op: LoggedOp) -> Self {
        Self { op, prepared: None }
    }
}

/// The share's latest ops, oldest first, at most `max_bytes` of them.
pub(super) struct Buffer {
    ops: VecDeque<Arc<FeedOp>>,
    /// The cursor the buffer reaches back to: it holds every op after it.
    /// `None` until the feed's first read.
    from: Option<Cursor>,
    /// The share's writer and viewer epochs at the last read.
    pub epochs: Option<(Epoch, Epoch)>,
    bytes: usize,
    max_bytes: usize,
}

impl Buffer {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            ops: VecDeque::new(),
            from: None,
            epochs: None,
            bytes: 0,
            max_bytes,
        }
    }

    /// The cursor of the last op read.
    pub fn head(&self) -> Option<Cursor> {
        self.ops.back().map(|op| op.op.cursor).or(self.from)
    }

    /// The ops after `after`, at most `limit`: `None` when the buffer does not
    /// reach back to `after`.
    pub fn after(&self, after: Cursor, limit: usize) -> Option<Vec<Arc<FeedOp>>> {
        if after < self.from? {
            return None;
        }
        let first = self.ops.partition_point(|op| op.op.cursor <= after);
        Some(self.ops.range(first..).take(limit).cloned().collect())
    }

    /// Empty, holding every op after `cursor` (none yet).
    pub fn start_at(&mut self, cursor: Cursor) {
        self.clear();
        self.from = Some(cursor);
    }

    pub fn clear(&mut self) {
        self.ops.clear();
        self.from = None;
        self.epochs = None;
        self.bytes = 0;
    }

    /// Appends ops read after the head, dropping the oldest beyond `max_bytes`.
    pub fn extend(&mut self, ops: impl IntoIterator<Item = FeedOp>) {
        for op in ops {
            self.bytes += footprint(&op);
            self.ops.push_back(Arc::new(op));
        }
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.ops.pop_front() else {
                break;
            };
            self.bytes -= footprint(&oldest);
            self.from = Some(oldest.op.cursor);
        }
    }
}

/// What an op costs the buffer's memory.
fn footprint(op: &FeedOp) -> usize {
    std::mem::size_of::<FeedOp>()
        + op.op.payload.len()
        + op.op.op_id.as_str().len()
        + op.prepared.as_ref().map_or(0, |prepared| prepared.len())
}

#[cfg(test)]
mod tests {
    use capsync_shared::{OpId, OpKind};

    use super::*;

    fn op(cursor: u64, payload_bytes: usize) -> FeedOp {
        FeedOp::from(LoggedOp {
            cursor: Cursor(cursor),
            op_id: OpId::from(format!("op_{cursor}").as_str()),
            kind: OpKind::ModelUpsert,
            payload: "x".repeat(payload_bytes),
            applied_at: 0,
        })
    }

    fn cursors(ops: Option<Vec<Arc<FeedOp>>>) -> Option<Vec<u64>> {
        ops.map(|ops| ops.iter().map(|op| op.op.cursor.0).collect())
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
        buffer.extend((5..=9).map(|c| op(c, 10)));
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
        buffer.extend((1..=5).map(|c| op(c, 100)));
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
}
