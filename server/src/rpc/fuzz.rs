//! Fuzzing harness for RPC requests: arbitrary bytes decoded as the params
//! struct of one of the server's interface methods, then read with the same
//! functions its handler reads them with, and the result checked.
//!
//! Nothing here reaches the ledger: a handler's reading ends where it hands a
//! typed request on, and that is where this stops.

use std::time::Duration;

use capnp::message::ReaderOptions;
use capnp::serialize::{self, OwnedSegments};
use capsync_shared::capsync_capnp::{admin, agent, gateway, share_viewer, share_writer};
use capsync_shared::limits::{
    MAX_BATCH_ID_BYTES, MAX_DEPENDS_ON, MAX_LIST_PAGE, MAX_OP_ID_BYTES, MAX_OPS_PAGE,
    MAX_RECORD_ID_BYTES, MAX_SNAPSHOT_PAGE_BYTES,
};
use capsync_shared::{Cursor, ErrorCode, now_millis};

use super::wire::{self, BatchLimits};
use super::{admin as admin_rpc, agent as agent_rpc, shares, viewer};
use crate::error::ServerError;

/// Every method of the interfaces the server implements, in the order a fuzz
/// input's first byte picks them (modulo the count).
pub const METHODS: [&str; 28] = [
    "Gateway.redeem",
    "Admin.mintAgent",
    "Admin.revokeShare",
    "Admin.revokeToken",
    "Admin.listShares",
    "Admin.deleteShare",
    "Admin.archiveShare",
    "Admin.unarchiveShare",
    "Admin.stats",
    "Admin.prune",
    "Admin.vacuum",
    "Admin.reclaim",
    "Admin.compactLedger",
    "Agent.createShare",
    "Agent.listShares",
    "Agent.revokeShare",
    "Agent.mintWriter",
    "Agent.mintViewer",
    "ShareWriter.appendOps",
    "ShareWriter.mintViewer",
    "ShareWriter.save",
    "ShareWriter.state",
    "ShareWriter.viewer",
    "ShareViewer.snapshot",
    "ShareViewer.opsSince",
    "ShareViewer.state",
    "ShareViewer.subscribe",
    "ShareViewer.presence",
];

/// Batch limits small enough that the fuzzer reaches them (the server's
/// default is 1000 ops; an op over the per-op size limit is the ledger's to
/// refuse, alone).
pub const BATCH_LIMITS: BatchLimits = BatchLimits { max_ops: 16 };

/// Decoding bounds: tighter than the server's, which only bounds the message
/// size, so an input cannot make one run slow.
const TRAVERSAL_LIMIT_WORDS: usize = 64 * 1024;
const NESTING_LIMIT: i32 = 16;

type Message = capnp::message::Reader<OwnedSegments>;

/// One fuzz input: a byte choosing the method, then a capnp message in the
/// standard stream framing (segment table, then segments).
pub fn rpc_params(data: &[u8]) {
    let Some((&selector, mut framed)) = data.split_first() else {
        return;
    };
    let mut options = ReaderOptions::new();
    options
        .traversal_limit_in_words(Some(TRAVERSAL_LIMIT_WORDS))
        .nesting_limit(NESTING_LIMIT);
    let Ok(message) = serialize::read_message(&mut framed, options) else {
        return;
    };
    let method = usize::from(selector) % METHODS.len();
    if let Err(err) = read(method, &message) {
        // A request the server cannot read is the caller's mistake, never an internal error.
        assert!(
            matches!(err.code, ErrorCode::InvalidArgument | ErrorCode::TooLarge),
            "{}: reading failed with {err}",
            METHODS[method]
        );
    }
}

/// The input that [`rpc_params`] reads as a call of `method` with `params`.
#[cfg(test)]
pub(crate) fn encode<A: capnp::message::Allocator>(
    method: &str,
    params: &capnp::message::Builder<A>,
) -> Vec<u8> {
    let index = METHODS
        .iter()
        .position(|m| *m == method)
        .unwrap_or_else(|| panic!("{method} is not a method of METHODS"));
    let mut data = vec![index as u8];
    serialize::write_message(&mut data, params).expect("writing to a Vec cannot fail");
    data
}

