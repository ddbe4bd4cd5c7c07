//! The normal scenario's load: agents appending to their shares, viewers
//! following them live (RPC subscriptions and HTTP Server-Sent Events,
//! reconnecting now and then), and short connections that redeem, make one
//! call and leave. Everything runs on one `LocalSet`; each part counts what it
//! did in the current minute's [`Stats`] and checks what it saw as it goes.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use capsync_client::{
    Batch, Connection, LiveEvent, NewShare, OpKind, OpSpec, ViewerClient, WriterClient,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::BenchResult;

/// A message holds this many parts before the agent starts the next one.
const PARTS_PER_MESSAGE: u32 = 10;
/// Each part is created empty and then streamed in this many text deltas.
const DELTAS_PER_PART: u32 = 20;
/// Text per delta: a few tokens' worth, as an agent streams them.
const DELTA_TEXT: &str = "the quick brown fox jumps over the lazy dog, streaming token by token; ";
/// A viewer stays connected this long (picked at random), then reconnects.
const VIEWER_LIFETIME_SECS: std::ops::Range<u64> = 20..120;
/// Churning connections in progress at once; more are skipped (and counted).
const MAX_CHURN_IN_FLIGHT: usize = 32;
/// Freshly minted viewer tokens kept for churning connections to redeem once.
const FRESH_TOKENS: usize = 16;
/// Longest any single step of a viewer or churning connection may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Problems described in full; after that they are only counted.
const PROBLEMS_SHOWN: usize = 20;

/// What happened in the current minute; the reporter takes it each minute.
#[derive(Debug, Default)]
pub struct Minute {
    pub append_latencies: Vec<Duration>,
    pub ops_acked: u64,
    pub rpc_delivered: u64,
    pub sse_delivered: u64,
    pub viewer_reconnects: u64,
    /// Subscriptions the server ended (lagged and the like) rather than the viewer.
    pub viewer_ended: u64,
    pub churn_ok: u64,
    pub churn_failed: u64,
    pub churn_skipped: u64,
    pub churn_latencies: Vec<Duration>,
}

/// Shared by every task of the run.
#[derive(Debug, Default)]
pub struct Stats {
    pub minute: RefCell<Minute>,
    /// Wrong results (an op not applied, a cursor out of order, a failed call):
    /// a run with any is not a measurement of a working server.
    problems: Cell<u64>,
    problem_texts: RefCell<Vec<String>>,
}

impl Stats {
    pub fn take_minute(&self) -> Minute {
        std::mem::take(&mut *self.minute.borrow_mut())
    }

    fn count(&self, update: impl FnOnce(&mut Minute)) {
        update(&mut self.minute.borrow_mut());
    }

    pub fn problem(&self, text: String) {
        self.problems.set(self.problems.get() + 1);
        let mut texts = self.problem_texts.borrow_mut();
        if texts.len() < PROBLEMS_SHOWN {
            eprintln!("problem: {text}");
            texts.push(text);
        }
    }

    pub fn problems(&self) -> u64 {
        self.problems.get()
    }
}

// ---------------------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------------------

/// How an agent sends: as fast as acks come back, or one batch per tick.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    FlatOut,
    Every(Duration),
}

/// The tokens of one agent's share, for the viewers and churning connections.
#[derive(Clone, Debug)]
pub struct ShareTokens {
    pub share_id: String,
    pub writer: String,
    pub viewer: String,
}

/// One agent: its own connection (kept for the whole run, as an agent's is)
/// and share, one batch in flight.
pub struct Agent {
    _conn: Connection,
    writer: WriterClient,
    pub tokens: ShareTokens,
    script: Script,
    /// Ops the server acked as applied, setup included: the share's cursor.
    pub acked: u64,
    batches: u64,
}

impl Agent {
    /// Connects, creates the share and writes its session.
    pub async fn start(addr: SocketAddr, agent_token: &str, index: usize) -> BenchResult<Self> {
        let conn = capsync_client::connect(addr).await?;
        let agent = conn.redeem(agent_token).await?.into_agent()?;
        let script = Script::new(index);
        let created = agent
            .create_share(NewShare {
                session_id: script.session.clone(),
                project_id: "prj_soak".into(),
                parent_session_id: None,
                title: format!("soak agent {index}"),
                ..NewShare::default()
            })
            .await?;
        let setup = Batch::new(
            format!("a{index}-setup"),
            vec![OpSpec::new(
                format!("a{index}-session"),
                OpKind::SessionUpsert,
                json!({"id": script.session, "title": "soak", "projectID": "prj_soak"}),
            )],
        );
        let ack = created.writer.append(&setup).await?;
        if ack.applied() != 1 {
            return Err(format!("agent {index}: the session op was not applied").into());
        }
        Ok(Self {
            _conn: conn,
            writer: created.writer,
            tokens: ShareTokens {
                share_id: created.info.state.share_id.clone(),
                writer: created.writer_token.token,
                viewer: created.viewer_token.token,
            },
            script,
            acked: 1,
            batches: 0,
        })
    }

