//! Contract cases of reclaiming compacted tool output: clearing it on write
//! (the `reclaim` setting) and in a retroactive pass of bounded steps.

use std::collections::BTreeMap;

use capsync_shared::{Cursor, OpKind};

use super::{Fixture, raw_op as raw};
use crate::ledger::{
    LedgerError, LedgerResult, OpOutcome, Operator, ReclaimStep, RecordKind, RejectReason,
};

/// The output of every part in these cases: easy to look for in what is stored.
const BIG_OUTPUT: &str = "BIG OUTPUT line 1\nline 2 \"quoted\" déjà vu";
const ATTACHMENTS: &str =
    r#"[{"type":"file","mime":"image/png","url":"data:image/png;base64,AAAA"}]"#;

/// A tool part as opencode sends it, its keys in opencode's order (not
/// sorted), so a test can tell whether anything but the cleared values moved.
/// `compacted` is the JSON of `state.time.compacted`, if the part has one.
fn tool_part(id: &str, output: &str, attachments: &str, compacted: Option<&str>) -> String {
    let output = serde_json::to_string(output).unwrap();
    let compacted = compacted.map_or(String::new(), |c| format!(r#","compacted":{c}"#));
    format!(
        r#"{{"id":"{id}","messageID":"msg_1","sessionID":"ses_1","type":"tool","callID":"call_{id}","tool":"bash","state":{{"status":"completed","input":{{"command":"cat big.log","description":"reads the log"}},"output":{output},"title":"cat big.log","metadata":{{"exit":0}},"time":{{"start":1,"end":2{compacted}}},"attachments":{attachments}}}}}"#
    )
}

/// A text part carrying a tool-like state with a compacted time: not a tool part, so never touched.
fn text_part(id: &str) -> String {
    let output = serde_json::to_string(BIG_OUTPUT).unwrap();
    format!(
        r#"{{"id":"{id}","messageID":"msg_1","sessionID":"ses_1","type":"text","text":"after compaction","state":{{"output":{output},"time":{{"compacted":3}}}}}}"#
    )
}

/// The parts of a reclaim test, by id: what each was sent as.
fn sent_parts() -> Vec<(&'static str, String)> {
    vec![
        (
            "prt_a_compacted",
            tool_part("prt_a_compacted", BIG_OUTPUT, ATTACHMENTS, Some("3")),
        ),
        (
            "prt_b_plain",
            tool_part("prt_b_plain", BIG_OUTPUT, ATTACHMENTS, None),
        ),
        (
            "prt_c_null_compacted",
            tool_part("prt_c_null_compacted", BIG_OUTPUT, "[]", Some("null")),
        ),
        (
            "prt_d_compacted_no_attachments",
            tool_part(
                "prt_d_compacted_no_attachments",
                BIG_OUTPUT,
                "[]",
                Some("5"),
            ),
        ),
        ("prt_e_text", text_part("prt_e_text")),
        (
            "prt_f_already_cleared",
            tool_part("prt_f_already_cleared", "", "[]", Some("4")),
        ),
        (
            "prt_g_compacted",
            tool_part("prt_g_compacted", "x", ATTACHMENTS, Some("6")),
        ),
    ]
}

/// What each part of [`sent_parts`] is once its compacted output is cleared.
fn cleared_parts() -> BTreeMap<String, String> {
    let mut parts: BTreeMap<String, String> = sent_parts()
        .into_iter()
        .map(|(id, json)| (id.to_owned(), json))
        .collect();
    for (id, compacted) in [
        ("prt_a_compacted", "3"),
        ("prt_d_compacted_no_attachments", "5"),
        ("prt_g_compacted", "6"),
    ] {
        parts.insert(id.to_owned(), tool_part(id, "", "[]", Some(compacted)));
    }
    parts
}

/// Sends a session, a message and every part of [`sent_parts`], one op each.
async fn write_parts(fx: &Fixture) {
    let mut ops = vec![
        raw(
            "o_session",
            OpKind::SessionUpsert,
            r#"{"id":"ses_1","title":"t"}"#,
        ),
        raw(
            "o_message",
            OpKind::MessageUpsert,
            r#"{"id":"msg_1","role":"assistant","sessionID":"ses_1","time":{"created":1}}"#,
        ),
    ];
    for (id, json) in sent_parts() {
        ops.push(raw(&format!("o_{id}"), OpKind::PartUpsert, &json));
    }
    let count = ops.len();
    let ack = fx.append(ops).await;
    assert!(
        ack.results
            .iter()
            .all(|r| matches!(r.outcome, OpOutcome::Applied(_))),
        "{ack:?}"
    );
    assert_eq!(ack.cursor, Cursor(count as u64));
}

/// Every part as a snapshot shows it, by id.
async fn snapshot_parts(fx: &Fixture) -> BTreeMap<String, String> {
    let (records, _) = fx.snapshot(1 << 20).await;
    records
        .into_iter()
        .filter(|r| r.kind == RecordKind::Part)
        .map(|r| (r.id, r.json))
        .collect()
}

/// Every op payload as `ops_since` shows it, by op id.
async fn ledger_payloads(fx: &Fixture) -> BTreeMap<String, String> {
    let page = fx
        .backend
        .ops_since(fx.viewer.clone(), Cursor(0), 1000)
        .await
        .unwrap();
    page.ops
        .into_iter()
        .map(|op| (op.op_id.as_str().to_owned(), op.payload))
        .collect()
}

/// Bytes of all parts' JSON text, as a snapshot shows it.
async fn part_bytes(fx: &Fixture) -> u64 {
    snapshot_parts(fx)
        .await
        .values()
        .map(|json| json.len() as u64)
        .sum()
}

async fn reclaimable_output_bytes(fx: &Fixture) -> u64 {
    let stats = fx.backend.stats(fx.admin.clone()).await.unwrap();
    stats.reclaimable_output_bytes
}

/// What a whole pass added up to, and the steps it took.
#[derive(Debug, Default, PartialEq, Eq)]
struct Pass {
    scanned: u64,
    cleared: u64,
    bytes: u64,
    steps: Vec<ReclaimStep>,
}

impl Pass {
    fn totals(&self) -> (u64, u64, u64) {
        (self.scanned, self.cleared, self.bytes)
    }
}

/// Runs reclaim steps from the start until the scan is complete.
async fn pass(fx: &Fixture, op: &Operator, max_parts: u32, dry_run: bool) -> LedgerResult<Pass> {
    let mut pass = Pass::default();
    let mut after = 0;
    loop {
        let step = fx
            .backend
            .reclaim_step(op.clone(), after, max_parts, dry_run)
            .await?;
        pass.scanned += step.scanned;
        pass.cleared += step.cleared;
        pass.bytes += step.bytes;
        pass.steps.push(step);
        assert!(pass.steps.len() < 1000, "the pass does not end");
        match step.next {
            Some(next) => {
                assert!(next > after, "a step must move the pass on");
                after = next;
            }
            None => return Ok(pass),
        }
    }
}

pub(crate) async fn with_reclaim_on_a_compacted_tool_part_is_stored_without_output_or_attachments(
    fx: Fixture,
) {
    write_parts(&fx).await;

    let expected = cleared_parts();
    assert_eq!(snapshot_parts(&fx).await, expected);
    // The ledger row holds the cleared JSON too: a viewer replaying ops sees
    // what a snapshot shows, and the output is not on disk anywhere.
    let payloads = ledger_payloads(&fx).await;
    for (id, json) in &expected {
        assert_eq!(&payloads[&format!("o_{id}")], json, "{id}");
    }
    assert_eq!(
        payloads
            .values()
            .filter(|payload| payload.contains("data:image/png"))
            .count(),
        1,
        "only the part that is not compacted keeps its attachments"
    );
    assert_eq!(reclaimable_output_bytes(&fx).await, 0);
    let admin = Operator::Admin(fx.admin.clone());
    let nothing_left = pass(&fx, &admin, 100, false).await.unwrap();
    assert_eq!(nothing_left.totals(), (4, 0, 0));
}

pub(crate) async fn a_delta_on_a_compacted_part_is_stale_and_changes_nothing(fx: Fixture) {
    write_parts(&fx).await;
    let before = snapshot_parts(&fx).await["prt_a_compacted"].clone();
    let delta = r#"{"partID":"prt_a_compacted","field":"note","delta":"kept"}"#;
    let ack = fx
        .append(vec![raw("o_delta", OpKind::PartDelta, delta)])
        .await;
    // A compacted tool call is finished: its snapshot is the whole record.
    assert!(
        matches!(
            ack.results[0].outcome,
            OpOutcome::Rejected {
                reason: RejectReason::StaleTransition,
                ..
            }
        ),
        "{:?}",
        ack.results[0].outcome
    );
    assert!(!ledger_payloads(&fx).await.contains_key("o_delta"));
    assert_eq!(snapshot_parts(&fx).await["prt_a_compacted"], before);
}

pub(crate) async fn with_reclaim_off_parts_are_stored_as_sent(fx: Fixture) {
    let fx = fx.reopen_without_reclaim().await;
    write_parts(&fx).await;

    let sent: BTreeMap<String, String> = sent_parts()
        .into_iter()
        .map(|(id, json)| (id.to_owned(), json))
        .collect();
    assert_eq!(snapshot_parts(&fx).await, sent);
    let payloads = ledger_payloads(&fx).await;
    for (id, json) in &sent {
        assert_eq!(&payloads[&format!("o_{id}")], json, "{id}");
    }
}

pub(crate) async fn the_retroactive_pass_clears_exactly_the_compacted_tool_parts(fx: Fixture) {
    let fx = fx.reopen_without_reclaim().await;
    write_parts(&fx).await;
    let before = snapshot_parts(&fx).await;
    let bytes_before = part_bytes(&fx).await;
    let payloads_before = ledger_payloads(&fx).await;
    assert!(reclaimable_output_bytes(&fx).await > 0);
    let admin = Operator::Admin(fx.admin.clone());

    // Two parts a step: seven parts take four steps.
    let dry = pass(&fx, &admin, 2, true).await.unwrap();
    assert_eq!((dry.scanned, dry.cleared), (4, 3));
    assert!(dry.bytes > 0);
    assert_eq!(dry.steps.len(), 4);
    let total = dry.steps[0].total;
    assert!(dry.steps.iter().all(|s| s.total == total));
    assert!(dry.steps.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(dry.steps.last().unwrap().position, total);
    assert_eq!(
        snapshot_parts(&fx).await,
        before,
        "a dry run changes nothing"
    );

    let real = pass(&fx, &admin, 2, false).await.unwrap();
    assert_eq!(real.totals(), dry.totals());
    assert_eq!(snapshot_parts(&fx).await, cleared_parts());
    assert_eq!(real.bytes, bytes_before - part_bytes(&fx).await);
    assert_eq!(reclaimable_output_bytes(&fx).await, 0);
    // The pass leaves the ledger to ledger compaction.
    assert_eq!(ledger_payloads(&fx).await, payloads_before);

    let again = pass(&fx, &admin, 2, false).await.unwrap();
    assert_eq!(again.totals(), (4, 0, 0));
    assert_eq!(snapshot_parts(&fx).await, cleared_parts());
}

pub(crate) async fn a_pass_over_no_parts_ends_at_once(fx: Fixture) {
    let step = fx
        .backend
        .reclaim_step(Operator::Scheduler, 0, 10, false)
        .await
        .unwrap();
    assert_eq!(step, ReclaimStep::default());
}

pub(crate) async fn only_admins_and_the_scheduler_may_reclaim(fx: Fixture) {
    let fx = fx.reopen_without_reclaim().await;
    write_parts(&fx).await;
    for who in [fx.agent.clone(), fx.writer.clone(), fx.viewer.clone()] {
        for dry_run in [true, false] {
            let refused = pass(&fx, &Operator::Admin(who.clone()), 100, dry_run).await;
            assert!(
                matches!(refused, Err(LedgerError::PermissionDenied)),
                "{who:?} dry_run={dry_run}: {refused:?}"
            );
        }
    }
    assert!(reclaimable_output_bytes(&fx).await > 0);
    let scheduled = pass(&fx, &Operator::Scheduler, 100, false).await.unwrap();
    assert_eq!(scheduled.totals().1, 3);
    assert_eq!(reclaimable_output_bytes(&fx).await, 0);
}
