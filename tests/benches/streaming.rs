//! Streamed text: what one `part.delta` costs as the part it appends to grows (issue 14,
//! target 2).
//!
//! One real server (`capsync_server::spawn` on `127.0.0.1:0`, fresh data directory,
//! durability FULL, HTTP gateway on) and, in this process on one `LocalSet`:
//!
//! - a writer that makes one text part and then appends `--deltas` `part.delta`s of
//!   `--delta-bytes` each to its text, one call in flight, as opencode streams a model's
//!   answer (the default, 20,000 × 10 bytes, grows the part to 200 KB). The answer is
//!   markdown as models write it: paragraphs, lists and fenced code, split by blank
//!   lines; `--one-paragraph` streams one paragraph without any instead;
//! - one SSE follower of the share (`GET /api/shares/{share}/events`), which gets each
//!   delta with the HTML of the segments of the part's text that the delta changed.
//!
//! Printed, for the first and the last `--window` deltas (default 1,000): the mean append
//! round trip (the ledger's cost), the mean time from the writer's ack to the follower
//! having the delta's event, and the mean size of those events; then the last / first
//! ratios against the target (at most 1.5). At the end the snapshot's text is checked to
//! be the whole streamed text.
//!
//! ```text
//! cargo bench -p capsync-tests --bench streaming
//! cargo bench -p capsync-tests --bench streaming -- --deltas 5000 --delta-bytes 40
//! cargo bench -p capsync-tests --bench streaming -- --one-paragraph
//! ```
//!
//! Results: `docs/BENCHMARKS.md`, "Streamed text".

use std::cell::RefCell;
use std::error::Error;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capsync_server::Config;
use capsync_tests::client::{self, Batch, NewShare, OpKind, OpSpec};
use capsync_tests::{run_local, session_ops};
use clap::Parser;
use serde_json::{Value, json};

#[path = "common/event_stream.rs"]
mod event_stream;

use event_stream::{next_event, ops_cursors};

type BenchResult<T> = Result<T, Box<dyn Error>>;

/// The most the last deltas may cost against the first ones.
const TARGET_RATIO: f64 = 1.5;
const SESSION: &str = "ses_stream";
const MESSAGE: &str = "msg_stream";
const PART: &str = "prt_stream";

#[derive(Debug, Parser)]
#[command(about = "Streamed text: a part.delta's cost as its part grows (see docs/BENCHMARKS.md)")]
struct Args {
    /// Deltas appended to the one text part.
    #[arg(long, default_value_t = 20_000)]
    deltas: usize,
    /// Bytes of text in each delta.
    #[arg(long, default_value_t = 10)]
    delta_bytes: usize,
    /// Stream one paragraph with no blank line in it: nowhere for the HTML to be cut
    /// into segments, so each delta renders the whole text (the worst case).
    #[arg(long)]
    one_paragraph: bool,
    /// Deltas averaged at the start and at the end.
    #[arg(long, default_value_t = 1_000)]
    window: usize,
    /// Where the server's data goes (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Passed by `cargo bench` to every bench binary; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> BenchResult<()> {
    let args = Args::parse();
    if args.delta_bytes == 0 || args.window == 0 || args.deltas < 2 * args.window {
        return Err(
            "--delta-bytes and --window must be at least 1, --deltas at least 2 × --window".into(),
        );
    }
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let data = tempfile::Builder::new()
        .prefix("capsync-bench-streaming")
        .tempdir_in(&dir)?;
    let config = Config::for_tests(data.path().join("data"));
    let server = capsync_server::spawn(TcpListener::bind("127.0.0.1:0")?, config.clone())?;
    let http = server.http_addr().ok_or("the server has no HTTP gateway")?;
    let admin_token = std::fs::read_to_string(config.admin_token_path())?;
    println!("capsync streamed-text benchmark");
    println!(
        "  {} deltas of {} bytes to one text part (it grows to {} KB of {}), one call in flight; 1 SSE follower; durability FULL",
        args.deltas,
        args.delta_bytes,
        args.deltas * args.delta_bytes / 1000,
        if args.one_paragraph {
            "one paragraph"
        } else {
            "markdown: paragraphs, lists, code"
        }
    );
    let result = run_local(run(server.addr(), http, admin_token.trim(), &args));
    server.shutdown()?;
    result
}

