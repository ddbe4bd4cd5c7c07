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
//! | `/opencode/{agent token}/api/share…`, `GET /share/{token}`, `GET /api/share/{token}/data` | opencode's share client ([`opencode`]) |
//!
//! The API takes `Authorization: Bearer <viewer token>`. Headers, and so
//! tokens, are never logged. Connections are served by [`connections`]: slots
//! per listener and per address, a header timeout, body limits on every route.

mod api;
mod auth;
mod connections;
mod error;
mod events;
pub(crate) mod fuzz;
mod live_html;
pub mod markdown;
mod markdown_segments;
mod opencode;
mod page;
mod page_data;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;
use tracing::{debug, info};

use crate::ledger::Ledger;
use crate::log_limit::LogLimiter;
use crate::metrics::{Listener, Metrics};
use crate::net::{AcceptPolicy, Acceptor};
use crate::presence::Presence;
use crate::redeem::Redeemer;
use crate::secret_hasher::SecretHasher;
use error::ApiError;

pub use connections::BUSY_RESPONSE;

/// What every handler can reach. Cheap to clone, `Send`.
#[derive(Clone)]
pub struct AppState {
    pub ledger: Ledger,
    pub redeemer: Redeemer,
    pub presence: Presence,
    pub metrics: Metrics,
    /// Summarises log events peers can repeat (shared with the RPC side).
    pub logs: LogLimiter,
    /// How long a share's writer may be gone before running tool calls show as interrupted.
    pub interrupted_after: Duration,
    /// Live event streams allowed at once (`--max-connections`); more get `503`.
    pub streams: Arc<Semaphore>,
    /// Cancelled when the server shuts down: live streams end, so the
    /// graceful shutdown of the listener does not wait for them forever.
    pub shutdown: CancellationToken,
    /// Mints the tokens of shares that opencode creates.
    pub hasher: SecretHasher,
    /// `--max-op-bytes`: the most one record of an opencode sync may take.
    pub max_op_bytes: usize,
    /// `--sync-max-body-bytes`.
    pub sync_max_body_bytes: usize,
    /// `--public-url`: where share links start, if not at the request's host.
    pub public_url: Option<String>,
    /// The live feeds of followed shares (shared with the RPC side).
    pub feeds: crate::follow::Feeds,
}

impl AppState {
    fn interrupted_after_ms(&self) -> i64 {
        i64::try_from(self.interrupted_after.as_millis()).unwrap_or(i64::MAX)
    }

    /// The gateway's state over `ledger` as the server builds it, with cheap argon2.
    #[cfg(test)]
    fn for_tests(ledger: Ledger) -> Self {
        let config = crate::config::Config::default();
        let hasher = crate::secret_hasher::SecretHasher::new(256, 1)
            .expect("valid argon2 parameters for tests");
        let metrics = Metrics::default();
        let logs = LogLimiter::new(config.log_summary_interval);
        Self {
            redeemer: Redeemer::new(
                ledger.clone(),
                hasher,
                std::sync::Arc::new(crate::rate_limit::LocalRedeemFailures::new(
                    crate::rate_limit::RedeemLimiter::new(
                        config.redeem_failures,
                        config.redeem_window,
                    ),
                )),
                metrics.clone(),
                logs.clone(),
            ),
            presence: Presence::default(),
            metrics: metrics.clone(),
            logs,
            interrupted_after: config.interrupted_after,
            streams: Arc::new(Semaphore::new(config.max_connections)),
            shutdown: CancellationToken::new(),
            hasher: crate::secret_hasher::SecretHasher::new(256, 1)
                .expect("valid argon2 parameters for tests"),
            max_op_bytes: config.max_op_bytes,
            sync_max_body_bytes: config.sync_max_body_bytes,
            public_url: None,
            feeds: event_feeds(crate::follow::Feeds::new(
                ledger.clone(),
                crate::follow::FollowSettings::from_config(&config),
                metrics.clone(),
            )),
            ledger,
        }
    }
}

/// Runs CPU-heavy `work` (rendering markdown, parsing or building large JSON) on a
/// blocking thread, off the executor that serves RPC and every other request.
pub(crate) async fn off_the_executor<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|err| {
        tracing::error!(%err, "work for an HTTP response failed");
        ApiError::Internal
    })
}

/// A JSON answer already serialized, on a blocking thread: a large snapshot or page of
/// ops is megabytes of text to write out.
pub(crate) struct JsonBody(pub(crate) axum::body::Bytes);

impl JsonBody {
    /// What `make` builds, serialized, both off the executor (see [`off_the_executor`]).
    pub(crate) async fn of<T: serde::Serialize>(
        make: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Self, ApiError> {
        let body = off_the_executor(move || serde_json::to_vec(&make())).await?;
        let body = body.map_err(|err| {
            tracing::error!(%err, "an HTTP response could not be serialized");
            ApiError::Internal
        })?;
        Ok(Self(body.into()))
    }
}

impl IntoResponse for JsonBody {
    fn into_response(self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.0,
        )
            .into_response()
    }
}

