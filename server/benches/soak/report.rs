//! The per-minute table and the end-of-run verdict against the soak targets.

use std::time::Duration;

use crate::process::{FdKinds, ProcSample};

/// RSS may grow by less than this fraction after warm-up.
pub const MAX_RSS_GROWTH: f64 = 0.10;
/// The p99 of the last minutes may be at most this multiple of the first ones'
/// (or [`P99_SLACK`] more). Generous: the machine is shared and one busy
/// minute moves a p99 a lot.
pub const MAX_P99_RATIO: f64 = 1.5;
/// A p99 of a few milliseconds doubles with any noise on a shared machine.
pub const P99_SLACK: Duration = Duration::from_millis(2);
/// Minutes compared at each end of the run for p99.
const P99_WINDOW: usize = 3;

const MIB: f64 = 1024.0 * 1024.0;

/// One minute of a run, as printed.
#[derive(Clone, Debug)]
pub struct Row {
    pub minute: u32,
    /// Taken at the end of the minute.
    pub proc: ProcSample,
    /// Fewest and most descriptors over the minute's samples: connections come
    /// and go, so the minimum is the one that shows a leak.
    pub fds_min: u64,
    pub fds_max: u64,
    pub db_bytes: u64,
    /// Server log lines written during the minute.
    pub log_lines: u64,
    /// Latency samples of the minute, sorted: appends, or the hostile run's probe.
    pub latency: Vec<Duration>,
    /// Scenario-specific counts, `(header, value)`, same headers every minute.
    pub extra: Vec<(&'static str, String)>,
}

impl Row {
    pub fn p50(&self) -> Duration {
        percentile(&self.latency, 50.0)
    }

    pub fn p99(&self) -> Duration {
        percentile(&self.latency, 99.0)
    }

