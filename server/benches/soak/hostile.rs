//! The hostile scenario's load: connections that never hold a token and send
//! what a fuzzer would (random bytes, plausible segment tables with random
//! sizes, truncated frames, mutated copies of a real `Gateway.redeem` call with
//! bogus tokens), then read whatever comes back until the server answers or
//! closes. Nothing they send can write an op or mint a token.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use capsync_client::ViewerClient;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};

use crate::BenchResult;

/// Longest a hostile connection waits for the server to answer or close. The
/// server's handshake timeout (5 s by default) closes every connection that
/// never redeems, so this is only reached if that fails.
const READ_LIMIT: Duration = Duration::from_secs(15);
/// After an answer, how long a connection waits for more before leaving.
const QUIET: Duration = Duration::from_millis(100);
/// Most bytes one hostile connection sends.
const MAX_SEND: usize = 128 * 1024;
/// How often the probe (a viewer with a real token) reads the share's state.
const PROBE_EVERY: Duration = Duration::from_millis(200);

/// What happened in the current minute; the reporter takes it each minute.
#[derive(Debug, Default)]
pub struct Minute {
    pub connections: u64,
    pub bytes_sent: u64,
    /// The server closed (or reset) the connection.
    pub closed: u64,
    /// The server answered and left the connection open.
    pub answered: u64,
    /// Neither within [`READ_LIMIT`].
    pub silent: u64,
    /// Answers that were a redeem refused after a token check (argon2 done),
    /// or refused by the failed-redeem limit without one.
    pub denied: u64,
    pub rate_limited: u64,
    pub connect_errors: u64,
    /// The probe's `state()` calls.
    pub probe_latencies: Vec<Duration>,
    pub probe_failures: u64,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub minute: RefCell<Minute>,
    pub total_connections: Cell<u64>,
}

impl Stats {
    pub fn take_minute(&self) -> Minute {
        std::mem::take(&mut *self.minute.borrow_mut())
    }

    fn count(&self, update: impl FnOnce(&mut Minute)) {
        update(&mut self.minute.borrow_mut());
    }
}

/// The bytes a real client sends to redeem a token, up to and including the
/// `redeem` call's frame, and where in them the token is.
#[derive(Clone, Debug)]
pub struct RedeemTemplate {
    bytes: Vec<u8>,
    token_at: usize,
    token_len: usize,
    /// A token id that exists, for bogus tokens with a known id and a wrong secret.
    known_id: String,
}

/// Records what `capsync_client` sends to redeem a bogus token of the right
/// shape, through a recording relay in front of `server`.
pub async fn record_redeem(server: SocketAddr, known_id: &str) -> BenchResult<RedeemTemplate> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let relay = listener.local_addr()?;
    let recorder = tokio::task::spawn_local(async move {
        let (mut client, _) = listener.accept().await?;
        let mut upstream = TcpStream::connect(server).await?;
        let mut recorded = Vec::new();
        let (mut from_client, mut from_server) = (vec![0u8; 4096], vec![0u8; 4096]);
        loop {
            tokio::select! {
                n = client.read(&mut from_client) => {
                    let n = n?;
                    if n == 0 { break; }
                    recorded.extend_from_slice(&from_client[..n]);
                    upstream.write_all(&from_client[..n]).await?;
                }
                n = upstream.read(&mut from_server) => {
                    let n = n?;
                    if n == 0 { break; }
                    client.write_all(&from_server[..n]).await?;
                }
            }
        }
        Ok::<_, std::io::Error>(recorded)
    });
    let token = bogus_token(&mut StdRng::seed_from_u64(0), None);
    let conn = capsync_client::connect(relay).await?;
    if conn.redeem(&token).await.is_ok() {
        return Err("a bogus token was accepted".into());
    }
    conn.disconnect().await?;
    let recorded = recorder.await??;
    let token_at = find(&recorded, token.as_bytes()).ok_or("the token is not in the recording")?;
    // Keep the frames up to the one holding the token: the bootstrap and the
    // call. (A `Finish` sent before the answer would cancel the call.)
    let mut end = 0;
    while end <= token_at {
        end += frame_len(&recorded[end..]).ok_or("could not split the recording into frames")?;
    }
    Ok(RedeemTemplate {
        bytes: recorded[..end].to_vec(),
        token_at,
        token_len: token.len(),
        known_id: known_id.to_owned(),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Length of the Cap'n Proto frame at the start of `bytes` (segment table included).
fn frame_len(bytes: &[u8]) -> Option<usize> {
    let word = |i: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(4 * i..4 * i + 4)?.try_into().ok()?) as usize)
    };
    let segments = word(0)? + 1;
    let table = (4 * (1 + segments)).next_multiple_of(8);
    let words: usize = (1..=segments).map(word).sum::<Option<usize>>()?;
    let len = table + 8 * words;
    (len <= bytes.len()).then_some(len)
}