/// `feeds`, preparing what event streams send (see [`live_html::PreparedOps`]).
pub fn event_feeds(feeds: crate::follow::Feeds) -> crate::follow::Feeds {
    feeds.prepare_with(live_html::PreparedOps::preparer());
    feeds
}

/// The gateway's routes. Every route but opencode's sync takes a body of at
/// most `max_body_bytes` (larger ones get `413` before a handler runs).
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let limited = Router::new()
        .route("/", get(page::index))
        .route("/s/{share}", get(page::share_page))
        .route("/assets/page.js", get(page::script))
        .route("/assets/page.css", get(page::stylesheet))
        .route("/api/shares/{share}/snapshot", get(api::snapshot))
        .route("/api/shares/{share}/ops", get(api::ops))
        .route("/api/shares/{share}/events", get(events::events))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(opencode::routes())
        .layer(RequestBodyLimitLayer::new(max_body_bytes))
        .layer(DefaultBodyLimit::max(max_body_bytes));
    limited
        .merge(opencode::sync_routes())
        .fallback(page::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), common))
        .with_state(state)
}

/// How the gateway treats its connections.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// Slots, keepalive and the `503` for connections refused for lack of them.
    pub accept: AcceptPolicy,
    /// How long a connection may take to deliver a request's headers (also how
    /// long an idle keep-alive connection stays open).
    pub header_timeout: Duration,
    pub max_body_bytes: usize,
}

/// A bound listener and the state to serve it with.
pub struct HttpGateway {
    acceptor: Acceptor,
    state: AppState,
    settings: HttpSettings,
}

impl HttpGateway {
    /// Binds `addr` now, so a bad address fails the server's start.
    pub async fn bind(
        addr: SocketAddr,
        state: AppState,
        settings: HttpSettings,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let acceptor = Acceptor::new(
            listener,
            Listener::Http,
            settings.accept.clone(),
            state.metrics.clone(),
            state.logs.clone(),
        );
        Ok(Self {
            acceptor,
            state,
            settings,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.acceptor.local_addr()
    }

    /// Serves until `state.shutdown` is cancelled, then lets requests in
    /// flight finish (live streams end at once).
    pub async fn serve(self) -> std::io::Result<()> {
        let shutdown = self.state.shutdown.clone();
        let metrics = self.state.metrics.clone();
        info!(addr = %self.acceptor.local_addr()?, "share pages and HTTP API listening");
        let app = router(self.state, self.settings.max_body_bytes);
        connections::serve(
            self.acceptor,
            app,
            self.settings.header_timeout,
            metrics,
            shutdown,
        )
        .await;
        Ok(())
    }
}

/// For every request: count it, log it without headers or query (which is
/// where credentials would be), and set the headers that keep the page to itself.
async fn common(State(state): State<AppState>, request: Request, next: Next) -> Response {
    state.metrics.http_request();
    let started = Instant::now();
    let method = request.method().clone();
    let path = loggable_path(request.uri().path());
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

/// `path` with the tokens some routes carry in it left out: opencode's agent
/// token (`/opencode/{token}/…`) and share links (`/share/{token}`,
/// `/api/share/{token}/data`).
fn loggable_path(path: &str) -> String {
    let mut segments: Vec<&str> = path.split('/').collect();
    // segments[0] is the empty string before the leading '/'.
    let secret_at = match segments.get(1..3) {
        Some(["opencode", _]) | Some(["share", _]) => Some(2),
        Some(["api", "share"]) => Some(3),
        _ => None,
    };
    if let Some(at) = secret_at
        && at < segments.len()
    {
        segments[at] = "<token>";
    }
    segments.join("/")
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

#[cfg(test)]
mod tests {
    use super::loggable_path;

    #[test]
    fn tokens_in_paths_are_left_out_of_logs() {
        for (path, logged) in [
            (
                "/opencode/csagent_1_2/api/share",
                "/opencode/<token>/api/share",
            ),
            (
                "/opencode/csagent_1_2/api/share/sh_1/sync",
                "/opencode/<token>/api/share/sh_1/sync",
            ),
            ("/share/csviewer_1_2", "/share/<token>"),
            ("/api/share/csviewer_1_2/data", "/api/share/<token>/data"),
            ("/api/shares/sh_1/snapshot", "/api/shares/sh_1/snapshot"),
            ("/s/sh_1", "/s/sh_1"),
            ("/opencode", "/opencode"),
        ] {
            assert_eq!(loggable_path(path), logged);
        }
    }
}
