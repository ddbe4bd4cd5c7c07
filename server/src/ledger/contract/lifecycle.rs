//! Contract cases of a share's and the store's life: archiving, the stats
//! counts, deleting a share with everything it owns, and closing the ledger.

use std::time::Duration;

use capsync_shared::{Cursor, OpKind, ShareId, TokenId, TokenKind};
use serde_json::json;

use super::{
    Fixture, SESSION, applied, batch, delete_share, logged_ops, message, model_op, new_share, op,
    outcomes, part, session, snapshot, token,
};
use crate::ledger::{AuditEvent, LedgerError, ShareInfo};

pub(crate) async fn an_archived_share_is_hidden_read_only_and_still_viewable(fx: Fixture) {
    fx.append(vec![op("o1", OpKind::SessionUpsert, session())])
        .await;
    let (_, _) = fx.new_share(&fx.agent, "sh_2").await;

    let info = fx
        .backend
        .set_archived(fx.admin.clone(), fx.share.clone(), true)
        .await
        .unwrap();
    let archived_at = info.archived_at.expect("archived");
    assert_eq!(archived_at, fx.now());
    // Archiving again (a minute later) keeps the first date: a retry does not move it.
    fx.clock.advance(Duration::from_secs(60));
    let again = fx
        .backend
        .set_archived(fx.admin.clone(), fx.share.clone(), true)
        .await
        .unwrap();
    assert_eq!(again.archived_at, Some(archived_at));

    let ids = |list: Vec<ShareInfo>| -> Vec<String> {
        list.into_iter().map(|s| s.state.share_id.0).collect()
    };
    for who in [fx.admin.clone(), fx.agent.clone()] {
        let hidden = fx
            .backend
            .list_shares(who.clone(), String::new(), 10, false)
            .await
            .unwrap();
        assert_eq!(ids(hidden), ["sh_2"]);
        let all = fx
            .backend
            .list_shares(who, String::new(), 10, true)
            .await
            .unwrap();
        assert_eq!(ids(all), ["sh_1", "sh_2"]);
    }

    // Appends are refused, and nothing is written.
    let refused = fx
        .backend
        .append(
            fx.writer.clone(),
            batch(vec![op("o2", OpKind::ModelUpsert, json!({"id": "m"}))]),
        )
        .await;
    match refused {
        Err(LedgerError::InvalidArgument(why)) => {
            assert_eq!(why, "share is archived; unarchive it to append");
        }
        other => panic!("expected invalid argument, got {other:?}"),
    }
    assert_eq!(fx.stats().await.ledger_ops, 1);

    // Viewers still read it.
    let state = fx.backend.share_state(fx.viewer.clone()).await.unwrap();
    assert_eq!(state.cursor, Cursor(1));
    let page = fx
        .backend
        .snapshot_page(fx.viewer.clone(), String::new(), 1 << 20)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1);
    let ops = fx
        .backend
        .ops_since(fx.viewer.clone(), Cursor(0), 10)
        .await
        .unwrap();
    assert_eq!(ops.ops.len(), 1);

    // Only an admin archives; unarchiving restores appends.
    assert!(matches!(
        fx.backend
            .set_archived(fx.agent.clone(), fx.share.clone(), false)
            .await,
        Err(LedgerError::PermissionDenied)
    ));
    assert!(matches!(
        fx.backend
            .set_archived(fx.admin.clone(), ShareId::from("sh_none"), true)
            .await,
        Err(LedgerError::NotFound)
    ));
    let info = fx
        .backend
        .set_archived(fx.admin.clone(), fx.share.clone(), false)
        .await
        .unwrap();
    assert_eq!(info.archived_at, None);
    let ack = fx.append(vec![model_op("m2")]).await;
    assert_eq!(outcomes(&ack), applied(&[2]));
}

/// What the engine says of its own storage (`Stats::storage`) is checked by
/// the engines' own tests.
pub(crate) async fn stats_count_a_known_dataset(fx: Fixture) {
    let ops = vec![
        op("o1", OpKind::SessionUpsert, session()),
        op("o2", OpKind::MessageUpsert, message("m1")),
        op("o3", OpKind::PartUpsert, part("p1", "m1")),
        op("o4", OpKind::PartUpsert, part("p2", "m1")),
        op("o5", OpKind::MessageUpsert, message("m2")),
    ];
    let payload_bytes: usize = ops.iter().map(|o| o.payload.len()).sum();
    assert_eq!(outcomes(&fx.append(ops).await), applied(&[1, 2, 3, 4, 5]));
    // A child share (sub-agent session), archived.
    let mut child = new_share("sh_child");
    child.parent_session_id = SESSION.into();
    fx.backend
        .create_share(fx.agent.clone(), child, token("w-c"), token("v-c"))
        .await
        .unwrap();
    fx.backend
        .set_archived(fx.admin.clone(), ShareId::from("sh_child"), true)
        .await
        .unwrap();

    let stats = fx.backend.stats(fx.admin.clone()).await.unwrap();
    assert_eq!(stats.root_shares, 1);
    assert_eq!(stats.child_shares, 1);
    assert_eq!(stats.archived_shares, 1);
    assert_eq!(stats.messages, 2);
    assert_eq!(stats.parts, 2);
    assert_eq!(stats.ledger_ops, 5);
    assert_eq!(stats.ledger_payload_bytes, payload_bytes as u64);
    assert_eq!(stats.compacted_ops, 0);
    assert_eq!(stats.reclaimable_output_bytes, 0);

    // The counts follow deletions; only admins may ask.
    delete_share(&fx.backend, &fx.admin, &fx.share)
        .await
        .unwrap();
    assert!(matches!(
        fx.backend.stats(fx.agent.clone()).await,
        Err(LedgerError::PermissionDenied)
    ));
    let after = fx.backend.stats(fx.admin.clone()).await.unwrap();
    assert_eq!((after.messages, after.parts, after.ledger_ops), (0, 0, 0));
    assert_eq!(after.root_shares, 0);
}

