//! `ShareWriter`: appends ops to one share, mints viewers and sturdy refs to itself.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use capsync_shared::TokenKind;
use capsync_shared::capsync_capnp::share_writer;
use tokio::sync::oneshot;

use super::answer::answer;
use super::context::Context;
use super::shares::{self, outcome};
use super::viewer::ViewerImpl;
use super::wire::{self, BatchLimits};
use capsync_shared::ErrorCode;

use crate::error::ServerError;
use crate::ledger::oversize::append_within_limit;
use crate::ledger::{Ack, AuditEvent, Authority, BatchLink, LedgerError};
use crate::presence::WriterPresence;

pub struct WriterImpl {
    ctx: Rc<Context>,
    auth: Authority,
    /// Expiry of the token this capability came from; `save()` gives the same.
    expires_at: Option<i64>,
    /// Shows the share's writer as connected for as long as this capability lives.
    _presence: Option<WriterPresence>,
    /// The last `appendOps` call on this capability, for the pipelined batch that names
    /// it in `after` (see `Batch.after` in the schema).
    last_append: RefCell<Option<LastAppend>>,
}

/// An `appendOps` call as the call after it sees it.
struct LastAppend {
    batch_id: String,
    /// Marked by the ledger as the batch applies and commits.
    link: Arc<BatchLink>,
}

impl WriterImpl {
    pub fn new(ctx: Rc<Context>, auth: Authority, expires_at: Option<i64>) -> Self {
        let presence = auth
            .share
            .as_ref()
            .map(|(share, _)| ctx.presence.writer_connected(share.clone()));
        Self {
            ctx,
            auth,
            expires_at,
            _presence: presence,
            last_append: RefCell::new(None),
        }
    }

    fn audit(&self, action: &'static str, outcome: &str, detail: String) {
        self.ctx.audit(AuditEvent {
            action,
            token_id: Some(self.auth.token_id.clone()),
            share_id: self.auth.share.as_ref().map(|(id, _)| id.clone()),
            outcome: outcome.to_owned(),
            detail,
        });
    }

    /// Queues the call's batch with the ledger and returns where its ack will arrive.
    /// The batch is queued now, before the next call on this capability is read, and
    /// the rest runs in a task of its own: a call the client cancels at once (a
    /// timeout, a dropped connection) is still applied, counted and announced to
    /// followers, just like one whose answer is lost on the way back. The client's
    /// retry then finds every op a duplicate.
    ///
    /// A pipelined batch (one naming the call before it in `after`) is queued at once
    /// too, and applies only if that batch did (see `ledger::rules::batch_order`): in the
    /// same group commit, or after it. So a failed batch never has the batches sent
    /// after it applied before it, and a writer's batches need not wait for each other's
    /// acks to share a commit.
    fn start_append(
        &self,
        params: &share_writer::AppendOpsParams,
    ) -> Result<oneshot::Receiver<Result<Ack, ServerError>>, ServerError> {
        // Every call is the one before the next, whether it reads or not; one that is
        // refused before the ledger leaves its link unwritten, which refuses its followers.
        let reader = params.get().and_then(|p| p.get_batch());
        let batch_id = reader
            .as_ref()
            .ok()
            .and_then(|r| wire::text(r.get_batch_id()).ok())
            .unwrap_or_default();
        let link = BatchLink::new();
        let previous = self.last_append.replace(Some(LastAppend {
            batch_id,
            link: Arc::clone(&link),
        }));
        let reader = reader?;
        let after = wire::text(reader.get_after())?;
        let limits = BatchLimits {
            max_ops: self.ctx.max_ops_per_batch,
        };
        let mut batch = wire::batch(reader, &limits)?;
        if !after.is_empty() {
            batch.follows = match previous {
                Some(previous) if previous.batch_id == after => Some(previous.link),
                _ => return Err(ServerError::out_of_order(&batch.batch_id, &after)),
            };
        }
        batch.link = Some(link);
        let in_flight = self.ctx.begin_batch()?;
        let started = Instant::now();
        let batch_id = batch.batch_id.clone();
        let appended = append_within_limit(
            &self.ctx.ledger,
            self.auth.clone(),
            batch,
            self.ctx.max_op_bytes,
        );
        let ctx = Rc::clone(&self.ctx);
        let (done_tx, done) = oneshot::channel();
        tokio::task::spawn_local(async move {
            let result = appended.await.map_err(|e| match e {
                LedgerError::OutOfOrder => ServerError::out_of_order(&batch_id, &after),
                e => ServerError::from(e),
            });
            match &result {
                Ok(ack) => ctx.metrics.batch_committed(started.elapsed(), ack),
                Err(e) if e.code == ErrorCode::Overloaded => ctx.metrics.write_overloaded(),
                Err(_) => {}
            }
            drop(in_flight);
            let _ = done_tx.send(result);
        });
        Ok(done)
    }

