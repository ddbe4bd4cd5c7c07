//! What capsync's opencode plugin (`opencode/capsync-journal.js`) costs opencode.
//!
//! - **Wall time**: the real opencode (pinned in `tests/opencode/`, offline, the fake model
//!   of the tests playing its coding script: reasoning, text, a bash call, an edit, an
//!   answer) answers the same prompt with and without the plugin, in alternating rounds,
//!   each in a fresh `opencode serve`. Printed: the median prompt time of each, and the
//!   median of the per-round ratios (target: at most 1.05, under 5% added).
//! - **Per event**: the plugin's event handler alone, in Node.js, called on a typical
//!   part-delta event many times (one synchronous write and fsync each).
//!
//! ```text
//! cargo bench -p capsync-tests --bench opencode_plugin
//! cargo bench -p capsync-tests --bench opencode_plugin -- --rounds 10 --events 5000
//! ```
//!
//! Needs the pinned opencode (`npm install --prefix tests/opencode --no-save`, or
//! `CAPSYNC_OPENCODE_BIN`) and `node`. Results: `docs/BENCHMARKS.md`, "opencode plugin".

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use capsync_tests::fake_llm::FakeLlm;
use capsync_tests::opencode::{self, OpenCode};
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "What capsync's opencode plugin costs opencode (see docs/BENCHMARKS.md)")]
struct Args {
    /// Rounds, each one prompt without and one with the plugin.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Events for the handler-alone measurement.
    #[arg(long, default_value_t = 2000)]
    events: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const PROMPT: &str = "Please mark the task in notes.txt as done.";

fn plugin() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("opencode/capsync-journal.js")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One prompt in a fresh opencode, with or without the plugin: its wall time.
fn prompt_time(binary: &std::path::Path, llm: &FakeLlm, with_plugin: bool) -> Duration {
    let journal = tempfile::tempdir().expect("scratch");
    let mut builder = OpenCode::builder(binary, llm);
    if with_plugin {
        builder = builder.config(json!({"plugin": [[
            format!("file://{}", plugin().display()),
            {"journal": journal.path().join("journal").to_str().expect("UTF-8 path")}
        ]]}));
    }
    let oc = builder.start();
    let session = oc.create_session();
    let started = Instant::now();
    oc.prompt(&session, PROMPT);
    started.elapsed()
}

fn main() {
    let args = Args::parse();
    let Some(binary) = opencode::binary() else {
        eprintln!("opencode is not installed: {}", opencode::INSTALL_HINT);
        std::process::exit(1);
    };
    println!("opencode plugin benchmark ({} rounds)", args.rounds);
    let llm = FakeLlm::start();
    // One round of each first, not counted: caches, the plugin's first load.
    prompt_time(&binary, &llm, false);
    prompt_time(&binary, &llm, true);
    let (mut without, mut with, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        // Alternate which goes first, so a slow stretch of the machine hits both.
        let (a, b) = if round % 2 == 0 {
            let a = prompt_time(&binary, &llm, false);
            (a, prompt_time(&binary, &llm, true))
        } else {
            let b = prompt_time(&binary, &llm, true);
            (prompt_time(&binary, &llm, false), b)
        };
        without.push(a.as_secs_f64() * 1000.0);
        with.push(b.as_secs_f64() * 1000.0);
        ratios.push(b.as_secs_f64() / a.as_secs_f64());
    }
    let ratio = median(ratios);
    println!(
        "| prompt without the plugin, median ms | with it, median ms | median ratio (with / without) | target |"
    );
    println!("|---:|---:|---:|---|");
    println!(
        "| {:.0} | {:.0} | {ratio:.3} | {} (≤ 1.05) |",
        median(without),
        median(with),
        if ratio <= 1.05 { "met" } else { "not met" }
    );

    // The handler alone: import the plugin and call its event hook in a loop.
    let scratch = tempfile::tempdir().expect("scratch");
    let script = format!(
        r#"const {{ CapsyncJournal }} = await import({plugin});
const hooks = await CapsyncJournal({{ directory: {dir} }}, {{ journal: {journal} }});
const event = {{ id: "evt_0", type: "message.part.delta", properties: {{ sessionID: "ses_1",
  messageID: "msg_1", partID: "prt_1", field: "text", delta: "a few words of streamed text " }} }};
const started = process.hrtime.bigint();
for (let i = 0; i < {events}; i++) {{ event.id = "evt_" + i; hooks.event({{ event }}); }}
const ns = Number(process.hrtime.bigint() - started);
console.log((ns / {events} / 1000).toFixed(1));"#,
        plugin = json!(format!("file://{}", plugin().display())),
        dir = json!(scratch.path().to_str().expect("UTF-8 path")),
        journal = json!(scratch.path().join("journal").to_str().expect("UTF-8 path")),
        events = args.events,
    );
    let output = Command::new("node")
        .args(["--input-type=module", "-e", &script])
        .output()
        .expect("run node");
    assert!(
        output.status.success(),
        "node failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!(
        "\nthe event handler alone: {} µs per event (the mean of {} calls, a write and an fsync each)",
        String::from_utf8_lossy(&output.stdout).trim(),
        args.events
    );
}
