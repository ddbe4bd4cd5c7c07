//! A follower of one share, over RPC or SSE: when each op arrived, and the proof that
//! every op arrived exactly once and in order.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capsync_tests::client::Connection;
use clap::ValueEnum;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::report::Latencies;
use crate::writer::{AckTimes, Share};
use crate::{BenchResult, follow_rpc, follow_sse};

/// Followers set up at once (connect, redeem or request, subscribe).
const SETUP_CONCURRENCY: usize = 64;

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

/// Ops that arrived together (one RPC page, one SSE event).
#[derive(Clone, Copy, Debug)]
pub struct Page {
    pub first: u64,
    pub last: u64,
    /// When the follower's stream yielded it.
    pub at: Instant,
}

/// What a follower's task feeds: every page, checked to continue exactly after the
/// previous one.
#[derive(Debug)]
pub struct Recorder {
    /// The cursor the next op must have.
    next: u64,
    pages: Rc<RefCell<Vec<Page>>>,
    /// The last cursor seen, for whoever waits for the follower to catch up.
    progress: watch::Sender<u64>,
}

impl Recorder {
    /// Records ops that arrived together; an error names the first one that is not
    /// the next cursor (missing, repeated or out of order).
    pub fn record(
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
            self.pages.borrow_mut().push(Page { first, last, at });
            self.progress.send_replace(last);
        }
        Ok(())
    }
}

/// What is closed with the follower, besides its task.
#[derive(Debug)]
pub enum Link {
    Rpc(Connection),
    /// The HTTP connection's own task (hyper drives it apart from the response).
    Sse(JoinHandle<()>),
}

/// One share's follower, running on the `LocalSet` until closed.
#[derive(Debug)]
pub struct Follower {
    pages: Rc<RefCell<Vec<Page>>>,
    progress: watch::Receiver<u64>,
    /// Ends only with an error (a gap, a repeat, the stream ending); closing aborts it.
    task: JoinHandle<Result<(), String>>,
    link: Link,
}

impl Follower {
    /// Follows `share` from after `after`; returns once the server has the follower
    /// registered, so every op after `after` reaches it.
    pub async fn start(
        via: Via,
        endpoints: Endpoints,
        share: &Share,
        after: u64,
    ) -> BenchResult<Self> {
        let pages = Rc::new(RefCell::new(Vec::new()));
        let (progress, watched) = watch::channel(after);
        let recorder = Recorder {
            next: after + 1,
            pages: pages.clone(),
            progress,
        };
        let (task, link) = match via {
            Via::Rpc => follow_rpc::start(endpoints.rpc, share, after, recorder).await?,
            Via::Sse => follow_sse::start(endpoints.http, share, after, recorder).await?,
        };
        Ok(Self {
            pages,
            progress: watched,
            task,
            link,
        })
    }

    /// Starts one follower per `(share, after)`, many at once.
    pub async fn start_all(
        via: Via,
        endpoints: Endpoints,
        targets: impl IntoIterator<Item = (&Share, u64)>,
    ) -> BenchResult<Vec<Self>> {
        futures::stream::iter(targets)
            .map(|(share, after)| Self::start(via, endpoints, share, after))
            .buffered(SETUP_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Waits until the follower has every op up to `cursor`, or says why it never will.
    pub async fn caught_up(&mut self, cursor: u64, limit: Duration) -> BenchResult<()> {
        let waited = tokio::time::timeout(limit, self.progress.wait_for(|&seen| seen >= cursor))
            .await
            .map(|seen| seen.map(drop));
        match waited {
            Ok(Ok(())) => Ok(()),
            // The task dropped its recorder: it ended, and says why.
            Ok(Err(_)) => match (&mut self.task).await {
                Ok(Err(why)) => Err(why.into()),
                Ok(Ok(())) => Err("a follower stopped without a reason".into()),
                Err(err) => Err(format!("a follower's task failed: {err}").into()),
            },
            Err(_) => Err(format!(
                "a follower was still at cursor {} of {cursor} after {limit:?}",
                *self.progress.borrow()
            )
            .into()),
        }
    }

    /// Adds the latency of every delivery of an op in `acks`, from its ack to its
    /// arrival here.
    pub fn latencies(&self, acks: &AckTimes, into: &mut Latencies) {
        let range = acks.range();
        if range.is_empty() {
            return;
        }
        for page in self.pages.borrow().iter() {
            for cursor in page.first.max(range.start)..=page.last.min(range.end - 1) {
                let Some(acked) = acks.get(cursor) else {
                    continue;
                };
                match page.at.checked_duration_since(acked) {
                    Some(latency) => into.push(latency),
                    None => into.push_before_ack(),
                }
            }
        }
    }

    /// Ends the follower and closes its connection.
    pub async fn close(self) -> BenchResult<()> {
        self.task.abort();
        match self.link {
            Link::Rpc(conn) => conn.disconnect().await?,
            Link::Sse(conn) => conn.abort(),
        }
        Ok(())
    }

    pub async fn close_all(followers: Vec<Self>) -> BenchResult<()> {
        for follower in followers {
            follower.close().await?;
        }
        Ok(())
    }
}
