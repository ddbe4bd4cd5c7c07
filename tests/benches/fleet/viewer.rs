//! A viewer of one agent's share, on a connection of its own: an RPC subscription
//! (`ShareViewer.subscribe` through `LiveOps`, as the CLI's `follow`) or an HTTP event
//! stream (`GET /api/shares/{share}/events?after=N` with the viewer token as a bearer,
//! as the share page). Each checks that every op arrives once and in cursor order, and
//! hands the arrivals to the share's [`Delivery`] for the commit → viewer latency.
//!
//! The connection code follows the subscribe bench's followers; the SSE viewer reads
//! only the ops' cursors, so the bench's own CPU per event stays small.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capsync_tests::client::{self, Connection, LiveEvent};
use clap::ValueEnum;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::BenchResult;
use crate::event_stream::{self, next_event, ops_cursors};
use crate::stats::{Delivery, Stats};

/// How a viewer follows its share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// `ShareViewer.subscribe` on an RPC connection of its own.
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

/// The share a viewer follows, from after which cursor.
#[derive(Clone, Debug)]
pub struct Target {
    pub share_id: String,
    pub viewer_token: String,
    pub after: u64,
}

/// Checks the order of arrivals and passes them on.
struct Recorder {
    /// The cursor the next op must have.
    next: u64,
    delivery: Rc<RefCell<Delivery>>,
    stats: Rc<Stats>,
    /// The last cursor seen, for whoever waits for the viewer to catch up.
    progress: watch::Sender<u64>,
}

impl Recorder {
    /// Records ops that arrived together; an error names the first one that is not the
    /// next cursor (missing, repeated or out of order).
    fn record(
        &mut self,
        cursors: impl IntoIterator<Item = u64>,
        at: Instant,
    ) -> Result<(), String> {
        let first = self.next;
        for cursor in cursors {
            if cursor != self.next {
                return Err(format!(
                    "a viewer got cursor {cursor} where {} was next: an op missing, repeated or out of order",
                    self.next
                ));
            }
            self.next += 1;
        }
        if self.next > first {
            self.delivery
                .borrow_mut()
                .arrived(self.next - first, at, &self.stats);
            self.progress.send_replace(self.next - 1);
        }
        Ok(())
    }
}

/// What is closed with the viewer, besides its task.
enum Link {
    Rpc(Connection),
    /// The HTTP connection's own task (hyper drives it apart from the response).
    Sse(JoinHandle<()>),
}

/// A running viewer.
pub struct Viewer {
    progress: watch::Receiver<u64>,
    /// Ends only with an error (a gap, a repeat, the stream ending).
    task: JoinHandle<Result<(), String>>,
    link: Link,
}

impl Viewer {
    /// Follows `target`; returns once the server has the viewer registered, so every op
    /// after `target.after` reaches it.
    pub async fn start(
        via: Via,
        endpoints: Endpoints,
        target: &Target,
        delivery: Rc<RefCell<Delivery>>,
        stats: Rc<Stats>,
    ) -> BenchResult<Self> {
        let (progress, watched) = watch::channel(target.after);
        let recorder = Recorder {
            next: target.after + 1,
            delivery,
            stats,
            progress,
        };
        let (task, link) = match via {
            Via::Rpc => start_rpc(endpoints.rpc, target, recorder).await?,
            Via::Sse => start_sse(endpoints.http, target, recorder).await?,
        };
        Ok(Self {
            progress: watched,
            task,
            link,
        })
    }

    /// The viewer's task ended: it can only have failed.
    pub fn failed(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until the viewer has every op up to `cursor`, or says why it never will.
    pub async fn caught_up(&mut self, cursor: u64, limit: Duration) -> BenchResult<()> {
        let waited = tokio::time::timeout(limit, self.progress.wait_for(|&seen| seen >= cursor))
            .await
            .map(|seen| seen.map(drop));
        match waited {
            Ok(Ok(())) => Ok(()),
            // The task dropped its recorder: it ended, and says why.
            Ok(Err(_)) => Err(self.why().await.into()),
            Err(_) => Err(format!(
                "a viewer was still at cursor {} of {cursor} after {limit:?}",
                *self.progress.borrow()
            )
            .into()),
        }
    }

    /// Why the task ended.
    pub async fn why(&mut self) -> String {
        match (&mut self.task).await {
            Ok(Err(why)) => why,
            Ok(Ok(())) => "a viewer stopped without a reason".to_owned(),
            Err(err) => format!("a viewer's task failed: {err}"),
        }
    }

    pub async fn close(self) -> BenchResult<()> {
        self.task.abort();
        match self.link {
            Link::Rpc(conn) => conn.disconnect().await?,
            Link::Sse(conn) => conn.abort(),
        }
        Ok(())
    }
}

async fn start_rpc(
    addr: SocketAddr,
    target: &Target,
    mut recorder: Recorder,
) -> BenchResult<(JoinHandle<Result<(), String>>, Link)> {
    let conn = client::connect(addr).await?;
    let viewer = conn.redeem(&target.viewer_token).await?.into_viewer()?;
    let mut live = viewer.subscribe(target.after).await?;
    let task = tokio::task::spawn_local(async move {
        while let Some(event) = live.next().await {
            match event {
                LiveEvent::Ops(ops) => {
                    recorder.record(ops.iter().map(|op| op.cursor.0), Instant::now())?;
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

async fn start_sse(
    addr: SocketAddr,
    target: &Target,
    mut recorder: Recorder,
) -> BenchResult<(JoinHandle<Result<(), String>>, Link)> {
    let mut stream =
        event_stream::open(addr, &target.share_id, &target.viewer_token, target.after).await?;
    let task = tokio::task::spawn_local(async move {
        while let Some(event) = next_event(&mut stream.events).await? {
            let at = Instant::now();
            match event.event.as_deref() {
                Some("ops") => recorder.record(ops_cursors(&event)?, at)?,
                Some("presence") => {}
                _ => return Err(format!("the event stream ended with {event:?}")),
            }
        }
        Err("the event stream ended".to_owned())
    });
    Ok((task, Link::Sse(stream.connection)))
}
