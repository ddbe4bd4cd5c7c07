//! `Admin`: mints agents, revokes, archives and deletes shares, lists everything,
//! reports stats, and runs the lifecycle (prune, vacuum, reclaim, ledger compaction).

use std::rc::Rc;

use capsync_shared::capsync_capnp::{admin, prune_options, share_info_result};
use capsync_shared::{ShareId, SturdyRef, TokenId, TokenKind};

use super::answer::answer;
use super::context::Context;
use super::progress_listener::Forwarder;
use super::shares::{self, outcome};
use super::wire;
use crate::error::ServerError;
use crate::ledger::{AuditEvent, Authority, Operator};
use crate::lifecycle::{self, PruneOptions};

pub struct AdminImpl {
    ctx: Rc<Context>,
    auth: Authority,
}

impl AdminImpl {
    pub fn new(ctx: Rc<Context>, auth: Authority) -> Self {
        Self { ctx, auth }
    }

    /// Lifecycle calls run as this admin: the backend re-checks its token in every step.
    fn operator(&self) -> Operator {
        Operator::Admin(self.auth.clone())
    }

    /// Audits a finished call as `action`: `asked` says what was asked, and on
    /// success `done` adds what the call did.
    fn audit<T>(
        &self,
        action: &'static str,
        share_id: Option<ShareId>,
        result: &Result<T, ServerError>,
        asked: String,
        done: impl FnOnce(&T) -> String,
    ) {
        let mut detail = asked;
        if let Ok(value) = result {
            let done = done(value);
            if !done.is_empty() && !detail.is_empty() {
                detail.push(' ');
            }
            detail.push_str(&done);
        }
        self.ctx.audit(AuditEvent {
            action,
            token_id: Some(self.auth.token_id.clone()),
            share_id,
            outcome: outcome(result).to_owned(),
            detail,
        });
    }

    /// Archives or unarchives the share named in the call, audits it, and answers with its info.
    async fn set_archived(
        &self,
        share_id: capnp::Result<capnp::text::Reader<'_>>,
        archived: bool,
        out: share_info_result::Builder<'_>,
    ) {
        let share_id = wire::text(share_id).map(ShareId);
        let done = async {
            let share_id = share_id.clone()?;
            Ok::<_, ServerError>(
                self.ctx
                    .ledger
                    .set_archived(self.auth.clone(), share_id, archived)
                    .await?,
            )
        }
        .await;
        let action = if archived {
            "archive_share"
        } else {
            "unarchive_share"
        };
        self.audit(action, share_id.ok(), &done, String::new(), |_| {
            String::new()
        });
        answer!(out, done, |info, ok| wire::fill_info(&info, ok));
    }
}

/// `mintAgent`'s label and expiry.
pub(super) fn read_mint_agent(
    p: admin::mint_agent_params::Reader<'_>,
    now: i64,
) -> Result<(String, Option<i64>), ServerError> {
    Ok((
        wire::text(p.get_label())?,
        wire::optional_time(p.get_expires_at(), "expiresAt", now)?,
    ))
}

/// `prune`'s options as the lifecycle takes them.
pub(super) fn read_prune_options(
    o: prune_options::Reader<'_>,
) -> Result<PruneOptions, ServerError> {
    Ok(PruneOptions {
        older_than: wire::older_than(o.get_older_than_ms(), "olderThanMs")?,
        children: o.get_children(),
        archived_only: o.get_archived_only(),
        dry_run: o.get_dry_run(),
        vacuum: o.get_vacuum(),
    })
}

impl admin::Server for AdminImpl {
    async fn mint_agent(
        self: Rc<Self>,
        params: admin::MintAgentParams,
        mut results: admin::MintAgentResults,
    ) -> Result<(), capnp::Error> {
        let request = params
            .get()
            .map_err(ServerError::from)
            .and_then(|p| read_mint_agent(p, self.ctx.ledger.clock().now_millis()));
        let minted = async {
            let (label, expires_at) = request?;
            let (token, row) = self
                .ctx
                .hasher
                .mint(TokenKind::Agent, expires_at, label)
                .await?;
            self.ctx
                .ledger
                .mint_token(self.auth.clone(), TokenKind::Agent, row)
                .await?;
            Ok::<_, ServerError>((token, expires_at))
        }
        .await;
        self.audit("mint", None, &minted, String::new(), |(token, _)| {
            format!("new_token={}", token.id)
        });
        answer!(
            results.get().init_result(),
            minted,
            |(token, expires_at): (SturdyRef, _), ok| {
                wire::fill_minted(&token.expose(), token.id.as_str(), expires_at, ok)
            }
        );
        Ok(())
    }

