//! Audit lines on PostgreSQL: queued by the calls that report them and written in
//! batches, one background transaction at a time, so an append does not pay for a
//! transaction of its own for its audit line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::pool::{Access, Pool, Worker};
use crate::ledger::AuditEvent;
use crate::ledger::rules::store::LedgerTx as _;

/// Most lines kept while the database cannot take them; older ones are dropped (and
/// counted in the log) past it.
const MAX_PENDING: usize = 10_000;

#[derive(Default)]
pub(super) struct AuditQueue {
    pending: Mutex<Vec<(AuditEvent, i64)>>,
    /// A flush is queued on the pool and has not started yet.
    scheduled: AtomicBool,
}

impl AuditQueue {
    /// Queues a line written at `at`, and a flush unless one is already waiting.
    pub(super) fn push(self: &Arc<Self>, pool: &Pool, event: AuditEvent, at: i64) {
        self.lines().push((event, at));
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            let queue = Arc::clone(self);
            // Queued now; nobody waits for it (a closed pool refuses it, and the lines go).
            drop(pool.submit(None, move |worker| {
                queue.flush(worker);
                Ok(())
            }));
        }
    }

    fn lines(&self) -> std::sync::MutexGuard<'_, Vec<(AuditEvent, i64)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes every queued line in one transaction; on failure they wait for the next flush.
    fn flush(&self, worker: &mut Worker) {
        self.scheduled.store(false, Ordering::Release);
        let lines = std::mem::take(&mut *self.lines());
        if lines.is_empty() {
            return;
        }
        let written = worker.transaction(Access::Write, &|tx, _| {
            for (event, at) in &lines {
                tx.audit(event, *at)?;
            }
            Ok(())
        });
        if let Err(e) = written {
            tracing::warn!(error = %e, lines = lines.len(), "could not write audit lines; kept for the next try");
            let mut pending = self.lines();
            let mut kept = lines;
            kept.append(&mut pending);
            let dropped = kept.len().saturating_sub(MAX_PENDING);
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    "audit lines dropped: the database has not taken them"
                );
                kept.drain(..dropped);
            }
            *pending = kept;
        }
    }
}
