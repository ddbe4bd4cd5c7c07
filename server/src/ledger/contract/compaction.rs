//! Contract cases of ledger compaction (old payloads dropped in bounded steps,
//! op ids kept, readers below the compaction point sent to a snapshot), and of
//! who may vacuum.

use std::time::Duration;

use capsync_shared::{Cursor, OpKind, ShareId, TokenKind};
use serde_json::json;

use super::{Fixture, authority, fill, logged_ops, op, outcomes, padded_op};
use crate::ledger::{
    CompactPosition, CompactStep, DeleteStep, LedgerError, OpIn, OpOutcome, Operator, RecordKind,
    RejectReason,
};

/// Runs a whole compaction pass in steps of `max_ops`, returning every step.
async fn compact_pass(
    fx: &Fixture,
    applied_before: i64,
    max_ops: u32,
    dry_run: bool,
) -> Vec<CompactStep> {
    let mut steps = Vec::new();
    let mut from: Option<CompactPosition> = None;
    loop {
        let step = fx
            .backend
            .compact_step(
                Operator::Admin(fx.admin.clone()),
                applied_before,
                from.clone(),
                max_ops,
                dry_run,
            )
            .await
            .unwrap();
        from = step.next.clone();
        steps.push(step);
        assert!(steps.len() < 100, "the pass does not end");
        if from.is_none() {
            return steps;
        }
    }
}

/// Bytes of the payloads of `ops`.
fn payload_bytes<'a>(ops: impl IntoIterator<Item = &'a str>) -> u64 {
    ops.into_iter().map(|payload| payload.len() as u64).sum()
}

pub(crate) async fn reused_op_ids_are_still_caught_after_compaction(fx: Fixture) {
    let first = op("t", OpKind::ModelUpsert, json!({"id": "m1"}));
    fx.append(vec![first.clone()]).await;
    let cutoff = fx.now() + 1;
    compact_pass(&fx, cutoff, 100, false).await;
    // Its payload is gone: catching up from before it takes a snapshot.
    let stats = fx.stats().await;
    assert_eq!((stats.compacted_ops, stats.ledger_payload_bytes), (1, 0));
    let gap = fx.backend.ops_since(fx.viewer.clone(), Cursor(0), 10).await;
    assert!(
        matches!(gap, Err(LedgerError::SnapshotRequired(Cursor(1)))),
        "{gap:?}"
    );
    let ack = fx.append(vec![first]).await;
    assert_eq!(ack.results[0].outcome, OpOutcome::Duplicate(Cursor(1)));
    let ack = fx
        .append(vec![op("t", OpKind::ModelUpsert, json!({"id": "m2"}))])
        .await;
    assert!(
        matches!(
            ack.results[0].outcome,
            OpOutcome::Rejected {
                reason: RejectReason::OpIdReused,
                ..
            }
        ),
        "{:?}",
        ack.results[0]
    );
}

