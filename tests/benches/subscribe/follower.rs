//! A follower of one share, over RPC or SSE (`common/follow.rs`), that keeps when each
//! of its ops arrived, for the commit → follower latency.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use futures::StreamExt;

use crate::BenchResult;
use crate::follow::{self, Arrival, Endpoints, Via};
use crate::report::Latencies;
use crate::writer::{AckTimes, Share};

/// Followers set up at once (connect, redeem or request, subscribe).
const SETUP_CONCURRENCY: usize = 64;

/// One share's follower, running on the `LocalSet` until closed.
pub struct Follower {
    arrivals: Rc<RefCell<Vec<Arrival>>>,
    follower: follow::Follower,
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
        let arrivals = Rc::new(RefCell::new(Vec::new()));
        let kept = Rc::clone(&arrivals);
        let follower = follow::Follower::start(
            via,
            endpoints,
            &share.share_id,
            &share.viewer_token,
            after,
            Box::new(move |arrival| kept.borrow_mut().push(arrival)),
        )
        .await?;
        Ok(Self { arrivals, follower })
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
        self.follower.caught_up(cursor, limit).await
    }

    /// Adds the latency of every delivery of an op in `acks`, from its ack to its
    /// arrival here.
    pub fn latencies(&self, acks: &AckTimes, into: &mut Latencies) {
        let range = acks.range();
        if range.is_empty() {
            return;
        }
        for arrival in self.arrivals.borrow().iter() {
            for cursor in arrival.first.max(range.start)..=arrival.last.min(range.end - 1) {
                let Some(acked) = acks.get(cursor) else {
                    continue;
                };
                match arrival.at.checked_duration_since(acked) {
                    Some(latency) => into.push(latency),
                    None => into.push_before_ack(),
                }
            }
        }
    }

    pub async fn close_all(followers: Vec<Self>) -> BenchResult<()> {
        for follower in followers {
            follower.follower.close().await?;
        }
        Ok(())
    }
}
