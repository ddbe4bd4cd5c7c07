//! Connecting to a capsync server and redeeming sturdy refs into live capabilities.

use std::time::Duration;

use capnp::message::ReaderOptions;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{Disconnector, RpcSystem, twoparty};
use capsync_shared::TokenKind;
use capsync_shared::capsync_capnp::{gateway, redeemed};
use futures::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::admin::AdminClient;
use crate::agent::AgentClient;
use crate::error::{ClientError, TimeoutStage};
use crate::peer_watch::{FirstBytes, PeerWatch, Silent, within_silence};
use crate::server_addr::ServerList;
use crate::types::{ShareState, nonzero_time};
use crate::viewer::ViewerClient;
use crate::wire::{self, ok_or_fail};
use crate::writer::WriterClient;

/// How the client connects and reads messages from the server.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Most 8-byte words one incoming message may make the reader traverse; `None` for no
    /// limit. The capnp default (64 MiB) is tight for big snapshot pages and op pages read more
    /// than once, so the client's default is 512 MiB: the server is trusted not to attack us.
    pub traversal_limit_words: Option<usize>,
    /// Deepest struct nesting accepted; the schema nests only a few levels.
    pub nesting_limit: i32,
    /// How long [`connect_with`] may take (resolving the address and the TCP connect), and
    /// then [`Connection::redeem`], the handshake that gives a connection its authority
    /// (default 10 s each). A server whose listen queue takes the connection but that
    /// never answers fails the redeem with a [`ClientError::Timeout`] rather than hanging
    /// the caller.
    pub connect_timeout: Duration,
}

/// [`ClientOptions::connect_timeout`] unless set.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            traversal_limit_words: Some(64 * 1024 * 1024),
            nesting_limit: 64,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

impl ClientOptions {
    /// The capnp reader options these settings stand for.
    pub fn reader_options(&self) -> ReaderOptions {
        let mut options = ReaderOptions::new();
        options
            .traversal_limit_in_words(self.traversal_limit_words)
            .nesting_limit(self.nesting_limit);
        options
    }
}

/// Connects to a capsync server with [`ClientOptions::default`].
///
/// capnp-rpc is single-threaded: this spawns the connection's `RpcSystem` with
/// `tokio::task::spawn_local`, so it **must be called inside a tokio `LocalSet`** (for
/// example `LocalSet::run_until` on a current-thread runtime), and the returned
/// [`Connection`] and every capability from it must stay on that `LocalSet`. Outside one,
/// `spawn_local` panics.
pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> Result<Connection, ClientError> {
    connect_with(addr, &ClientOptions::default()).await
}

/// [`connect`] with explicit options. Same `LocalSet` requirement.
///
/// Fails with [`ClientError::Timeout`] when resolving the address and the TCP connect take
/// longer than [`ClientOptions::connect_timeout`]. Nothing is heard from the server yet:
/// [`Connection::redeem`] makes the first call, and says when the peer does not answer or
/// is not a capsync RPC port.
pub async fn connect_with(
    addr: impl tokio::net::ToSocketAddrs,
    options: &ClientOptions,
) -> Result<Connection, ClientError> {
    let limit = options.connect_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let timed_out = |addr: String| ClientError::Timeout {
        stage: TimeoutStage::Connect,
        addr,
        after: limit,
    };
    // Resolve first, so a failure can name the address it was trying.
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout_at(deadline, tokio::net::lookup_host(addr)).await {
            Ok(resolved) => resolved
                .map_err(|source| ClientError::Connect {
                    addr: "the server".into(),
                    source,
                })?
                .collect(),
            Err(_) => return Err(timed_out("the server (resolving its address)".into())),
        };
    let shown = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match tokio::time::timeout_at(deadline, TcpStream::connect(&addrs[..])).await {
        Ok(Ok(stream)) => Connection::start(stream, options),
        Ok(Err(source)) => Err(ClientError::Connect {
            addr: shown,
            source,
        }),
        Err(_) => Err(timed_out(shown)),
    }
}

