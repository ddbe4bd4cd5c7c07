//! Test fixtures: a real capsync server on `127.0.0.1:0` in a temporary data
//! directory, and helpers to talk to it through the public client API.
//!
//! The listener is bound before the server thread starts and `spawn` returns
//! only once the server is ready, so no test waits or sleeps for readiness.
//!
//! Beside it: [`opencode`] runs the real opencode offline against the fake model
//! server in [`fake_llm`]; [`proxy`] puts faults between a client and a server;
//! [`model`] and [`workload`] are a reference model of a share and seeded agent work.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use capsync_server::clock::Clock;
use capsync_server::{Config, ServerHandle};

/// A running server plus the data directory it owns: the one server fixture of
/// every test in the workspace. Dropping it shuts the server down, then deletes
/// the directory (database, `-wal`, `-shm`, token file).
pub struct TestServer {
    handle: Option<ServerHandle>,
    config: Config,
    /// Where the ledger is, when not the SQLite file in the data directory; dropped
    /// (with its schema) after the server stopped: field order.
    schema: Option<postgres::TestSchema>,
    /// The RPC address, kept across [`TestServer::restart`], so clients that know
    /// only the address (a syncer, a shipper) find the server again.
    addr: SocketAddr,
    /// Kept across restarts; deleted when the fixture drops (after the server
    /// stopped: field order).
    dir: tempfile::TempDir,
}