    async fn revoke_share(
        self: Rc<Self>,
        params: admin::RevokeShareParams,
        mut results: admin::RevokeShareResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let out = results.get().init_result();
        shares::revoke(&self.ctx, &self.auth, p.get_share_id(), p.get_scope(), out).await;
        Ok(())
    }

    async fn revoke_token(
        self: Rc<Self>,
        params: admin::RevokeTokenParams,
        mut results: admin::RevokeTokenResults,
    ) -> Result<(), capnp::Error> {
        let mut target = String::new();
        let revoked = async {
            let token_id = TokenId(wire::text(params.get()?.get_token_id())?);
            target = format!("target={token_id}");
            self.ctx
                .ledger
                .revoke_token(self.auth.clone(), token_id)
                .await
                .map_err(|err| match err {
                    crate::ledger::LedgerError::NotFound => {
                        ServerError::new(capsync_shared::ErrorCode::NotFound, "token not found")
                    }
                    other => other.into(),
                })
        }
        .await;
        self.audit("revoke_token", None, &revoked, target, |_| String::new());
        answer!(results.get().init_result(), revoked);
        Ok(())
    }

    async fn list_shares(
        self: Rc<Self>,
        params: admin::ListSharesParams,
        mut results: admin::ListSharesResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let out = results.get().init_result();
        let (after, limit) = (p.get_after(), p.get_limit());
        shares::list(
            &self.ctx,
            &self.auth,
            after,
            limit,
            p.get_include_archived(),
            out,
        )
        .await;
        Ok(())
    }

    async fn delete_share(
        self: Rc<Self>,
        params: admin::DeleteShareParams,
        mut results: admin::DeleteShareResults,
    ) -> Result<(), capnp::Error> {
        let mut share = None;
        let deleted = async {
            let share_id = ShareId(wire::text(params.get()?.get_share_id())?);
            share = Some(share_id.clone());
            lifecycle::delete_share(&self.ctx.ledger, &self.operator(), &share_id, None).await?;
            Ok::<_, ServerError>(())
        }
        .await;
        self.audit("delete_share", share, &deleted, String::new(), |_| {
            String::new()
        });
        answer!(results.get().init_result(), deleted);
        Ok(())
    }

    async fn archive_share(
        self: Rc<Self>,
        params: admin::ArchiveShareParams,
        mut results: admin::ArchiveShareResults,
    ) -> Result<(), capnp::Error> {
        let share_id = params.get()?.get_share_id();
        self.set_archived(share_id, true, results.get().init_result())
            .await;
        Ok(())
    }

    async fn unarchive_share(
        self: Rc<Self>,
        params: admin::UnarchiveShareParams,
        mut results: admin::UnarchiveShareResults,
    ) -> Result<(), capnp::Error> {
        let share_id = params.get()?.get_share_id();
        self.set_archived(share_id, false, results.get().init_result())
            .await;
        Ok(())
    }

    async fn stats(
        self: Rc<Self>,
        _: admin::StatsParams,
        mut results: admin::StatsResults,
    ) -> Result<(), capnp::Error> {
        let stats = self
            .ctx
            .ledger
            .stats(self.auth.clone())
            .await
            .map_err(ServerError::from);
        answer!(results.get().init_result(), stats, |stats, ok| {
            wire::fill_stats(&stats, ok)
        });
        Ok(())
    }

    async fn prune(
        self: Rc<Self>,
        params: admin::PruneParams,
        mut results: admin::PruneResults,
    ) -> Result<(), capnp::Error> {
        let request = (|| {
            let p = params.get()?;
            let options = read_prune_options(p.get_options()?)?;
            Ok::<_, ServerError>((options, p.get_progress().ok()))
        })();
        let mut detail = String::new();
        let pruned = async {
            let (options, listener) = request?;
            detail = format!(
                "older_than_ms={} children={} archived_only={} dry_run={} vacuum={}",
                options.older_than.as_millis(),
                options.children,
                options.archived_only,
                options.dry_run,
                options.vacuum
            );
            let report = Forwarder::run(listener, async |sink| {
                lifecycle::prune(&self.ctx.ledger, &self.operator(), &options, sink).await
            })
            .await;
            Ok::<_, ServerError>(report?)
        }
        .await;
        self.audit("prune", None, &pruned, detail, |report| {
            format!(
                "shares={} ops={} bytes={} kept_children={} skipped={}",
                report.shares.len(),
                report.totals.ops,
                report.totals.bytes,
                report.kept_children.len(),
                report.skipped.len()
            )
        });
        answer!(results.get().init_result(), pruned, |report, ok| {
            wire::fill_prune_report(&report, ok)
        });
        Ok(())
    }

