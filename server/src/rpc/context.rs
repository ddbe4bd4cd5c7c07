//! State every capability object of one server shares, on the RPC thread.

use std::cell::{Cell, RefCell};

use tokio::sync::Notify;

use crate::auth::SecretHasher;
use crate::config::Config;
use crate::error::ServerError;
use crate::ledger::{AuditEvent, Ledger};
use crate::rate_limit::RedeemLimiter;

/// Shared by every capability object through an `Rc`.
pub struct Context {
    pub ledger: Ledger,
    pub hasher: SecretHasher,
    /// Limits checked before anything reaches the ledger.
    pub max_ops_per_batch: usize,
    pub max_op_bytes: usize,
    pub limiter: RefCell<RedeemLimiter>,
    /// Set once shutdown starts: new batches are refused with `overloaded` so
    /// the ones in flight can drain.
    draining: Cell<bool>,
    /// Batches between their arrival and their reply being written.
    in_flight: Cell<usize>,
    /// Woken when `in_flight` drops to zero during a drain.
    drained: Notify,
}

impl Context {
    pub fn new(ledger: Ledger, hasher: SecretHasher, config: &Config) -> Self {
        Self {
            ledger,
            hasher,
            max_ops_per_batch: config.max_ops_per_batch,
            max_op_bytes: config.max_op_bytes,
            limiter: RefCell::new(RedeemLimiter::new(
                config.redeem_failures,
                config.redeem_window,
            )),
            draining: Cell::new(false),
            in_flight: Cell::new(0),
            drained: Notify::new(),
        }
    }

    pub fn audit(&self, event: AuditEvent) {
        self.ledger.audit(event);
    }

    /// Registers a batch in flight; `None` while shutting down.
    pub fn begin_batch(&self) -> Result<BatchGuard<'_>, ServerError> {
        if self.draining.get() {
            return Err(ServerError::shutting_down());
        }
        self.in_flight.set(self.in_flight.get() + 1);
        Ok(BatchGuard(self))
    }

    /// Refuses new batches and waits until those in flight have answered.
    pub async fn drain(&self) {
        self.draining.set(true);
        while self.in_flight.get() > 0 {
            self.drained.notified().await;
        }
    }
}

/// Counts one batch in flight for as long as it lives.
pub struct BatchGuard<'a>(&'a Context);

impl Drop for BatchGuard<'_> {
    fn drop(&mut self) {
        let left = self.0.in_flight.get() - 1;
        self.0.in_flight.set(left);
        if left == 0 {
            self.0.drained.notify_waiters();
        }
    }
}
