//! The accept loop, one `RpcSystem` per connection, and graceful shutdown.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use capsync_shared::capsync_capnp::gateway;
use futures::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;
use tracing::{Level, debug, info, warn};

use crate::config::Config;
use crate::data_dir::DataDirLock;
use crate::http::{AppState, BUSY_RESPONSE, HttpGateway, HttpSettings};
use crate::ledger::postgres::{Database, PostgresOptions};
use crate::ledger::sqlite::SqliteOptions;
use crate::ledger::{self, Ledger};
use crate::lifecycle::{self, Schedule};
use crate::metrics::{Listener, Metrics};
use crate::net::{
    AcceptPolicy, Accepted, Acceptor, ConnectionSlots, ConnectionState, FrameGate, FrameLimits,
};
use crate::node::NodeServices;
use crate::rpc::{Context, GatewayImpl};
use crate::secret_hasher::SecretHasher;
use crate::{StartError, admin_token};

/// How long shutdown waits for each connection to close cleanly.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the ledger `config.database` names: PostgreSQL for a URL, else the embedded
/// SQLite file in `config.data_dir`, counting its refusals in `metrics`.
pub fn open_ledger(config: &Config, metrics: &Metrics) -> Result<Ledger, StartError> {
    let Some(url) = &config.database else {
        return open_sqlite(config, metrics);
    };
    let options = PostgresOptions {
        connections: config.database_connections.max(1),
        reclaim_compacted: config.reclaim,
        write_queue: config.write_queue,
        write_queue_bytes: config.write_queue_bytes,
        clock: config.clock.clone(),
        metrics: metrics.clone(),
        ..PostgresOptions::for_database(
            Database::new(url.expose(), config.database_ca_file.as_deref())
                .map_err(StartError::Ledger)?,
        )
    };
    info!(?options, "opening the PostgreSQL ledger");
    ledger::postgres::open(options).map_err(StartError::Ledger)
}

fn open_sqlite(config: &Config, metrics: &Metrics) -> Result<Ledger, StartError> {
    ledger::sqlite::open(SqliteOptions {
        path: config.database_path(),
        durability: config.durability.into(),
        read_connections: config.read_connections.max(1),
        max_group_commit: config.max_group_commit.max(1),
        reclaim_compacted: config.reclaim,
        write_queue: config.write_queue,
        write_queue_bytes: config.write_queue_bytes,
        max_database_bytes: (config.max_database_bytes > 0).then_some(config.max_database_bytes),
        reserve_bytes: config.storage_reserve_bytes,
        metrics: metrics.clone(),
        clock: config.clock.clone(),
    })
    .map_err(StartError::Ledger)
}

pub fn hasher(config: &Config) -> Result<SecretHasher, StartError> {
    SecretHasher::new(config.argon2_memory_kib, config.argon2_iterations)
        .map(|hasher| hasher.with_concurrency(config.argon2_concurrency))
        .map_err(|err| StartError::Config(format!("argon2 parameters: {err}")))
}

/// Serves RPC on `listener` until `shutdown` resolves, then drains in-flight
/// batches, closes connections and flushes the ledger.
///
/// Must run inside a tokio `LocalSet` (capnp-rpc objects are `!Send`); see
/// [`run_blocking`] and [`spawn`] for a ready-made runtime.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    prepare(config).await?.serve(listener, shutdown).await
}

/// A server whose data directory is locked, database open and migrated, and
/// admin token in place: everything that can fail at start has been done.
pub struct Prepared {
    config: Config,
    ledger: Ledger,
    ctx: Rc<Context>,
    /// The HTTP gateway's bound listener, unless `--http-listen off`.
    http: Option<HttpGateway>,
    /// Stops the HTTP gateway (and its live streams) when the server shuts down.
    http_shutdown: CancellationToken,
    /// What this process would share with other server processes.
    node: NodeServices,
    /// Held until the server stops, so no second server opens the same data.
    _lock: DataDirLock,
}