impl TestServer {
    /// A server with test defaults (`Config::for_tests`: cheap argon2, otherwise the defaults).
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// A server whose config `adjust` may change (limits, durability, …).
    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_on_with(Engine::Sqlite, adjust).expect("SQLite is always there")
    }

    /// A server keeping its ledger on `engine`, or `None` (having said that it
    /// skipped) when that engine is not available here.
    pub fn start_on(engine: Engine) -> Option<Self> {
        Self::start_on_with(engine, |_| {})
    }

    /// [`TestServer::start_on`] with a config `adjust` may change.
    pub fn start_on_with(engine: Engine, adjust: impl FnOnce(&mut Config)) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::for_tests(dir.path().join("data"));
        // The system's time, which a test may shift (see `ago`).
        config.clock = Clock::shifted();
        let schema = match engine {
            Engine::Sqlite => None,
            Engine::Postgres => {
                let schema = postgres::TestSchema::create(&postgres::url_or_skip()?);
                keep_ledger_in(&mut config, &schema);
                Some(schema)
            }
        };
        adjust(&mut config);
        Some(Self::spawn(config, schema, dir))
    }

    /// A second server process on the same PostgreSQL schema as this one (another
    /// node of one deployment), with a data directory of its own.
    pub fn another_node(&self) -> Self {
        assert!(
            self.config.database.is_some(),
            "another node needs a server on PostgreSQL"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let config = Config {
            data_dir: dir.path().join("data"),
            ..self.config.clone()
        };
        Self::spawn(config, None, dir)
    }

    /// Starts a server with `config` on `127.0.0.1:0`, owning `dir` (and `schema`, if any).
    fn spawn(config: Config, schema: Option<postgres::TestSchema>, dir: tempfile::TempDir) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let handle = capsync_server::spawn(listener, config.clone()).expect("server starts");
        Self {
            handle: Some(handle),
            config,
            schema,
            addr,
            dir,
        }
    }

    /// Moves this stopped SQLite server's ledger into a fresh PostgreSQL schema, as
    /// `capsync-server migrate` does, and starts it on PostgreSQL from then on (same data
    /// directory, same admin token file). `None`, having said that it skipped, without a
    /// PostgreSQL.
    pub fn migrate_to_postgres(
        &mut self,
    ) -> Option<capsync_server::ledger::move_to_postgres::MoveReport> {
        assert!(self.handle.is_none(), "stop the server first");
        assert!(self.schema.is_none(), "the server is on SQLite");
        let schema = postgres::TestSchema::create(&postgres::url_or_skip()?);
        let url = schema.server_url();
        let sqlite = self.database_path();
        // Blocking, and not in an async context: a thread of its own.
        let report = std::thread::spawn(move || {
            let options = capsync_server::ledger::postgres::PostgresOptions::new(&url)
                .expect("a postgres:// URL");
            capsync_server::ledger::move_to_postgres::move_to_postgres(
                &sqlite,
                &options,
                &mut |_| {},
            )
        })
        .join()
        .expect("the migration thread")
        .expect("the ledger moves");
        keep_ledger_in(&mut self.config, &schema);
        self.schema = Some(schema);
        Some(report)
    }

    /// The server's settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Which engine keeps this server's ledger.
    pub fn engine(&self) -> Engine {
        if self.config.database.is_some() {
            Engine::Postgres
        } else {
            Engine::Sqlite
        }
    }

    /// The server's clock (see [`ago`]).
    pub fn clock(&self) -> &Clock {
        &self.config.clock
    }

    /// The RPC address; the same after a restart.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP gateway's address (`Config::for_tests` serves it on a free port).
    pub fn http_addr(&self) -> SocketAddr {
        self.handle
            .as_ref()
            .and_then(ServerHandle::http_addr)
            .expect("the test server runs its HTTP gateway")
    }

    /// A metric of the server's `/metrics` without labels, e.g. a counter's total.
    pub fn metric(&self, name: &str) -> f64 {
        let mut response = ureq::get(format!("http://{}/metrics", self.http_addr()))
            .call()
            .expect("GET /metrics");
        let text = response.body_mut().read_to_string().expect("metrics text");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    pub fn database_path(&self) -> PathBuf {
        self.config.database_path()
    }

    /// The admin token the server wrote to its data directory on first start.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.config.admin_token_path())
            .expect("admin token file")
            .trim()
            .to_owned()
    }

    /// Graceful shutdown (drain, disconnect, flush), keeping the data directory.
    /// Blocks until the server is down: call it from `spawn_blocking` while
    /// clients on this thread's `LocalSet` must keep running.
    pub fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().expect("clean shutdown");
        }
    }

    /// Starts a stopped server again on the same data and the same RPC address.
    pub fn start_again(&mut self) {
        let listener = self.bind_again();
        self.handle =
            Some(capsync_server::spawn(listener, self.config.clone()).expect("server restarts"));
    }

    /// Binds the stopped server's RPC address: what [`TestServer::start_again`]
    /// listens on, or something else that takes the port meanwhile. A client
    /// reconnecting meanwhile can, rarely, connect to itself on the free port
    /// (Linux TCP self-connect: its ephemeral port equals the port it dials); it
    /// lets go as soon as it sees its own bytes, so a conflict is retried for a moment.
    pub fn bind_again(&self) -> TcpListener {
        assert!(self.handle.is_none(), "the server is still running");
        let mut attempts = 0;
        loop {
            // std sets SO_REUSEADDR, so the old connections' TIME_WAIT does not block the port.
            match TcpListener::bind(self.addr) {
                Ok(listener) => return listener,
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(err) => panic!("bind the same address again: {err}"),
            }
        }
    }

    /// Starts the server again on the same data and the same two ports it had
    /// (after [`TestServer::stop`]): for clients that keep both addresses, like
    /// the opencode plugin's shipper. `rpc` and `http` are the addresses it had.
    pub fn start_again_at(&mut self, rpc: SocketAddr, http: SocketAddr) {
        assert!(self.handle.is_none(), "stop the server first");
        let mut config = self.config.clone();
        config.http_listen = capsync_server::config::HttpListen::On(http);
        let listener = TcpListener::bind(rpc).expect("bind the old RPC port again");
        self.handle = Some(capsync_server::spawn(listener, config).expect("server starts"));
    }

    /// [`TestServer::stop`], then [`TestServer::start_again`] on the same address.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// The temporary directory holding the data dir, for scratch files.
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let stopped = handle.shutdown();
            // Not while unwinding from a failed assertion: a second panic would
            // abort the whole test binary and hide which test failed.
            if !std::thread::panicking() {
                stopped.expect("clean shutdown");
            }
        }
    }
}

/// Points `config` at `schema` for its ledger, with a few connections (tests run many
/// servers at once).
fn keep_ledger_in(config: &mut Config, schema: &postgres::TestSchema) {
    config.database = Some(schema.server_url().parse().expect("a postgres:// URL"));
    config.database_connections = 4;
}

/// The storage engines a test server can keep its ledger on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The embedded default: a file in the data directory.
    Sqlite,
    /// The database at `CAPSYNC_TEST_POSTGRES`, a schema per server.
    Postgres,
}

