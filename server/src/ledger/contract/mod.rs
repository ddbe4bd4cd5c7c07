//! The backend contract: behaviour every storage engine of the ledger must show
//! through the [`Backend`] seam alone, written once and run on each engine.
//!
//! An engine runs the whole suite with one line, [`ledger_contract!`], given an
//! [`Engine`] (how to open a ledger in a directory). Each case gets a fresh
//! [`Fixture`]: a store with an admin, an agent and one share of that agent,
//! and a clock that stands still until a case moves it, so every time stored
//! is exact and "a month later" takes no waiting.
//!
//! The cases observe only what the seam shows (snapshots, `ops_since`,
//! `share_state`, listings, `stats`, prune plans, `NotFound` answers): what an
//! engine stores, and how, is its own business, tested beside the engine.
//!
//! - [`append`]: applying batches exactly once.
//! - [`records`]: what ops do to the stored records, out-of-order arrival included.
//! - [`authority`]: tokens, epochs, and who may call what.
//! - [`shares`]: joining a session's share, minting for a share, child shares.
//! - [`snapshot`]: snapshot pages and catch-up from the ledger.
//! - [`lifecycle`]: archiving, stats, deleting, closing.
//! - [`prune`]: prune plans, deletion in steps, archiving inactive shares.
//! - [`reclaim`]: compacted tool output, on write and in a retroactive pass.
//! - [`compaction`]: dropping old ledger payloads, and vacuum's permission.

pub(crate) mod append;
pub(crate) mod authority;
pub(crate) mod compaction;
pub(crate) mod lifecycle;
pub(crate) mod prune;
pub(crate) mod reclaim;
pub(crate) mod records;
pub(crate) mod shares;
pub(crate) mod snapshot;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use capsync_shared::{Cursor, Epoch, OpId, OpKind, ShareId, TokenId, TokenKind};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::clock::Clock;
use crate::ledger::{
    Ack, Authority, BatchIn, DeleteStep, Ledger, LedgerResult, LoggedOp, NewShare, NewToken, OpIn,
    OpOutcome, Operator, Record, RejectReason, Stats,
};

/// The session of the fixture's share.
pub(crate) const SESSION: &str = "ses_1";
/// The fixture's share.
pub(crate) const SHARE: &str = "sh_1";
/// Where every fixture's clock starts: 2026-01-01T00:00:00Z, in Unix ms.
pub(crate) const START: i64 = 1_767_225_600_000;

/// A day, for moving the clock.
pub(crate) const DAY: Duration = Duration::from_secs(24 * 3600);

/// A storage engine under test: how to open a ledger stored in a directory.
///
/// Opening the same directory again finds what was stored there, so a case
/// can close the ledger and reopen it (a server restart).
#[derive(Clone, Copy)]
pub(crate) struct Engine {
    /// Whether the engine can run here (PostgreSQL needs a server; its tests say
    /// that they skipped when there is none).
    pub(crate) available: fn() -> bool,
    /// Opens the ledger stored in the directory (creating it there if it is
    /// empty), reading "now" from the clock, with the server's default settings.
    pub(crate) open: fn(&Path, Clock) -> Ledger,
    /// [`Engine::open`] with the server's `reclaim` setting off: compacted tool
    /// parts are stored as sent.
    pub(crate) open_without_reclaim: fn(&Path, Clock) -> Ledger,
}

/// A store with an admin (`adm`), an agent (`agt`) and one share (`sh_1`, of
/// session `ses_1`) created by that agent, with its writer and viewer.
pub(crate) struct Fixture {
    /// Where the engine stores; kept alive for the test.
    pub(crate) dir: TempDir,
    pub(crate) engine: Engine,
    /// The ledger under test (named as the seam's role, so cases read `fx.backend.append(…)`).
    pub(crate) backend: Ledger,
    /// The ledger's clock: manual, at [`START`] until a case moves it.
    pub(crate) clock: Clock,
    pub(crate) admin: Authority,
    pub(crate) agent: Authority,
    /// `sh_1`, for session `ses_1`.
    pub(crate) share: ShareId,
    pub(crate) writer: Authority,
    pub(crate) viewer: Authority,
}