    async fn vacuum(
        self: Rc<Self>,
        _: admin::VacuumParams,
        mut results: admin::VacuumResults,
    ) -> Result<(), capnp::Error> {
        let vacuumed = self
            .ctx
            .ledger
            .vacuum(self.operator())
            .await
            .map_err(ServerError::from);
        self.audit("vacuum", None, &vacuumed, String::new(), |report| {
            format!(
                "bytes_before={} bytes_after={} duration_ms={}",
                report.bytes_before, report.bytes_after, report.duration_ms
            )
        });
        answer!(results.get().init_result(), vacuumed, |report, ok| {
            wire::fill_vacuum(&report, ok)
        });
        Ok(())
    }

    async fn reclaim(
        self: Rc<Self>,
        params: admin::ReclaimParams,
        mut results: admin::ReclaimResults,
    ) -> Result<(), capnp::Error> {
        let mut detail = String::new();
        let reclaimed = async {
            let p = params.get()?;
            let dry_run = p.get_dry_run();
            detail = format!("dry_run={dry_run}");
            let report = Forwarder::run(p.get_progress().ok(), async |sink| {
                lifecycle::reclaim(&self.ctx.ledger, &self.operator(), dry_run, sink).await
            })
            .await;
            Ok::<_, ServerError>(report?)
        }
        .await;
        self.audit("reclaim", None, &reclaimed, detail, |report| {
            format!(
                "parts_scanned={} parts_cleared={} bytes={}",
                report.parts_scanned, report.parts_cleared, report.bytes_reclaimed
            )
        });
        answer!(results.get().init_result(), reclaimed, |report, ok| {
            wire::fill_reclaim_report(&report, ok)
        });
        Ok(())
    }