/// [`connect_with`] to the first of `servers` that can be reached, trying them in order
/// from the one at `start` (around the list); also says which one it was. When none
/// can, the error is the last one's.
pub async fn connect_any(
    servers: &ServerList,
    start: usize,
    options: &ClientOptions,
) -> Result<(Connection, usize), ClientError> {
    let addrs = servers.addrs();
    let mut last = None;
    for step in 0..addrs.len() {
        let index = (start + step) % addrs.len();
        match connect_with(addrs[index].to_string(), options).await {
            Ok(conn) => return Ok((conn, index)),
            Err(e) => {
                if addrs.len() > 1 {
                    tracing::debug!(server = %addrs[index], error = %e, "trying the next server");
                }
                last = Some(e);
            }
        }
    }
    Err(last.expect("a server list is never empty"))
}

/// A live connection: the server's `Gateway` plus the means to close it.
pub struct Connection {
    /// The bootstrap capability; it carries no authority until a token is redeemed.
    gateway: gateway::Client,
    /// Closes the connection's RpcSystem cleanly (see [`Connection::disconnect`]).
    disconnector: Disconnector<Side>,
    /// Where we are connected, for messages.
    peer: std::net::SocketAddr,
    /// What the server's bytes showed: whether it answers at all and in which protocol, and
    /// when it last said anything.
    watch: PeerWatch,
    /// Limit of [`Connection::redeem`]: [`ClientOptions::connect_timeout`].
    handshake_timeout: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Starts the RpcSystem on `stream`; the server is not heard from yet.
    fn start(stream: TcpStream, options: &ClientOptions) -> Result<Self, ClientError> {
        let peer = stream.peer_addr()?;
        // Calls are small request/response pairs: Nagle's algorithm would only add latency.
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.compat().split();
        let watch = PeerWatch::new();
        let network = twoparty::VatNetwork::new(
            futures::io::BufReader::new(watch.reader(reader)),
            futures::io::BufWriter::new(writer),
            Side::Client,
            options.reader_options(),
        );
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let gateway: gateway::Client = rpc.bootstrap(Side::Server);
        let disconnector = rpc.get_disconnector();
        // Nothing happens on the connection unless the RpcSystem is polled. Its result
        // carries no information (it is Ok even on a reset), so the task's output is dropped.
        tokio::task::spawn_local(rpc);
        Ok(Self {
            gateway,
            disconnector,
            peer,
            watch,
            handshake_timeout: options.connect_timeout,
        })
    }

    /// The raw bootstrap capability, for calls this library does not wrap.
    pub fn gateway(&self) -> gateway::Client {
        self.gateway.clone()
    }

    /// The server's address.
    pub fn peer_addr(&self) -> std::net::SocketAddr {
        self.peer
    }

    /// When the server last sent anything on this connection (or, before that, when the
    /// connection was made).
    pub fn last_heard(&self) -> tokio::time::Instant {
        self.watch.last_heard()
    }

    /// Runs `work`, calls on this connection, failing with a [`ClientError::Timeout`]
    /// (stage [`TimeoutStage::Call`]) once the server has sent nothing for `limit` while it
    /// runs. For a single call this is a plain call timeout; work that makes calls in turn
    /// (paging through a snapshot, pushing many batches) is not cut short while the server
    /// keeps answering. Do not wrap waits on the server's own schedule (a live
    /// subscription, a long admin call without progress updates) in it.
    pub async fn with_call_timeout<T>(
        &self,
        limit: Duration,
        work: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        within_silence(limit, || self.last_heard(), work)
            .await
            .unwrap_or_else(|Silent| {
                Err(ClientError::Timeout {
                    stage: TimeoutStage::Call,
                    addr: self.peer.to_string(),
                    after: limit,
                })
            })
    }

    /// Turns a sturdy ref (any kind) into its live capability.
    ///
    /// The token is sent as given; a malformed, unknown, wrong, expired or revoked token
    /// comes back as `Remote { code: PermissionDenied, .. }` (or `RateLimited` after many).
    ///
    /// Redeeming is the handshake: usually the first call, whose answer (and the bootstrap
    /// answer before it) is the first the client hears of the server. So it has the
    /// connect limit, [`ClientOptions::connect_timeout`]: past it, a
    /// [`ClientError::Timeout`], of stage [`TimeoutStage::Connect`] if the server never
    /// said a word, else [`TimeoutStage::Redeem`]. A peer whose first bytes are not Cap'n
    /// Proto fails it with [`ClientError::NotCapsync`].
    pub async fn redeem(&self, token: &str) -> Result<Redeemed, ClientError> {
        let limit = self.handshake_timeout;
        let addr = self.peer.to_string();
        match tokio::time::timeout(limit, self.redeem_unbounded(token)).await {
            Ok(Ok(redeemed)) => Ok(redeemed),
            Ok(Err(error)) => Err(match (self.watch.first_bytes(), error) {
                (FirstBytes::Foreign(reply), ClientError::Rpc(_)) => {
                    ClientError::NotCapsync { addr, reply }
                }
                (_, error) => error,
            }),
            Err(_) => Err(ClientError::Timeout {
                stage: match self.watch.first_bytes() {
                    FirstBytes::Awaited => TimeoutStage::Connect,
                    _ => TimeoutStage::Redeem,
                },
                addr,
                after: limit,
            }),
        }
    }