impl Fixture {
    /// A fresh store of `engine` in a new directory.
    pub(crate) async fn new(engine: Engine) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(START);
        let backend = (engine.open)(dir.path(), clock.clone());
        Self::over(engine, dir, clock, backend).await
    }

    /// The fixture's admin, agent and share, set up in `backend`, a fresh
    /// ledger already open in `dir` with `clock` (an engine's own tests open it
    /// themselves to keep a handle of their own on it).
    pub(crate) async fn over(engine: Engine, dir: TempDir, clock: Clock, backend: Ledger) -> Self {
        backend.replace_admin_token(token("adm")).await.unwrap();
        let admin = authority("adm", TokenKind::Admin, None);
        backend
            .mint_token(admin.clone(), TokenKind::Agent, token("agt"))
            .await
            .unwrap();
        let agent = authority("agt", TokenKind::Agent, None);
        let mut fixture = Self {
            dir,
            engine,
            backend,
            clock,
            admin,
            agent: agent.clone(),
            share: ShareId::from(SHARE),
            writer: authority("w-sh_1", TokenKind::Writer, Some((SHARE, 0))),
            viewer: authority("v-sh_1", TokenKind::Viewer, Some((SHARE, 0))),
        };
        let (writer, viewer) = fixture.new_share(&agent, SHARE).await;
        fixture.writer = writer;
        fixture.viewer = viewer;
        fixture
    }

    /// Closes the ledger and opens the same store again.
    pub(crate) async fn reopen(self) -> Self {
        let open = self.engine.open;
        self.reopen_with(open).await
    }

    /// Closes the ledger and opens the same store again with reclaim off.
    pub(crate) async fn reopen_without_reclaim(self) -> Self {
        let open = self.engine.open_without_reclaim;
        self.reopen_with(open).await
    }

    async fn reopen_with(mut self, open: fn(&Path, Clock) -> Ledger) -> Self {
        self.backend.close().await;
        self.backend = open(self.dir.path(), self.clock.clone());
        self
    }

    /// A second, empty store of the same engine (nothing in it, not even an
    /// admin), on the fixture's clock; the directory must outlive the ledger.
    pub(crate) fn empty_store(&self) -> (TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = (self.engine.open)(dir.path(), self.clock.clone());
        (dir, ledger)
    }

    /// The clock's time, in Unix ms.
    pub(crate) fn now(&self) -> i64 {
        self.clock.now_millis()
    }

    /// Runs `work` as if it happened `age` ago: the clock is moved back for it
    /// and forward again after, so what `work` stores (a share's creation, its
    /// last change, when its ops were applied) is `age` old.
    pub(crate) async fn ago<T>(&self, age: Duration, work: impl Future<Output = T>) -> T {
        self.clock.rewind(age);
        let out = work.await;
        self.clock.advance(age);
        out
    }

    /// Creates share `id` (session `ses_1`) owned by `agent`; returns its writer and viewer.
    pub(crate) async fn new_share(&self, agent: &Authority, id: &str) -> (Authority, Authority) {
        let info = self
            .backend
            .create_share(
                agent.clone(),
                new_share(id),
                token(&format!("w-{id}")),
                token(&format!("v-{id}")),
            )
            .await
            .unwrap();
        assert_eq!(info.state.cursor, Cursor(0));
        assert_eq!(info.owner_token_id, agent.token_id);
        (
            authority(&format!("w-{id}"), TokenKind::Writer, Some((id, 0))),
            authority(&format!("v-{id}"), TokenKind::Viewer, Some((id, 0))),
        )
    }

    /// Appends `ops` as the fixture's writer, in one batch.
    pub(crate) async fn append(&self, ops: Vec<OpIn>) -> Ack {
        self.backend
            .append(self.writer.clone(), batch(ops))
            .await
            .unwrap()
    }

    /// The share's cursor, as its viewer reads it.
    pub(crate) async fn cursor(&self) -> Cursor {
        self.backend
            .share_state(self.viewer.clone())
            .await
            .unwrap()
            .cursor
    }

    /// The whole store's counts, as the admin reads them.
    pub(crate) async fn stats(&self) -> Stats {
        self.backend.stats(self.admin.clone()).await.unwrap()
    }

    /// Every op of the fixture's share still served, from the start.
    pub(crate) async fn logged_ops(&self) -> Vec<LoggedOp> {
        logged_ops(&self.backend, &self.viewer).await
    }

    /// Every record of the share, read in pages of at most `max_bytes`.
    pub(crate) async fn snapshot(&self, max_bytes: u32) -> (Vec<Record>, usize) {
        snapshot(&self.backend, &self.viewer, max_bytes).await
    }
}