pub(crate) async fn compaction_drops_old_payloads_and_sends_viewers_below_the_point_to_a_snapshot(
    fx: Fixture,
) {
    let old: Vec<OpIn> = (1..=5)
        .map(|n| padded_op(&format!("old-{n}"), 50))
        .collect();
    fx.append(old.clone()).await;
    let old_bytes = fx.stats().await.ledger_payload_bytes;
    assert_eq!(
        old_bytes,
        payload_bytes(old.iter().map(|o| o.payload.as_str()))
    );
    // A second later, newer ops.
    fx.clock.advance(Duration::from_secs(1));
    fx.append(
        (1..=3)
            .map(|n| padded_op(&format!("new-{n}"), 50))
            .collect(),
    )
    .await;
    let logged = fx.logged_ops().await;
    let cutoff = logged
        .iter()
        .filter(|o| o.cursor > Cursor(5))
        .map(|o| o.applied_at)
        .min()
        .unwrap();
    assert!(logged[..5].iter().all(|o| o.applied_at < cutoff));
    let new_payloads: Vec<String> = logged[5..].iter().map(|o| o.payload.clone()).collect();
    let new_bytes = payload_bytes(new_payloads.iter().map(String::as_str));

    let denied = fx
        .backend
        .compact_step(Operator::Admin(fx.agent.clone()), cutoff, None, 100, true)
        .await;
    assert!(
        matches!(denied, Err(LedgerError::PermissionDenied)),
        "{denied:?}"
    );

    let expected = CompactStep {
        next: None,
        visited: 1,
        total_shares: 1,
        shares: 1,
        ops: 5,
        bytes: old_bytes,
    };
    let dry = compact_pass(&fx, cutoff, 100, true).await;
    assert_eq!(dry, vec![expected.clone()]);
    // A dry run moves no compaction point and drops no payload.
    let stats = fx.stats().await;
    assert_eq!(stats.compacted_ops, 0);
    assert_eq!(stats.ledger_payload_bytes, old_bytes + new_bytes);
    assert_eq!(fx.logged_ops().await, logged);

    let real = compact_pass(&fx, cutoff, 100, false).await;
    assert_eq!(real, dry, "a dry run reports what the real run does");
    let stats = fx.stats().await;
    assert_eq!(stats.compacted_ops, 5);
    assert_eq!(
        stats.ledger_payload_bytes, new_bytes,
        "the old payloads are gone, the new ones kept"
    );
    assert_eq!(stats.ledger_ops, 8, "op ids stay");

    for below in [0, 4] {
        let gap = fx
            .backend
            .ops_since(fx.viewer.clone(), Cursor(below), 100)
            .await;
        assert!(
            matches!(gap, Err(LedgerError::SnapshotRequired(Cursor(5)))),
            "{gap:?}"
        );
    }
    let page = fx
        .backend
        .ops_since(fx.viewer.clone(), Cursor(5), 100)
        .await
        .unwrap();
    let served: Vec<(u64, String)> = page
        .ops
        .iter()
        .map(|o| (o.cursor.0, o.payload.clone()))
        .collect();
    assert_eq!(served, (6..=8).zip(new_payloads).collect::<Vec<_>>());
    // The records stay: compaction only drops the ledger's copy.
    let (records, _) = fx.snapshot(1 << 20).await;
    assert_eq!(
        records
            .iter()
            .filter(|r| r.kind == RecordKind::Model)
            .count(),
        8
    );

    // Dedupe outlives the payload: a retried old op is still a duplicate at its cursor.
    let retried = fx.append(vec![old[2].clone()]).await;
    assert_eq!(retried.results[0].outcome, OpOutcome::Duplicate(Cursor(3)));
    assert_eq!(retried.cursor, Cursor(8));
    let all_again = fx.append(old).await;
    assert_eq!(
        outcomes(&all_again),
        [1, 2, 3, 4, 5].map(|c| OpOutcome::Duplicate(Cursor(c)))
    );

    let stats = fx.backend.stats(fx.admin.clone()).await.unwrap();
    assert_eq!(stats.compacted_ops, 5);
    let again = compact_pass(&fx, cutoff, 100, false).await;
    assert_eq!((again[0].ops, again[0].shares, again[0].visited), (0, 0, 1));
}

