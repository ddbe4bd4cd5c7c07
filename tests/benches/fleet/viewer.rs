//! A viewer of one agent's share, on a connection of its own, over RPC or SSE
//! (`common/follow.rs`, which checks that every op arrives once and in cursor order);
//! it hands the arrivals to the share's [`Delivery`] for the commit → viewer latency.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use crate::BenchResult;
use crate::follow::{self, Endpoints, Via};
use crate::stats::{Delivery, Stats};

/// The share a viewer follows, from after which cursor.
#[derive(Clone, Debug)]
pub struct Target {
    pub share_id: String,
    pub viewer_token: String,
    pub after: u64,
}

/// A running viewer.
pub struct Viewer(follow::Follower);

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
        let follower = follow::Follower::start(
            via,
            endpoints,
            &target.share_id,
            &target.viewer_token,
            target.after,
            Box::new(move |arrival| {
                let ops = arrival.last - arrival.first + 1;
                delivery.borrow_mut().arrived(ops, arrival.at, &stats);
            }),
        )
        .await?;
        Ok(Self(follower))
    }

    /// The viewer's task ended: it can only have failed.
    pub fn failed(&self) -> bool {
        self.0.failed()
    }

    /// Waits until the viewer has every op up to `cursor`, or says why it never will.
    pub async fn caught_up(&mut self, cursor: u64, limit: Duration) -> BenchResult<()> {
        self.0.caught_up(cursor, limit).await
    }

    /// Why the task ended.
    pub async fn why(&mut self) -> String {
        self.0.why().await
    }

    pub async fn close(self) -> BenchResult<()> {
        self.0.close().await
    }
}
