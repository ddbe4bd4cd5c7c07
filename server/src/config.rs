//! Server settings: every one is a `capsync-server serve` flag and a `CAPSYNC_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::clock::Clock;
use crate::ledger::sqlite::Durability;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";
pub const DEFAULT_DATA_DIR: &str = "capsync-data";
pub const DEFAULT_MAX_OPS_PER_BATCH: usize = 1000;
pub use capsync_shared::limits::DEFAULT_MAX_OP_BYTES;
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 << 20;
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// An eighth of the slots: a laptop's agent, viewers and browser fit many
/// times over, while one address can never lock everyone else out.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 128;
/// How long a new RPC connection may take to redeem a token (NATS: 2 s).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// What a connection may send before it has redeemed a token; a redeem takes
/// a few hundred bytes.
pub const DEFAULT_HANDSHAKE_BYTES: usize = 64 << 10;
/// Bytes of large RPC messages being received at once, all connections together.
pub const DEFAULT_READ_BUDGET_BYTES: usize = 256 << 20;
/// How long an RPC message that has started arriving may stop making progress.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle time before TCP keepalive probes look for a vanished peer.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// How long an HTTP connection may take to deliver a request's headers.
pub const DEFAULT_HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP request body; every route today is a GET.
pub const DEFAULT_HTTP_MAX_BODY_BYTES: usize = 64 << 10;
pub const DEFAULT_SYNC_MAX_BODY_BYTES: usize = 32 << 20;
/// Commands waiting for the ledger's writer, and the bytes of batches among them.
pub const DEFAULT_WRITE_QUEUE: usize = 1024;
pub const DEFAULT_WRITE_QUEUE_BYTES: usize = 64 << 20;
/// Disk space set aside so a full disk can still be checkpointed and recovered.
pub const DEFAULT_STORAGE_RESERVE_BYTES: u64 = 16 << 20;
/// How often repeated log events of one kind are summarised.
pub const DEFAULT_LOG_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_REDEEM_FAILURES: u32 = 10;
pub const DEFAULT_REDEEM_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// argon2id cost, OWASP's minimum recommendation (19 MiB, 2 passes, 1 lane).
pub const DEFAULT_ARGON2_MEMORY_KIB: u32 = 19 * 1024;
pub const DEFAULT_ARGON2_ITERATIONS: u32 = 2;
/// `ops` calls one live subscriber may have unanswered before the server waits for it.
pub const DEFAULT_SUBSCRIBER_WINDOW: usize = 8;
/// How long one `ops` call may stay unanswered before its subscriber is dropped as lagged.
pub const DEFAULT_SUBSCRIBER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_FOLLOW_RECHECK: Duration = Duration::from_secs(15);
/// 1 MiB of recent ops per followed share (`--follow-buffer-bytes`).
pub const DEFAULT_FOLLOW_BUFFER_BYTES: usize = 1 << 20;
/// `--follow-interval`.
pub const DEFAULT_FOLLOW_INTERVAL: Duration = Duration::from_millis(5);
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7421";
/// How long a share's writer may be gone before its running tool calls show as interrupted.
pub const DEFAULT_INTERRUPTED_AFTER: Duration = Duration::from_secs(5 * 60);

pub const DEFAULT_LIFECYCLE_INTERVAL: Duration = Duration::from_secs(60 * 60);
pub const DEFAULT_HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_HOUSEKEEPING_BUDGET: Duration = Duration::from_millis(20);

/// Connections to PostgreSQL per server process, by default: half for writes, half for
/// reads. Writes waiting for a connection commit together (group commit), so a few
/// write connections go a long way (on the 2-core test machine 4 did best).
pub const DEFAULT_DATABASE_CONNECTIONS: u32 = 8;

/// A `postgres://` URL. It may hold a password, so it prints as its scheme only.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL itself, for connecting; never for a log line.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;
    fn from_str(url: &str) -> Result<Self, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self(url.to_owned()))
        } else {
            Err("expected a postgres:// URL (leave --database unset for SQLite in the data directory)".to_owned())
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("postgres://…")
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("postgres://…")
    }
}

