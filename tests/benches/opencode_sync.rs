//! opencode syncs: how many a server takes per second with many sessions shared at once.
//!
//! One real server (`capsync_server::spawn` on `127.0.0.1:0`, fresh data directory,
//! durability FULL, **default argon2**: 19 MiB, 2 passes) and, in this process, N shares
//! created as opencode creates them (`POST /opencode/<agent>/api/share`). Then W client
//! threads send syncs flat out, round-robin over the sessions, each a batch as opencode
//! sends in its one-second window: the session, the assistant message and one new text
//! part (each a new snapshot, so three ops applied). Every sync checks the agent token in
//! the URL and the writer secret in the body: the first of each costs argon2, later ones
//! hit the cache of verified secrets (a revocation still counts, as the token's row and
//! epoch are read on every call).
//!
//! Printed per session count: syncs per second (the median of 1-second windows over the
//! run, after a 2-second warm-up), latency p50/p99, and the cost of the first (uncached)
//! sync of each session. opencode sends one sync a second per active session, so
//! "syncs/s ≥ sessions" means the server keeps up.
//!
//! ```text
//! cargo bench -p capsync-tests --bench opencode_sync
//! cargo bench -p capsync-tests --bench opencode_sync -- --sessions 50,500 --seconds 10 --workers 16
//! ```
//!
//! Results: `docs/BENCHMARKS.md`, "opencode syncs".

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsync_server::Config;
use capsync_tests::run_local;
use clap::Parser;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "opencode syncs per second with many shared sessions (see docs/BENCHMARKS.md)")]
struct Args {
    /// Session counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "50,500")]
    sessions: Vec<usize>,
    /// Seconds of syncing measured per session count (after 2 s of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Client threads sending syncs.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Share {
    id: String,
    secret: String,
    /// Snapshots sent so far: each sync's content is new.
    sent: AtomicU64,
}

fn main() {
    let args = Args::parse();
    println!("opencode sync benchmark (default argon2, durability FULL)");
    println!(
        "  {} worker threads, {} s per run after 2 s of warm-up",
        args.workers, args.seconds
    );
    println!(
        "| sessions | syncs/s (median of 1 s windows) | p50 ms | p99 ms | first sync of a session p50 ms | items applied |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for &sessions in &args.sessions {
        run(sessions, &args);
    }
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn post(agent: &ureq::Agent, url: &str, body: &Value) -> (u16, Value) {
    let mut response = agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .expect("HTTP request");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn items(session: &str, n: u64) -> Value {
    json!([
        {"type": "session", "data": {"id": session, "title": "bench", "time": {"created": 1, "updated": n}}},
        {"type": "message", "data": {"id": "msg_1", "sessionID": session, "role": "assistant", "time": {"created": 1}, "tokens": {"output": n}}},
        {"type": "part", "data": {"id": format!("prt_{n:08}"), "messageID": "msg_1", "sessionID": session, "type": "text",
                                   "text": "x".repeat(300), "time": {"start": n, "end": n}}},
    ])
}

fn run(sessions: usize, args: &Args) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().join("data"),
        http_listen: capsync_server::config::HttpListen::On(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..Config::default()
    };
    // The bench's own address sends everything: give it room.
    config.max_connections_per_address = 1024;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = capsync_server::spawn(listener, config).unwrap();
    let http_addr = server.http_addr().expect("HTTP gateway on");
    let admin_token = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let agent_token = run_local(async {
        let conn = capsync_tests::client::connect(server.addr()).await.unwrap();
        let admin = conn
            .redeem(admin_token.trim())
            .await
            .unwrap()
            .into_admin()
            .unwrap();
        admin.mint_agent("bench", None).await.unwrap().token
    });
    let base = format!("http://{http_addr}/opencode/{agent_token}");

    let client = http();
    let shares: Vec<Arc<Share>> = (0..sessions)
        .map(|i| {
            let (status, created) = post(
                &client,
                &format!("{base}/api/share"),
                &json!({"sessionID": format!("ses_{i:05}")}),
            );
            assert_eq!(status, 200, "{created}");
            Arc::new(Share {
                id: created["id"].as_str().unwrap().to_owned(),
                secret: created["secret"].as_str().unwrap().to_owned(),
                sent: AtomicU64::new(0),
            })
        })
        .collect();

    let sync = |client: &ureq::Agent, i: usize| -> (Duration, u64) {
        let share = &shares[i];
        let n = share.sent.fetch_add(1, Ordering::Relaxed) + 1;
        let started = Instant::now();
        let (status, body) = post(
            client,
            &format!("{base}/api/share/{}/sync", share.id),
            &json!({"secret": share.secret, "data": items(&format!("ses_{i:05}"), n)}),
        );
        assert_eq!(status, 200, "{body}");
        (started.elapsed(), body["applied"].as_u64().unwrap_or(0))
    };

    // The first sync of each session: its secrets are not verified yet.
    let mut first: Vec<Duration> = (0..sessions).map(|i| sync(&client, i).0).collect();
    first.sort();

    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let done: Arc<Mutex<Vec<(Instant, Duration)>>> = Arc::default();
    let applied = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.workers {
            let (stop, next, done, applied) = (&stop, &next, &done, &applied);
            let sync = &sync;
            scope.spawn(move || {
                let client = http();
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = (next.fetch_add(1, Ordering::Relaxed) as usize) % sessions;
                    let (took, items) = sync(&client, i);
                    applied.fetch_add(items, Ordering::Relaxed);
                    mine.push((Instant::now(), took));
                }
                done.lock().unwrap().extend(mine);
            });
        }
        std::thread::sleep(Duration::from_secs(2 + args.seconds));
        stop.store(true, Ordering::Relaxed);
    });

    let warm = started + Duration::from_secs(2);
    let end = warm + Duration::from_secs(args.seconds);
    let done = done.lock().unwrap();
    let measured: Vec<&(Instant, Duration)> = done
        .iter()
        .filter(|(at, _)| *at >= warm && *at < end)
        .collect();
    let mut windows = vec![0u64; args.seconds as usize];
    for (at, _) in &measured {
        let second = at.duration_since(warm).as_secs() as usize;
        if let Some(window) = windows.get_mut(second) {
            *window += 1;
        }
    }
    windows.sort();
    let mut latencies: Vec<Duration> = measured.iter().map(|(_, took)| *took).collect();
    latencies.sort();
    let pct = |sorted: &[Duration], p: f64| -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i].as_secs_f64() * 1000.0
    };
    println!(
        "| {sessions} | {} | {:.2} | {:.2} | {:.1} | {} |",
        windows[windows.len() / 2],
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        pct(&first, 0.5),
        applied.load(Ordering::Relaxed),
    );
    drop(server);
}
