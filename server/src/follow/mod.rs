//! Following a share: the ops after a cursor, then each commit as it lands,
//! pulled at the follower's own pace.
//!
//! Both live paths use this: RPC subscriptions (which push to a listener with a
//! bounded window) and the HTTP gateway's Server-Sent Events. Each share with
//! followers on this server has one [`feeds`] entry: its commits' ops (handed over
//! by this node's commits, read once from the ledger for other nodes') go to every
//! follower from a bounded buffer, and only that share's followers are woken. A follower checks its own authority by
//! reading the ledger itself: when it starts, when authority over the share may
//! have changed (a revocation, a deletion, a token revoked anywhere, missed
//! announcements), every `--follow-recheck`, and whenever it is further behind
//! than the buffer reaches. A slow follower simply pulls later, so it can never
//! hold up the writer or other followers, and holds at most one page.

mod buffer;
mod feed;
mod feeds;
mod prepare;

use std::sync::Arc;
use std::time::Duration;

use capsync_shared::Cursor;
use tokio::sync::watch;
use tokio::time::Instant;

pub use buffer::FeedOp;
pub use feeds::{Feeds, FollowSettings};
pub use prepare::{Prepare, Preparer};

use crate::ledger::{Authority, Ledger, LedgerError, LedgerResult};
use feed::{Feed, Head, Preparing};

/// A cursor into one share's ledger that advances as ops are pulled.
pub struct Follower {
    ledger: Ledger,
    auth: Authority,
    cursor: Cursor,
    /// Most ops per pull.
    page: u32,
    /// The share's feed, joined before the first read, so a commit between a
    /// read that found nothing and the wait that follows it is never missed.
    /// `None` for an authority without a share (whose reads all fail).
    feed: Option<(Arc<Feed>, watch::Receiver<Head>)>,
    /// When the authority was last checked, and the feed's check count then.
    checked: Option<(Instant, u64)>,
    /// How often the authority is checked at the latest (`--follow-recheck`), so
    /// an expired token stops the follower in time.
    recheck: Duration,
    /// Held while this follower wants its feed to prepare ops (see [`Prepare`]).
    _preparing: Option<Preparing>,
}

impl Follower {
    /// Follows the share of `auth` (a viewer or writer authority) from after
    /// `after`. Must be called on a tokio runtime.
    pub fn new(feeds: &Feeds, auth: Authority, after: Cursor, page: u32) -> Self {
        let feed = auth.share.as_ref().map(|(share, _)| {
            let joined = feeds.join(share);
            (joined.feed, joined.head)
        });
        Self {
            ledger: feeds.ledger().clone(),
            recheck: feeds.recheck(),
            auth,
            cursor: after,
            page: page.max(1),
            feed,
            checked: None,
            _preparing: None,
        }
    }

    /// This follower wants ops prepared (see [`Prepare`]): those it is handed
    /// from its feed carry [`FeedOp::prepared`] once the feed has started preparing.
    pub fn prepared(mut self) -> Self {
        self._preparing = self.feed.as_ref().map(|(feed, _)| feed.prepare_for());
        self
    }

    /// The cursor of the last op returned (or the starting cursor).
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The next ops after the cursor, in cursor order; waits for a commit when
    /// there are none. Fails when the authority no longer holds (`Revoked`,
    /// `PermissionDenied` once expired, `NotFound` once deleted) or the ledger closes.
    pub async fn next(&mut self) -> LedgerResult<Vec<Arc<FeedOp>>> {
        loop {
            let head = match &mut self.feed {
                Some((_, head)) => *head.borrow_and_update(),
                None => Head::default(),
            };
            if head.closed {
                return Err(LedgerError::Closed);
            }
            if !self.check_due(&head)
                && let Some((feed, _)) = &self.feed
                && let Some(ops) = feed.after(self.cursor, self.page as usize)
            {
                if let Some(last) = ops.last() {
                    self.cursor = last.op.cursor;
                    return Ok(ops);
                }
                // Caught up with the feed.
                self.wait().await;
                continue;
            }
            // Behind the feed's buffer, or time to check: read under our own authority.
            let page = self
                .ledger
                .ops_since(self.auth.clone(), self.cursor, self.page)
                .await?;
            self.checked = Some((Instant::now(), head.checks));
            if let Some(last) = page.ops.last() {
                self.cursor = last.cursor;
                return Ok(page
                    .ops
                    .into_iter()
                    .map(|op| Arc::new(FeedOp::from(op)))
                    .collect());
            }
            self.wait().await;
        }
    }