/// Runs a story on each engine: for each `story(server: TestServer)` named, a module of
/// the same name with the tests `sqlite` and `postgres`, each calling the story with a
/// fresh [`TestServer`] on that engine (the PostgreSQL one says that it skipped when
/// there is no database).
#[macro_export]
macro_rules! on_each_engine {
    ($($story:ident),* $(,)?) => {
        $(
            mod $story {
                #[test]
                fn sqlite() {
                    super::$story($crate::TestServer::start());
                }

                #[test]
                fn postgres() {
                    if let Some(server) = $crate::TestServer::start_on($crate::Engine::Postgres) {
                        super::$story(server);
                    }
                }
            }
        )*
    };
}

/// Runs an async test body on a current-thread runtime inside a `LocalSet`,
/// as the capnp-rpc client requires.
pub fn run_local<F: std::future::Future>(body: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&runtime, body)
}

/// The repository's sample session export.
pub fn sample_session_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .join("examples/sessions/fix-login-bug.json")
}

pub use capsync_cli as cli;
use capsync_cli::{CliRun, run_args};
pub use capsync_client as client;
use capsync_client::{
    AdminClient, AgentClient, Batch, Connection, CreatedShare, NewShare, OpKind, OpSpec,
    ViewerClient,
};
use serde_json::json;

/// Connects to the server and redeems its admin token.
pub async fn admin(server: &TestServer) -> (Connection, AdminClient) {
    let conn = capsync_client::connect(server.addr())
        .await
        .expect("connect");
    let admin = conn
        .redeem(&server.admin_token())
        .await
        .expect("redeem admin")
        .into_admin()
        .expect("admin capability");
    (conn, admin)
}

/// Mints an agent token with the admin and redeems it on `conn`.
pub async fn agent(conn: &Connection, admin: &AdminClient) -> (AgentClient, String) {
    let minted = admin
        .mint_agent("test agent", None)
        .await
        .expect("mint agent");
    let agent = conn
        .redeem(&minted.token)
        .await
        .expect("redeem agent")
        .into_agent()
        .expect("agent capability");
    (agent, minted.token)
}

/// Creates a share for session `session_id`.
pub async fn share(agent: &AgentClient, session_id: &str) -> CreatedShare {
    child_share(agent, session_id, "prj_test", None).await
}

/// Creates a share for session `session_id` in `project_id`, the child of
/// `parent_session_id` when given (a sub-agent's session).
pub async fn child_share(
    agent: &AgentClient,
    session_id: &str,
    project_id: &str,
    parent_session_id: Option<&str>,
) -> CreatedShare {
    agent
        .create_share(NewShare {
            session_id: session_id.to_owned(),
            project_id: project_id.to_owned(),
            parent_session_id: parent_session_id.map(str::to_owned),
            title: format!("test session {session_id}"),
            ..NewShare::default()
        })
        .await
        .expect("create share")
}

/// Runs `work` as if it happened `age` ago: the server's clock is moved back
/// for it and forward again after, so what `work` stores (a share's creation,
/// its last change, when its ops were applied) is `age` old. Tests cannot wait
/// 30 days, and the clock is the server's own, whatever stores its data.
pub async fn ago<T>(
    server: &TestServer,
    age: std::time::Duration,
    work: impl Future<Output = T>,
) -> T {
    server.clock().rewind(age);
    let out = work.await;
    server.clock().advance(age);
    out
}

