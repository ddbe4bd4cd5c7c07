//! The append benchmark on PostgreSQL (`--database postgres://…`): the server on that
//! database (one node, then two on the same schema), against the limit of the same
//! inserts issued straight to PostgreSQL from this process.
//!
//! The raw limit runs N clients at once (N = agents), each on a connection of its own,
//! each writing its own share's batches, one transaction per batch with synchronous
//! commit, into the server's table shapes: a ledger row per op (`ON CONFLICT DO
//! NOTHING` on the op id), a part upsert per op, the share's cursor per batch. The
//! server does all of that and more (authority, dedupe by digest, dependencies, the
//! share's row lock, validation, a notification, RPC).
//!
//! Every run gets a schema of its own in the database, dropped afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{
    BenchResult, Budget, Measurement, Scenario, Workload, drive, message_id, op_id, part_id,
    run_local, session_id, share_name,
};
use capsync_server::Config;

/// The server's tables for shares, messages, parts and the ledger, as in
/// `server/src/ledger/postgres/schema.rs` (tokens and the other records are left out).
const RAW_SCHEMA: &str = r#"
CREATE TABLE shares (
    id         TEXT COLLATE "C" PRIMARY KEY,
    session_id TEXT COLLATE "C" NOT NULL,
    cursor     BIGINT NOT NULL DEFAULT 0 CHECK (cursor >= 0),
    updated_at BIGINT NOT NULL
);
CREATE TABLE ops (
    share_id   TEXT COLLATE "C" NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    cursor     BIGINT NOT NULL CHECK (cursor > 0),
    op_id      TEXT COLLATE "C" NOT NULL,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    token_id   TEXT COLLATE "C" NOT NULL,
    batch_id   TEXT NOT NULL,
    applied_at BIGINT NOT NULL,
    digest     BYTEA,
    PRIMARY KEY (share_id, cursor),
    UNIQUE (share_id, op_id)
);
CREATE TABLE messages (
    share_id TEXT COLLATE "C" NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    id       TEXT COLLATE "C" NOT NULL,
    terminal BOOLEAN NOT NULL,
    json     TEXT NOT NULL,
    PRIMARY KEY (share_id, id)
);
CREATE TABLE parts (
    share_id   TEXT COLLATE "C" NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    id         TEXT COLLATE "C" NOT NULL,
    message_id TEXT COLLATE "C" NOT NULL,
    finished   BOOLEAN NOT NULL,
    json       TEXT NOT NULL,
    pos        BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    PRIMARY KEY (share_id, id)
);
CREATE INDEX parts_by_message ON parts (share_id, message_id, id);
"#;

/// A schema of its own in the benchmark's database, dropped when this is.
pub struct Schema {
    url: String,
    name: String,
}

impl Schema {
    pub fn create(url: &str, what: &str) -> BenchResult<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "capsync_bench_{what}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut client = postgres::Client::connect(url, postgres::NoTls)?;
        client.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
        ))?;
        Ok(Self {
            url: url.to_owned(),
            name,
        })
    }

    /// The URL of this schema (its `search_path`).
    pub fn url(&self) -> String {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        format!(
            "{}{separator}options=-csearch_path%3D{}",
            self.url, self.name
        )
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.url, postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
    }
}

/// The settings the server is measured under, for the header.
pub fn settings(url: &str) -> BenchResult<String> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    let mut shown = Vec::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "full_page_writes",
        "shared_buffers",
        "max_connections",
    ] {
        let row = client.query_one(&format!("SHOW {name}"), &[])?;
        shown.push(format!("{name}={}", row.get::<_, String>(0)));
    }
    Ok(shown.join(", "))
}

/// Starts `nodes` servers on a fresh schema, drives the scenario through them (agent
/// `i` on node `i % nodes`), stops them.
pub fn measure_server(
    scenario: &Scenario,
    url: &str,
    nodes: usize,
    connections: u32,
) -> BenchResult<Measurement> {
    let schema = Schema::create(url, "server")?;
    let mut servers = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..nodes {
        let data = tempfile::Builder::new()
            .prefix("capsync-bench-node")
            .tempdir()?;
        let mut config = Config::for_tests(data.path().join("data"));
        config.database = Some(schema.url().parse()?);
        config.database_connections = connections;
        servers.push(capsync_server::spawn(
            std::net::TcpListener::bind("127.0.0.1:0")?,
            config,
        )?);
        dirs.push(data);
    }
    // The first node made the admin token.
    let admin_token = std::fs::read_to_string(dirs[0].path().join("data/admin.token"))?;
    let addrs: Vec<_> = servers
        .iter()
        .map(capsync_server::ServerHandle::addr)
        .collect();
    let measured = run_local(drive(&addrs, admin_token.trim(), scenario));
    for server in servers {
        server.shutdown()?;
    }
    measured
}