/// Does everything `run` does before accepting connections.
pub async fn prepare(config: Config) -> Result<Prepared, StartError> {
    let lock = DataDirLock::acquire(&config.data_dir)?;
    let metrics = Metrics::default();
    let ledger = open_ledger(&config, &metrics)?;
    let hasher = hasher(&config)?;
    let admin_path = config.admin_token_path();
    if admin_token::ensure(&ledger, &hasher, &admin_path).await? {
        info!(path = %admin_path.display(), "created the admin token; it is in this file (owner-only)");
    }
    let node = NodeServices::for_config(&config)?;
    let ctx = Rc::new(Context::with_node(
        ledger.clone(),
        hasher,
        &config,
        metrics,
        &node,
    ));
    let http_shutdown = CancellationToken::new();
    let http = match config.http_listen.addr() {
        Some(addr) => {
            let state = http_state(&ctx, &config, http_shutdown.clone());
            let settings = HttpSettings {
                accept: accept_policy(&config, Some(BUSY_RESPONSE)),
                header_timeout: config.http_header_timeout,
                max_body_bytes: config.http_max_body_bytes,
            };
            let gateway = HttpGateway::bind(addr, state, settings)
                .await
                .map_err(|err| {
                    // Say which listener: an address in use could be either one.
                    std::io::Error::new(err.kind(), format!("HTTP gateway on {addr}: {err}"))
                })?;
            Some(gateway)
        }
        None => None,
    };
    Ok(Prepared {
        config,
        ledger,
        ctx,
        http,
        http_shutdown,
        node,
        _lock: lock,
    })
}

/// What the HTTP gateway shares with the RPC side: `Send` handles only.
fn http_state(ctx: &Context, config: &Config, shutdown: CancellationToken) -> AppState {
    AppState {
        ledger: ctx.ledger.clone(),
        redeemer: ctx.redeemer.clone(),
        presence: ctx.presence.clone(),
        metrics: ctx.metrics.clone(),
        logs: ctx.logs.clone(),
        interrupted_after: config.interrupted_after,
        streams: Arc::new(Semaphore::new(config.max_connections)),
        shutdown,
        hasher: ctx.hasher.clone(),
        max_op_bytes: config.max_op_bytes,
        sync_max_body_bytes: config.sync_max_body_bytes,
        public_url: config.public_url.clone(),
        feeds: crate::http::event_feeds(ctx.feeds.clone()),
    }
}

/// How a listener of this server treats connections: its own slots, the
/// configured limits and keepalive.
pub(crate) fn accept_policy(config: &Config, refusal: Option<&'static [u8]>) -> AcceptPolicy {
    AcceptPolicy {
        slots: ConnectionSlots::new(config.max_connections, config.max_connections_per_address),
        keepalive: config.tcp_keepalive.get(),
        refusal,
    }
}

impl Prepared {
    /// Where the HTTP gateway listens, unless it is off.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|h| h.local_addr().ok())
    }

    /// The accept loop, then graceful shutdown once `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        let Self {
            config,
            ledger,
            ctx,
            http,
            http_shutdown,
            node,
            ..
        } = self;
        // Plain tokio tasks, beside the LocalSet: everything the gateway holds is `Send`.
        let http = http.map(|gateway| {
            tokio::spawn(async move {
                if let Err(err) = gateway.serve().await {
                    warn!(%err, "HTTP gateway stopped");
                }
            })
        });
        // Also a plain task: the ledger handle is `Send`, and maintenance must not
        // compete with RPC objects for the LocalSet's thread.
        let maintenance_stop = CancellationToken::new();
        let maintenance = tokio::spawn(lifecycle::scheduler::run(
            ledger.clone(),
            Schedule::from_config(&config),
            Arc::clone(&node.leadership),
            maintenance_stop.clone(),
        ));
        let logs_stop = CancellationToken::new();
        let logs_flusher = ctx.logs.spawn_flusher(logs_stop.clone());
        let connections = Connections::default();
        let mut reader_options = capnp::message::ReaderOptions::new();
        reader_options.traversal_limit_in_words(Some(config.max_message_bytes / 8));
        let frame_limits = FrameLimits::new(
            config.handshake_bytes,
            config.max_message_bytes,
            config.read_budget_bytes,
            config.message_timeout,
        );
        let mut acceptor = Acceptor::new(
            listener,
            Listener::Rpc,
            accept_policy(&config, None),
            ctx.metrics.clone(),
            ctx.logs.clone(),
        );

        info!(addr = %acceptor.local_addr()?, data_dir = %config.data_dir.display(), "capsync listening");
        tokio::pin!(shutdown);
        loop {
            let Accepted { stream, peer, slot } = tokio::select! {
                () = &mut shutdown => break,
                accepted = acceptor.accept() => accepted,
            };
            let state = Rc::new(ConnectionState::default());
            let rpc = connection(
                stream,
                peer,
                &ctx,
                reader_options,
                frame_limits.clone(),
                state.clone(),
            );
            let id = connections.add(rpc.get_disconnector());
            let connections = connections.clone();
            let counted = ctx.metrics.rpc_connection();
            let ctx = ctx.clone();
            let handshake_timeout = config.handshake_timeout;
            tokio::task::spawn_local(async move {
                debug!(%peer, "connection open");
                let ended = tokio::select! {
                    result = rpc => Ended::Closed(result),
                    () = handshake_deadline(&state, handshake_timeout) => Ended::HandshakeTimeout,
                };
                ended.report(&ctx, &state, peer);
                connections.remove(id);
                drop((slot, counted));
            });
        }
        drop(acceptor);
        http_shutdown.cancel();
        if let Some(task) = http
            && tokio::time::timeout(DISCONNECT_TIMEOUT, task)
                .await
                .is_err()
        {
            warn!("the HTTP gateway did not stop in time");
        }

        info!("shutting down: draining batches in flight");
        if tokio::time::timeout(config.drain_timeout, ctx.drain())
            .await
            .is_err()
        {
            warn!(timeout = ?config.drain_timeout, "batches still in flight after the drain timeout");
        }
        connections.disconnect_all().await;
        maintenance_stop.cancel();
        if tokio::time::timeout(DISCONNECT_TIMEOUT, maintenance)
            .await
            .is_err()
        {
            warn!("maintenance did not stop in time");
        }
        node.stop();
        ledger.close().await;
        logs_stop.cancel();
        let _ = logs_flusher.await;
        info!("shutdown complete");
        Ok(())
    }
}