/// Settings of one server. `Config::default()` equals running `serve` with no flags.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Address to listen on for Cap'n Proto RPC.
    #[arg(long, env = "CAPSYNC_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Directory for the database and the admin token file; created if missing.
    #[arg(long, env = "CAPSYNC_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Where the ledger is: unset for the embedded SQLite file in the data directory,
    /// or a `postgres://user:password@host:port/database` URL for PostgreSQL, which
    /// several server processes can share (settings such as `sslmode` and
    /// `options=-csearch_path=…` as query parameters). Never logged.
    #[arg(long, env = "CAPSYNC_DATABASE", value_name = "URL")]
    pub database: Option<DatabaseUrl>,

    /// PostgreSQL with `sslmode=require` in the URL: the CA certificates (PEM) to trust
    /// for the database's certificate, instead of this machine's (also `sslrootcert=`
    /// in the URL). The certificate and host name are always verified under TLS.
    #[arg(long, env = "CAPSYNC_DATABASE_CA_FILE", value_name = "PEM")]
    pub database_ca_file: Option<PathBuf>,

    /// PostgreSQL: how often this node publishes its writers and a heartbeat, and reads
    /// the other nodes' (writer presence across nodes is this fresh).
    #[arg(long, env = "CAPSYNC_NODE_HEARTBEAT", value_parser = humantime::parse_duration,
          default_value = "1s")]
    pub node_heartbeat: Duration,

    /// PostgreSQL: a node silent this long counts as gone, and its writers with it.
    #[arg(long, env = "CAPSYNC_NODE_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "15s")]
    pub node_timeout: Duration,

    /// Most connections this process opens to PostgreSQL at once (at least 2): half
    /// for writes, half for reads, each serving one transaction at a time. Writes to one
    /// share run one at a time, in order; writes to different shares that wait for a
    /// connection commit together.
    #[arg(long, env = "CAPSYNC_DATABASE_CONNECTIONS", default_value_t = DEFAULT_DATABASE_CONNECTIONS)]
    pub database_connections: u32,

    /// When an ack may be sent. `full`: after the commit is on disk (survives power
    /// loss). `normal`: survives a crash of capsync, but the last commits can be
    /// lost if the machine loses power or the OS crashes.
    #[arg(long, env = "CAPSYNC_DURABILITY", value_enum, default_value_t = DurabilityArg::Full)]
    pub durability: DurabilityArg,

    /// Most ops in one appendOps batch; larger batches are refused with `tooLarge`.
    #[arg(long, env = "CAPSYNC_MAX_OPS_PER_BATCH", default_value_t = DEFAULT_MAX_OPS_PER_BATCH)]
    pub max_ops_per_batch: usize,

    /// Largest op payload in bytes; a larger op is refused alone with
    /// `rejected(tooLarge)`, and the rest of its batch applies.
    #[arg(long, env = "CAPSYNC_MAX_OP_BYTES", default_value_t = DEFAULT_MAX_OP_BYTES)]
    pub max_op_bytes: usize,

    /// Largest Cap'n Proto message the server reads, in bytes; a connection that
    /// sends a larger one is closed.
    #[arg(long, env = "CAPSYNC_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Most simultaneous connections on each listener (RPC, HTTP); further
    /// ones are closed at once and counted in `capsync_connections_refused_total`.
    #[arg(long, env = "CAPSYNC_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Most simultaneous connections from one address on each listener (an
    /// IPv6 peer counts with its /64), so one address cannot take every slot.
    #[arg(long, env = "CAPSYNC_MAX_CONNECTIONS_PER_ADDRESS",
          default_value_t = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)]
    pub max_connections_per_address: usize,

    /// How long a new RPC connection may take to redeem a token before it is
    /// closed, e.g. `5s`.
    #[arg(long, env = "CAPSYNC_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "5s")]
    pub handshake_timeout: Duration,

    /// Bytes an RPC connection may send before it has redeemed a token. Past
    /// it, the server reads nothing more from it until a redeem succeeds.
    #[arg(long, env = "CAPSYNC_HANDSHAKE_BYTES", default_value_t = DEFAULT_HANDSHAKE_BYTES)]
    pub handshake_bytes: usize,

    /// Bytes of large RPC messages (over 64 KiB) being received at once, all
    /// connections together. Past it, reading them pauses until others are in.
    #[arg(long, env = "CAPSYNC_READ_BUDGET_BYTES", default_value_t = DEFAULT_READ_BUDGET_BYTES)]
    pub read_budget_bytes: usize,

    /// How long an RPC message that has started arriving may make no progress
    /// before its connection is closed, e.g. `30s`.
    #[arg(long, env = "CAPSYNC_MESSAGE_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "30s")]
    pub message_timeout: Duration,

    /// Idle time before TCP keepalive probes check that a peer is still there
    /// (both listeners); a vanished peer's connection is closed about twice this
    /// long after its last sign of life. `off` leaves the OS default.
    #[arg(
        long,
        env = "CAPSYNC_TCP_KEEPALIVE",
        default_value = "60s",
        value_name = "DURATION"
    )]
    pub tcp_keepalive: DurationOrOff,

    /// Failed redeems one address may make per window before it gets `rateLimited`.
    #[arg(long, env = "CAPSYNC_REDEEM_FAILURES", default_value_t = DEFAULT_REDEEM_FAILURES)]
    pub redeem_failures: u32,

    /// Length of the failed-redeem window, e.g. `60s`, `5m`.
    #[arg(long, env = "CAPSYNC_REDEEM_WINDOW", value_parser = humantime::parse_duration,
          default_value = "60s")]
    pub redeem_window: Duration,

    /// How long shutdown waits for batches in flight before closing connections.
    #[arg(long, env = "CAPSYNC_DRAIN_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "30s")]
    pub drain_timeout: Duration,

    /// argon2id memory cost in KiB for token hashes. Lower it only for tests.
    #[arg(long, env = "CAPSYNC_ARGON2_MEMORY_KIB", default_value_t = DEFAULT_ARGON2_MEMORY_KIB)]
    pub argon2_memory_kib: u32,

    /// argon2id passes for token hashes. Lower it only for tests.
    #[arg(long, env = "CAPSYNC_ARGON2_ITERATIONS", default_value_t = DEFAULT_ARGON2_ITERATIONS)]
    pub argon2_iterations: u32,

    /// Token checks (argon2id, about 19 MiB each) running at once; further
    /// redeems wait their turn. Defaults to the number of CPUs.
    #[arg(long, env = "CAPSYNC_ARGON2_CONCURRENCY", default_value_t = default_argon2_concurrency())]
    pub argon2_concurrency: usize,

    /// Read connections to SQLite (snapshots, catch-up, token lookups).
    #[arg(long, env = "CAPSYNC_READ_CONNECTIONS", default_value_t = 4)]
    pub read_connections: usize,

    /// Most queued writes one group-commit transaction takes.
    #[arg(long, env = "CAPSYNC_MAX_GROUP_COMMIT", default_value_t = 256)]
    pub max_group_commit: usize,

    /// Most writes waiting for the ledger's writer; more are refused with
    /// `overloaded` (retryable) rather than queued in memory.
    #[arg(long, env = "CAPSYNC_WRITE_QUEUE", default_value_t = DEFAULT_WRITE_QUEUE)]
    pub write_queue: usize,

    /// Most bytes of op payloads waiting for the ledger's writer; a batch that
    /// would go past it is refused with `overloaded` (one batch alone always fits).
    #[arg(long, env = "CAPSYNC_WRITE_QUEUE_BYTES", default_value_t = DEFAULT_WRITE_QUEUE_BYTES)]
    pub write_queue_bytes: usize,

    /// Largest the database file may grow, in bytes; writes past it are refused
    /// with `storageFull` until a prune (or vacuum) makes room. 0 for no limit.
    #[arg(long, env = "CAPSYNC_MAX_DATABASE_BYTES", default_value_t = 0)]
    pub max_database_bytes: u64,

    /// Disk space kept in `<data-dir>/reserve` and given back when the disk
    /// fills up, so the database can still checkpoint its log. 0 for none.
    #[arg(long, env = "CAPSYNC_STORAGE_RESERVE_BYTES", default_value_t = DEFAULT_STORAGE_RESERVE_BYTES)]
    pub storage_reserve_bytes: u64,

    /// Most `ops` calls in flight to one live subscriber (`ShareViewer.subscribe`).
    /// A subscriber this far behind is not sent more until it answers, so it holds
    /// at most this many pages of ops in the server's memory.
    #[arg(long, env = "CAPSYNC_SUBSCRIBER_WINDOW", default_value_t = DEFAULT_SUBSCRIBER_WINDOW)]
    pub subscriber_window: usize,

    /// How long one `ops` call to a subscriber may go unanswered before the
    /// subscriber is dropped with `ended(lagged, cursor)`, e.g. `10s`.
    #[arg(long, env = "CAPSYNC_SUBSCRIBER_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "10s")]
    pub subscriber_timeout: Duration,

    /// How often a live follower (RPC subscription, event stream) checks its token
    /// again when nothing else made it: an expired token stops it within this time.
    /// Revocations and deletions are checked at once; commits are handed to
    /// followers from memory without a check.
    #[arg(long, env = "CAPSYNC_FOLLOW_RECHECK", value_parser = humantime::parse_duration,
          default_value = "15s")]
    pub follow_recheck: Duration,

    /// Bytes of recent ops kept in memory for each share that has live followers on
    /// this server, read from the ledger once and handed to all of them. A follower
    /// further behind reads the ledger itself.
    #[arg(long, env = "CAPSYNC_FOLLOW_BUFFER_BYTES", default_value_t = DEFAULT_FOLLOW_BUFFER_BYTES)]
    pub follow_buffer_bytes: usize,

    /// The least time between two reads of a followed share's new ops, e.g. `5ms`. A
    /// commit after a quiet spell reaches followers at once; the commits of a busy
    /// share meanwhile go out together, one page per follower instead of one per
    /// commit. `0s` sends every commit on its own.
    #[arg(long, env = "CAPSYNC_FOLLOW_INTERVAL", value_parser = humantime::parse_duration,
          default_value = "5ms")]
    pub follow_interval: Duration,

    /// Address of the HTTP gateway (share pages, JSON API, live events, `/healthz`,
    /// `/metrics`), or `off` to run without it.
    #[arg(long, env = "CAPSYNC_HTTP_LISTEN", default_value = DEFAULT_HTTP_LISTEN)]
    pub http_listen: HttpListen,

    /// How long an HTTP connection may take to deliver a request's headers,
    /// counted from when it connects or its last response was sent, e.g. `10s`.
    /// So it is also how long an idle keep-alive connection stays open.
    #[arg(long, env = "CAPSYNC_HTTP_HEADER_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "10s")]
    pub http_header_timeout: Duration,

    /// Largest HTTP request body, in bytes; larger requests get `413`. opencode's
    /// syncs have their own limit (`--sync-max-body-bytes`).
    #[arg(long, env = "CAPSYNC_HTTP_MAX_BODY_BYTES", default_value_t = DEFAULT_HTTP_MAX_BODY_BYTES)]
    pub http_max_body_bytes: usize,

    /// Largest body of an opencode sync (`POST …/api/share/{id}/sync`), in bytes:
    /// one second of a session's changes. Read only once the agent token in the
    /// URL has been checked; larger syncs get `413`.
    #[arg(long, env = "CAPSYNC_SYNC_MAX_BODY_BYTES", default_value_t = DEFAULT_SYNC_MAX_BODY_BYTES)]
    pub sync_max_body_bytes: usize,

    /// The origin share links start with, e.g. `https://share.example.com`
    /// (behind a TLS proxy; no path, as `opencode import` wants links of the
    /// form `<origin>/share/…`). Unset: `http://` and the host the request was sent to.
    #[arg(long, env = "CAPSYNC_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,

    /// How long a share's writer may be gone before the share page shows its
    /// still-running tool calls as interrupted (display only), e.g. `5m`.
    #[arg(long, env = "CAPSYNC_INTERRUPTED_AFTER", value_parser = humantime::parse_duration,
          default_value = "5m")]
    pub interrupted_after: Duration,

    /// Clear the output and attachments of a tool part when it is stored marked
    /// compacted (its state has `time.compacted`). `capsync admin reclaim` does the
    /// same for parts stored before. `--reclaim false` keeps them.
    #[arg(long, env = "CAPSYNC_RECLAIM", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub reclaim: bool,

    /// Archive shares with no change for this long, e.g. `90d`; `off` never does.
    #[arg(
        long,
        env = "CAPSYNC_AUTO_ARCHIVE_AFTER",
        default_value = "off",
        value_name = "DURATION"
    )]
    pub auto_archive_after: DurationOrOff,

    /// Delete child (sub-agent) session shares with no change for this long,
    /// e.g. `14d`; `off` keeps them until their root is pruned.
    #[arg(
        long,
        env = "CAPSYNC_CHILD_RETENTION",
        default_value = "off",
        value_name = "DURATION"
    )]
    pub child_retention: DurationOrOff,

    /// Drop the payload of ledger ops applied longer ago than this, e.g. `30d`;
    /// their op ids stay, so retries are still deduplicated. Viewers asking for
    /// older ops are told to take a snapshot. `off` keeps every payload.
    #[arg(
        long,
        env = "CAPSYNC_LEDGER_RETENTION",
        default_value = "off",
        value_name = "DURATION"
    )]
    pub ledger_retention: DurationOrOff,

    /// How often the automatic lifecycle (auto-archive, child retention, ledger
    /// compaction) runs when any of it is on, e.g. `1h`.
    #[arg(long, env = "CAPSYNC_LIFECYCLE_INTERVAL", value_parser = humantime::parse_duration,
          default_value = "1h")]
    pub lifecycle_interval: Duration,

    /// How often the server checkpoints the write-ahead log (keeping it bounded
    /// under constant load) and gives free pages back to the file system in
    /// small incremental-vacuum steps, e.g. `30s`.
    #[arg(long, env = "CAPSYNC_HOUSEKEEPING_INTERVAL", value_parser = humantime::parse_duration,
          default_value = "30s")]
    pub housekeeping_interval: Duration,

    /// Longest one housekeeping step (an incremental-vacuum step, or a checkpoint
    /// waiting for readers) may hold up writers, e.g. `20ms`.
    #[arg(long, env = "CAPSYNC_HOUSEKEEPING_BUDGET", value_parser = humantime::parse_duration,
          default_value = "20ms")]
    pub housekeeping_budget: Duration,

    /// Events that repeat (refused connections, bad input, failed accepts) are
    /// logged once per interval in full, then as one line with a count, e.g. `10s`.
    #[arg(long, env = "CAPSYNC_LOG_SUMMARY_INTERVAL", value_parser = humantime::parse_duration,
          default_value = "10s")]
    pub log_summary_interval: Duration,

    /// Where "now" comes from: the system clock, except in tests that move time by hand.
    #[arg(skip)]
    pub clock: Clock,
}