/// The raw limit: `scenario.agents` clients at once, one transaction per batch each.
pub fn measure_raw(scenario: &Scenario, url: &str) -> BenchResult<Measurement> {
    let schema = Schema::create(url, "raw")?;
    let schema_url = schema.url();
    {
        let mut client = postgres::Client::connect(&schema_url, postgres::NoTls)?;
        client.batch_execute(RAW_SCHEMA)?;
        for agent in 0..scenario.agents {
            client.execute(
                "INSERT INTO shares (id, session_id, updated_at) VALUES ($1, $2, 0)",
                &[&share_name(agent), &session_id(agent)],
            )?;
            client.execute(
                "INSERT INTO messages (share_id, id, terminal, json) VALUES ($1, $2, false, '{}')",
                &[&share_name(agent), &message_id(agent)],
            )?;
        }
    }
    let workload = Workload::new();
    let results: Vec<BenchResult<(Vec<Duration>, Duration)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..scenario.agents)
            .map(|agent| {
                let (schema_url, workload) = (&schema_url, &workload);
                // Errors cross the thread as text.
                scope.spawn(move || {
                    raw_client(scenario, schema_url, agent, workload).map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(Ok(done)) => Ok(done),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err("a raw client panicked".into()),
            })
            .collect()
    });
    let mut latencies = Vec::new();
    let mut elapsed = Duration::ZERO;
    for result in results {
        let (client_latencies, client_elapsed) = result?;
        latencies.extend(client_latencies);
        elapsed = elapsed.max(client_elapsed);
    }
    let batches = latencies.len() as u64;
    Ok(Measurement::new(
        batches * scenario.batch as u64,
        batches,
        elapsed,
        latencies,
        None,
    ))
}

/// One raw client: warm-up, then its share's batches until the budget is spent.
fn raw_client(
    scenario: &Scenario,
    url: &str,
    agent: usize,
    workload: &Workload,
) -> BenchResult<(Vec<Duration>, Duration)> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    let ledger = client.prepare(
        "INSERT INTO ops (share_id, cursor, op_id, kind, payload, token_id, batch_id, applied_at)
         VALUES ($1, $2, $3, 'part.upsert', $4, 'tok_bench', $5, $6)
         ON CONFLICT (share_id, op_id) DO NOTHING",
    )?;
    let part = client.prepare(
        "INSERT INTO parts (share_id, id, message_id, finished, json) VALUES ($1, $2, $3, false, $4)
         ON CONFLICT (share_id, id) DO UPDATE
         SET message_id = excluded.message_id, json = excluded.json",
    )?;
    let cursor_update =
        client.prepare("UPDATE shares SET cursor = $2, updated_at = $3 WHERE id = $1")?;
    let (share, message) = (share_name(agent), message_id(agent));
    let mut seq = 0u64;
    let mut write = |client: &mut postgres::Client| -> BenchResult<Duration> {
        let batch: Vec<(String, String, String)> = (seq..seq + scenario.batch as u64)
            .map(|s| {
                (
                    op_id(agent, s),
                    part_id(agent, s),
                    workload.payload_text(agent, s),
                )
            })
            .collect();
        let batch_id = format!("b-{agent}-{seq}");
        let started = Instant::now();
        let now = capsync_shared::now_millis();
        let mut tx = client.transaction()?;
        let mut cursor = i64::try_from(seq)?;
        for (op, part_id, payload) in &batch {
            cursor += 1;
            tx.execute(&ledger, &[&share, &cursor, op, payload, &batch_id, &now])?;
            tx.execute(&part, &[&share, part_id, &message, payload])?;
        }
        tx.execute(&cursor_update, &[&share, &cursor, &now])?;
        tx.commit()?;
        seq += scenario.batch as u64;
        Ok(started.elapsed())
    };
    for _ in 0..scenario.warmup_batches() {
        write(&mut client)?;
    }
    let (limit, deadline) = match scenario.budget {
        Budget::Batches(n) => (n, None),
        Budget::Time(d) => (u64::MAX, Some(Instant::now() + d)),
    };
    let mut latencies = Vec::new();
    let started = Instant::now();
    while (latencies.len() as u64) < limit && deadline.is_none_or(|d| Instant::now() < d) {
        latencies.push(write(&mut client)?);
    }
    Ok((latencies, started.elapsed()))
}