/// Every record of `who`'s share, read in pages of at most `max_bytes`, and
/// how many pages it took. Checks that the cursor stays put while reading and
/// that only the last page may be empty.
pub(crate) async fn snapshot(
    backend: &Ledger,
    who: &Authority,
    max_bytes: u32,
) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut page = String::new();
    let mut pages = 0;
    let first_cursor = backend.share_state(who.clone()).await.unwrap().cursor;
    loop {
        let got = backend
            .snapshot_page(who.clone(), page, max_bytes)
            .await
            .unwrap();
        assert_eq!(got.cursor, first_cursor);
        pages += 1;
        assert!(pages < 10_000, "snapshot does not end");
        assert!(
            !got.records.is_empty() || got.next_page.is_empty(),
            "an empty page must be the last"
        );
        records.extend(got.records);
        if got.next_page.is_empty() {
            return (records, pages);
        }
        page = got.next_page;
    }
}

/// Every op of `who`'s share still served, from the start, a page of 100 at a time.
pub(crate) async fn logged_ops(backend: &Ledger, who: &Authority) -> Vec<LoggedOp> {
    let mut ops = Vec::new();
    let mut after = Cursor(0);
    loop {
        let page = backend.ops_since(who.clone(), after, 100).await.unwrap();
        let Some(last) = page.ops.last() else {
            return ops;
        };
        after = last.cursor;
        ops.extend(page.ops);
    }
}

/// Deletes a share to the end in small steps, as `crate::lifecycle::delete_share` does.
pub(crate) async fn delete_share(
    backend: &Ledger,
    who: &Authority,
    share: &ShareId,
) -> LedgerResult<()> {
    let op = Operator::Admin(who.clone());
    loop {
        match backend
            .delete_share_step(op.clone(), share.clone(), None, 100)
            .await?
        {
            DeleteStep::More => {}
            DeleteStep::Done => return Ok(()),
            DeleteStep::Changed => unreachable!("no cursor was expected"),
        }
    }
}

pub(crate) fn token(id: &str) -> NewToken {
    NewToken {
        id: TokenId::from(id),
        secret_hash: format!("$argon2id$fake${id}"),
        expires_at: None,
        label: String::new(),
    }
}

pub(crate) fn authority(token_id: &str, kind: TokenKind, share: Option<(&str, u32)>) -> Authority {
    Authority {
        token_id: TokenId::from(token_id),
        kind,
        share: share.map(|(id, epoch)| (ShareId::from(id), Epoch(epoch))),
    }
}

/// Share `id` of session `ses_1`, a root, in project `prj`.
pub(crate) fn new_share(id: &str) -> NewShare {
    NewShare {
        share_id: ShareId::from(id),
        session_id: SESSION.into(),
        project_id: "prj".into(),
        parent_session_id: String::new(),
        title: "a session".into(),
    }
}

pub(crate) fn op(id: &str, kind: OpKind, payload: Value) -> OpIn {
    raw_op(id, kind, &payload.to_string())
}

/// An op with its payload exactly as given (not necessarily JSON).
pub(crate) fn raw_op(id: &str, kind: OpKind, payload: &str) -> OpIn {
    OpIn {
        op_id: OpId::from(id),
        kind,
        payload: payload.to_owned(),
        depends_on: Vec::new(),
    }
}

/// `op`, depending on `dependencies`.
pub(crate) fn after(mut op: OpIn, dependencies: &[&str]) -> OpIn {
    op.depends_on = dependencies.iter().map(|d| OpId::from(*d)).collect();
    op
}

pub(crate) fn batch(ops: Vec<OpIn>) -> BatchIn {
    BatchIn {
        batch_id: "batch".into(),
        ops,
        expected_cursor: None,
        follows: None,
        link: None,
    }
}

pub(crate) fn outcomes(ack: &Ack) -> Vec<OpOutcome> {
    ack.results.iter().map(|r| r.outcome.clone()).collect()
}

