//! An agent: its own RPC connection, its own share, and its op stream sent the way a
//! syncer's outbox sends: one `appendOps` call in flight at most, and each call takes
//! every op that fell due while the previous one was in flight.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capsync_tests::client::{
    self, Ack, Batch, ClientError, Connection, ErrorCode, NewShare, OpSpec, WriterClient,
};
use tokio::task::JoinHandle;

use crate::BenchResult;
use crate::stats::{Delivery, Stats};
use crate::traffic::{DueOp, Traffic};

/// Most ops in one call: well under the server's 1,000, as a syncer's batches are.
const MAX_BATCH_OPS: usize = 500;
/// How long to wait before sending a call refused as `overloaded` again, when the
/// server gave no hint.
const OVERLOADED_RETRY: Duration = Duration::from_millis(50);

/// An agent with its share, connected and set up, not streaming yet.
pub struct Agent {
    pub index: usize,
    /// Held for as long as the agent streams: the writer lives on it.
    _conn: Connection,
    writer: WriterClient,
    pub share_id: String,
    pub viewer_token: String,
    /// The share's cursor after the last ack.
    pub cursor: u64,
    traffic: Traffic,
}

/// What a streaming agent shows the bench between its calls.
#[derive(Debug, Default)]
pub struct Backlog {
    /// Ops due and not acked yet (waiting, or in the call in flight).
    pub ops: Cell<usize>,
    /// When the oldest of them fell due.
    pub oldest: Cell<Option<Instant>>,
}

/// A streaming agent's task and its backlog.
pub struct Streaming {
    pub index: usize,
    pub backlog: Rc<Backlog>,
    /// Ends once the bench stops the agents, with the share's last cursor.
    pub task: JoinHandle<BenchResult<u64>>,
}

/// What every streaming agent shares.
#[derive(Clone)]
pub struct Shared {
    pub stats: Rc<Stats>,
    /// Set when the ramp is over: each agent ends after its call in flight.
    pub stop: Rc<Cell<bool>>,
}

impl Agent {
    /// Connects, redeems the agent token, creates the share and writes its session
    /// (what a syncer does for a new session), all on the agent's own connection.
    pub async fn open(
        addr: SocketAddr,
        agent_token: &str,
        index: usize,
        seed: u64,
        message_every: Duration,
    ) -> BenchResult<Self> {
        let conn = client::connect(addr).await?;
        let agent = conn.redeem(agent_token).await?.into_agent()?;
        let mut traffic = Traffic::new(index, seed, message_every);
        let created = agent
            .create_share(NewShare {
                session_id: traffic.session_id(),
                project_id: "prj_fleet".into(),
                parent_session_id: None,
                title: format!("fleet agent {index}"),
                ..NewShare::default()
            })
            .await?;
        let setup = Batch::new(format!("setup-{index}"), traffic.setup_ops());
        let ack = created.writer.append(&setup).await?;
        check_ack(index, &ack, setup.ops.len(), 0)?;
        Ok(Self {
            index,
            _conn: conn,
            writer: created.writer,
            share_id: created.info.state.share_id,
            viewer_token: created.viewer_token.token,
            cursor: ack.cursor.0,
            traffic,
        })
    }

    /// Starts streaming now, on the `LocalSet`; `delivery` when the share has a viewer.
    pub fn stream(mut self, shared: Shared, delivery: Option<Rc<RefCell<Delivery>>>) -> Streaming {
        let index = self.index;
        let backlog = Rc::new(Backlog::default());
        let shown = backlog.clone();
        let task = tokio::task::spawn_local(async move {
            self.traffic.start(Instant::now());
            let mut pending: Vec<DueOp> = Vec::new();
            while !shared.stop.get() {
                let before = pending.len();
                self.traffic.take_due(Instant::now(), &mut pending);
                for op in &pending[before..] {
                    shared.stats.offered(op.due);
                }
                show(&shown, &pending);
                if pending.is_empty() {
                    tokio::time::sleep_until(self.traffic.next_due().into()).await;
                    continue;
                }
                let take = pending.len().min(MAX_BATCH_OPS);
                let batch: Vec<DueOp> = pending.drain(..take).collect();
                self.send(batch, &shared.stats, delivery.as_deref()).await?;
            }
            Ok(self.cursor)
        });
        Streaming {
            index,
            backlog,
            task,
        }
    }

    /// Sends one call and waits for its ack; `overloaded` is sent again after a pause.
    async fn send(
        &mut self,
        ops: Vec<DueOp>,
        stats: &Stats,
        delivery: Option<&RefCell<Delivery>>,
    ) -> BenchResult<()> {
        let (dues, ops): (Vec<Instant>, Vec<OpSpec>) =
            ops.into_iter().map(|due| (due.due, due.op)).unzip();
        let batch = Batch::new(format!("b-{}", ops[0].op_id), ops);
        loop {
            let sent = Instant::now();
            match self.writer.append(&batch).await {
                Ok(ack) => {
                    let acked = Instant::now();
                    check_ack(self.index, &ack, batch.ops.len(), self.cursor)?;
                    self.cursor = ack.cursor.0;
                    stats.acked(sent, acked, dues.iter().copied());
                    if let Some(delivery) = delivery {
                        delivery.borrow_mut().acked(dues.len() as u64, acked, stats);
                    }
                    return Ok(());
                }
                Err(ClientError::Remote {
                    code: ErrorCode::Overloaded,
                    retry_after,
                    ..
                }) => {
                    stats.overloaded();
                    tokio::time::sleep(retry_after.unwrap_or(OVERLOADED_RETRY)).await;
                }
                Err(err) => {
                    return Err(format!("agent {}: appendOps failed: {err}", self.index).into());
                }
            }
        }
    }
}

/// Every op of the call applied, right after the previous call's: anything else (an op
/// refused, a duplicate, a gap) fails the bench.
fn check_ack(index: usize, ack: &Ack, ops: usize, cursor: u64) -> BenchResult<()> {
    if let Some((op_id, reason, detail)) = ack.rejections().next() {
        return Err(format!("agent {index}: op {op_id} refused ({reason}): {detail}").into());
    }
    if ack.applied() != ops || ack.cursor.0 != cursor + ops as u64 {
        return Err(format!(
            "agent {index}: {ops} ops after cursor {cursor} were acked as {} applied, cursor {}",
            ack.applied(),
            ack.cursor.0
        )
        .into());
    }
    Ok(())
}

fn show(backlog: &Backlog, pending: &[DueOp]) {
    backlog.ops.set(pending.len());
    backlog.oldest.set(pending.first().map(|op| op.due));
}