/// Reads the params of `METHODS[method]` from `message` as its handler does.
fn read(method: usize, message: &Message) -> Result<(), ServerError> {
    match method {
        0 => {
            let p: gateway::redeem_params::Reader<'_> = message.get_root()?;
            // The redeemer parses the token before anything else.
            crate::fuzzing::check_token(&wire::text(p.get_token())?);
        }
        1 => {
            let p: admin::mint_agent_params::Reader<'_> = message.get_root()?;
            let before = now_millis();
            let (_label, expires_at) = admin_rpc::read_mint_agent(p, now_millis())?;
            check_expiry(p.get_expires_at(), expires_at, before);
        }
        2 => {
            let p: admin::revoke_share_params::Reader<'_> = message.get_root()?;
            revoke(p.get_share_id(), p.get_scope())?;
        }
        3 => {
            let p: admin::revoke_token_params::Reader<'_> = message.get_root()?;
            wire::text(p.get_token_id())?;
        }
        4 => {
            let p: admin::list_shares_params::Reader<'_> = message.get_root()?;
            list(p.get_after(), p.get_limit())?;
        }
        5 => {
            let p: admin::delete_share_params::Reader<'_> = message.get_root()?;
            wire::text(p.get_share_id())?;
        }
        6 => {
            let p: admin::archive_share_params::Reader<'_> = message.get_root()?;
            wire::text(p.get_share_id())?;
        }
        7 => {
            let p: admin::unarchive_share_params::Reader<'_> = message.get_root()?;
            wire::text(p.get_share_id())?;
        }
        8 => {
            let _: admin::stats_params::Reader<'_> = message.get_root()?;
        }
        9 => {
            let p: admin::prune_params::Reader<'_> = message.get_root()?;
            let o = p.get_options()?;
            let options = admin_rpc::read_prune_options(o)?;
            check_retention(o.get_older_than_ms(), options.older_than);
            assert_eq!(
                (
                    options.children,
                    options.archived_only,
                    options.dry_run,
                    options.vacuum
                ),
                (
                    o.get_children(),
                    o.get_archived_only(),
                    o.get_dry_run(),
                    o.get_vacuum()
                )
            );
            // A missing or unusable listener means no progress reports, not a failure.
            let _listener = p.get_progress().ok();
        }
        10 => {
            let _: admin::vacuum_params::Reader<'_> = message.get_root()?;
        }
        11 => {
            let p: admin::reclaim_params::Reader<'_> = message.get_root()?;
            let _ = (p.get_dry_run(), p.get_progress().ok());
        }
        12 => {
            let p: admin::compact_ledger_params::Reader<'_> = message.get_root()?;
            let millis = p.get_older_than_ms();
            check_retention(millis, wire::older_than(millis, "olderThanMs")?);
            let _ = (p.get_dry_run(), p.get_progress().ok());
        }
        13 => {
            let p: agent::create_share_params::Reader<'_> = message.get_root()?;
            let before = now_millis();
            let (share, viewer_expires_at) = agent_rpc::read_new_share(p, now_millis())?;
            assert!(!share.session_id.is_empty());
            for id in [
                &share.session_id,
                &share.project_id,
                &share.parent_session_id,
            ] {
                assert!(
                    id.len() <= MAX_RECORD_ID_BYTES,
                    "an id of {} bytes",
                    id.len()
                );
            }
            assert!(share.title.len() <= agent_rpc::MAX_TITLE_BYTES);
            check_expiry(p.get_viewer_expires_at(), viewer_expires_at, before);
        }
        14 => {
            let p: agent::list_shares_params::Reader<'_> = message.get_root()?;
            list(p.get_after(), p.get_limit())?;
        }
        15 => {
            let p: agent::revoke_share_params::Reader<'_> = message.get_root()?;
            revoke(p.get_share_id(), p.get_scope())?;
        }
        16 => {
            let p: agent::mint_writer_params::Reader<'_> = message.get_root()?;
            mint(p.get_share_id(), p.get_expires_at())?;
        }
        17 => {
            let p: agent::mint_viewer_params::Reader<'_> = message.get_root()?;
            mint(p.get_share_id(), p.get_expires_at())?;
        }
        18 => {
            let p: share_writer::append_ops_params::Reader<'_> = message.get_root()?;
            let reader = p.get_batch()?;
            let batch = wire::batch(reader, &BATCH_LIMITS)?;
            check_batch(reader, &batch);
        }
        19 => {
            let p: share_writer::mint_viewer_params::Reader<'_> = message.get_root()?;
            let before = now_millis();
            let millis = p.get_expires_at();
            check_expiry(
                millis,
                wire::optional_time(millis, "expiresAt", now_millis())?,
                before,
            );
        }
        20 => {
            let _: share_writer::save_params::Reader<'_> = message.get_root()?;
        }
        21 => {
            let _: share_writer::state_params::Reader<'_> = message.get_root()?;
        }
        22 => {
            let _: share_writer::viewer_params::Reader<'_> = message.get_root()?;
        }
        23 => {
            let p: share_viewer::snapshot_params::Reader<'_> = message.get_root()?;
            let (_page, max_bytes) = viewer::read_snapshot(p)?;
            check_page_size(p.get_max_bytes(), max_bytes, MAX_SNAPSHOT_PAGE_BYTES);
        }
        24 => {
            let p: share_viewer::ops_since_params::Reader<'_> = message.get_root()?;
            let (after, limit) = viewer::read_ops_since(p);
            assert_eq!(after, Cursor(p.get_after()));
            check_page_size(p.get_limit(), limit, MAX_OPS_PAGE);
        }
        25 => {
            let _: share_viewer::state_params::Reader<'_> = message.get_root()?;
        }
        26 => {
            let p: share_viewer::subscribe_params::Reader<'_> = message.get_root()?;
            let _from = Cursor(p.get_from_cursor());
            // A message without a capability table has no listener to call.
            p.get_listener()?;
        }
        27 => {
            let _: share_viewer::presence_params::Reader<'_> = message.get_root()?;
        }
        _ => unreachable!("the method index is taken modulo METHODS.len()"),
    }
    Ok(())
}