/// Resolves once `timeout` has passed unless the connection redeemed a token
/// by then; then never. Connections that never authenticate do not keep slots.
async fn handshake_deadline(state: &ConnectionState, timeout: Duration) {
    tokio::time::sleep(timeout).await;
    if state.is_authenticated() {
        std::future::pending::<()>().await;
    }
}

/// How an RPC connection ended.
enum Ended {
    /// The connection closed, or its RPC system stopped on bad input (`Err`).
    Closed(Result<(), capnp::Error>),
    /// It did not redeem a token in time and was closed by the server.
    HandshakeTimeout,
}

impl Ended {
    /// Counts and logs the end. Anything a peer can cause is logged at debug
    /// per connection and summarised at info, so no peer chooses the log's volume.
    fn report(self, ctx: &Context, state: &ConnectionState, peer: SocketAddr) {
        let reason = match &self {
            Self::HandshakeTimeout => "handshake_timeout",
            // The RpcSystem resolves Ok even on a reset.
            Self::Closed(Ok(())) => {
                debug!(%peer, "connection closed");
                return;
            }
            Self::Closed(Err(_)) => state.refused().unwrap_or("protocol_error"),
        };
        ctx.metrics.connection_ended(reason);
        let detail = match &self {
            Self::Closed(Err(err)) => err.to_string(),
            _ => "no token redeemed within the handshake timeout".to_owned(),
        };
        debug!(%peer, reason, %detail, "connection ended by the server");
        if ctx.logs.allow(reason, Level::INFO) {
            info!(%peer, reason, %detail, "connection ended by the server (further ones of this kind are summarised)");
        }
    }
}

/// Builds the RPC system for one accepted connection. Its input goes through
/// a [`FrameGate`], which its `Gateway` opens wider once a redeem succeeds.
fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: &Rc<Context>,
    reader_options: capnp::message::ReaderOptions,
    limits: FrameLimits,
    state: Rc<ConnectionState>,
) -> RpcSystem<rpc_twoparty_capnp::Side> {
    let (reader, writer) = stream.compat().split();
    let network = twoparty::VatNetwork::new(
        FrameGate::new(reader, limits, state.clone()),
        futures::io::BufWriter::new(writer),
        rpc_twoparty_capnp::Side::Server,
        reader_options,
    );
    let gateway: gateway::Client =
        capnp_rpc::new_client(GatewayImpl::new(ctx.clone(), peer, state));
    RpcSystem::new(Box::new(network), Some(gateway.client))
}

/// Open connections, so shutdown can close them cleanly.
#[derive(Clone, Default)]
struct Connections(Rc<RefCell<ConnectionsInner>>);

