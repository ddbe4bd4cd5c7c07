//! Server metrics, served by the HTTP gateway at `/metrics` in the Prometheus
//! (OpenMetrics) text format.
//!
//! The RPC side records (connections, op outcomes, commit latency, live
//! subscribers); the HTTP side records its own subscribers and renders. All
//! handles are atomics behind `Arc`s, so recording is cheap and `Send`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::ledger::{Ack, OpOutcome};

/// How a live follower is attached, the `via` label of `capsync_subscribers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriberVia {
    /// `ShareViewer.subscribe` over Cap'n Proto.
    Rpc,
    /// Server-Sent Events from the HTTP gateway.
    Sse,
}

type ViaLabel = [(&'static str, &'static str); 1];
type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// Which listener a connection came in on, the `listener` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Rpc,
    Http,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rpc => "rpc",
            Self::Http => "http",
        }
    }
}

/// Every metric of one server. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    rpc_connections_total: Counter,
    rpc_connections: Gauge,
    http_requests_total: Counter,
    ops_applied: Counter,
    ops_duplicate: Counter,
    ops_rejected: Counter,
    /// Seconds from handing a batch to the ledger to its durable ack.
    commit_latency: Histogram,
    subscribers: Family<ViaLabel, Gauge>,
    followed_shares: Gauge,
    http_connections: Gauge,
    /// Connections closed at accept: `listener`, `reason` (`limit`, `address_limit`).
    connections_refused: Family<Labels2, Counter>,
    /// RPC connections the server ended: `reason` (`handshake_timeout`, `message_too_large`, …).
    connections_ended: Family<Labels1, Counter>,
    accept_errors: Family<Labels1, Counter>,
    /// Redeems refused without checking the token: `by` (`address`, `token`).
    redeems_limited: Family<Labels1, Counter>,
    /// Work refused with `overloaded` because the ledger's write queue was full.
    writes_overloaded: Counter,
    /// 1 while the storage is full (writes refused with `storageFull`), else 0.
    storage_full: Gauge,
    storage_full_refusals: Counter,
    /// Syncs from opencode's share client whose secret was good.
    opencode_syncs: Counter,
    /// Their items, by `outcome` (`applied`, `duplicate`, `rejected`).
    opencode_items: Family<Labels1, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let rpc_connections_total = Counter::default();
        let rpc_connections = Gauge::default();
        let http_requests_total = Counter::default();
        let ops_applied = Counter::default();
        let ops_duplicate = Counter::default();
        let ops_rejected = Counter::default();
        // 0.25 ms to about 4 s: a group commit with fsync sits in the low milliseconds.
        let commit_latency = Histogram::new(exponential_buckets(0.000_25, 2.0, 15));
        let subscribers = Family::<ViaLabel, Gauge>::default();
        let followed_shares = Gauge::default();
        let http_connections = Gauge::default();
        let connections_refused = Family::<Labels2, Counter>::default();
        let connections_ended = Family::<Labels1, Counter>::default();
        let accept_errors = Family::<Labels1, Counter>::default();
        let redeems_limited = Family::<Labels1, Counter>::default();
        let writes_overloaded = Counter::default();
        let storage_full = Gauge::default();
        let storage_full_refusals = Counter::default();
        let opencode_syncs = Counter::default();
        let opencode_items = Family::<Labels1, Counter>::default();
        for outcome in ["applied", "duplicate", "rejected"] {
            let _ = opencode_items.get_or_create(&[("outcome", outcome)]);
        }
        // Both kinds show from the start, at 0, so dashboards need no special case.
        for via in [SubscriberVia::Rpc, SubscriberVia::Sse] {
            let _ = subscribers.get_or_create(&via_label(via));
        }

        let mut registry = Registry::with_prefix("capsync");
        registry.register(
            "rpc_connections",
            "RPC connections accepted",
            rpc_connections_total.clone(),
        );
        registry.register(
            "rpc_connections_open",
            "RPC connections open now",
            rpc_connections.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP gateway requests",
            http_requests_total.clone(),
        );
        registry.register(
            "ops_applied",
            "Ops applied (each advanced its share's cursor)",
            ops_applied.clone(),
        );
        registry.register(
            "ops_duplicate",
            "Ops received again after they were applied (no effect)",
            ops_duplicate.clone(),
        );
        registry.register(
            "ops_rejected",
            "Ops rejected (missing dependency, invalid, stale transition)",
            ops_rejected.clone(),
        );
        registry.register(
            "commit_latency_seconds",
            "Time from a batch reaching the ledger to its durable commit",
            commit_latency.clone(),
        );
        registry.register(
            "subscribers",
            "Live followers of a share, by how they are attached",
            subscribers.clone(),
        );
        registry.register(
            "followed_shares",
            "Shares with live followers on this server, each read once per commit for \
             all of them (its feed)",
            followed_shares.clone(),
        );
        registry.register(
            "http_connections_open",
            "HTTP gateway connections open now (live event streams included)",
            http_connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed as soon as they were accepted, by listener and reason \
             (limit: every slot taken; address_limit: the address holds its share)",
            connections_refused.clone(),
        );
        registry.register(
            "rpc_connections_ended",
            "RPC connections the server closed, by reason (handshake_timeout, \
             message_too_large, bad_segment_table, message_stalled, protocol_error)",
            connections_ended.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts (e.g. out of file descriptors), by listener",
            accept_errors.clone(),
        );
        registry.register(
            "redeems_limited",
            "Redeems refused before checking the token, by what was limited \
             (address: failures from one address; token: wrong secrets for one token id)",
            redeems_limited.clone(),
        );
        registry.register(
            "writes_overloaded",
            "Appends refused with `overloaded`: too many writes waiting, or the database busy or unreachable",
            writes_overloaded.clone(),
        );
        registry.register(
            "storage_full",
            "1 while the server's storage is full and writes are refused, else 0",
            storage_full.clone(),
        );
        registry.register(
            "storage_full_refusals",
            "Writes refused with `storageFull`",
            storage_full_refusals.clone(),
        );
        registry.register(
            "opencode_syncs",
            "Syncs from opencode's share client with a good secret",
            opencode_syncs.clone(),
        );
        registry.register(
            "opencode_items",
            "Items of opencode syncs, by outcome (applied, duplicate, rejected: \
             not kept, see the log)",
            opencode_items.clone(),
        );
        Self {
            registry: Arc::new(registry),
            rpc_connections_total,
            rpc_connections,
            http_requests_total,
            ops_applied,
            ops_duplicate,
            ops_rejected,
            commit_latency,
            subscribers,
            followed_shares,
            http_connections,
            connections_refused,
            connections_ended,
            accept_errors,
            redeems_limited,
            writes_overloaded,
            storage_full,
            storage_full_refusals,
            opencode_syncs,
            opencode_items,
        }
    }
}