/// What `shares::revoke` reads before it asks the ledger.
fn revoke(
    share_id: capnp::Result<capnp::text::Reader<'_>>,
    scope: Result<capsync_shared::capsync_capnp::Scope, capnp::NotInSchema>,
) -> Result<(), ServerError> {
    wire::text(share_id)?;
    wire::scope(scope)?;
    Ok(())
}

/// What `shares::list` reads before it asks the ledger.
fn list(after: capnp::Result<capnp::text::Reader<'_>>, limit: u32) -> Result<(), ServerError> {
    check_page_size(limit, shares::list_limit(limit), MAX_LIST_PAGE);
    wire::text(after)?;
    Ok(())
}

/// What `shares::mint` reads before it hashes and stores a token.
fn mint(
    share_id: capnp::Result<capnp::text::Reader<'_>>,
    expires_at: i64,
) -> Result<(), ServerError> {
    wire::text(share_id)?;
    let before = now_millis();
    check_expiry(
        expires_at,
        wire::optional_time(expires_at, "expiresAt", now_millis())?,
        before,
    );
    Ok(())
}

/// An accepted expiry is "never" for 0, else the time sent, which lies in the future.
fn check_expiry(sent: i64, read: Option<i64>, before: i64) {
    match read {
        None => assert_eq!(sent, 0, "expiry {sent} read as never"),
        Some(at) => assert!(at == sent && at > before, "expiry {sent} read as {at}"),
    }
}

/// An accepted retention is the positive age sent.
fn check_retention(sent: i64, read: Duration) {
    assert!(sent > 0, "a retention of {sent} ms was accepted");
    assert_eq!(read.as_millis(), u128::from(sent.unsigned_abs()));
}

/// A page size is the default for 0, else what was asked, capped.
fn check_page_size(sent: u32, used: u32, max: u32) {
    assert!((1..=max).contains(&used), "page size {sent} became {used}");
    if sent != 0 {
        assert_eq!(used, sent.min(max));
    }
}

/// A batch `wire::batch` accepted is within every limit, and is what was sent.
fn check_batch(
    sent: capsync_shared::capsync_capnp::batch::Reader<'_>,
    read: &crate::ledger::BatchIn,
) {
    assert!(read.batch_id.len() <= MAX_BATCH_ID_BYTES);
    assert!(read.ops.len() <= BATCH_LIMITS.max_ops);
    let sent_ops = sent.get_ops().expect("the batch was read once already");
    assert_eq!(read.ops.len(), sent_ops.len() as usize);
    let is_op_id = |id: &str| (1..=MAX_OP_ID_BYTES).contains(&id.len());
    for op in &read.ops {
        assert!(is_op_id(op.op_id.as_str()), "op id {:?}", op.op_id);
        assert!(op.depends_on.len() <= MAX_DEPENDS_ON);
        for dependency in &op.depends_on {
            assert!(
                is_op_id(dependency.as_str()),
                "dependsOn entry of {} bytes accepted",
                dependency.as_str().len()
            );
        }
    }
    let expected = sent
        .get_has_expected_cursor()
        .then(|| Cursor(sent.get_expected_cursor()));
    assert_eq!(read.expected_cursor, expected);
}

#[cfg(test)]
mod tests {
    use capnp::message::Builder;

    use super::*;

    /// Found by `rpc_params`: `wire::batch` bounded an op's own id but not the
    /// ids in its `dependsOn`, so an empty or oversized entry (which no op can
    /// have) made its op wait forever as `missingDependency`.
    #[test]
    fn depends_on_entries_must_be_op_ids() {
        for dependency in [String::new(), "d".repeat(MAX_OP_ID_BYTES + 1)] {
            let mut message = Builder::new_default();
            let mut batch = message
                .init_root::<share_writer::append_ops_params::Builder<'_>>()
                .init_batch();
            let mut op = batch.reborrow().init_ops(1).get(0);
            op.set_op_id("op_1");
            op.set_payload("{}");
            op.init_depends_on(1).set(0, &dependency);
            let params = message
                .get_root_as_reader::<share_writer::append_ops_params::Reader<'_>>()
                .unwrap();
            let err = wire::batch(params.get_batch().unwrap(), &BATCH_LIMITS).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
            assert!(err.message.contains("depends on"), "{err}");
            rpc_params(&encode("ShareWriter.appendOps", &message));
        }
    }
}