    async fn redeem_unbounded(&self, token: &str) -> Result<Redeemed, ClientError> {
        let mut request = self.gateway.redeem_request();
        request.get().set_token(token);
        let response = request.send().promise.await?;
        let redeemed = ok_or_fail!(
            capsync_shared::capsync_capnp::redeem_result,
            response.get()?.get_result()?
        );
        let token_id = wire::text(redeemed.get_token_id())?;
        let expires_at = nonzero_time(redeemed.get_expires_at());
        // Only writer and viewer capabilities come with a state; read it lazily so a
        // server that leaves it unset for admin/agent is fine.
        let state =
            || -> Result<ShareState, ClientError> { wire::share_state(redeemed.get_state()?) };
        Ok(match redeemed.get_capability().which()? {
            redeemed::capability::Which::Admin(cap) => {
                Redeemed::Admin(AdminClient::new(cap?, token_id, expires_at))
            }
            redeemed::capability::Which::Agent(cap) => {
                Redeemed::Agent(AgentClient::new(cap?, token_id, expires_at))
            }
            redeemed::capability::Which::Writer(cap) => {
                let pipelines = redeemed.get_orders_pipelined_batches();
                Redeemed::Writer(WriterClient::new(
                    cap?,
                    token_id,
                    expires_at,
                    state()?,
                    pipelines,
                ))
            }
            redeemed::capability::Which::Viewer(cap) => Redeemed::Viewer(ViewerClient::new(
                cap?,
                Some(token_id),
                expires_at,
                state()?,
            )),
        })
    }

    /// Closes the connection cleanly and waits until it is closed. Capabilities obtained
    /// through it fail with a disconnected error afterwards.
    pub async fn disconnect(self) -> Result<(), ClientError> {
        self.disconnector.await?;
        Ok(())
    }
}

/// The live capability a token redeemed into.
#[derive(Debug, Clone)]
pub enum Redeemed {
    Admin(AdminClient),
    Agent(AgentClient),
    Writer(WriterClient),
    Viewer(ViewerClient),
}

impl Redeemed {
    /// Which kind of token this came from.
    pub fn kind(&self) -> TokenKind {
        match self {
            Self::Admin(_) => TokenKind::Admin,
            Self::Agent(_) => TokenKind::Agent,
            Self::Writer(_) => TokenKind::Writer,
            Self::Viewer(_) => TokenKind::Viewer,
        }
    }

    fn wrong(&self, expected: TokenKind) -> ClientError {
        ClientError::WrongKind {
            expected,
            got: self.kind(),
        }
    }

    pub fn into_admin(self) -> Result<AdminClient, ClientError> {
        match self {
            Self::Admin(c) => Ok(c),
            other => Err(other.wrong(TokenKind::Admin)),
        }
    }

    pub fn into_agent(self) -> Result<AgentClient, ClientError> {
        match self {
            Self::Agent(c) => Ok(c),
            other => Err(other.wrong(TokenKind::Agent)),
        }
    }

    pub fn into_writer(self) -> Result<WriterClient, ClientError> {
        match self {
            Self::Writer(c) => Ok(c),
            other => Err(other.wrong(TokenKind::Writer)),
        }
    }

    pub fn into_viewer(self) -> Result<ViewerClient, ClientError> {
        match self {
            Self::Viewer(c) => Ok(c),
            other => Err(other.wrong(TokenKind::Viewer)),
        }
    }

    /// A viewer for a viewer token, or the attenuated view of a writer token: what
    /// read-only commands accept. Admin and agent tokens are refused.
    pub fn into_reader(self) -> Result<ViewerClient, ClientError> {
        match self {
            Self::Viewer(c) => Ok(c),
            Self::Writer(w) => Ok(w.viewer()),
            other => Err(other.wrong(TokenKind::Viewer)),
        }
    }
}