/// A token of the right shape that no one holds: `csviewer_<id>_<secret>`
/// with a random secret, and a random id unless `known_id` is given.
fn bogus_token(rng: &mut StdRng, known_id: Option<&str>) -> String {
    let hex = |rng: &mut StdRng, bytes: usize| -> String {
        (0..bytes)
            .map(|_| format!("{:02x}", rng.random::<u8>()))
            .collect()
    };
    let id = known_id.map_or_else(|| hex(rng, 8), str::to_owned);
    format!("csviewer_{id}_{}", hex(rng, 32))
}

/// What a hostile connection sends.
#[derive(Clone, Copy, Debug)]
enum Kind {
    RandomBytes,
    SegmentTable,
    Truncated,
    MutatedRedeem,
}

/// When a hostile connection leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leave {
    /// As soon as its bytes are sent.
    AtOnce,
    /// When the server has closed, or has sent something and then been quiet
    /// for [`QUIET`]: for a redeem, often before its answer, which cancels it.
    AfterQuiet,
    /// When the answer to its redeem has come (or the server closed).
    AfterAnswer,
}

/// One hostile connection's bytes, and when it leaves.
fn hostile_bytes(rng: &mut StdRng, template: &RedeemTemplate) -> (Kind, Vec<u8>, Leave) {
    let kind = match rng.random_range(0..100) {
        0..20 => Kind::RandomBytes,
        20..45 => Kind::SegmentTable,
        45..60 => Kind::Truncated,
        _ => Kind::MutatedRedeem,
    };
    let mut leave = if rng.random_bool(0.3) {
        Leave::AtOnce
    } else {
        Leave::AfterQuiet
    };
    let bytes = match kind {
        Kind::RandomBytes => {
            let mut bytes = vec![0u8; rng.random_range(1..4096)];
            rng.fill(&mut bytes[..]);
            bytes
        }
        Kind::SegmentTable => segment_table(rng),
        Kind::Truncated => {
            let redeem = redeem_with_bogus_token(rng, template);
            let cut = rng.random_range(1..redeem.len());
            redeem[..cut].to_vec()
        }
        Kind::MutatedRedeem => {
            let mut redeem = redeem_with_bogus_token(rng, template);
            // Half go unchanged apart from the token: a well-formed redeem
            // that the server must check (argon2) and refuse. Half of those
            // wait for the refusal; the others leave while it is checked.
            if rng.random_bool(0.5) {
                for _ in 0..rng.random_range(1..=4) {
                    mutate(rng, &mut redeem);
                }
            } else if rng.random_bool(0.5) {
                leave = Leave::AfterAnswer;
            } else {
                leave = Leave::AfterQuiet;
            }
            redeem
        }
    };
    (kind, bytes, leave)
}

/// A frame header with 1–4 segments (sometimes absurdly many) of random
/// sizes, from empty to past the message limit, then some or all of a random body.
fn segment_table(rng: &mut StdRng) -> Vec<u8> {
    let segments: u32 = if rng.random_bool(0.05) {
        rng.random_range(512..100_000)
    } else {
        rng.random_range(1..=4)
    };
    let mut bytes = (segments - 1).to_le_bytes().to_vec();
    let mut words: u64 = 0;
    for _ in 0..segments.min(4) {
        let size: u32 = match rng.random_range(0..100) {
            0..60 => rng.random_range(0..64),
            60..85 => rng.random_range(64..8192),
            85..95 => rng.random_range(8192..(1 << 21)),
            _ => rng.random(),
        };
        words += u64::from(size);
        bytes.extend_from_slice(&size.to_le_bytes());
    }
    if !bytes.len().is_multiple_of(8) {
        bytes.extend_from_slice(&[0; 4]);
    }
    let whole = usize::try_from(words * 8).unwrap_or(usize::MAX);
    let body = if rng.random_bool(0.5) {
        whole
    } else {
        rng.random_range(0..=whole.min(MAX_SEND))
    }
    .min(MAX_SEND);
    let start = bytes.len();
    bytes.resize(start + body, 0);
    rng.fill(&mut bytes[start..]);
    bytes
}