impl TestServer {
    /// The `detail` of the audit lines of `action` on `share_id`, in the order written,
    /// read from the server's database whatever the engine.
    pub fn audit_details(&self, action: &str, share_id: &str) -> Vec<String> {
        let sql = "SELECT detail FROM audit WHERE action = $1 AND share_id = $2 ORDER BY id";
        match &self.schema {
            Some(schema) => schema.query_strings(sql, &[action, share_id]),
            None => {
                let db = rusqlite::Connection::open(self.database_path()).expect("open database");
                let mut statement = db.prepare(&sql.replace('$', "?")).unwrap();
                statement
                    .query_map([action, share_id], |row| row.get::<_, String>(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            }
        }
    }
}

/// Rows of `table` whose `share_id` is `share_id`, read from the database file.
pub fn rows_of_share(server: &TestServer, table: &str, share_id: &str) -> i64 {
    let conn = rusqlite::Connection::open(server.database_path()).expect("open database");
    let column = if table == "shares" { "id" } else { "share_id" };
    conn.query_row(
        &format!("SELECT count(*) FROM {table} WHERE {column} = ?1"),
        [share_id],
        |r| r.get(0),
    )
    .expect("count rows")
}

/// `PRAGMA integrity_check` and `PRAGMA foreign_key_check` of the server's
/// database: "ok" and no violations, or the problems found.
pub fn database_check(server: &TestServer) -> Result<(), String> {
    let conn = rusqlite::Connection::open(server.database_path()).expect("open database");
    let integrity: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("integrity_check");
    if integrity != ["ok"] {
        return Err(format!("integrity_check: {integrity:?}"));
    }
    let violations: Vec<String> = conn
        .prepare("PRAGMA foreign_key_check")
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok(format!(
                    "{}:{:?}",
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<i64>>(1)?
                ))
            })?
            .collect()
        })
        .expect("foreign_key_check");
    if !violations.is_empty() {
        return Err(format!("foreign_key_check: {violations:?}"));
    }
    Ok(())
}

/// Ops that build a small session: the session, one message, and `parts` text parts.
pub fn session_ops(session_id: &str, message_id: &str, parts: usize) -> Vec<OpSpec> {
    let mut ops = vec![
        OpSpec::new(
            format!("{session_id}:session"),
            OpKind::SessionUpsert,
            json!({"id": session_id, "title": "t", "projectID": "prj_test"}),
        ),
        message_op(session_id, message_id, "assistant"),
    ];
    ops.extend(
        (0..parts).map(|i| text_part_op(session_id, message_id, &format!("{message_id}_p{i:04}"))),
    );
    ops
}

pub fn message_op(session_id: &str, message_id: &str, role: &str) -> OpSpec {
    OpSpec::new(
        format!("msg:{message_id}"),
        OpKind::MessageUpsert,
        json!({"id": message_id, "sessionID": session_id, "role": role, "time": {"created": 1}}),
    )
}

pub fn text_part_op(session_id: &str, message_id: &str, part_id: &str) -> OpSpec {
    OpSpec::new(
        format!("part:{part_id}"),
        OpKind::PartUpsert,
        json!({"id": part_id, "messageID": message_id, "sessionID": session_id, "type": "text", "text": format!("text of {part_id}")}),
    )
}

pub fn batch(id: &str, ops: Vec<OpSpec>) -> Batch {
    Batch::new(id, ops)
}

/// Creates a share for the sample session export and pushes all of it (23 ops).
pub async fn sample_share(agent: &AgentClient) -> CreatedShare {
    let text = std::fs::read_to_string(sample_session_path()).expect("sample session");
    let export = capsync_client::SessionExport::from_json(&text).expect("sample parses");
    let created = agent
        .create_share(NewShare {
            session_id: export.session_id().to_owned(),
            project_id: export.project_id().to_owned(),
            parent_session_id: None,
            title: export.title().to_owned(),
            ..NewShare::default()
        })
        .await
        .expect("create share");
    let ack = created
        .writer
        .append(&Batch::new("sample", export.to_ops()))
        .await
        .expect("push sample");
    assert_eq!(ack.applied(), 23, "the sample session is 23 ops");
    created
}

/// Runs the `capsync` CLI in-process against `server` with `token`.
pub async fn capsync(server: &TestServer, token: &str, args: &[&str]) -> CliRun {
    let addr = server.addr().to_string();
    let mut argv = vec!["capsync", "--server", &addr, "--token", token];
    argv.extend_from_slice(args);
    run_args(argv).await
}

/// The JSON a successful `--json` run printed.
pub fn json_of(run: &CliRun) -> serde_json::Value {
    assert_eq!(
        run.code, 0,
        "stderr: {}\nstdout: {}",
        run.stderr, run.stdout
    );
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stdout))
}

/// Redeems a share's viewer token on `conn`.
pub async fn viewer_of(conn: &Connection, created: &CreatedShare) -> ViewerClient {
    conn.redeem(&created.viewer_token.token)
        .await
        .expect("redeem viewer")
        .into_viewer()
        .expect("viewer capability")
}

pub mod fake_llm;
pub mod model;
pub mod opencode;
pub mod postgres;
pub mod proxy;
pub mod workload;