    async fn compact_ledger(
        self: Rc<Self>,
        params: admin::CompactLedgerParams,
        mut results: admin::CompactLedgerResults,
    ) -> Result<(), capnp::Error> {
        let mut detail = String::new();
        let compacted = async {
            let p = params.get()?;
            let older_than = wire::older_than(p.get_older_than_ms(), "olderThanMs")?;
            let dry_run = p.get_dry_run();
            detail = format!("older_than_ms={} dry_run={dry_run}", older_than.as_millis());
            let report = Forwarder::run(p.get_progress().ok(), async |sink| {
                let op = self.operator();
                lifecycle::compact_ledger(&self.ctx.ledger, &op, older_than, dry_run, sink).await
            })
            .await;
            Ok::<_, ServerError>(report?)
        }
        .await;
        self.audit("compact_ledger", None, &compacted, detail, |report| {
            format!(
                "shares={} ops={} bytes={}",
                report.shares, report.ops, report.bytes
            )
        });
        answer!(results.get().init_result(), compacted, |report, ok| {
            wire::fill_compact_report(&report, ok)
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use capsync_shared::Cursor;
    use capsync_shared::capsync_capnp::{
        ErrorCode, compact_result, progress_listener, prune_result, reclaim_result, stats_result,
        vacuum_result,
    };

    use super::*;
    use crate::config::Config;
    use crate::follow::test_share::TestShare;
    use crate::secret_hasher::SecretHasher;

    /// The `Admin` capability of the share's admin, called locally.
    fn admin(share: &TestShare) -> admin::Client {
        let config = Config::for_tests(share.dir.path());
        let hasher = SecretHasher::new(config.argon2_memory_kib, config.argon2_iterations).unwrap();
        let ctx = Rc::new(Context::new(
            share.ledger.clone(),
            hasher,
            &config,
            Default::default(),
        ));
        capnp_rpc::new_client(AdminImpl::new(ctx, share.admin.clone()))
    }

    /// Records every update it hears.
    struct Listener(Rc<RefCell<Vec<(String, u64, u64)>>>);

    impl progress_listener::Server for Listener {
        async fn progress(
            self: Rc<Self>,
            params: progress_listener::ProgressParams,
            _: progress_listener::ProgressResults,
        ) -> Result<(), capnp::Error> {
            let p = params.get()?;
            let stage = p.get_stage()?.to_string().unwrap();
            self.0
                .borrow_mut()
                .push((stage, p.get_done(), p.get_total()));
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_retention_of_zero_or_less_is_refused() {
        let share = TestShare::new().await;
        let admin = admin(&share);

        let mut prune = admin.prune_request();
        prune.get().init_options().set_older_than_ms(0);
        let response = prune.send().promise.await.unwrap();
        let prune_result::Failure(failure) = response
            .get()
            .unwrap()
            .get_result()
            .unwrap()
            .which()
            .unwrap()
        else {
            panic!("prune with olderThanMs 0 was accepted");
        };
        assert_eq!(
            failure.unwrap().get_code().unwrap(),
            ErrorCode::InvalidArgument
        );

        let mut compact = admin.compact_ledger_request();
        compact.get().set_older_than_ms(-5);
        let response = compact.send().promise.await.unwrap();
        let compact_result::Failure(failure) = response
            .get()
            .unwrap()
            .get_result()
            .unwrap()
            .which()
            .unwrap()
        else {
            panic!("compactLedger with olderThanMs -5 was accepted");
        };
        assert_eq!(
            failure.unwrap().get_code().unwrap(),
            ErrorCode::InvalidArgument
        );
    }

    #[tokio::test]
    async fn a_dry_run_prune_reports_its_cutoff_and_deletes_nothing() {
        let mut share = TestShare::new().await;
        share.append(3).await;
        let admin = admin(&share);
        let day_ms = 24 * 3600 * 1000;
        let before = capsync_shared::now_millis();

        let mut request = admin.prune_request();
        let mut options = request.get().init_options();
        options.set_older_than_ms(day_ms);
        options.set_dry_run(true);
        options.set_vacuum(true);
        let response = request.send().promise.await.unwrap();
        let prune_result::Ok(report) = response
            .get()
            .unwrap()
            .get_result()
            .unwrap()
            .which()
            .unwrap()
        else {
            panic!("the dry run failed");
        };
        let report = report.unwrap();
        assert!(report.get_dry_run());
        let cutoff = report.get_cutoff();
        assert!(cutoff >= before - day_ms && cutoff <= capsync_shared::now_millis() - day_ms);
        assert_eq!(
            report.get_shares().unwrap().len(),
            0,
            "the share is moments old, not a day"
        );
        assert_eq!(report.get_totals().unwrap().get_shares(), 0);
        assert!(!report.get_vacuumed(), "a dry run does not vacuum");
        assert_eq!(share.state().await.cursor, Cursor(3));
    }

    #[tokio::test]
    async fn reclaim_answers_after_the_listener_heard_the_last_update() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let share = TestShare::new().await;
                let admin = admin(&share);
                let heard = Rc::new(RefCell::new(Vec::new()));

                let mut request = admin.reclaim_request();
                request.get().set_dry_run(true);
                request
                    .get()
                    .set_progress(capnp_rpc::new_client(Listener(heard.clone())));
                let response = request.send().promise.await.unwrap();
                let reclaim_result::Ok(report) = response
                    .get()
                    .unwrap()
                    .get_result()
                    .unwrap()
                    .which()
                    .unwrap()
                else {
                    panic!("reclaim failed");
                };
                let report = report.unwrap();
                assert!(report.get_dry_run());
                assert_eq!(report.get_parts_cleared(), 0);
                let heard = heard.borrow();
                let (stage, done, total) = heard.last().expect("no progress was heard");
                assert_eq!((stage.as_str(), done), ("reclaim", total));
            })
            .await;
    }

    #[tokio::test]
    async fn compaction_shows_in_stats_and_vacuum_reports_the_file() {
        let mut share = TestShare::new().await;
        share.append(5).await;
        share.compact().await;
        let admin = admin(&share);

        let response = admin.stats_request().send().promise.await.unwrap();
        let stats_result::Ok(stats) = response
            .get()
            .unwrap()
            .get_result()
            .unwrap()
            .which()
            .unwrap()
        else {
            panic!("stats failed");
        };
        let stats = stats.unwrap();
        assert_eq!(stats.get_compacted_ops(), 5);
        assert_eq!(stats.get_ledger_ops(), 5);

        let response = admin.vacuum_request().send().promise.await.unwrap();
        let vacuum_result::Ok(report) = response
            .get()
            .unwrap()
            .get_result()
            .unwrap()
            .which()
            .unwrap()
        else {
            panic!("vacuum failed");
        };
        let report = report.unwrap();
        assert!(report.get_bytes_before() > 0 && report.get_bytes_after() > 0);
    }
}
