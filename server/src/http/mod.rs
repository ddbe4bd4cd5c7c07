//! The HTTP gateway: share pages for browsers, a small JSON API, live updates
//! as Server-Sent Events, `/healthz` and `/metrics`.
//!
//! It runs in the server's process on its own listener, as plain (`Send`)
//! tokio tasks beside the RPC `LocalSet`, and reaches the rest of the server
//! only through `Send + Clone` handles: the [`Ledger`], the [`Redeemer`]
//! (the same token check and failed-redeem limit as RPC), [`Presence`] and
//! [`Metrics`].
//!
//! | route | what |
//! |---|---|
//! | `GET /s/{share}` | the share page; its token travels in the URL fragment |
//! | `GET /api/shares/{share}/snapshot` | the whole document ([`api`]) |
//! | `GET /api/shares/{share}/ops?after=N&limit=M` | applied ops after a cursor (`410` below the compaction point) |
//! | `GET /api/shares/{share}/events` | live updates ([`events`]) |
//! | `GET /healthz`, `GET /metrics` | liveness, Prometheus text |
//!
//! The API takes `Authorization: Bearer <viewer token>`. Headers, and so
//! tokens, are never logged.

mod api;
mod auth;
mod document;
mod error;
mod events;
pub(crate) mod fuzz;
pub mod markdown;
mod page;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::redeem::Redeemer;

/// What every handler can reach. Cheap to clone, `Send`.
#[derive(Clone)]
pub struct AppState {
    pub ledger: Ledger,
    pub redeemer: Redeemer,
    pub presence: Presence,
    pub metrics: Metrics,
    /// How long a share's writer may be gone before running tool calls show as interrupted.
    pub interrupted_after: Duration,
    /// Live event streams allowed at once (`--max-connections`); more get `503`.
    pub streams: Arc<Semaphore>,
    /// Cancelled when the server shuts down: live streams end, so the
    /// graceful shutdown of the listener does not wait for them forever.
    pub shutdown: CancellationToken,
}

impl AppState {
    fn interrupted_after_ms(&self) -> i64 {
        i64::try_from(self.interrupted_after.as_millis()).unwrap_or(i64::MAX)
    }

    /// The gateway's state over `ledger` as the server builds it, with cheap argon2.
    #[cfg(test)]
    fn for_tests(ledger: Ledger) -> Self {
        let config = crate::config::Config::default();
        let hasher =
            crate::auth::SecretHasher::new(256, 1).expect("valid argon2 parameters for tests");
        Self {
            redeemer: Redeemer::new(
                ledger.clone(),
                hasher,
                crate::rate_limit::RedeemLimiter::new(config.redeem_failures, config.redeem_window),
            ),
            ledger,
            presence: Presence::default(),
            metrics: Metrics::default(),
            interrupted_after: config.interrupted_after,
            streams: Arc::new(Semaphore::new(config.max_connections)),
            shutdown: CancellationToken::new(),
        }
    }
}

/// The gateway's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/s/{share}", get(page::share_page))
        .route("/assets/page.js", get(page::script))
        .route("/assets/page.css", get(page::stylesheet))
        .route("/api/shares/{share}/snapshot", get(api::snapshot))
        .route("/api/shares/{share}/ops", get(api::ops))
        .route("/api/shares/{share}/events", get(events::events))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(page::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), common))
        .with_state(state)
}

/// A bound listener and the state to serve it with.
pub struct HttpGateway {
    listener: TcpListener,
    state: AppState,
}

impl HttpGateway {
    /// Binds `addr` now, so a bad address fails the server's start.
    pub async fn bind(addr: SocketAddr, state: AppState) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `state.shutdown` is cancelled, then lets requests in
    /// flight finish (live streams end at once).
    pub async fn serve(self) -> std::io::Result<()> {
        let shutdown = self.state.shutdown.clone();
        info!(addr = %self.listener.local_addr()?, "share pages and HTTP API listening");
        let app = router(self.state).into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }
}

/// For every request: count it, log it without headers or query (which is
/// where credentials would be), and set the headers that keep the page to itself.
async fn common(State(state): State<AppState>, request: Request, next: Next) -> Response {
    state.metrics.http_request();
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    debug!(%method, %path, status = response.status().as_u16(), elapsed = ?started.elapsed(), "http request");
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(page::CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Share content is private to whoever holds the link: no cache keeps it.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}