#[derive(Default)]
struct ConnectionsInner {
    next_id: u64,
    open: HashMap<u64, capnp_rpc::Disconnector<rpc_twoparty_capnp::Side>>,
}

impl Connections {
    fn add(&self, disconnector: capnp_rpc::Disconnector<rpc_twoparty_capnp::Side>) -> u64 {
        let mut inner = self.0.borrow_mut();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.open.insert(id, disconnector);
        id
    }

    fn remove(&self, id: u64) {
        self.0.borrow_mut().open.remove(&id);
    }

    async fn disconnect_all(&self) {
        let open: Vec<_> = self.0.borrow_mut().open.drain().map(|(_, d)| d).collect();
        if open.is_empty() {
            return;
        }
        debug!(count = open.len(), "closing connections");
        let all = futures::future::join_all(open);
        if tokio::time::timeout(DISCONNECT_TIMEOUT, all).await.is_err() {
            warn!("some connections did not close in time");
        }
    }
}

/// Prepares the server, then binds `config.listen` and serves until
/// `shutdown` resolves, on its own current-thread runtime and `LocalSet`. What
/// the binary uses: the RPC port opens only once the database is migrated and
/// the admin token written, so "port open" means "ready".
pub fn serve_blocking(
    config: Config,
    shutdown: impl Future<Output = ()> + 'static,
) -> Result<(), StartError> {
    let runtime = server_runtime(&config)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let addr = config.listen;
        let prepared = prepare(config).await?;
        let listener = TcpListener::bind(addr).await.map_err(|err| {
            std::io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}"))
        })?;
        prepared.serve(listener, shutdown).await
    })
}

/// Runs the server on its own current-thread runtime and `LocalSet` until
/// `shutdown` resolves, on a listener bound by the caller.
pub fn run_blocking(
    listener: std::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + 'static,
) -> Result<(), StartError> {
    let runtime = server_runtime(&config)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio_listener(listener)?;
        run(listener, config, shutdown).await
    })
}

/// The server's current-thread runtime. Its blocking pool does only bounded
/// work (the read connections' queries and argon2 checks, each under its own
/// limit), so it gets that many threads and a few to spare. Left at tokio's
/// default of 512, a thread that gives its slot back before it counts as idle
/// makes the next task start another one, and each new thread may bring a
/// malloc arena that keeps what it freed (docs/BENCHMARKS.md, "Soak").
fn server_runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    const SPARE_BLOCKING_THREADS: usize = 2;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(
            config.read_connections + config.argon2_concurrency + SPARE_BLOCKING_THREADS,
        )
        .build()
}

fn tokio_listener(listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// A server running on a thread of its own, for tests and for embedding.
/// Dropping the handle shuts the server down and waits for it.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    /// Where the HTTP gateway listens; `None` when it is off.
    http_addr: Option<SocketAddr>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), StartError>>>,
}

/// Starts a server on `listener` in a new thread and returns once it is ready:
/// its data directory locked, its database migrated and its admin token written.
/// Startup errors are returned here, not logged away.
pub fn spawn(listener: std::net::TcpListener, config: Config) -> Result<ServerHandle, StartError> {
    let addr = listener.local_addr()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("capsync-server-{addr}"))
        .spawn(move || {
            let runtime = server_runtime(&config)?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let started = async {
                    Ok::<_, StartError>((tokio_listener(listener)?, prepare(config).await?))
                };
                match started.await {
                    Ok((listener, prepared)) => {
                        let _ = ready_tx.send(Ok(prepared.http_addr()));
                        let shutdown = async {
                            // A dropped sender also means "stop".
                            let _ = shutdown_rx.await;
                        };
                        prepared.serve(listener, shutdown).await
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        Ok(())
                    }
                }
            })
        })?;
    match ready_rx.recv() {
        Ok(Ok(http_addr)) => Ok(ServerHandle {
            addr,
            http_addr,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }),
        Ok(Err(err)) => {
            let _ = thread.join();
            Err(err)
        }
        Err(_) => Err(StartError::Io(std::io::Error::other(
            "server thread ended before it was ready",
        ))),
    }
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the HTTP gateway (share pages, API, `/metrics`) listens; `None` when it is off.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Shuts down gracefully (drain, disconnect, flush) and waits for it.
    pub fn shutdown(mut self) -> Result<(), StartError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), StartError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| StartError::Io(std::io::Error::other("server thread panicked")))?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