fn via_label(via: SubscriberVia) -> ViaLabel {
    [(
        "via",
        match via {
            SubscriberVia::Rpc => "rpc",
            SubscriberVia::Sse => "sse",
        },
    )]
}

impl Metrics {
    /// Counts an accepted RPC connection, open until the guard drops.
    pub fn rpc_connection(&self) -> GaugeGuard {
        self.rpc_connections_total.inc();
        GaugeGuard::new(self.rpc_connections.clone())
    }

    pub fn http_request(&self) {
        self.http_requests_total.inc();
    }

    /// Counts an open HTTP connection until the guard drops.
    pub fn http_connection(&self) -> GaugeGuard {
        GaugeGuard::new(self.http_connections.clone())
    }

    /// Counts a connection closed at accept, and why (`limit`, `address_limit`).
    pub fn connection_refused(&self, listener: Listener, reason: &'static str) {
        self.connections_refused
            .get_or_create(&[("listener", listener.as_str()), ("reason", reason)])
            .inc();
    }

    /// Counts an RPC connection the server ended, and why.
    pub fn connection_ended(&self, reason: &'static str) {
        self.connections_ended
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn accept_error(&self, listener: Listener) {
        self.accept_errors
            .get_or_create(&[("listener", listener.as_str())])
            .inc();
    }

    /// Counts a redeem refused unchecked; `by` is `address` or `token`.
    pub fn redeem_limited(&self, by: &'static str) {
        self.redeems_limited.get_or_create(&[("by", by)]).inc();
    }

    pub fn write_overloaded(&self) {
        self.writes_overloaded.inc();
    }

    /// Records whether the storage is full now.
    pub fn set_storage_full(&self, full: bool) {
        self.storage_full.set(i64::from(full));
    }

    pub fn storage_full_refusal(&self) {
        self.storage_full_refusals.inc();
    }

    /// Counts a live follower until the guard drops.
    pub fn subscriber(&self, via: SubscriberVia) -> GaugeGuard {
        GaugeGuard::new(self.subscribers.get_or_create(&via_label(via)).clone())
    }

    /// Counts a share with live followers (its feed) until the guard drops.
    pub fn followed_share(&self) -> GaugeGuard {
        GaugeGuard::new(self.followed_shares.clone())
    }

    pub fn opencode_sync(&self) {
        self.opencode_syncs.inc();
    }

    /// Counts one item of an opencode sync by its `outcome`.
    pub fn opencode_item(&self, outcome: &'static str) {
        self.opencode_items
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// Records one acked batch: how long its commit took and each op's outcome.
    pub fn batch_committed(&self, latency: Duration, ack: &Ack) {
        self.commit_latency.observe(latency.as_secs_f64());
        for result in &ack.results {
            match result.outcome {
                OpOutcome::Applied(_) => self.ops_applied.inc(),
                OpOutcome::Duplicate(_) => self.ops_duplicate.inc(),
                OpOutcome::Rejected { .. } => self.ops_rejected.inc(),
            };
        }
    }

    /// The whole exposition, ending with `# EOF`.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Holds one unit of a gauge; dropping it gives it back.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::OpResult;
    use capsync_shared::{Cursor, OpId};

    #[test]
    fn renders_every_metric() {
        let metrics = Metrics::default();
        let conn = metrics.rpc_connection();
        let sub = metrics.subscriber(SubscriberVia::Sse);
        let result = |outcome| OpResult {
            op_id: OpId::from("o"),
            outcome,
        };
        metrics.batch_committed(
            Duration::from_millis(3),
            &Ack {
                cursor: Cursor(1),
                results: vec![
                    result(OpOutcome::Applied(Cursor(1))),
                    result(OpOutcome::Duplicate(Cursor(1))),
                ],
            },
        );
        let text = metrics.render();
        for line in [
            "capsync_rpc_connections_total 1",
            "capsync_rpc_connections_open 1",
            "capsync_ops_applied_total 1",
            "capsync_ops_duplicate_total 1",
            "capsync_ops_rejected_total 0",
            "capsync_commit_latency_seconds_count 1",
            "capsync_subscribers{via=\"sse\"} 1",
            "capsync_subscribers{via=\"rpc\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        drop((conn, sub));
        let text = metrics.render();
        assert!(text.contains("capsync_rpc_connections_open 0"));
        assert!(text.contains("capsync_subscribers{via=\"sse\"} 0"));
    }
}
