//! Numbers every scenario prints the same way: latency percentiles, medians of paired
//! ratios, verdicts against the targets.

use std::time::Duration;

/// Issue 14's throughput target: a writer with followers makes at least this much of
/// its throughput without them.
pub const TARGET_RATIO: f64 = 0.9;
/// Issue 14's latency target: commit to follower, p99, with 100 followers.
pub const TARGET_P99: Duration = Duration::from_millis(20);

/// Latency samples, kept as whole microseconds: a fan-out run collects millions, and
/// `u32` halves the memory of `u64` for a range (over an hour) no run comes near.
#[derive(Debug, Default)]
pub struct Latencies {
    micros: Vec<u32>,
    /// Deliveries that reached a follower before the writer had its ack (counted as 0):
    /// both leave the server after the commit, in no fixed order.
    pub before_ack: usize,
}

impl Latencies {
    pub fn push(&mut self, latency: Duration) {
        self.micros
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
    }

    /// A delivery that beat the ack: 0, and counted apart.
    pub fn push_before_ack(&mut self) {
        self.before_ack += 1;
        self.micros.push(0);
    }

    pub fn append(&mut self, other: &mut Self) {
        self.micros.append(&mut other.micros);
        self.before_ack += other.before_ack;
    }

    pub fn len(&self) -> usize {
        self.micros.len()
    }

    /// Sorts in place (once; a sorted vector sorts again in linear time).
    pub fn summary(&mut self) -> Summary {
        self.micros.sort_unstable();
        let at = |p: f64| {
            if self.micros.is_empty() {
                return Duration::ZERO;
            }
            // Nearest rank.
            let rank = ((p / 100.0) * self.micros.len() as f64).ceil() as usize;
            micros(self.micros[rank.clamp(1, self.micros.len()) - 1])
        };
        Summary {
            count: self.micros.len(),
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: self.micros.last().copied().map_or(Duration::ZERO, micros),
            before_ack: self.before_ack,
        }
    }
}

fn micros(us: u32) -> Duration {
    Duration::from_micros(u64::from(us))
}

/// Percentiles of a set of [`Latencies`].
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub count: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub before_ack: usize,
}

impl Summary {
    /// `p50 1.23 ms, p99 4.56 ms`.
    pub fn short(&self) -> String {
        format!("p50 {:.2} ms, p99 {:.2} ms", ms(self.p50), ms(self.p99))
    }

    /// Every percentile, with the share that beat the ack.
    pub fn long(&self) -> String {
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({:.1}% before the ack, counted as 0)",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max),
            100.0 * self.before_ack as f64 / self.count.max(1) as f64
        )
    }
}

/// Which run of pair `rep` (from 1) goes first, `false` being the run without
/// followers: it alternates, so neither always writes into the bigger database or
/// always comes right after the previous pair's teardown.
pub fn order(rep: u32) -> [bool; 2] {
    if rep % 2 == 1 {
        [false, true]
    } else {
        [true, false]
    }
}

/// Throughputs of back-to-back runs without and with followers.
#[derive(Debug, Default)]
pub struct Pairs {
    alone: Vec<f64>,
    with: Vec<f64>,
}

impl Pairs {
    pub fn push(&mut self, alone: f64, with: f64) {
        self.alone.push(alone);
        self.with.push(with);
    }

    pub fn median_alone(&self) -> f64 {
        median(&self.alone)
    }

    pub fn median_with(&self) -> f64 {
        median(&self.with)
    }

    /// Each pair's ratio compares two runs that saw the same stretch of a noisy
    /// machine; their median is the verdict.
    pub fn ratios(&self) -> Vec<f64> {
        self.alone
            .iter()
            .zip(&self.with)
            .map(|(alone, with)| with / alone)
            .collect()
    }

    pub fn median_ratio(&self) -> f64 {
        median(&self.ratios())
    }

    /// `0.98, 1.02, 0.95`.
    pub fn ratio_list(&self) -> String {
        self.ratios()
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// One target, what was measured against it, and whether it holds.
#[derive(Debug)]
pub struct Verdict {
    pub target: String,
    pub measured: String,
    pub pass: bool,
}

impl Verdict {
    pub fn new(target: impl Into<String>, measured: impl Into<String>, pass: bool) -> Self {
        Self {
            target: target.into(),
            measured: measured.into(),
            pass,
        }
    }

    pub fn word(&self) -> &'static str {
        pass_fail(self.pass)
    }
}

pub fn pass_fail(pass: bool) -> &'static str {
    if pass { "PASS" } else { "FAIL" }
}

/// The verdicts of the whole run together, last, so they can be read at a glance.
pub fn print_verdicts(verdicts: &[Verdict]) {
    if verdicts.is_empty() {
        return;
    }
    println!("Verdicts:");
    let width = verdicts.iter().map(|v| v.target.len()).max().unwrap_or(0);
    for verdict in verdicts {
        println!(
            "  {:<width$}  {}  {}",
            verdict.target,
            verdict.word(),
            verdict.measured
        );
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// 12345.6 -> "12,346".
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