pub(crate) fn applied(cursors: &[u64]) -> Vec<OpOutcome> {
    cursors
        .iter()
        .map(|c| OpOutcome::Applied(Cursor(*c)))
        .collect()
}

/// The detail of a rejection with `reason`, or a panic.
pub(crate) fn rejection(outcome: &OpOutcome, reason: RejectReason) -> String {
    match outcome {
        OpOutcome::Rejected { reason: r, detail } if *r == reason => detail.clone(),
        other => panic!("expected a {reason:?} rejection, got {other:?}"),
    }
}

pub(crate) fn session() -> Value {
    json!({"id": SESSION, "title": "t"})
}

pub(crate) fn message(id: &str) -> Value {
    json!({"id": id, "role": "assistant", "sessionID": SESSION, "time": {"created": 1}})
}

pub(crate) fn completed_message(id: &str) -> Value {
    json!({"id": id, "role": "assistant", "time": {"created": 1, "completed": 2}})
}

pub(crate) fn part(id: &str, message_id: &str) -> Value {
    json!({"id": id, "messageID": message_id, "sessionID": SESSION, "type": "text", "text": "Hel"})
}

pub(crate) fn model_op(id: &str) -> OpIn {
    op(id, OpKind::ModelUpsert, json!({"id": id}))
}

/// A model upsert whose payload is padded to about `pad` bytes.
pub(crate) fn padded_op(id: &str, pad: usize) -> OpIn {
    op(
        id,
        OpKind::ModelUpsert,
        json!({"id": id, "pad": "x".repeat(pad)}),
    )
}

/// Appends `count` padded ops named `<prefix>-<n>` to `writer`'s share, 100 to a batch.
pub(crate) async fn fill(
    backend: &Ledger,
    writer: &Authority,
    prefix: &str,
    count: usize,
    pad: usize,
) {
    let ids: Vec<String> = (0..count).map(|n| format!("{prefix}-{n}")).collect();
    for chunk in ids.chunks(100) {
        let ops = chunk.iter().map(|id| padded_op(id, pad)).collect();
        backend.append(writer.clone(), batch(ops)).await.unwrap();
    }
}