    /// Mints a share token of `kind` with this capability's authority.
    async fn mint(
        &self,
        kind: TokenKind,
        expires_at: Option<i64>,
    ) -> Result<(String, String), ServerError> {
        let (token, row) = self
            .ctx
            .hasher
            .mint(kind, expires_at, String::new())
            .await?;
        self.ctx
            .ledger
            .mint_token(self.auth.clone(), kind, row)
            .await?;
        Ok((token.expose(), token.id.to_string()))
    }
}

impl share_writer::Server for WriterImpl {
    fn append_ops(
        self: Rc<Self>,
        params: share_writer::AppendOpsParams,
        mut results: share_writer::AppendOpsResults,
    ) -> impl Future<Output = Result<(), capnp::Error>> + 'static {
        // Not an `async fn`: the append must start now, not at the future's first poll,
        // which a cancelled call never gets.
        let started = self.start_append(&params);
        async move {
            let appended = match started {
                Ok(done) => done.await.unwrap_or_else(|_| Err(ServerError::internal())),
                Err(err) => Err(err),
            };
            // A successful append's audit line is written by the ledger, in the
            // batch's own transaction; failures are audited here.
            if let Err(err) = &appended {
                let batch_id = params
                    .get()
                    .and_then(|p| p.get_batch())
                    .and_then(|b| b.get_batch_id())
                    .ok()
                    .and_then(|t| t.to_str().ok().map(str::to_owned))
                    .unwrap_or_default();
                self.audit(
                    "append",
                    err.code.as_str(),
                    format!("batch={batch_id} {err}"),
                );
            }
            let result = results.get().init_result();
            match appended {
                Ok(ack) => wire::fill_ack(&ack, result.init_ack()),
                Err(err) => err.fill(result.init_failure()),
            }
            Ok(())
        }
    }

    async fn mint_viewer(
        self: Rc<Self>,
        params: share_writer::MintViewerParams,
        mut results: share_writer::MintViewerResults,
    ) -> Result<(), capnp::Error> {
        let minted = async {
            let expires_at = wire::optional_time(
                params.get()?.get_expires_at(),
                "expiresAt",
                self.ctx.ledger.clock().now_millis(),
            )?;
            let (token, id) = self.mint(TokenKind::Viewer, expires_at).await?;
            Ok::<_, ServerError>((token, id, expires_at))
        }
        .await;
        let detail = minted
            .as_ref()
            .map(|m| format!("new_viewer={}", m.1))
            .unwrap_or_default();
        self.audit("mint", outcome(&minted), detail);
        let result = results.get().init_result();
        match minted {
            Ok((token, id, expires_at)) => {
                wire::fill_minted(&token, &id, expires_at, result.init_ok())
            }
            Err(err) => err.fill(result.init_failure()),
        }
        Ok(())
    }

    async fn save(
        self: Rc<Self>,
        _params: share_writer::SaveParams,
        mut results: share_writer::SaveResults,
    ) -> Result<(), capnp::Error> {
        let minted = self.mint(TokenKind::Writer, self.expires_at).await;
        let detail = minted
            .as_ref()
            .map(|m| format!("new_writer={}", m.1))
            .unwrap_or_default();
        self.audit("mint", outcome(&minted), detail);
        answer!(
            results.get().init_result(),
            minted,
            |(token, id): (String, String), ok| wire::fill_minted(&token, &id, self.expires_at, ok)
        );
        Ok(())
    }

    async fn state(
        self: Rc<Self>,
        _params: share_writer::StateParams,
        mut results: share_writer::StateResults,
    ) -> Result<(), capnp::Error> {
        shares::state(&self.ctx, &self.auth, results.get().init_result()).await;
        Ok(())
    }

    async fn viewer(
        self: Rc<Self>,
        _params: share_writer::ViewerParams,
        mut results: share_writer::ViewerResults,
    ) -> Result<(), capnp::Error> {
        // The viewer is bound to the share's current viewer epoch, so revoking
        // viewers also stops viewers derived from writers.
        let state = self
            .ctx
            .ledger
            .share_state(self.auth.clone())
            .await
            .map_err(|err| {
                let err = ServerError::from(err);
                // This method returns a capability, not a result struct: the
                // failure can only travel as an exception, with the code in front.
                capnp::Error::failed(format!("{}: {}", err.code, err.message))
            })?;
        let auth = Authority {
            token_id: self.auth.token_id.clone(),
            kind: TokenKind::Viewer,
            share: Some((state.share_id.clone(), state.viewer_epoch)),
        };
        results
            .get()
            .set_viewer(capnp_rpc::new_client(ViewerImpl::new(
                self.ctx.clone(),
                auth,
            )));
        Ok(())
    }
}