    /// Appends batches of `size` ops until `until`, at `pace`, checking every ack.
    pub async fn run(&mut self, pace: Pace, size: usize, until: Instant, stats: &Stats) {
        let mut ticker = match pace {
            Pace::FlatOut => None,
            Pace::Every(period) => {
                // Agents start spread over one period, not all on the same tick.
                let offset = period.mul_f64(self.script.agent as f64 / 64.0 % 1.0);
                let mut ticker = tokio::time::interval_at(Instant::now() + offset, period);
                // Behind schedule, an agent sends its next batch at once and
                // then keeps the period: no catch-up burst.
                ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
                Some(ticker)
            }
        };
        while Instant::now() < until {
            if let Some(ticker) = &mut ticker {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = sleep_until(until) => break,
                }
            }
            self.batches += 1;
            let ops: Vec<OpSpec> = (0..size).map(|_| self.script.next_op()).collect();
            let agent = self.script.agent;
            let batch = Batch::new(format!("a{agent}-b{}", self.batches), ops);
            let sent = Instant::now();
            match self.writer.append(&batch).await {
                Ok(ack) if ack.applied() == size => {
                    let latency = sent.elapsed();
                    self.acked += size as u64;
                    stats.count(|m| {
                        m.append_latencies.push(latency);
                        m.ops_acked += size as u64;
                    });
                }
                Ok(ack) => {
                    let why: Vec<String> = ack
                        .rejections()
                        .take(2)
                        .map(|(op, reason, detail)| format!("{op}: {reason} ({detail})"))
                        .collect();
                    self.acked += ack.applied() as u64;
                    stats.problem(format!(
                        "agent {agent}: {} of {size} ops applied: {}",
                        ack.applied(),
                        why.join("; ")
                    ));
                }
                Err(err) => stats.problem(format!("agent {agent}: append failed: {err}")),
            }
        }
    }

    /// The share's cursor as the server reports it.
    pub async fn server_cursor(&self) -> BenchResult<u64> {
        Ok(self.writer.state().await?.cursor)
    }
}

/// An agent's session as ops: messages of parts, each part created empty and
/// then streamed in text deltas. Op ids are unique across the run.
struct Script {
    agent: usize,
    session: String,
    seq: u64,
    message: u64,
    part: u64,
    /// Parts of the current message so far.
    parts_in_message: u32,
    /// Deltas still to come for the current part; `None` before its upsert.
    deltas_left: Option<u32>,
}

impl Script {
    fn new(agent: usize) -> Self {
        Self {
            agent,
            session: format!("ses_soak_{agent:03}"),
            seq: 0,
            message: 0,
            part: 0,
            parts_in_message: PARTS_PER_MESSAGE,
            deltas_left: None,
        }
    }

    fn message_id(&self) -> String {
        format!("msg_{:03}_{:08}", self.agent, self.message)
    }

    fn part_id(&self) -> String {
        format!("prt_{:03}_{:010}", self.agent, self.part)
    }

