//! State every capability object of one server shares, on the RPC thread.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::error::ServerError;
use crate::follow::{Feeds, FollowSettings};
use crate::ledger::{AuditEvent, Ledger};
use crate::log_limit::LogLimiter;
use crate::metrics::{GaugeGuard, Metrics, SubscriberVia};
use crate::node::NodeServices;
use crate::presence::Presence;
use crate::redeem::Redeemer;
use crate::secret_hasher::SecretHasher;

/// Audit actions also logged at info (see [`Context::audit`]).
const SECURITY_ACTIONS: &[&str] = &[
    "mint",
    "create_share",
    "revoke_share",
    "revoke_token",
    "delete_share",
    "archive_share",
    "unarchive_share",
    "prune",
    "vacuum",
    "reclaim",
    "compact_ledger",
];

/// Shared by every capability object through an `Rc`.
pub struct Context {
    pub ledger: Ledger,
    pub hasher: SecretHasher,
    /// Limits checked before anything reaches the ledger.
    pub max_ops_per_batch: usize,
    pub max_op_bytes: usize,
    /// Checks tokens; shared with the HTTP gateway (one failed-redeem limiter for both).
    pub redeemer: Redeemer,
    /// Which shares have a writer connected; read by the HTTP gateway.
    pub presence: Presence,
    pub metrics: Metrics,
    /// Summarises log events that peers can repeat at will; shared with the HTTP gateway.
    pub logs: LogLimiter,
    /// Most `ops` calls in flight to one live subscriber, and how long one may
    /// go unanswered (see [`super::subscription`]).
    pub subscriber_window: usize,
    pub subscriber_timeout: Duration,
    /// The live feeds of followed shares, shared with the HTTP gateway's streams.
    pub feeds: Feeds,
    /// After how long without a writer running tool calls count as interrupted (presence).
    pub interrupted_after_ms: i64,
    /// Set once shutdown starts: new batches are refused with `overloaded` so
    /// the ones in flight can drain.
    draining: Cell<bool>,
    /// Batches between their arrival and their reply being written.
    in_flight: Cell<usize>,
    /// Woken when `in_flight` or `subscriptions` drops to zero during a drain.
    drained: Notify,
    /// Turns true when shutdown starts: live subscriptions watch it, so each
    /// sends `ended(shutdown)` while its connection is still open.
    shutting_down: watch::Sender<bool>,
    /// Live subscription tasks; a drain waits until each has said goodbye.
    subscriptions: Cell<usize>,
}

impl Context {
    /// A context for a server alone on its data ([`NodeServices::sole_process`]).
    pub fn new(ledger: Ledger, hasher: SecretHasher, config: &Config, metrics: Metrics) -> Self {
        let node = NodeServices::sole_process(config);
        Self::with_node(ledger, hasher, config, metrics, &node)
    }

    /// A context whose shared state (presence, failed-redeem limits) is `node`'s.
    pub fn with_node(
        ledger: Ledger,
        hasher: SecretHasher,
        config: &Config,
        metrics: Metrics,
        node: &NodeServices,
    ) -> Self {
        let logs = LogLimiter::new(config.log_summary_interval);
        let redeemer = Redeemer::new(
            ledger.clone(),
            hasher.clone(),
            Arc::clone(&node.redeem_failures),
            metrics.clone(),
            logs.clone(),
        );
        let feeds = Feeds::new(
            ledger.clone(),
            FollowSettings::from_config(config),
            metrics.clone(),
        );
        Self {
            presence: node.presence.clone(),
            hasher,
            max_ops_per_batch: config.max_ops_per_batch,
            max_op_bytes: config.max_op_bytes,
            redeemer,
            metrics,
            logs,
            subscriber_window: config.subscriber_window.max(1),
            subscriber_timeout: config.subscriber_timeout,
            feeds,
            ledger,
            interrupted_after_ms: i64::try_from(config.interrupted_after.as_millis())
                .unwrap_or(i64::MAX),
            draining: Cell::new(false),
            in_flight: Cell::new(0),
            drained: Notify::new(),
            shutting_down: watch::Sender::new(false),
            subscriptions: Cell::new(0),
        }
    }

    /// Writes an audit line; actions that change who may do what, or delete
    /// data, are also logged at info, so an operator sees them in the server
    /// log at the default level. (Appends and redeems are too frequent: they
    /// stay in the audit table.)
    pub fn audit(&self, event: AuditEvent) {
        if SECURITY_ACTIONS.contains(&event.action) {
            tracing::info!(
                action = event.action,
                outcome = %event.outcome,
                by_token = %event.token_id.as_ref().map_or("", |id| id.as_str()),
                share = %event.share_id.as_ref().map_or("", |id| id.as_str()),
                detail = %event.detail,
                "{}", event.action
            );
        }
        self.ledger.audit(event);
    }

    /// Registers a batch in flight; `None` while shutting down.
    pub fn begin_batch(self: &Rc<Self>) -> Result<BatchGuard, ServerError> {
        if self.draining.get() {
            return Err(ServerError::shutting_down());
        }
        self.in_flight.set(self.in_flight.get() + 1);
        Ok(BatchGuard(Rc::clone(self)))
    }

    /// Registers a live subscription for as long as the guard lives; refused
    /// while shutting down.
    pub fn begin_subscription(self: &Rc<Self>) -> Result<SubscriptionGuard, ServerError> {
        if self.draining.get() {
            return Err(ServerError::shutting_down());
        }
        self.subscriptions.set(self.subscriptions.get() + 1);
        Ok(SubscriptionGuard {
            ctx: self.clone(),
            shutting_down: self.shutting_down.subscribe(),
            _gauge: self.metrics.subscriber(SubscriberVia::Rpc),
        })
    }

    /// Refuses new batches and subscriptions, tells live subscriptions to end,
    /// and waits until batches in flight have answered and every subscription
    /// has sent its `ended(shutdown)` (each bounded by the subscriber timeout).
    pub async fn drain(&self) {
        self.draining.set(true);
        self.shutting_down.send_replace(true);
        while self.in_flight.get() > 0 || self.subscriptions.get() > 0 {
            self.drained.notified().await;
        }
    }
}

/// Counts one live subscription, and tells it when the server shuts down.
pub struct SubscriptionGuard {
    ctx: Rc<Context>,
    /// Becomes true when the server starts shutting down.
    pub shutting_down: watch::Receiver<bool>,
    /// Counts it in `capsync_subscribers{via="rpc"}`.
    _gauge: GaugeGuard,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        let left = self.ctx.subscriptions.get() - 1;
        self.ctx.subscriptions.set(left);
        if left == 0 {
            self.ctx.drained.notify_waiters();
        }
    }
}

/// Counts one batch in flight for as long as it lives.
pub struct BatchGuard(Rc<Context>);

impl Drop for BatchGuard {
    fn drop(&mut self) {
        let left = self.0.in_flight.get() - 1;
        self.0.in_flight.set(left);
        if left == 0 {
            self.0.drained.notify_waiters();
        }
    }
}