/// The audit trail outliving the share, and no row left anywhere, are checked
/// by the engines' own tests.
pub(crate) async fn deleting_a_share_cascades_to_everything_it_owns(fx: Fixture) {
    let (other_writer, other_viewer) = fx.new_share(&fx.agent, "sh_2").await;
    let populate = || {
        vec![
            op("s", OpKind::SessionUpsert, session()),
            model_op("md"),
            op("d", OpKind::DiffSet, json!([{"file": "a"}])),
            op("m", OpKind::MessageUpsert, message("msg_1")),
            op("p", OpKind::PartUpsert, part("prt_1", "msg_1")),
        ]
    };
    fx.append(populate()).await;
    fx.backend
        .append(other_writer.clone(), batch(populate()))
        .await
        .unwrap();
    fx.backend
        .mint_token(fx.writer.clone(), TokenKind::Viewer, token("v-extra"))
        .await
        .unwrap();
    fx.backend.audit(AuditEvent {
        action: "append",
        token_id: Some(fx.writer.token_id.clone()),
        share_id: Some(fx.share.clone()),
        outcome: "ok".into(),
        detail: "127.0.0.1".into(),
    });
    let (others_records, _) = snapshot(&fx.backend, &other_viewer, 1 << 20).await;
    let others_ops = logged_ops(&fx.backend, &other_viewer).await;
    assert_eq!((others_records.len(), others_ops.len()), (5, 5));

    delete_share(&fx.backend, &fx.admin, &fx.share)
        .await
        .unwrap();
    // Its records, ops and tokens are gone; the other share's are all there.
    let stats = fx.stats().await;
    assert_eq!((stats.messages, stats.parts, stats.ledger_ops), (1, 1, 5));
    assert_eq!(stats.root_shares, 1);
    assert_eq!(
        snapshot(&fx.backend, &other_viewer, 1 << 20).await.0,
        others_records
    );
    assert_eq!(logged_ops(&fx.backend, &other_viewer).await, others_ops);
    for (id, kept) in [
        ("w-sh_1", false),
        ("v-sh_1", false),
        ("v-extra", false),
        ("w-sh_2", true),
        ("v-sh_2", true),
        // Admin and agent tokens do not belong to a share.
        ("adm", true),
        ("agt", true),
    ] {
        let found = fx.backend.find_token(TokenId::from(id)).await.unwrap();
        assert_eq!(found.is_some(), kept, "{id}: {found:?}");
    }
    let listed = fx
        .backend
        .list_shares(fx.admin.clone(), String::new(), 10, true)
        .await
        .unwrap();
    let ids: Vec<&str> = listed.iter().map(|s| s.state.share_id.as_str()).collect();
    assert_eq!(ids, ["sh_2"]);

    let r = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("x")]))
        .await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");
    let r = fx
        .backend
        .snapshot_page(fx.viewer.clone(), String::new(), 100)
        .await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");
    assert!(
        fx.backend
            .find_token(TokenId::from("w-sh_1"))
            .await
            .unwrap()
            .is_none()
    );
    let r = delete_share(&fx.backend, &fx.admin, &fx.share).await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");
    fx.backend.share_state(other_viewer).await.unwrap();
}

/// That a call queued behind a busy writer still runs, and which audit lines
/// are written, are checked by the engines' own tests (they can hold their
/// writer); here the ledger is closed with an append in flight.
pub(crate) async fn close_finishes_queued_work_then_refuses_everything(fx: Fixture) {
    let queued = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("o1")]));
    let closed = fx.backend.close();
    let late = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("o2")]));
    assert!(matches!(late.await, Err(LedgerError::Closed)));
    let late_read = fx.backend.share_state(fx.viewer.clone()).await;
    assert!(matches!(late_read, Err(LedgerError::Closed)));
    // Must not panic or block.
    fx.backend.audit(AuditEvent {
        action: "late",
        token_id: None,
        share_id: None,
        outcome: "ok".into(),
        detail: String::new(),
    });

    assert_eq!(outcomes(&queued.await.unwrap()), applied(&[1]));
    closed.await;
    // A second close is harmless and returns at once.
    fx.backend.close().await;
    assert!(matches!(
        fx.backend.has_admin_token().await,
        Err(LedgerError::Closed)
    ));

    let fx = fx.reopen().await;
    assert_eq!(fx.cursor().await, Cursor(1));
    let ids: Vec<String> = fx
        .logged_ops()
        .await
        .into_iter()
        .map(|o| o.op_id.0)
        .collect();
    assert_eq!(ids, ["o1"]);
}