    fn next_op(&mut self) -> OpSpec {
        self.seq += 1;
        let op_id = format!("a{}-{}", self.agent, self.seq);
        match self.deltas_left {
            Some(left) if left > 0 => {
                self.deltas_left = Some(left - 1);
                if left == 1 {
                    self.deltas_left = None;
                    self.parts_in_message += 1;
                }
                OpSpec::new(
                    op_id,
                    OpKind::PartDelta,
                    json!({
                        "partID": self.part_id(),
                        "messageID": self.message_id(),
                        "sessionID": self.session,
                        "field": "text",
                        "delta": DELTA_TEXT,
                    }),
                )
            }
            _ if self.parts_in_message >= PARTS_PER_MESSAGE => {
                self.message += 1;
                self.parts_in_message = 0;
                OpSpec::new(
                    op_id,
                    OpKind::MessageUpsert,
                    json!({
                        "id": self.message_id(),
                        "sessionID": self.session,
                        "role": "assistant",
                        "time": {"created": capsync_shared::now_millis()},
                    }),
                )
            }
            _ => {
                self.part += 1;
                self.deltas_left = Some(DELTAS_PER_PART);
                OpSpec::new(
                    op_id,
                    OpKind::PartUpsert,
                    json!({
                        "id": self.part_id(),
                        "messageID": self.message_id(),
                        "sessionID": self.session,
                        "type": "text",
                        "text": "",
                    }),
                )
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Viewers
// ---------------------------------------------------------------------------------------

/// Where one viewer has got to: the cursor of the last op it saw.
#[derive(Debug, Default)]
pub struct ViewerSlot {
    pub share: usize,
    pub cursor: Cell<u64>,
}

impl ViewerSlot {
    /// Takes the ops a viewer just saw, which must continue exactly after its cursor.
    fn advance(&self, cursors: impl Iterator<Item = u64>, via: &str, stats: &Stats) -> u64 {
        let mut seen = 0;
        for cursor in cursors {
            let expected = self.cursor.get() + 1;
            if cursor != expected {
                stats.problem(format!(
                    "{via} viewer of share {}: cursor {cursor} after {} (expected {expected})",
                    self.share,
                    self.cursor.get()
                ));
            }
            self.cursor.set(cursor.max(self.cursor.get()));
            seen += 1;
        }
        seen
    }
}

/// An RPC viewer: subscribes through [`ViewerClient::subscribe`], stays a
/// while, disconnects and subscribes again from its cursor on a new connection.
pub async fn rpc_viewer(
    addr: SocketAddr,
    token: String,
    slot: Rc<ViewerSlot>,
    stats: Rc<Stats>,
    stop: CancellationToken,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.is_cancelled() {
        let lifetime = Duration::from_secs(rng.random_range(VIEWER_LIFETIME_SECS));
        let session = rpc_viewer_session(addr, &token, &slot, &stats, &stop, lifetime);
        if let Err(err) = session.await {
            stats.problem(format!("rpc viewer of share {}: {err}", slot.share));
            sleep(Duration::from_secs(1)).await;
        }
        stats.count(|m| m.viewer_reconnects += 1);
    }
}

async fn rpc_viewer_session(
    addr: SocketAddr,
    token: &str,
    slot: &ViewerSlot,
    stats: &Stats,
    stop: &CancellationToken,
    lifetime: Duration,
) -> BenchResult<()> {
    let conn = timed(capsync_client::connect(addr)).await??;
    let viewer = timed(conn.redeem(token)).await??.into_viewer()?;
    let mut live = timed(viewer.subscribe(slot.cursor.get())).await??;
    let deadline = Instant::now() + lifetime;
    loop {
        tokio::select! {
            event = live.next() => match event {
                Some(LiveEvent::Ops(ops)) => {
                    let seen = slot.advance(ops.iter().map(|op| op.cursor.0), "rpc", stats);
                    stats.count(|m| m.rpc_delivered += seen);
                }
                Some(LiveEvent::Ended(ended)) => {
                    stats.count(|m| m.viewer_ended += 1);
                    eprintln!("note: rpc subscription of share {} ended: {} ({})",
                        slot.share, ended.reason, ended.message);
                    break;
                }
                None => break,
            },
            () = sleep_until(deadline) => break,
            () = stop.cancelled() => break,
        }
    }
    drop(live);
    timed(conn.disconnect()).await??;
    Ok(())
}

/// An HTTP viewer: `GET /api/shares/{id}/events` with the viewer token as a
/// bearer token, read as Server-Sent Events, resumed with `Last-Event-ID`.
pub async fn sse_viewer(
    http: SocketAddr,
    tokens: ShareTokens,
    slot: Rc<ViewerSlot>,
    stats: Rc<Stats>,
    stop: CancellationToken,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.is_cancelled() {
        let lifetime = Duration::from_secs(rng.random_range(VIEWER_LIFETIME_SECS));
        let deadline = Instant::now() + lifetime;
        let session = sse_session(http, &tokens, &slot, &stats, &stop, deadline);
        if let Err(err) = session.await {
            stats.problem(format!("sse viewer of share {}: {err}", slot.share));
            sleep(Duration::from_secs(1)).await;
        }
        stats.count(|m| m.viewer_reconnects += 1);
    }
}

async fn sse_session(
    http: SocketAddr,
    tokens: &ShareTokens,
    slot: &ViewerSlot,
    stats: &Stats,
    stop: &CancellationToken,
    deadline: Instant,
) -> BenchResult<()> {
    let mut stream = timed(TcpStream::connect(http)).await??;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /api/shares/{}/events HTTP/1.1\r\nHost: capsync\r\nAccept: text/event-stream\r\n\
         Authorization: Bearer {}\r\nLast-Event-ID: {}\r\n\r\n",
        tokens.share_id,
        tokens.viewer,
        slot.cursor.get()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut reader = BufReader::new(stream);
    let chunked = timed(read_head(&mut reader)).await??;
    let mut text = String::new();
    loop {
        let chunk = tokio::select! {
            chunk = read_body_chunk(&mut reader, chunked) => chunk?,
            () = sleep_until(deadline) => return Ok(()),
            () = stop.cancelled() => return Ok(()),
        };
        let Some(chunk) = chunk else {
            return Err("the server ended the event stream".into());
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            sse_event(&event, slot, stats)?;
        }
    }
}

/// Reads the status line and headers; true if the body is chunked.
async fn read_head(reader: &mut BufReader<TcpStream>) -> BenchResult<bool> {
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let status = line.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("events answered {:?}", line.trim()).into());
    }
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err("connection closed in the response head".into());
        }
        let header = line.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            return Ok(chunked);
        }
        chunked |= header.starts_with("transfer-encoding:") && header.contains("chunked");
    }
}

