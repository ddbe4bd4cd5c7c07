//! Serving the gateway's HTTP/1 connections ourselves (rather than with
//! `axum::serve`) so that each one has a slot, a header timeout and a
//! graceful end.
//!
//! - Slots come from the same [`Acceptor`] as RPC connections: a limit per
//!   listener and per address, TCP keepalive, and back-off when accepting
//!   fails. A connection refused for lack of a slot gets a `503` and is closed.
//! - hyper's header timeout runs from when a connection starts waiting for a
//!   request (on connect, and after each response) until the request's headers
//!   are in: a slowloris client is cut off, and an idle keep-alive connection
//!   is closed after the same time. Live event streams are responses, so they
//!   are not cut by it; they end with the server or their client.
//! - On shutdown, requests in flight finish and idle connections close.

use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::metrics::Metrics;
use crate::net::{Accepted, Acceptor};

/// How long shutdown waits for HTTP requests in flight.
const GRACEFUL_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest request head (request line and headers) read, in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most headers in one request.
const MAX_HEADERS: usize = 64;

/// What a connection refused for lack of slots is told before it is closed.
pub const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
    content-type: text/plain; charset=utf-8\r\ncontent-length: 41\r\n\
    retry-after: 1\r\nconnection: close\r\n\r\n\
    Too many connections; try again shortly.\n";

/// Serves `app` on the connections `acceptor` hands out until `shutdown`.
pub async fn serve(
    mut acceptor: Acceptor,
    app: Router,
    header_timeout: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    let graceful = GracefulShutdown::new();
    loop {
        let Accepted { stream, peer, slot } = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = acceptor.accept() => accepted,
        };
        // The router as this connection's service, telling handlers the peer's
        // address the way `axum::serve` would (`ConnectInfo`).
        let router = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request.map(axum::body::Body::new))
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let open = metrics.http_connection();
        tokio::spawn(async move {
            // Errors here are the peer's (reset, header timeout, bad request
            // line) and already answered or moot: nothing for the log.
            if let Err(err) = connection.await {
                tracing::debug!(%peer, %err, "http connection ended with an error");
            }
            drop((slot, open));
        });
    }
    drop(acceptor);
    if tokio::time::timeout(GRACEFUL_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP connections did not close in time");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_response_is_well_formed() {
        let text = std::str::from_utf8(BUSY_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
    }
}