pub(crate) async fn compaction_in_small_steps_resumes_inside_and_across_shares(fx: Fixture) {
    let (writer_2, viewer_2) = fx.new_share(&fx.agent, "sh_2").await;
    let (writer_3, viewer_3) = fx.new_share(&fx.agent, "sh_3").await;
    let (writer_4, viewer_4) = fx.new_share(&fx.agent, "sh_4").await;
    fill(&fx.backend, &fx.writer, "a", 7, 20).await;
    fill(&fx.backend, &writer_3, "c", 5, 30).await;
    fill(&fx.backend, &writer_4, "d", 3, 40).await;
    // A second later, newer ops.
    fx.clock.advance(Duration::from_secs(1));
    fill(&fx.backend, &fx.writer, "a-new", 2, 20).await;
    fill(&fx.backend, &writer_2, "b-new", 3, 20).await;
    let cutoff = fx.now();
    let (ops_1, ops_3) = (
        fx.logged_ops().await,
        logged_ops(&fx.backend, &viewer_3).await,
    );
    assert!(
        ops_1
            .iter()
            .all(|o| (o.applied_at < cutoff) != o.op_id.as_str().contains("-new-"))
    );
    // A share whose deletion has begun is no longer visited.
    let hidden = fx
        .backend
        .delete_share_step(
            Operator::Admin(fx.admin.clone()),
            ShareId::from("sh_4"),
            None,
            7,
        )
        .await
        .unwrap();
    assert_eq!(hidden, DeleteStep::More);
    let bytes_before = fx.stats().await.ledger_payload_bytes;
    let old_bytes = payload_bytes(
        ops_1
            .iter()
            .chain(&ops_3)
            .filter(|o| !o.op_id.as_str().contains("-new-"))
            .map(|o| o.payload.as_str()),
    );

    let dry = compact_pass(&fx, cutoff, 3, true).await;
    let stats = fx.stats().await;
    assert_eq!(
        stats.ledger_payload_bytes, bytes_before,
        "a dry run changes nothing"
    );
    assert_eq!(stats.compacted_ops, 0);
    let real = compact_pass(&fx, cutoff, 3, false).await;
    assert_eq!(
        real, dry,
        "a dry run reports what the real run does, step by step"
    );

    let at = |share: &str, cursor: u64| Some((ShareId::from(share), Cursor(cursor)));
    let positions: Vec<_> = real.iter().map(|s| s.next.clone()).collect();
    assert_eq!(
        positions,
        vec![
            at("sh_1", 3),
            at("sh_1", 6),
            at("sh_3", 1),
            at("sh_3", 4),
            None
        ]
    );
    assert!(
        real.iter().all(|s| s.ops <= 3 && s.total_shares == 3),
        "{real:?}"
    );
    assert_eq!(real.iter().map(|s| s.ops).sum::<u64>(), 12);
    assert_eq!(real.iter().map(|s| s.visited).sum::<u64>(), 3);
    // sh_1 and sh_3 were each split across steps, and each counts once.
    assert_eq!(real.iter().map(|s| s.shares).sum::<u64>(), 2);
    assert_eq!(real.iter().map(|s| s.bytes).sum::<u64>(), old_bytes);

    // Each share's compaction point: below it, a reader needs a snapshot.
    for (viewer, point, kept) in [(&fx.viewer, 7, 2), (&viewer_2, 0, 3), (&viewer_3, 5, 0)] {
        if point > 0 {
            let gap = fx
                .backend
                .ops_since(viewer.clone(), Cursor(point - 1), 100)
                .await;
            assert!(
                matches!(gap, Err(LedgerError::SnapshotRequired(Cursor(p))) if p == point),
                "{viewer:?}: {gap:?}"
            );
        }
        let page = fx
            .backend
            .ops_since(viewer.clone(), Cursor(point), 100)
            .await
            .unwrap();
        assert_eq!(page.ops.len(), kept, "{viewer:?}");
        assert!(page.ops.iter().all(|o| !o.payload.is_empty()));
    }
    let gone = fx.backend.share_state(viewer_4).await;
    assert!(matches!(gone, Err(LedgerError::NotFound)), "{gone:?}");
    let stats = fx.stats().await;
    assert_eq!(
        stats.compacted_ops, 12,
        "only the old ops of visible shares lost their payload"
    );
    assert_eq!(stats.ledger_payload_bytes, bytes_before - old_bytes);
}

/// What a vacuum gives back is the engine's own business; who may ask is not.
pub(crate) async fn only_admins_and_the_scheduler_may_vacuum(fx: Fixture) {
    fx.append(vec![padded_op("kept", 100)]).await;
    for op in [
        Operator::Admin(fx.agent.clone()),
        Operator::Admin(fx.writer.clone()),
        Operator::Admin(fx.viewer.clone()),
        Operator::Admin(authority("agt", TokenKind::Admin, None)),
        Operator::Owner(fx.agent.clone()),
    ] {
        let denied = fx.backend.vacuum(op.clone()).await;
        assert!(
            matches!(denied, Err(LedgerError::PermissionDenied)),
            "{op:?}: {denied:?}"
        );
    }
    fx.backend
        .vacuum(Operator::Admin(fx.admin.clone()))
        .await
        .unwrap();
    fx.backend.vacuum(Operator::Scheduler).await.unwrap();
    // Nothing stored was lost.
    assert_eq!(fx.cursor().await, Cursor(1));
    let logged = fx.logged_ops().await;
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].payload, padded_op("kept", 100).payload);
    let (records, _) = fx.snapshot(1 << 20).await;
    assert_eq!(records.len(), 1);
}
