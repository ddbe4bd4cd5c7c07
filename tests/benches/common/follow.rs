//! A follower of one share for the benchmarks, on a connection of its own: an RPC
//! subscription (`ShareViewer.subscribe` through `LiveOps`, as the CLI's `follow`) or
//! the share's event stream (as the share page; see `event_stream.rs`, which reads only
//! the ops' cursors). Every arrival is checked to continue exactly after the one before
//! (no op missing, repeated or out of order), then handed to the bench.
#![allow(dead_code)]

use std::error::Error;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use capsync_tests::client::{self, Connection, LiveEvent};
use clap::ValueEnum;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::event_stream::{self, next_event, ops_cursors};

/// How a follower follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// `ShareViewer.subscribe` on an RPC connection of its own (`LiveOps`).
    Rpc,
    /// `GET /api/shares/{share}/events` on the HTTP gateway, one connection each.
    Sse,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Self::Rpc => "rpc",
            Self::Sse => "sse",
        }
    }
}

/// Where the server listens.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    pub rpc: SocketAddr,
    pub http: SocketAddr,
}

/// Ops that arrived together (one RPC page, one SSE event): cursors `first..=last`.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub first: u64,
    pub last: u64,
    /// When the follower's stream yielded them.
    pub at: Instant,
}

/// What the bench does with each arrival.
pub type OnArrival = Box<dyn FnMut(Arrival)>;

/// A running follower.
pub struct Follower {
    /// The last cursor seen, for whoever waits for the follower to catch up.
    progress: watch::Receiver<u64>,
    /// Ends only with an error (a gap, a repeat, the stream ending); closing aborts it.
    task: JoinHandle<Result<(), String>>,
    link: Link,
}

/// What is closed with the follower, besides its task.
enum Link {
    Rpc(Connection),
    /// The HTTP connection's own task (hyper drives it apart from the response).
    Sse(JoinHandle<()>),
}

/// Checks that arrivals continue exactly after each other, and passes them on.
struct Sequence {
    /// The cursor the next op must have.
    next: u64,
    progress: watch::Sender<u64>,
    on_arrival: OnArrival,
}

impl Sequence {
    /// Records ops that arrived together; an error names the first one that is not
    /// the next cursor (missing, repeated or out of order).
    fn record(
        &mut self,
        cursors: impl IntoIterator<Item = u64>,
        at: Instant,
    ) -> Result<(), String> {
        let first = self.next;
        for cursor in cursors {
            if cursor != self.next {
                return Err(format!(
                    "a follower got cursor {cursor} where {} was next: an op missing, repeated or out of order",
                    self.next
                ));
            }
            self.next += 1;
        }
        if self.next > first {
            let last = self.next - 1;
            (self.on_arrival)(Arrival { first, last, at });
            self.progress.send_replace(last);
        }
        Ok(())
    }
}

impl Follower {
    /// Follows the share from after `after` with its viewer token; returns once the
    /// server has the follower registered, so every op after `after` reaches it.
    pub async fn start(
        via: Via,
        endpoints: Endpoints,
        share_id: &str,
        viewer_token: &str,
        after: u64,
        on_arrival: OnArrival,
    ) -> Result<Self, Box<dyn Error>> {
        let (progress, watched) = watch::channel(after);
        let sequence = Sequence {
            next: after + 1,
            progress,
            on_arrival,
        };
        let (task, link) = match via {
            Via::Rpc => start_rpc(endpoints.rpc, viewer_token, after, sequence).await?,
            Via::Sse => start_sse(endpoints.http, share_id, viewer_token, after, sequence).await?,
        };
        Ok(Self {
            progress: watched,
            task,
            link,
        })
    }

    /// The follower's task ended: it can only have failed.
    pub fn failed(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until the follower has every op up to `cursor`, or says why it never will.
    pub async fn caught_up(&mut self, cursor: u64, limit: Duration) -> Result<(), Box<dyn Error>> {
        let waited = tokio::time::timeout(limit, self.progress.wait_for(|&seen| seen >= cursor))
            .await
            .map(|seen| seen.map(drop));
        match waited {
            Ok(Ok(())) => Ok(()),
            // The task dropped its sequence: it ended, and says why.
            Ok(Err(_)) => Err(self.why().await.into()),
            Err(_) => Err(format!(
                "a follower was still at cursor {} of {cursor} after {limit:?}",
                *self.progress.borrow()
            )
            .into()),
        }
    }

    /// Why the task ended.
    pub async fn why(&mut self) -> String {
        match (&mut self.task).await {
            Ok(Err(why)) => why,
            Ok(Ok(())) => "a follower stopped without a reason".to_owned(),
            Err(err) => format!("a follower's task failed: {err}"),
        }
    }

    /// Ends the follower and closes its connection.
    pub async fn close(self) -> Result<(), Box<dyn Error>> {
        self.task.abort();
        match self.link {
            Link::Rpc(conn) => conn.disconnect().await?,
            Link::Sse(conn) => conn.abort(),
        }
        Ok(())
    }
}

/// Subscribes after `after`; the subscription is registered when this returns.
async fn start_rpc(
    addr: SocketAddr,
    viewer_token: &str,
    after: u64,
    mut sequence: Sequence,
) -> Result<(JoinHandle<Result<(), String>>, Link), Box<dyn Error>> {
    let conn = client::connect(addr).await?;
    let viewer = conn.redeem(viewer_token).await?.into_viewer()?;
    let mut live = viewer.subscribe(after).await?;
    let task = tokio::task::spawn_local(async move {
        while let Some(event) = live.next().await {
            match event {
                LiveEvent::Ops(ops) => {
                    sequence.record(ops.iter().map(|op| op.cursor.0), Instant::now())?;
                }
                LiveEvent::Ended(ended) => {
                    return Err(format!(
                        "a subscription ended at cursor {}: {} {}",
                        ended.cursor, ended.reason, ended.message
                    ));
                }
            }
        }
        Err("a subscription ended without a reason".to_owned())
    });
    Ok((task, Link::Rpc(conn)))
}

/// Opens the event stream after `after` and reads its `hello`: the server has the
/// follower registered when this returns.
async fn start_sse(
    addr: SocketAddr,
    share_id: &str,
    viewer_token: &str,
    after: u64,
    mut sequence: Sequence,
) -> Result<(JoinHandle<Result<(), String>>, Link), Box<dyn Error>> {
    let mut stream = event_stream::open(addr, share_id, viewer_token, after).await?;
    let task = tokio::task::spawn_local(async move {
        while let Some(event) = next_event(&mut stream.events).await? {
            let at = Instant::now();
            match event.event.as_deref() {
                Some("ops") => sequence.record(ops_cursors(&event)?, at)?,
                Some("presence") => {}
                _ => return Err(format!("the event stream ended with {event:?}")),
            }
        }
        Err("the event stream ended".to_owned())
    });
    Ok((task, Link::Sse(stream.connection)))
}
