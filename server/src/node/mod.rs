//! The node seam: what one server process keeps for itself that several
//! processes serving one database would have to share or agree on.
//!
//! Each item sits behind a small interface; [`NodeServices::sole_process`] gives
//! today's implementations, for a server that is the only one on its data (the
//! data directory's lock, `data_dir.rs`, makes sure of it). A multi-node
//! deployment replaces them, as `docs/ARCHITECTURE.md` ("The node seam") says:
//!
//! | item | interface | in one process |
//! |---|---|---|
//! | change announcements | `Backend::changes` | the ledger's broadcast channel, sent by the committing writer |
//! | writer presence | [`PresenceBoard`] | [`LocalPresence`]: counts in memory |
//! | failed-redeem limits | [`RedeemFailures`] | [`LocalRedeemFailures`]: buckets in memory |
//! | lifecycle leadership | [`Leadership`] | [`SoleProcess`]: always the leader |
//! | bootstrap (admin token) | `admin_token::ensure` over `Backend::create_first_admin_token` | one transaction decides; the token file is this node's |
//! | the clock | [`Clock`](crate::clock::Clock), `Config::clock` | the system clock |
//!
//! On PostgreSQL ([`NodeServices::for_config`] with `--database`), [`postgres`] gives
//! the shared implementations: an advisory lock for leadership, presence in tables.

pub mod postgres;

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::config::Config;
pub use crate::presence::{LocalPresence, Presence, PresenceBoard};
use crate::rate_limit::RedeemLimiter;
pub use crate::rate_limit::{LocalRedeemFailures, RedeemFailures};

/// Who runs the automatic lifecycle (auto-archive, child retention, ledger
/// compaction) and the storage upkeep: one process at a time, or two would
/// race each other's deletions.
pub trait Leadership: Send + Sync + 'static {
    /// Whether this process leads now. Asked before every round, so a lost
    /// lead (a lease that ran out, a database connection that broke) stops
    /// the work at the next round.
    fn lead(&self) -> BoxFuture<'static, bool>;
}

/// The only process on its data: always the leader.
#[derive(Clone, Copy, Debug, Default)]
pub struct SoleProcess;

impl Leadership for SoleProcess {
    fn lead(&self) -> BoxFuture<'static, bool> {
        futures::future::ready(true).boxed()
    }
}

/// What a server process is given for the state it would share with others.
/// (The clock is the config's, `Config::clock`, shared with the ledger.)
#[derive(Clone)]
pub struct NodeServices {
    pub presence: Presence,
    pub redeem_failures: Arc<dyn RedeemFailures>,
    pub leadership: Arc<dyn Leadership>,
    /// Stops sharing this node's state (its presence leaves with it); called at shutdown.
    stop: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl NodeServices {
    /// What `config` needs: the shared implementations when its ledger is on
    /// PostgreSQL (other nodes may serve the same database), else [`Self::sole_process`].
    pub fn for_config(config: &Config) -> Result<Self, crate::StartError> {
        let Some(url) = &config.database else {
            return Ok(Self::sole_process(config));
        };
        let db = crate::ledger::postgres::Database::new(
            url.expose(),
            config.database_ca_file.as_deref(),
        )
        .map_err(|e| crate::StartError::Config(format!("--database: {e}")))?;
        let node = hex::encode(rand::random::<[u8; 8]>());
        let board = postgres::SharedPresence::start(
            db.clone(),
            node,
            config.clock.clone(),
            config
                .node_heartbeat
                .max(std::time::Duration::from_millis(10)),
            config.node_timeout,
        )?;
        let leadership = postgres::AdvisoryLead::start(db)?;
        let stopping = Arc::clone(&board);
        Ok(Self {
            presence: Presence::on(board, config.clock.clone()),
            // Per node, by design: see `postgres`.
            redeem_failures: Arc::new(LocalRedeemFailures::new(RedeemLimiter::new(
                config.redeem_failures,
                config.redeem_window,
            ))),
            leadership: Arc::new(leadership),
            stop: Some(Arc::new(move || stopping.stop())),
        })
    }

    /// Stops sharing this node's state with the others.
    pub fn stop(&self) {
        if let Some(stop) = &self.stop {
            stop();
        }
    }

    /// The in-process implementations, for a server alone on its data.
    pub fn sole_process(config: &Config) -> Self {
        Self {
            presence: Presence::new(config.clock.clone()),
            redeem_failures: Arc::new(LocalRedeemFailures::new(RedeemLimiter::new(
                config.redeem_failures,
                config.redeem_window,
            ))),
            leadership: Arc::new(SoleProcess),
            stop: None,
        }
    }
}

impl std::fmt::Debug for NodeServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeServices").finish_non_exhaustive()
    }
}
