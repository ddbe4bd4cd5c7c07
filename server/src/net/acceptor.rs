//! Accepting connections on a listener without letting trouble become a loop:
//! slots per listener and per address, TCP keepalive, and a growing back-off
//! (with summarised logging) when accepting fails, e.g. out of descriptors.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::Level;

use super::slots::{ConnectionSlots, Slot};
use crate::log_limit::LogLimiter;
use crate::metrics::{Listener, Metrics};

/// First wait after a failed accept; it doubles up to [`BACKOFF_MAX`] while
/// accepting keeps failing, and starts over after a success.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A connection that got a slot.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Frees the connection's slot when dropped: keep it as long as the connection.
    pub slot: Slot,
}

/// How a listener treats the connections it accepts.
#[derive(Clone, Debug)]
pub struct AcceptPolicy {
    pub slots: ConnectionSlots,
    /// Idle time before TCP keepalive probes start; `None` leaves the OS default.
    pub keepalive: Option<Duration>,
    /// Written (best effort) to a connection refused for lack of slots before it
    /// is closed, e.g. an HTTP 503; nothing for RPC.
    pub refusal: Option<&'static [u8]>,
}

/// Accepts on one listener.
pub struct Acceptor {
    listener: TcpListener,
    kind: Listener,
    policy: AcceptPolicy,
    metrics: Metrics,
    logs: LogLimiter,
    backoff: Duration,
}

impl Acceptor {
    pub fn new(
        listener: TcpListener,
        kind: Listener,
        policy: AcceptPolicy,
        metrics: Metrics,
        logs: LogLimiter,
    ) -> Self {
        Self {
            listener,
            kind,
            policy,
            metrics,
            logs,
            backoff: Duration::ZERO,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection that gets a slot. Connections refused for lack of
    /// slots are closed here; accept errors are waited out here.
    pub async fn accept(&mut self) -> Accepted {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    self.failed(&err).await;
                    continue;
                }
            };
            self.backoff = Duration::ZERO;
            match self.policy.slots.try_take(peer.ip()) {
                Ok(slot) => {
                    self.configure(&stream, peer);
                    return Accepted { stream, peer, slot };
                }
                Err(refusal) => {
                    self.metrics.connection_refused(self.kind, refusal.as_str());
                    let kind = match self.kind {
                        Listener::Rpc => "rpc_connection_refused",
                        Listener::Http => "http_connection_refused",
                    };
                    if self.logs.allow(kind, Level::WARN) {
                        tracing::warn!(listener = self.kind.as_str(), %peer, reason = refusal.as_str(),
                            "connection refused: no free slot (further refusals are summarised)");
                    }
                    if let Some(response) = self.policy.refusal {
                        // Best effort and never blocking: the connection is closed next.
                        let _ = stream.try_write(response);
                    }
                }
            }
        }
    }

    /// Waits after a failed accept, longer while failures go on. A peer that
    /// gave up before we accepted it is not a failure of ours: no wait.
    async fn failed(&mut self, err: &io::Error) {
        if matches!(
            err.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
        ) {
            return;
        }
        self.metrics.accept_error(self.kind);
        self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        let kind = match self.kind {
            Listener::Rpc => "rpc_accept_failed",
            Listener::Http => "http_accept_failed",
        };
        if self.logs.allow(kind, Level::WARN) {
            tracing::warn!(listener = self.kind.as_str(), %err, retry_in = ?self.backoff,
                "accepting a connection failed (e.g. out of file descriptors); backing off");
        }
        tokio::time::sleep(self.backoff).await;
    }

    fn configure(&self, stream: &TcpStream, peer: SocketAddr) {
        // Both are optimisations and liveness aids; a socket that refuses them still works.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %err, "could not set TCP_NODELAY");
        }
        if let Some(idle) = self.policy.keepalive {
            let interval = (idle / 4).max(Duration::from_secs(1));
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(4);
            if let Err(err) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
                tracing::debug!(%peer, %err, "could not set TCP keepalive");
            }
        }
    }
}