/// Runs every contract case on an engine: one test per case, each on a fresh
/// [`Fixture`] of the engine that `$engine` (an expression giving an
/// [`Engine`]) names. The list of cases is here, and only here.
macro_rules! ledger_contract {
    ($engine:expr) => {
        $crate::ledger::contract::ledger_contract! { @tests $engine;
            current_thread: [
                append::applied_ops_advance_the_cursor_and_are_logged_with_their_token,
                append::dedupe_is_permanent_across_a_reopen,
                append::an_op_id_sent_again_with_other_content_is_refused_not_a_duplicate,
                append::a_repeated_op_id_in_one_batch_is_a_duplicate_of_the_first,
                append::dependencies_must_be_applied_in_this_share,
                append::a_stale_expected_cursor_refuses_the_whole_batch,
                append::a_pipelined_batch_applies_only_if_the_batch_before_it_did,
                append::invalid_payloads_are_rejected_and_leave_no_trace,
                append::an_append_whose_caller_stops_waiting_is_still_announced,
                append::a_part_the_full_parse_refuses_is_not_stored_and_cannot_poison_its_deltas,
                records::completed_or_errored_messages_do_not_move_back,
                records::parts_follow_their_message_and_are_removed_with_it,
                records::removed_messages_and_parts_stay_removed,
                records::part_deltas_append_durably,
                records::streamed_text_reads_whole_until_a_snapshot_replaces_it,
                records::a_delta_to_a_field_that_is_not_a_string_is_refused,
                records::a_delta_to_a_finished_part_is_stale_and_adds_nothing,
                records::diff_set_replaces_the_whole_list,
                records::upserts_replace_their_record_and_keep_the_agents_text,
                records::a_finished_tool_call_does_not_go_back_to_running,
                records::an_ended_text_or_reasoning_part_keeps_its_end,
                records::a_session_does_not_go_back_to_an_older_update,
                records::a_part_before_its_message_is_kept_and_joins_it_when_it_arrives,
                records::the_same_model_id_from_two_providers_is_two_records,
                authority::revoking_writers_fences_the_old_epoch_only,
                authority::revoking_viewers_leaves_writers_working,
                authority::each_call_accepts_only_its_kinds_of_authority,
                authority::revoked_expired_and_unknown_tokens_grant_nothing,
                authority::minted_tokens_follow_the_chain_and_the_current_epochs,
                authority::only_the_first_admin_token_is_created,
                authority::replacing_the_admin_token_revokes_the_old_one,
                authority::create_share_refuses_unusable_session_ids,
                authority::agents_list_and_revoke_only_their_own_shares,
                shares::create_or_join_joins_the_agents_open_share_of_the_session,
                shares::owners_and_admins_mint_tokens_for_a_share_at_its_current_epochs,
                shares::a_share_is_never_its_own_child,
                shares::a_parents_viewer_reads_its_child_shares_until_its_viewers_are_revoked,
                snapshot::snapshot_pages_return_every_record_once_in_order,
                snapshot::a_snapshot_resumes_where_it_stopped_even_if_records_changed,
                snapshot::an_empty_share_has_an_empty_snapshot,
                snapshot::ops_since_pages_through_the_ledger_in_cursor_order,
                snapshot::pages_of_more_than_one_storage_batch_return_every_record_once_in_order,
                snapshot::records_are_ordered_by_the_bytes_of_their_ids,
                lifecycle::an_archived_share_is_hidden_read_only_and_still_viewable,
                lifecycle::stats_count_a_known_dataset,
                lifecycle::deleting_a_share_cascades_to_everything_it_owns,
                lifecycle::close_finishes_queued_work_then_refuses_everything,
                prune::a_plan_of_roots_takes_old_roots_and_reports_their_children,
                prune::archived_only_leaves_unarchived_shares_alone,
                prune::with_children_takes_every_descendant_whatever_its_project_or_age,
                prune::a_share_selected_and_reached_as_a_child_is_listed_once_as_inactive,
                prune::a_child_whose_parent_share_is_being_deleted_becomes_a_root,
                prune::a_cycle_of_parent_sessions_ends_and_lists_each_share_once,
                prune::the_footprint_of_each_share_matches_its_rows_and_bytes,
                prune::a_deletion_in_small_steps_removes_every_row_and_leaves_others_untouched,
                prune::the_first_step_hides_the_share_and_an_interrupted_deletion_is_finished_later,
                prune::a_share_that_moved_since_its_plan_is_not_deleted,
                prune::only_an_admin_or_the_scheduler_runs_lifecycle_steps,
                prune::archive_inactive_archives_old_unarchived_shares_oldest_first,
                reclaim::with_reclaim_on_a_compacted_tool_part_is_stored_without_output_or_attachments,
                reclaim::a_delta_on_a_compacted_part_is_stale_and_changes_nothing,
                reclaim::with_reclaim_off_parts_are_stored_as_sent,
                reclaim::the_retroactive_pass_clears_exactly_the_compacted_tool_parts,
                reclaim::a_pass_over_no_parts_ends_at_once,
                reclaim::only_admins_and_the_scheduler_may_reclaim,
                compaction::reused_op_ids_are_still_caught_after_compaction,
                compaction::compaction_drops_old_payloads_and_sends_viewers_below_the_point_to_a_snapshot,
                compaction::compaction_in_small_steps_resumes_inside_and_across_shares,
                compaction::only_admins_and_the_scheduler_may_vacuum,
            ],
            multi_thread: [
                append::concurrent_writers_apply_each_op_exactly_once,
            ],
        }
    };
    (@tests $engine:expr;
        current_thread: [$($module:ident :: $case:ident),* $(,)?],
        multi_thread: [$($mt_module:ident :: $mt_case:ident),* $(,)?] $(,)?
    ) => {
        $(
            #[tokio::test]
            async fn $case() {
                if !($engine.available)() {
                    return;
                }
                let fx = $crate::ledger::contract::Fixture::new($engine).await;
                $crate::ledger::contract::$module::$case(fx).await;
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $mt_case() {
                if !($engine.available)() {
                    return;
                }
                let fx = $crate::ledger::contract::Fixture::new($engine).await;
                $crate::ledger::contract::$mt_module::$mt_case(fx).await;
            }
        )*
    };
}
pub(crate) use ledger_contract;