/// The default for `--argon2-concurrency`: one verification per CPU.
/// `--public-url`: an `http://` or `https://` origin, without a path:
/// `opencode import` only takes links of the form `https://host/share/<id>`.
fn parse_public_url(text: &str) -> Result<String, String> {
    let url = text.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must start with http:// or https://")?;
    if rest.is_empty() {
        return Err("names no host".to_owned());
    }
    if rest.contains('/') {
        return Err(
            "must be an origin without a path (share links are <origin>/share/…)".to_owned(),
        );
    }
    if url.contains(['?', '#', ' ']) {
        return Err("must not contain a query, a fragment or spaces".to_owned());
    }
    Ok(url.to_owned())
}

pub fn default_argon2_concurrency() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A duration setting that can be turned off: `30d`, `12h`, or `off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DurationOrOff(pub Option<Duration>);

impl DurationOrOff {
    pub fn get(self) -> Option<Duration> {
        self.0
    }
}

impl std::str::FromStr for DurationOrOff {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" | "never" | "" => Ok(Self(None)),
            text => match humantime::parse_duration(text) {
                Ok(d) if d.is_zero() => Err("use `off` rather than a zero duration".into()),
                Ok(d) => Ok(Self(Some(d))),
                Err(err) => Err(format!(
                    "{text:?}: {err} (expected e.g. `30d`, `12h` or `off`)"
                )),
            },
        }
    }
}

/// `--http-listen`: an address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpListen {
    Off,
    On(SocketAddr),
}

impl HttpListen {
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Self::Off => None,
            Self::On(addr) => Some(addr),
        }
    }
}

impl std::str::FromStr for HttpListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" | "none" | "" => Ok(Self::Off),
            addr => addr.parse().map(Self::On).map_err(|_| {
                format!("{addr:?} is neither an address like 127.0.0.1:7421 nor `off`")
            }),
        }
    }
}

/// `--durability` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityArg {
    Full,
    Normal,
}

impl From<DurabilityArg> for Durability {
    fn from(arg: DurabilityArg) -> Self {
        match arg {
            DurabilityArg::Full => Durability::Full,
            DurabilityArg::Normal => Durability::Normal,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            database: None,
            database_ca_file: None,
            database_connections: DEFAULT_DATABASE_CONNECTIONS,
            node_heartbeat: Duration::from_secs(1),
            node_timeout: Duration::from_secs(15),
            durability: DurabilityArg::Full,
            max_ops_per_batch: DEFAULT_MAX_OPS_PER_BATCH,
            max_op_bytes: DEFAULT_MAX_OP_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            handshake_bytes: DEFAULT_HANDSHAKE_BYTES,
            read_budget_bytes: DEFAULT_READ_BUDGET_BYTES,
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
            tcp_keepalive: DurationOrOff(Some(DEFAULT_TCP_KEEPALIVE)),
            redeem_failures: DEFAULT_REDEEM_FAILURES,
            redeem_window: DEFAULT_REDEEM_WINDOW,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            argon2_memory_kib: DEFAULT_ARGON2_MEMORY_KIB,
            argon2_iterations: DEFAULT_ARGON2_ITERATIONS,
            argon2_concurrency: default_argon2_concurrency(),
            read_connections: 4,
            max_group_commit: 256,
            write_queue: DEFAULT_WRITE_QUEUE,
            write_queue_bytes: DEFAULT_WRITE_QUEUE_BYTES,
            max_database_bytes: 0,
            storage_reserve_bytes: DEFAULT_STORAGE_RESERVE_BYTES,
            subscriber_window: DEFAULT_SUBSCRIBER_WINDOW,
            subscriber_timeout: DEFAULT_SUBSCRIBER_TIMEOUT,
            follow_recheck: DEFAULT_FOLLOW_RECHECK,
            follow_buffer_bytes: DEFAULT_FOLLOW_BUFFER_BYTES,
            follow_interval: DEFAULT_FOLLOW_INTERVAL,
            http_listen: HttpListen::On(
                DEFAULT_HTTP_LISTEN.parse().expect("valid default address"),
            ),
            http_header_timeout: DEFAULT_HTTP_HEADER_TIMEOUT,
            http_max_body_bytes: DEFAULT_HTTP_MAX_BODY_BYTES,
            sync_max_body_bytes: DEFAULT_SYNC_MAX_BODY_BYTES,
            public_url: None,
            interrupted_after: DEFAULT_INTERRUPTED_AFTER,
            reclaim: true,
            auto_archive_after: DurationOrOff(None),
            child_retention: DurationOrOff(None),
            ledger_retention: DurationOrOff(None),
            lifecycle_interval: DEFAULT_LIFECYCLE_INTERVAL,
            housekeeping_interval: DEFAULT_HOUSEKEEPING_INTERVAL,
            housekeeping_budget: DEFAULT_HOUSEKEEPING_BUDGET,
            log_summary_interval: DEFAULT_LOG_SUMMARY_INTERVAL,
            clock: Clock::system(),
        }
    }
}

impl Config {
    /// A config for tests and examples: data in `data_dir`, cheap argon2 (hashes
    /// still verify; they are just fast to brute-force, so never in production).
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            argon2_memory_kib: 256,
            argon2_iterations: 1,
            // Tests run many servers at once: the HTTP gateway on a free port
            // (see `ServerHandle::http_addr`).
            http_listen: HttpListen::On(([127, 0, 0, 1], 0).into()),
            // No reserve file: tests start hundreds of servers in temp dirs.
            storage_reserve_bytes: 0,
            ..Self::default()
        }
    }

    /// Where the database lives.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("capsync.db")
    }

    /// Where the first start writes the admin token.
    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn public_urls_are_origins() {
        assert_eq!(
            parse_public_url("https://share.example.com/").as_deref(),
            Ok("https://share.example.com")
        );
        assert_eq!(
            parse_public_url("http://h:8080").as_deref(),
            Ok("http://h:8080")
        );
        for bad in [
            "share.example.com",
            "ftp://h",
            "https://",
            "https:///x",
            "http://h/prefix",
            "http://h?a",
        ] {
            assert!(parse_public_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_matches_no_flags() {
        let parsed = Cli::try_parse_from(["capsync-server"]).unwrap().config;
        let default = Config::default();
        // Env vars could override parsing; compare only when none are set.
        if std::env::vars().any(|(k, _)| k.starts_with("CAPSYNC_")) {
            return;
        }
        assert_eq!(format!("{parsed:?}"), format!("{default:?}"));
    }
}
