//! Pipelined batches: a batch that names the one before it applies only if that one did.
//!
//! A client may send a writer's next batch before the last one is acked (`Batch.after`
//! in the schema). The two may then commit together in one group transaction, or the
//! later one in a later transaction. Each batch carries a [`BatchLink`]; the batch after
//! it checks that link inside its own transaction and applies only if the batch before
//! was written earlier in this same transaction (then they commit or fail together) or
//! in one that committed. Engines run one share's writes in call order and tell a write
//! it committed (the `change` step of [`crate::ledger::engine::Engine::write`]) before
//! they run the next write of that share, so at that moment a link that says neither is
//! final: the batch before was refused, or its transaction failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One transaction among all that this process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransactionId(u64);

impl TransactionId {
    /// A number no other transaction of this process has had.
    pub fn next() -> Self {
        // Starts past `UNWRITTEN`; `COMMITTED` (u64::MAX) is never reached.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A link's state: not written in any transaction (yet, or ever).
const UNWRITTEN: u64 = 0;
/// A link's state: written in a transaction that committed.
const COMMITTED: u64 = u64::MAX;

/// What the batch after a batch needs to know of it: nothing written yet, written in
/// some transaction, or committed.
#[derive(Debug)]
pub struct BatchLink(AtomicU64);

impl BatchLink {
    pub fn new() -> Arc<Self> {
        Arc::new(Self(AtomicU64::new(UNWRITTEN)))
    }

    /// Whether a batch that follows this link's batch may apply in `transaction`.
    pub fn allows(&self, transaction: TransactionId) -> bool {
        let state = self.0.load(Ordering::Acquire);
        state == COMMITTED || state == transaction.0
    }

    /// The batch applied in `transaction`, which has not committed yet.
    pub fn written(&self, transaction: TransactionId) {
        self.0.store(transaction.0, Ordering::Release);
    }

    /// The transaction the batch was written in committed.
    pub fn committed(&self) {
        self.0.store(COMMITTED, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_allows_its_own_transaction_until_committed_and_then_every_one() {
        let link = BatchLink::new();
        let (first, second) = (TransactionId::next(), TransactionId::next());
        assert!(!link.allows(first), "nothing written");
        link.written(first);
        assert!(link.allows(first), "the same transaction");
        assert!(
            !link.allows(second),
            "a later transaction, the first not committed: it failed"
        );
        link.committed();
        assert!(link.allows(second));
        assert!(link.allows(TransactionId::next()));
    }
}
