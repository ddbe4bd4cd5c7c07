//! The server's feeds: one per share that has live followers here, and the one
//! task that hears the ledger's announcements and wakes only the feed they name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use capsync_shared::ShareId;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;

use super::feed::{Feed, Head};
use super::prepare::Preparer;
use crate::config::Config;
use crate::ledger::{Changed, Ledger};
use crate::metrics::Metrics;

/// Every feed of this server. Cheap to clone, `Send`.
#[derive(Clone)]
pub struct Feeds {
    inner: Arc<Inner>,
}

struct Inner {
    ledger: Ledger,
    settings: FollowSettings,
    metrics: Metrics,
    /// What feeds prepare for followers that want it (the HTTP gateway's rendering).
    preparer: OnceLock<Preparer>,
    registry: Mutex<Registry>,
}

/// How followers are served (the `--follow-*` settings).
#[derive(Clone, Copy, Debug)]
pub struct FollowSettings {
    /// `--follow-recheck`: see [`super::Follower`].
    pub recheck: Duration,
    /// `--follow-buffer-bytes`: recent ops kept per feed.
    pub buffer_bytes: usize,
    /// `--follow-interval`: the least time between two reads of one feed, so the
    /// commits of a busy share reach its followers together.
    pub interval: Duration,
}

impl FollowSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            recheck: config.follow_recheck,
            buffer_bytes: config.follow_buffer_bytes,
            interval: config.follow_interval,
        }
    }
}

#[derive(Default)]
struct Registry {
    by_share: HashMap<ShareId, Arc<Feed>>,
    /// Whether the task that dispatches announcements runs (it starts with the first feed).
    dispatching: bool,
}

/// A follower's hold on its share's feed.
pub(super) struct Joined {
    pub feed: Arc<Feed>,
    pub head: watch::Receiver<Head>,
}

impl Feeds {
    pub fn new(ledger: Ledger, settings: FollowSettings, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                ledger,
                settings,
                metrics,
                preparer: OnceLock::new(),
                registry: Mutex::default(),
            }),
        }
    }

    /// Sets what feeds prepare for followers that ask (see [`super::Follower::prepared`]);
    /// once, before the first follower. Later calls change nothing.
    pub fn prepare_with(&self, preparer: Preparer) {
        let _ = self.inner.preparer.set(preparer);
    }

    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    pub(super) fn recheck(&self) -> Duration {
        self.inner.settings.recheck
    }

    /// Joins the feed of `share`, starting it (and the dispatcher) if it is the
    /// first follower. Must be called on a tokio runtime.
    pub(super) fn join(&self, share: &ShareId) -> Joined {
        let mut registry = self.inner.registry();
        if !registry.dispatching {
            registry.dispatching = true;
            let changes = self.inner.ledger.changes();
            tokio::spawn(dispatch(Arc::downgrade(&self.inner), changes));
        }
        let feed = match registry.by_share.get(share) {
            Some(feed) => Arc::clone(feed),
            None => {
                let settings = &self.inner.settings;
                let counted = self.inner.metrics.followed_share();
                let feed = Arc::new(Feed::new(share.clone(), settings.buffer_bytes, counted));
                registry.by_share.insert(share.clone(), Arc::clone(&feed));
                let inner = Arc::downgrade(&self.inner);
                let forget = move |feed: &Arc<Feed>| {
                    inner
                        .upgrade()
                        .is_none_or(|inner| inner.forget_if_unfollowed(feed))
                };
                let ledger = self.inner.ledger.clone();
                let preparer = self.inner.preparer.get().cloned();
                tokio::spawn(Arc::clone(&feed).run(ledger, settings.interval, preparer, forget));
                // Its first read finds the share's cursor, where its buffer begins.
                feed.wake();
                feed
            }
        };
        // Under the registry's lock, so the feed cannot be forgotten in between.
        let head = feed.subscribe();
        Joined { feed, head }
    }

    /// How many shares have a feed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.registry().by_share.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Nothing panics while holding it; a poisoned map is still consistent.
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drops `feed` if no follower holds it (none can join while this runs);
    /// whether it was dropped.
    fn forget_if_unfollowed(&self, feed: &Arc<Feed>) -> bool {
        let mut registry = self.registry();
        if !feed.unfollowed() {
            return false;
        }
        if registry
            .by_share
            .get(&feed.share)
            .is_some_and(|known| Arc::ptr_eq(known, feed))
        {
            registry.by_share.remove(&feed.share);
        }
        true
    }

    fn each(&self, what: impl Fn(&Feed)) {
        for feed in self.registry().by_share.values() {
            what(feed);
        }
    }
}

/// Hands each announcement to the feeds it concerns, until the ledger closes.
async fn dispatch(inner: Weak<Inner>, mut changes: broadcast::Receiver<Changed>) {
    loop {
        let changed = changes.recv().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match changed {
            Ok(Changed::Ops { share, applied }) => {
                if let Some(feed) = inner.registry().by_share.get(&share) {
                    match applied {
                        Some(ops) => feed.offer(ops),
                        None => feed.wake(),
                    }
                }
            }
            // A revocation or deletion. Every follower checks, not only this
            // share's: a viewer of a parent share also reads its children.
            Ok(Changed::Share(share)) => {
                inner.each(Feed::recheck);
                if let Some(feed) = inner.registry().by_share.get(&share) {
                    feed.wake();
                }
            }
            Ok(Changed::Tokens) => inner.each(Feed::recheck),
            // Commits may have gone unheard: every feed reads, every follower checks.
            Ok(Changed::Missed) | Err(RecvError::Lagged(_)) => inner.each(|feed| {
                feed.recheck();
                feed.wake();
            }),
            Err(RecvError::Closed) => {
                inner.each(Feed::close);
                return;
            }
        }
    }
}