    pub fn max(&self) -> Duration {
        self.latency.last().copied().unwrap_or_default()
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

/// The table's header line (Markdown, so it can go into docs/BENCHMARKS.md as is).
pub fn print_header(what: &str, first: &Row) {
    let mut header = format!(
        "| min | RSS MiB | anon MiB | fds min–max | threads | DB MiB | log lines | {what} p50 ms | p99 ms | max ms |"
    );
    let mut rule = "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".to_owned();
    for (name, _) in &first.extra {
        header.push_str(&format!(" {name} |"));
        rule.push_str("---:|");
    }
    println!("{header}");
    println!("{rule}");
}

pub fn print_row(row: &Row) {
    let mut line = format!(
        "| {} | {:.1} | {:.1} | {}–{} | {} | {:.1} | {} | {:.2} | {:.2} | {:.2} |",
        row.minute,
        mib(row.proc.rss),
        mib(row.proc.anon),
        row.fds_min,
        row.fds_max,
        row.proc.threads,
        mib(row.db_bytes),
        row.log_lines,
        ms(row.p50()),
        ms(row.p99()),
        ms(row.max()),
    );
    for (_, value) in &row.extra {
        line.push_str(&format!(" {value} |"));
    }
    println!("{line}");
}

/// What the run showed against the targets.
pub struct Verdict {
    pub lines: Vec<String>,
    /// Every target met (and enough minutes to judge).
    pub pass: bool,
}

/// Descriptors of the idle server: just after it started, and once the run's
/// connections were all closed. Leaked sockets, pipes or event descriptors
/// are the difference; database files only grow to a fixed number.
#[derive(Clone, Copy, Debug)]
pub struct IdleFds {
    pub before: FdKinds,
    pub after: FdKinds,
}

/// Compares the minutes after `warmup` with the targets: RSS growth, descriptor
/// growth, p99 first against last minutes.
pub fn verdict(rows: &[Row], warmup: u32, what: &str, idle: IdleFds) -> Verdict {
    let not_judged = |why: String| Verdict {
        lines: vec![format!("  ----  not judged: {why}")],
        pass: false,
    };
    let Some(base) = rows.iter().find(|r| r.minute == warmup) else {
        return not_judged(format!(
            "the run ended before the end of warm-up (minute {warmup})"
        ));
    };
    let after: Vec<&Row> = rows.iter().filter(|r| r.minute > warmup).collect();
    let Some(last) = after.last() else {
        return not_judged("no minute after warm-up".into());
    };
    // (None: information only, Some(met): a target.)
    let mut checks: Vec<(Option<bool>, String)> = Vec::new();

    let growth = last.proc.rss as f64 / base.proc.rss as f64 - 1.0;
    let peak = after.iter().map(|r| r.proc.rss).max().unwrap_or(0);
    checks.push((
        Some(growth < MAX_RSS_GROWTH),
        format!(
            "RSS growth after warm-up < {:.0}%: {:.1} MiB at minute {} -> {:.1} MiB at minute {} ({:+.1}%; peak {:.1} MiB)",
            MAX_RSS_GROWTH * 100.0,
            mib(base.proc.rss),
            base.minute,
            mib(last.proc.rss),
            last.minute,
            growth * 100.0,
            mib(peak),
        ),
    ));
    // The second half on its own: a curve that has levelled off grows ~0 here.
    let mid = after[(after.len() - 1) / 2];
    checks.push((
        None,
        format!(
            "RSS over the second half (minute {} -> {}): {:+.1} MiB",
            mid.minute,
            last.minute,
            mib(last.proc.rss) - mib(mid.proc.rss)
        ),
    ));

    let (idle_before, idle_after) = (idle.before, idle.after);
    checks.push((
        Some(idle_after.sockets + idle_after.other <= idle_before.sockets + idle_before.other),
        format!(
            "no descriptor growth: sockets {} and other {} before the load, {} and {} once its connections were closed (database files {} -> {})",
            idle_before.sockets,
            idle_before.other,
            idle_after.sockets,
            idle_after.other,
            idle_before.files,
            idle_after.files
        ),
    ));
    // Under load the count also holds the connections open at that moment.
    let fd_growth = last.fds_min as i64 - base.fds_min as i64;
    let fd_peak = after.iter().map(|r| r.fds_max).max().unwrap_or(0);
    checks.push((
        None,
        format!(
            "descriptors under load (fewest in a minute): {} at minute {} -> {} at minute {} ({fd_growth:+}; most at any sample {fd_peak})",
            base.fds_min, base.minute, last.fds_min, last.minute
        ),
    ));

    let window = P99_WINDOW.min(after.len());
    let first_p99 = median_p99(&after[..window]);
    let last_p99 = median_p99(&after[after.len() - window..]);
    let ratio = ms(last_p99) / ms(first_p99).max(1e-6);
    let stable = ratio <= MAX_P99_RATIO || last_p99 <= first_p99 + P99_SLACK;
    checks.push((
        Some(stable),
        format!(
            "{what} p99 stable (median of the last {window} minutes <= {MAX_P99_RATIO} x, or + {} ms, the first {window} after warm-up): {:.2} ms -> {:.2} ms ({ratio:.2}x)",
            P99_SLACK.as_millis(),
            ms(first_p99),
            ms(last_p99),
        ),
    ));

    Verdict {
        pass: checks.iter().all(|(met, _)| met.unwrap_or(true)),
        lines: checks
            .into_iter()
            .map(|(met, text)| {
                let label = match met {
                    Some(true) => "PASS",
                    Some(false) => "FAIL",
                    None => "----",
                };
                format!("  {label}  {text}")
            })
            .collect(),
    }
}

fn median_p99(rows: &[&Row]) -> Duration {
    let mut p99s: Vec<Duration> = rows.iter().map(|r| r.p99()).collect();
    p99s.sort_unstable();
    p99s[(p99s.len() - 1) / 2]
}

/// `12345.6` -> `"12,346"`.
pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