/// Per delta: when the follower had its event, and that event's size per delta in it.
type Deliveries = Rc<RefCell<Vec<Option<(Instant, usize)>>>>;

/// When each delta's ack came back, and when its event reached the follower.
struct Timings {
    sent: Vec<Instant>,
    acked: Vec<Instant>,
    delivered: Deliveries,
}

async fn run(rpc: SocketAddr, http: SocketAddr, admin_token: &str, args: &Args) -> BenchResult<()> {
    let conn = client::connect(rpc).await?;
    let admin = conn.redeem(admin_token).await?.into_admin()?;
    let agent_token = admin.mint_agent("streaming bench", None).await?.token;
    let agent = conn.redeem(&agent_token).await?.into_agent()?;
    let created = agent
        .create_share(NewShare {
            session_id: SESSION.into(),
            project_id: "prj_test".into(),
            title: "streamed text".into(),
            ..NewShare::default()
        })
        .await?;
    let writer = created.writer;
    let mut setup = session_ops(SESSION, MESSAGE, 0);
    setup.push(OpSpec::new(
        format!("part:{PART}"),
        OpKind::PartUpsert,
        json!({"id": PART, "messageID": MESSAGE, "sessionID": SESSION, "type": "text", "text": ""}),
    ));
    let base = writer.append(&Batch::new("setup", setup)).await?.cursor.0;

    let delivered = Rc::new(RefCell::new(vec![None; args.deltas]));
    let share_id = created.info.state.share_id.clone();
    let follower = follow(
        http,
        &share_id,
        &created.viewer_token.token,
        base,
        Rc::clone(&delivered),
    )
    .await?;

    let mut timings = Timings {
        sent: Vec::with_capacity(args.deltas),
        acked: Vec::with_capacity(args.deltas),
        delivered,
    };
    let answer = answer_text(args.deltas * args.delta_bytes, args.one_paragraph);
    let started = Instant::now();
    for n in 0..args.deltas {
        let text = &answer[n * args.delta_bytes..(n + 1) * args.delta_bytes];
        let op = OpSpec::new(
            format!("delta:{n}"),
            OpKind::PartDelta,
            json!({"partID": PART, "messageID": MESSAGE, "field": "text", "delta": text}),
        );
        timings.sent.push(Instant::now());
        let ack = writer
            .append(&Batch::new(format!("d{n}"), vec![op]))
            .await?;
        timings.acked.push(Instant::now());
        if ack.applied() != 1 {
            return Err(format!("delta {n} was not applied: {ack:?}").into());
        }
    }
    let elapsed = started.elapsed();
    // The follower has every event (or says why not) within a minute of the last ack.
    let deadline = Instant::now() + Duration::from_secs(60);
    while timings.delivered.borrow().iter().any(Option::is_none) {
        if follower.is_finished() || Instant::now() > deadline {
            return Err("the SSE follower did not get every delta".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    follower.abort();
    println!(
        "  appended in {:.1} s ({:.0} deltas/s)",
        elapsed.as_secs_f64(),
        args.deltas as f64 / elapsed.as_secs_f64()
    );
    report(&timings, args);
    check_snapshot(&writer.viewer(), &answer).await?;
    conn.disconnect().await?;
    Ok(())
}

/// `bytes` of an answer (ASCII, so it splits into deltas anywhere): markdown as models
/// write it, or with `one_paragraph`, prose that stays one growing paragraph.
fn answer_text(bytes: usize, one_paragraph: bool) -> String {
    if one_paragraph {
        return "lorem ipsum dolor ".chars().cycle().take(bytes).collect();
    }
    let mut answer = String::with_capacity(bytes + 1024);
    let mut n = 0;
    while answer.len() < bytes {
        match n % 6 {
            0 => answer.push_str(&format!("## Step {n}\n\n")),
            3 => {
                answer.push_str("```rust\n");
                for line in 0..8 {
                    answer.push_str(&format!("    let value_{line} = compute({n}, {line});\n"));
                }
                answer.push_str("```\n\n");
            }
            4 => {
                for item in 0..4 {
                    answer.push_str(&format!("- item {item} of list {n}, with `code`\n"));
                }
                answer.push('\n');
            }
            _ => {
                for sentence in 0..8 {
                    answer.push_str(&format!(
                        "Sentence {sentence} of paragraph {n} explains the **change** in words. "
                    ));
                }
                answer.push_str("\n\n");
            }
        }
        n += 1;
    }
    answer.truncate(bytes);
    answer
}

/// Follows the share's events after `base`; every delta's event lands in `delivered`.
async fn follow(
    http: SocketAddr,
    share: &str,
    viewer_token: &str,
    base: u64,
    delivered: Deliveries,
) -> BenchResult<tokio::task::JoinHandle<Result<(), String>>> {
    let mut stream = event_stream::open(http, share, viewer_token, base).await?;
    Ok(tokio::task::spawn_local(async move {
        while let Some(event) = next_event(&mut stream.events).await? {
            if event.event.as_deref() != Some("ops") {
                continue;
            }
            let at = Instant::now();
            let cursors = ops_cursors(&event)?;
            // An event's size is shared among the deltas it carries.
            let size = event.data.as_deref().map_or(0, str::len) / cursors.len().max(1);
            for cursor in cursors {
                if let Some(n) = cursor.checked_sub(base + 1)
                    && let Some(slot) = delivered.borrow_mut().get_mut(n as usize)
                {
                    *slot = Some((at, size));
                }
            }
        }
        Err("the event stream ended".to_owned())
    }))
}

/// Prints the first and last windows and their ratios.
fn report(timings: &Timings, args: &Args) {
    let delivered = timings.delivered.borrow();
    let window = |range: std::ops::Range<usize>| {
        let n = range.len() as f64;
        let append: f64 = range
            .clone()
            .map(|i| (timings.acked[i] - timings.sent[i]).as_secs_f64())
            .sum();
        let (mut follow, mut bytes) = (0.0, 0.0);
        for i in range {
            let (at, size) = delivered[i].expect("checked: every delta was delivered");
            follow += at.saturating_duration_since(timings.acked[i]).as_secs_f64();
            bytes += size as f64;
        }
        (append / n * 1e3, follow / n * 1e3, bytes / n)
    };
    let first = window(0..args.window);
    let last = window(args.deltas - args.window..args.deltas);
    println!(
        "  first {} deltas: append {:.3} ms, ack -> SSE follower {:.3} ms, {:.0} bytes of event each",
        args.window, first.0, first.1, first.2
    );
    println!(
        "  last {} deltas:  append {:.3} ms, ack -> SSE follower {:.3} ms, {:.0} bytes of event each",
        args.window, last.0, last.1, last.2
    );
    let verdict = |ratio: f64| {
        if ratio <= TARGET_RATIO {
            "PASS"
        } else {
            "FAIL"
        }
    };
    let ledger = last.0 / first.0;
    // The follower's cost is the append's plus its own wait: compare the whole way.
    let sse = (last.0 + last.1) / (first.0 + first.1);
    println!(
        "  ledger: last / first append {ledger:.2} (target <= {TARGET_RATIO}): {}",
        verdict(ledger)
    );
    println!(
        "  SSE:    last / first append + delivery {sse:.2} (target <= {TARGET_RATIO}): {}",
        verdict(sse)
    );
}

/// The snapshot holds the whole streamed text.
async fn check_snapshot(viewer: &client::ViewerClient, answer: &str) -> BenchResult<()> {
    let snapshot = viewer.snapshot().await?;
    let text = snapshot
        .records
        .iter()
        .find(|record| record.id == PART)
        .and_then(|record| serde_json::from_str::<Value>(&record.json).ok())
        .and_then(|part| part["text"].as_str().map(str::to_owned))
        .ok_or("the snapshot has no text part")?;
    if text != answer {
        return Err(format!(
            "the snapshot's text ({} bytes) is not the streamed text ({} bytes)",
            text.len(),
            answer.len()
        )
        .into());
    }
    println!("  the snapshot holds the whole text ({} bytes)", text.len());
    Ok(())
}