/// The recorded redeem with its token replaced (same length, so the frame
/// stays well formed): a random id, the id of a real token, or garbage.
fn redeem_with_bogus_token(rng: &mut StdRng, template: &RedeemTemplate) -> Vec<u8> {
    let mut bytes = template.bytes.clone();
    let token = match rng.random_range(0..10) {
        0..5 => bogus_token(rng, None),
        5..9 => bogus_token(rng, Some(&template.known_id)),
        _ => (0..template.token_len)
            .map(|_| char::from(rng.random_range(b'!'..=b'~')))
            .collect(),
    };
    if token.len() == template.token_len {
        bytes[template.token_at..template.token_at + template.token_len]
            .copy_from_slice(token.as_bytes());
    }
    bytes
}

/// One random change: a flipped bit, a random byte or word, bytes cut out, or
/// a stretch repeated.
fn mutate(rng: &mut StdRng, bytes: &mut Vec<u8>) {
    if bytes.is_empty() {
        return;
    }
    let at = rng.random_range(0..bytes.len());
    match rng.random_range(0..5) {
        0 => bytes[at] ^= 1 << rng.random_range(0..8),
        1 => bytes[at] = rng.random(),
        2 => {
            let word: u32 = rng.random();
            for (i, b) in word.to_le_bytes().into_iter().enumerate() {
                if let Some(slot) = bytes.get_mut(at + i) {
                    *slot = b;
                }
            }
        }
        3 => {
            let end = (at + rng.random_range(1..64)).min(bytes.len());
            bytes.drain(at..end);
        }
        _ => {
            let end = (at + rng.random_range(1..64)).min(bytes.len());
            let copy = bytes[at..end].to_vec();
            bytes.splice(at..at, copy);
        }
    }
}

/// One worker: hostile connections one after another until `until`.
pub async fn worker(
    addr: SocketAddr,
    template: Rc<RedeemTemplate>,
    stats: Rc<Stats>,
    until: Instant,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while Instant::now() < until {
        let (_kind, bytes, leave) = hostile_bytes(&mut rng, &template);
        let mut stream = match TcpStream::connect(addr).await {
            Ok(stream) => stream,
            Err(_) => {
                stats.count(|m| m.connect_errors += 1);
                sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        stats
            .total_connections
            .set(stats.total_connections.get() + 1);
        stats.count(|m| {
            m.connections += 1;
            m.bytes_sent += bytes.len() as u64;
        });
        let _ = stream.set_nodelay(true);
        if stream.write_all(&bytes).await.is_err() {
            stats.count(|m| m.closed += 1);
            continue;
        }
        if leave == Leave::AtOnce {
            continue;
        }
        let outcome = read_outcome(&mut stream, leave == Leave::AfterAnswer).await;
        stats.count(|m| match outcome {
            Outcome::Closed => m.closed += 1,
            Outcome::Silent => m.silent += 1,
            Outcome::Answered {
                denied,
                rate_limited,
            } => {
                m.answered += 1;
                m.denied += u64::from(denied);
                m.rate_limited += u64::from(rate_limited);
            }
        });
    }
}

enum Outcome {
    Closed,
    Silent,
    Answered { denied: bool, rate_limited: bool },
}

impl Outcome {
    /// The answer to a redeem has come.
    fn is_refusal(&self) -> bool {
        matches!(self, Self::Answered { denied, rate_limited } if *denied || *rate_limited)
    }
}

/// Reads until the server closes, or answers (a redeem's refusal, if
/// `redeem_answer`; anything, then quiet for [`QUIET`], if not), or [`READ_LIMIT`].
async fn read_outcome(stream: &mut TcpStream, redeem_answer: bool) -> Outcome {
    let deadline = Instant::now() + READ_LIMIT;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 4096];
    let answered = |received: &[u8]| Outcome::Answered {
        denied: find(received, b"token not accepted").is_some(),
        rate_limited: find(received, b"too many failed redeems").is_some(),
    };
    loop {
        let wait = if received.is_empty() || redeem_answer {
            deadline.saturating_duration_since(Instant::now())
        } else {
            QUIET
        };
        match timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Outcome::Closed,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) if received.is_empty() => return Outcome::Silent,
            Err(_) => return answered(&received),
        }
        let outcome = answered(&received);
        if redeem_answer && outcome.is_refusal() {
            return outcome;
        }
    }
}

/// A viewer with a real token, reading the share's state every
/// [`PROBE_EVERY`]: how a legitimate client fares meanwhile.
pub async fn probe(viewer: ViewerClient, stats: Rc<Stats>, until: Instant) {
    while Instant::now() < until {
        let started = Instant::now();
        match timeout(Duration::from_secs(30), viewer.state()).await {
            Ok(Ok(_)) => {
                let latency = started.elapsed();
                stats.count(|m| m.probe_latencies.push(latency));
            }
            _ => stats.count(|m| m.probe_failures += 1),
        }
        sleep(PROBE_EVERY).await;
    }
}