/// The next piece of the body: one chunk, or what one read gives; `None` at its end.
async fn read_body_chunk(
    reader: &mut BufReader<TcpStream>,
    chunked: bool,
) -> BenchResult<Option<Vec<u8>>> {
    if !chunked {
        let mut buf = vec![0u8; 16 * 1024];
        let n = reader.read(&mut buf).await?;
        buf.truncate(n);
        return Ok((n > 0).then_some(buf));
    }
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let size_text = line.trim().split(';').next().unwrap_or("");
    let size = usize::from_str_radix(size_text, 16)
        .map_err(|_| format!("bad chunk size line {:?}", line.trim()))?;
    if size == 0 {
        return Ok(None);
    }
    let mut chunk = vec![0u8; size + 2];
    reader.read_exact(&mut chunk).await?;
    chunk.truncate(size);
    Ok(Some(chunk))
}

/// One Server-Sent Event: `ops` must continue exactly after the viewer's cursor.
fn sse_event(event: &str, slot: &ViewerSlot, stats: &Stats) -> BenchResult<()> {
    let mut name = "message";
    let mut data = String::new();
    for line in event.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            name = value.trim();
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    match name {
        "ops" => {
            let value: Value = serde_json::from_str(&data)?;
            let cursors = value["ops"]
                .as_array()
                .ok_or("an ops event without ops")?
                .iter()
                .map(|op| op["cursor"].as_u64().unwrap_or(0));
            let seen = slot.advance(cursors, "sse", stats);
            stats.count(|m| m.sse_delivered += seen);
        }
        "revoked" | "snapshotRequired" => {
            return Err(format!("the stream ended with {name}: {data}").into());
        }
        // hello, presence, and keep-alive comments.
        _ => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Churning connections
// ---------------------------------------------------------------------------------------

/// Starts `per_second` short connections a second until `stop`: each
/// redeems a token, makes one call and disconnects (or one HTTP request).
pub async fn churn(
    addr: SocketAddr,
    http: SocketAddr,
    shares: Rc<Vec<ShareTokens>>,
    per_second: f64,
    stats: Rc<Stats>,
    stop: CancellationToken,
    seed: u64,
) {
    if per_second <= 0.0 {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let in_flight = Rc::new(Cell::new(0usize));
    let fresh: Rc<RefCell<VecDeque<(usize, String)>>> = Rc::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => break,
        }
        n += 1;
        if in_flight.get() >= MAX_CHURN_IN_FLIGHT {
            stats.count(|m| m.churn_skipped += 1);
            continue;
        }
        let share = rng.random_range(0..shares.len());
        let call = match n % 10 {
            0 => Call::MintViewer,
            1 if !fresh.borrow().is_empty() => Call::FreshViewerState,
            1..=3 => Call::ViewerState,
            4 | 5 => Call::ViewerOpsSince,
            6 => Call::WriterState,
            _ => Call::HttpOps,
        };
        in_flight.set(in_flight.get() + 1);
        let (shares, stats, in_flight, fresh) = (
            shares.clone(),
            stats.clone(),
            in_flight.clone(),
            fresh.clone(),
        );
        tokio::task::spawn_local(async move {
            let started = Instant::now();
            let done = timed(one_churn(addr, http, &shares, share, call, &fresh)).await;
            let latency = started.elapsed();
            match done {
                Ok(Ok(())) => stats.count(|m| {
                    m.churn_ok += 1;
                    m.churn_latencies.push(latency);
                }),
                Ok(Err(err)) => {
                    stats.count(|m| m.churn_failed += 1);
                    stats.problem(format!("churn {call:?} on share {share}: {err}"));
                }
                Err(_) => {
                    stats.count(|m| m.churn_failed += 1);
                    stats.problem(format!("churn {call:?} on share {share}: timed out"));
                }
            }
            in_flight.set(in_flight.get() - 1);
        });
    }
    // Let the ones in progress finish, so none is cut off by the server's shutdown.
    while in_flight.get() > 0 {
        sleep(Duration::from_millis(50)).await;
    }
}

/// What one churning connection does.
#[derive(Clone, Copy, Debug)]
enum Call {
    /// Redeem a viewer token, read the share's state.
    ViewerState,
    /// The same with a viewer token minted moments ago: its first redeem costs argon2.
    FreshViewerState,
    /// Redeem a viewer token, read the last ops.
    ViewerOpsSince,
    /// Redeem a writer token, read the share's state.
    WriterState,
    /// Redeem a writer token, mint a viewer token (a new share link).
    MintViewer,
    /// `GET /api/shares/{id}/ops` with the viewer token, on a new HTTP connection.
    HttpOps,
}

async fn one_churn(
    addr: SocketAddr,
    http: SocketAddr,
    shares: &[ShareTokens],
    share: usize,
    call: Call,
    fresh: &RefCell<VecDeque<(usize, String)>>,
) -> BenchResult<()> {
    let tokens = &shares[share];
    if let Call::HttpOps = call {
        return http_ops(http, tokens).await;
    }
    let conn = capsync_client::connect(addr).await?;
    match call {
        Call::ViewerState => {
            viewer(&conn, &tokens.viewer).await?.state().await?;
        }
        Call::FreshViewerState => {
            let token = fresh.borrow_mut().pop_front();
            let token = token.map_or_else(|| tokens.viewer.clone(), |(_, token)| token);
            viewer(&conn, &token).await?.state().await?;
        }
        Call::ViewerOpsSince => {
            let viewer = viewer(&conn, &tokens.viewer).await?;
            let cursor = viewer.state_at_redeem().cursor;
            let page = viewer.ops_since(cursor.saturating_sub(20), 20).await?;
            if page
                .ops
                .first()
                .is_some_and(|op| op.cursor != cursor.saturating_sub(20) + 1)
            {
                return Err("ops_since did not start right after the cursor asked for".into());
            }
        }
        Call::WriterState => {
            let writer = conn.redeem(&tokens.writer).await?.into_writer()?;
            writer.state().await?;
        }
        Call::MintViewer => {
            let writer = conn.redeem(&tokens.writer).await?.into_writer()?;
            let minted = writer.mint_viewer(None).await?;
            let mut fresh = fresh.borrow_mut();
            fresh.push_back((share, minted.token));
            if fresh.len() > FRESH_TOKENS {
                fresh.pop_front();
            }
        }
        Call::HttpOps => unreachable!("answered above"),
    }
    conn.disconnect().await?;
    Ok(())
}

async fn viewer(conn: &Connection, token: &str) -> BenchResult<ViewerClient> {
    Ok(conn.redeem(token).await?.into_viewer()?)
}

/// The first ops of a share over HTTP, on a connection of its own.
async fn http_ops(http: SocketAddr, tokens: &ShareTokens) -> BenchResult<()> {
    let mut stream = TcpStream::connect(http).await?;
    let request = format!(
        "GET /api/shares/{}/ops?limit=20 HTTP/1.1\r\nHost: capsync\r\n\
         Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
        tokens.share_id, tokens.viewer
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    match text.split(' ').nth(1) {
        Some("200") => Ok(()),
        _ => Err(format!("ops answered {:?}", text.lines().next().unwrap_or("")).into()),
    }
}

/// `future` with [`STEP_TIMEOUT`], so a stuck step is reported, not waited for.
async fn timed<F: std::future::Future>(
    future: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::time::timeout(STEP_TIMEOUT, future).await
}
