//! `WriterClient`: append batches of ops to one share, mint viewer links, save a sturdy ref.

use capsync_shared::capsync_capnp::{
    append_result, mint_result, op_result, share_state_result, share_writer,
};
use capsync_shared::{Cursor, OpId};

use crate::error::ClientError;
pub use crate::types::{Ack, Batch, OpOutcome, OpResult, RejectReason};
use crate::types::{MintedToken, ShareState, wire_time};
use crate::viewer::ViewerClient;
use crate::wire::{self, ok_or_fail};

/// A live `ShareWriter` capability. Cheap to clone: clones share the capability.
#[derive(Clone)]
pub struct WriterClient {
    /// The capability itself.
    cap: share_writer::Client,
    /// Id of the writer token it stands for, so a caller can revoke or audit it.
    token_id: String,
    /// When that token expires, if ever.
    expires_at: Option<i64>,
    /// The share's state when the capability was obtained (redeem or create).
    state: ShareState,
    /// The server said at redeem that it honours [`Batch::after`].
    orders_pipelined_batches: bool,
}

impl std::fmt::Debug for WriterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterClient")
            .field("token_id", &self.token_id)
            .field("share_id", &self.state.share_id)
            .finish_non_exhaustive()
    }
}

impl WriterClient {
    pub(crate) fn new(
        cap: share_writer::Client,
        token_id: String,
        expires_at: Option<i64>,
        state: ShareState,
        orders_pipelined_batches: bool,
    ) -> Self {
        Self {
            cap,
            token_id,
            expires_at,
            state,
            orders_pipelined_batches,
        }
    }

    /// Whether the server said, when this capability was redeemed, that it applies a
    /// batch with [`Batch::after`] only after that batch was acked, so several batches
    /// can be in flight on this capability without a failed one being overtaken. `false`
    /// for a capability from `createShare` (which does not say) or from an older server.
    pub fn orders_pipelined_batches(&self) -> bool {
        self.orders_pipelined_batches
    }

    /// The raw capability, for calls this library does not wrap.
    pub fn capability(&self) -> share_writer::Client {
        self.cap.clone()
    }

    /// Id of the writer token this capability stands for.
    pub fn token_id(&self) -> &str {
        &self.token_id
    }

    pub fn expires_at(&self) -> Option<i64> {
        self.expires_at
    }

    /// The share's state when this capability was redeemed or created (not refreshed;
    /// call [`WriterClient::state`] for the current one).
    pub fn state_at_redeem(&self) -> &ShareState {
        &self.state
    }

    pub fn share_id(&self) -> &str {
        &self.state.share_id
    }

    /// Appends a batch. Each op's payload goes on the wire as JSON text.
    ///
    /// Per-op outcomes (applied, duplicate, rejected) are in the `Ack`; a whole-batch
    /// refusal (revoked, cursor conflict, too large, ...) is `Err(Remote)`.
    pub async fn append(&self, batch: &Batch) -> Result<Ack, ClientError> {
        self.send_append(batch)?.await
    }

    /// Sends `batch` now and returns the answer to come: the way to keep several batches
    /// in flight on this capability, in the order of these calls (see [`Batch::after`]).
    /// Fails at once only if the batch cannot be encoded.
    pub fn send_append(
        &self,
        batch: &Batch,
    ) -> Result<impl Future<Output = Result<Ack, ClientError>> + 'static, ClientError> {
        let op_count = u32::try_from(batch.ops.len())
            .map_err(|_| ClientError::invalid("too many ops in one batch"))?;
        let mut request = self.cap.append_ops_request();
        {
            let mut wire_batch = request.get().init_batch();
            wire_batch.set_batch_id(batch.batch_id.as_str());
            if let Some(cursor) = batch.expected_cursor {
                wire_batch.set_expected_cursor(cursor);
                wire_batch.set_has_expected_cursor(true);
            }
            if let Some(after) = &batch.after {
                wire_batch.set_after(after.as_str());
            }
            let mut ops = wire_batch.init_ops(op_count);
            for (i, op) in batch.ops.iter().enumerate() {
                let mut wire_op = ops.reborrow().get(i as u32);
                wire_op.set_op_id(op.op_id.as_str());
                wire_op.set_kind(op.kind.into());
                let payload = serde_json::to_string(&op.payload)
                    .map_err(|e| ClientError::invalid(format!("op {}: payload: {e}", op.op_id)))?;
                wire_op.set_payload(payload.as_str());
                let dep_count = u32::try_from(op.depends_on.len())
                    .map_err(|_| ClientError::invalid("too many dependsOn entries"))?;
                let mut deps = wire_op.init_depends_on(dep_count);
                for (j, dep) in op.depends_on.iter().enumerate() {
                    deps.set(j as u32, dep.as_str());
                }
            }
        }
        let promise = request.send().promise;
        Ok(async move { read_ack(&promise.await?) })
    }

    /// Mints a read-only viewer token for this share (Unix ms expiry, `None` for never).
    pub async fn mint_viewer(&self, expires_at: Option<i64>) -> Result<MintedToken, ClientError> {
        let mut request = self.cap.mint_viewer_request();
        request.get().set_expires_at(wire_time(expires_at));
        let response = request.send().promise.await?;
        wire::minted_token(ok_or_fail!(mint_result, response.get()?.get_result()?))
    }

    /// A new writer token for this capability (same epoch and expiry), to redeem after a
    /// reconnect or a server restart.
    pub async fn save(&self) -> Result<MintedToken, ClientError> {
        let request = self.cap.save_request();
        let response = request.send().promise.await?;
        wire::minted_token(ok_or_fail!(mint_result, response.get()?.get_result()?))
    }

    /// The share's current state.
    pub async fn state(&self) -> Result<ShareState, ClientError> {
        let request = self.cap.state_request();
        let response = request.send().promise.await?;
        wire::share_state(ok_or_fail!(
            share_state_result,
            response.get()?.get_result()?
        ))
    }

    /// A read-only view of the same share. Pipelined: no round trip now; if the writer was
    /// revoked, the viewer's first call fails instead.
    pub fn viewer(&self) -> ViewerClient {
        let pipeline = self.cap.viewer_request().send().pipeline;
        // Not redeemed from a token: no token id, no expiry of its own to report.
        ViewerClient::new(pipeline.get_viewer(), None, None, self.state.clone())
    }
}

/// The ack in an `appendOps` response, or its failure.
fn read_ack(
    response: &capnp::capability::Response<share_writer::append_ops_results::Owned>,
) -> Result<Ack, ClientError> {
    let ack = match response.get()?.get_result()?.which()? {
        append_result::Which::Ack(ack) => ack?,
        append_result::Which::Failure(f) => return Err(wire::failure(f?)),
    };
    let results = ack
        .get_results()?
        .iter()
        .map(|r| {
            let outcome = match r.which()? {
                op_result::Which::Applied(cursor) => OpOutcome::Applied(Cursor(cursor)),
                op_result::Which::Duplicate(cursor) => OpOutcome::Duplicate(Cursor(cursor)),
                op_result::Which::Rejected(rejection) => {
                    let rejection = rejection?;
                    OpOutcome::Rejected {
                        reason: rejection.get_reason()?.into(),
                        detail: wire::text(rejection.get_detail())?,
                    }
                }
            };
            Ok(OpResult {
                op_id: OpId(wire::text(r.get_op_id())?),
                outcome,
            })
        })
        .collect::<Result<Vec<_>, ClientError>>()?;
    Ok(Ack {
        cursor: Cursor(ack.get_cursor()),
        results,
    })
}
