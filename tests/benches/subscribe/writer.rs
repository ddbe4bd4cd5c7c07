//! The writing side: shares made for the bench, and agents appending `part.upsert`s to
//! them with one call in flight.

use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

use capsync_tests::client::{self, Batch, Connection, NewShare, OpKind, OpSpec, WriterClient};
use capsync_tests::session_ops;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use crate::BenchResult;

/// Size of each op's JSON payload, as in the append benchmark.
pub const PAYLOAD_BYTES: usize = 300;
/// Share creations in flight at once while setting up.
const SETUP_CONCURRENCY: usize = 64;

/// A share the bench created, and what its agent and its followers redeem.
#[derive(Clone, Debug)]
pub struct Share {
    pub index: usize,
    pub share_id: String,
    pub writer_token: String,
    pub viewer_token: String,
}

/// Creates the shares `indexes` through `connections` agent connections, many at once
/// (a thousand one after the other would take longer than the runs).
pub async fn create_shares(
    addr: SocketAddr,
    agent_token: &str,
    indexes: Range<usize>,
    connections: usize,
) -> BenchResult<Vec<Share>> {
    let mut conns = Vec::new();
    let mut agents = Vec::new();
    for _ in 0..connections.max(1) {
        let conn = client::connect(addr).await?;
        agents.push(conn.redeem(agent_token).await?.into_agent()?);
        conns.push(conn);
    }
    let agents = &agents;
    let mut shares: Vec<Share> = futures::stream::iter(indexes)
        .map(|index| async move {
            let created = agents[index % agents.len()]
                .create_share(NewShare {
                    session_id: session_id(index),
                    project_id: "prj_test".into(),
                    parent_session_id: None,
                    title: format!("subscribe bench {index}"),
                    ..NewShare::default()
                })
                .await?;
            BenchResult::Ok(Share {
                index,
                share_id: created.info.state.share_id,
                writer_token: created.writer_token.token,
                viewer_token: created.viewer_token.token,
            })
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    for conn in conns {
        conn.disconnect().await?;
    }
    shares.sort_by_key(|share| share.index);
    Ok(shares)
}

/// One batch's round trip.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    /// Cursors of the batch's first and last op.
    pub first: u64,
    pub last: u64,
    pub sent: Instant,
    /// When the ack arrived: the writer's view of "committed".
    pub acked: Instant,
}

/// One agent's writer on its own share and connection, one batch in flight.
pub struct BenchWriter {
    pub share: Share,
    conn: Connection,
    writer: WriterClient,
    /// The share's cursor after the last ack.
    pub cursor: u64,
    next_seq: u64,
    workload: Rc<Workload>,
}

impl BenchWriter {
    /// Connects, redeems the share's writer token, and writes the session and the
    /// message every later part belongs to.
    pub async fn open(addr: SocketAddr, share: Share, workload: Rc<Workload>) -> BenchResult<Self> {
        let conn = client::connect(addr).await?;
        let writer = conn.redeem(&share.writer_token).await?.into_writer()?;
        let setup = Batch::new(
            format!("setup-{}", share.index),
            session_ops(&session_id(share.index), &message_id(share.index), 0),
        );
        let ack = writer.append(&setup).await?;
        Ok(Self {
            share,
            conn,
            writer,
            cursor: ack.cursor.0,
            next_seq: 0,
            workload,
        })
    }

    /// Sends one batch of `size` and waits for its ack.
    pub async fn push_one(&mut self, size: usize) -> BenchResult<Ack> {
        let first = self.next_seq;
        self.next_seq += size as u64;
        let index = self.share.index;
        let ops = (first..self.next_seq)
            .map(|seq| self.workload.op(index, seq))
            .collect();
        let batch = Batch::new(format!("b-{index}-{first}"), ops);
        let sent = Instant::now();
        let ack = self.writer.append(&batch).await?;
        let acked = Instant::now();
        if ack.applied() != size || ack.cursor.0 != self.cursor + size as u64 {
            return Err(format!("unexpected ack: {ack:?}").into());
        }
        let first = self.cursor + 1;
        self.cursor = ack.cursor.0;
        Ok(Ack {
            first,
            last: self.cursor,
            sent,
            acked,
        })
    }

    /// Sends `batches` batches of `size`, one after the other.
    pub async fn push(&mut self, size: usize, batches: u64) -> BenchResult<Vec<Ack>> {
        self.push_until(size, batches, None).await
    }

    /// Sends batches of `size`, one after the other: `batches` of them, or fewer if
    /// `deadline` comes first (the last one may be acked after it).
    pub async fn push_until(
        &mut self,
        size: usize,
        batches: u64,
        deadline: Option<Instant>,
    ) -> BenchResult<Vec<Ack>> {
        let mut acks = Vec::new();
        while (acks.len() as u64) < batches && deadline.is_none_or(|end| Instant::now() < end) {
            acks.push(self.push_one(size).await?);
        }
        Ok(acks)
    }

    pub async fn disconnect(self) -> BenchResult<()> {
        Ok(self.conn.disconnect().await?)
    }
}

/// When each op of a stretch of acks was acked, by cursor: what a follower's
/// arrival is measured from.
#[derive(Debug)]
pub struct AckTimes {
    first: u64,
    acked: Vec<Instant>,
}

impl AckTimes {
    /// `acks` must follow each other (one writer, in order).
    pub fn new(acks: &[Ack]) -> Self {
        let first = acks.first().map_or(0, |ack| ack.first);
        let mut acked = Vec::new();
        for ack in acks {
            debug_assert_eq!(ack.first, first + acked.len() as u64);
            acked.extend((ack.first..=ack.last).map(|_| ack.acked));
        }
        Self { first, acked }
    }

    /// The ack time of `cursor`, if it is in the stretch.
    pub fn get(&self, cursor: u64) -> Option<Instant> {
        let offset = usize::try_from(cursor.checked_sub(self.first)?).ok()?;
        self.acked.get(offset).copied()
    }

    /// The cursors of the stretch.
    pub fn range(&self) -> Range<u64> {
        self.first..self.first + self.acked.len() as u64
    }
}

/// Pads every payload to `PAYLOAD_BYTES`.
#[derive(Debug)]
pub struct Workload {
    filler: String,
}

impl Workload {
    pub fn new() -> Self {
        let bare = part_payload(0, 0, "").to_string().len();
        Self {
            filler: "x".repeat(PAYLOAD_BYTES.saturating_sub(bare)),
        }
    }

    fn op(&self, index: usize, seq: u64) -> OpSpec {
        OpSpec::new(
            format!("part:{}", part_id(index, seq)),
            OpKind::PartUpsert,
            part_payload(index, seq, &self.filler),
        )
    }
}

fn session_id(index: usize) -> String {
    format!("ses_sub_{index:04}")
}

fn message_id(index: usize) -> String {
    format!("msg_sub_{index:04}")
}

fn part_id(index: usize, seq: u64) -> String {
    format!("prt_{index:04}_{seq:010}")
}

fn part_payload(index: usize, seq: u64, text: &str) -> serde_json::Value {
    json!({
        "id": part_id(index, seq),
        "messageID": message_id(index),
        "sessionID": session_id(index),
        "type": "text",
        "text": text,
    })
}