    /// Whether the next read must check the authority: never checked yet, the
    /// feed asked for it, or `recheck` has passed.
    fn check_due(&self, head: &Head) -> bool {
        self.checked
            .is_none_or(|(at, checks)| checks != head.checks || at.elapsed() >= self.recheck)
    }

    /// Returns once something may have changed for this follower: its feed moved
    /// or asked for a check, or the next periodic check is due.
    async fn wait(&mut self) {
        let due = self
            .checked
            .map_or_else(Instant::now, |(at, _)| at + self.recheck);
        let Some((_, head)) = &mut self.feed else {
            tokio::time::sleep_until(due).await;
            return;
        };
        tokio::select! {
            // The feed lives as long as this follower holds it: its sender stays.
            _ = head.changed() => {}
            () = tokio::time::sleep_until(due) => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod test_share;

#[cfg(test)]
mod tests {
    use super::test_share::TestShare;
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    fn settings() -> FollowSettings {
        FollowSettings::from_config(&Config::default())
    }

    fn feeds(share: &TestShare) -> Feeds {
        Feeds::new(share.ledger.clone(), settings(), Metrics::default())
    }

    #[tokio::test]
    async fn a_follower_below_the_compaction_point_is_told_to_take_a_snapshot() {
        let mut share = TestShare::new().await;
        share.append(5).await;
        let point = share.compact().await;
        assert_eq!(point, Cursor(5));
        share.append(2).await;

        let mut behind = Follower::new(&feeds(&share), share.viewer.clone(), Cursor(4), 10);
        match behind.next().await {
            Err(LedgerError::SnapshotRequired(at)) => assert_eq!(at, point),
            other => panic!("expected SnapshotRequired, got {other:?}"),
        }

        let mut at_point = Follower::new(&feeds(&share), share.viewer.clone(), point, 10);
        let cursors: Vec<u64> = at_point
            .next()
            .await
            .unwrap()
            .iter()
            .map(|op| op.op.cursor.0)
            .collect();
        assert_eq!(cursors, [6, 7]);
    }

    async fn next_cursors(follower: &mut Follower) -> LedgerResult<Vec<u64>> {
        let ops = tokio::time::timeout(Duration::from_secs(10), follower.next())
            .await
            .expect("the follower heard nothing for 10 s")?;
        Ok(ops.iter().map(|op| op.op.cursor.0).collect())
    }

    #[tokio::test]
    async fn followers_of_a_share_get_each_commit_and_its_feed_goes_with_the_last_of_them() {
        let mut share = TestShare::new().await;
        let metrics = Metrics::default();
        let feeds = Feeds::new(share.ledger.clone(), settings(), metrics.clone());
        let followed = || {
            metrics
                .render()
                .lines()
                .find_map(|line| line.strip_prefix("capsync_followed_shares "))
                .map(str::to_owned)
        };
        let mut first = Follower::new(&feeds, share.viewer.clone(), Cursor(0), 10);
        let mut second = Follower::new(&feeds, share.writer.clone(), Cursor(0), 10);
        assert_eq!(feeds.len(), 1, "one feed for the share");
        assert_eq!(followed().as_deref(), Some("1"));
        share.append(3).await;
        assert_eq!(next_cursors(&mut first).await.unwrap(), [1, 2, 3]);
        assert_eq!(next_cursors(&mut second).await.unwrap(), [1, 2, 3]);
        // Both now wait on the feed: each later commit reaches both, in order.
        for round in 0..3u64 {
            share.append(2).await;
            let expected = [4 + 2 * round, 5 + 2 * round];
            let mut got = next_cursors(&mut first).await.unwrap();
            if got.len() < 2 {
                got.extend(next_cursors(&mut first).await.unwrap());
            }
            assert_eq!(got, expected);
            let mut got = next_cursors(&mut second).await.unwrap();
            if got.len() < 2 {
                got.extend(next_cursors(&mut second).await.unwrap());
            }
            assert_eq!(got, expected);
        }

        drop(first);
        drop(second);
        tokio::time::timeout(Duration::from_secs(10), async {
            while !feeds.is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the feed is dropped once nobody follows the share");
        assert_eq!(followed().as_deref(), Some("0"));
    }

    #[tokio::test]
    async fn a_follower_further_behind_than_the_feed_keeps_reads_the_ledger_in_order() {
        let mut share = TestShare::new().await;
        // A buffer that keeps nothing: every op comes from the follower's own reads.
        let settings = FollowSettings {
            buffer_bytes: 1,
            ..settings()
        };
        let feeds = Feeds::new(share.ledger.clone(), settings, Metrics::default());
        let mut follower = Follower::new(&feeds, share.viewer.clone(), Cursor(0), 10);
        share.append(25).await;
        let mut seen = Vec::new();
        while seen.len() < 25 {
            seen.extend(next_cursors(&mut follower).await.unwrap());
        }
        assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn revoking_viewers_ends_a_follower_at_once_with_no_op_after_it() {
        let mut share = TestShare::new().await;
        let feeds = feeds(&share);
        let mut follower = Follower::new(&feeds, share.viewer.clone(), Cursor(0), 10);
        share.append(1).await;
        assert_eq!(next_cursors(&mut follower).await.unwrap(), [1]);
        // Served from the feed from here on, without checking its authority...
        share.append(1).await;
        assert_eq!(next_cursors(&mut follower).await.unwrap(), [2]);
        share.revoke_viewers().await;
        // ...until the revocation: the writer goes on, the viewer gets nothing more.
        share.append(2).await;
        match next_cursors(&mut follower).await {
            Err(LedgerError::Revoked) => {}
            other => panic!("expected Revoked long before --follow-recheck, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn revoking_a_followers_token_ends_it_at_once() {
        let mut share = TestShare::new().await;
        let feeds = feeds(&share);
        let mut follower = Follower::new(&feeds, share.viewer.clone(), Cursor(0), 10);
        share.append(1).await;
        assert_eq!(next_cursors(&mut follower).await.unwrap(), [1]);
        share
            .ledger
            .revoke_token(share.admin.clone(), share.viewer.token_id.clone())
            .await
            .unwrap();
        share.append(1).await;
        match next_cursors(&mut follower).await {
            Err(LedgerError::Revoked | LedgerError::PermissionDenied) => {}
            other => panic!("expected the revoked token to stop the follower, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_served_from_the_feed_still_checks_every_recheck() {
        let mut share = TestShare::new().await;
        let recheck = Duration::from_secs(15);
        let feeds = Feeds::new(
            share.ledger.clone(),
            FollowSettings {
                recheck,
                ..settings()
            },
            Metrics::default(),
        );
        let mut follower = Follower::new(&feeds, share.viewer.clone(), Cursor(0), 10);
        share.append(1).await;
        assert_eq!(next_cursors(&mut follower).await.unwrap(), [1]);
        let checked = follower.checked.expect("the first read checks").0;
        share.append(1).await;
        assert_eq!(next_cursors(&mut follower).await.unwrap(), [2]);
        assert_eq!(
            follower.checked.unwrap().0,
            checked,
            "from the feed: no check"
        );
        tokio::time::advance(recheck).await;
        share.append(1).await;
        assert_eq!(next_cursors(&mut follower).await.unwrap(), [3]);
        assert!(
            follower.checked.unwrap().0 > checked,
            "a busy follower checks its authority once --follow-recheck has passed"
        );
    }
}
