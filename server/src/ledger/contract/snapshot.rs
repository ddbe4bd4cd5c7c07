//! Contract cases of reading a share: snapshot pages (order, resuming, pages
//! larger than the rules' storage batches) and catch-up with `ops_since`.

use capsync_shared::{Cursor, OpKind, TokenKind};
use serde_json::json;

use super::{Fixture, authority, batch, message, model_op, op, part, session, token};
use crate::ledger::{LedgerError, NewShare, OpIn, Record, RecordKind};

pub(crate) async fn snapshot_pages_return_every_record_once_in_order(fx: Fixture) {
    // Sent out of order on purpose.
    let mut ops = vec![
        op("s", OpKind::SessionUpsert, session()),
        model_op("mdl_c"),
        model_op("mdl_a"),
        op(
            "d",
            OpKind::DiffSet,
            json!([{"file": "x.rs", "patch": "+1"}]),
        ),
        model_op("mdl_b"),
    ];
    for message_id in ["msg_3", "msg_1", "msg_4", "msg_2"] {
        ops.push(op(
            &format!("op-{message_id}"),
            OpKind::MessageUpsert,
            message(message_id),
        ));
    }
    for (part_id, message_id) in [
        ("prt_c", "msg_1"),
        ("prt_a", "msg_1"),
        ("prt_b", "msg_1"),
        ("prt_e", "msg_3"),
        ("prt_d", "msg_3"),
        ("prt_f", "msg_4"),
    ] {
        ops.push(op(
            &format!("op-{part_id}"),
            OpKind::PartUpsert,
            part(part_id, message_id),
        ));
    }
    let count = ops.len();
    fx.append(ops).await;

    let expected: Vec<(RecordKind, &str, &str)> = vec![
        (RecordKind::Session, "", ""),
        (RecordKind::Model, "mdl_a", ""),
        (RecordKind::Model, "mdl_b", ""),
        (RecordKind::Model, "mdl_c", ""),
        (RecordKind::Diffs, "", ""),
        (RecordKind::Message, "msg_1", ""),
        (RecordKind::Part, "prt_a", "msg_1"),
        (RecordKind::Part, "prt_b", "msg_1"),
        (RecordKind::Part, "prt_c", "msg_1"),
        (RecordKind::Message, "msg_2", ""),
        (RecordKind::Message, "msg_3", ""),
        (RecordKind::Part, "prt_d", "msg_3"),
        (RecordKind::Part, "prt_e", "msg_3"),
        (RecordKind::Message, "msg_4", ""),
        (RecordKind::Part, "prt_f", "msg_4"),
    ];
    assert_eq!(expected.len(), count);
    let (whole, pages) = fx.snapshot(1 << 20).await;
    assert_eq!(pages, 1);
    let keys: Vec<(RecordKind, &str, &str)> = whole
        .iter()
        .map(|r| (r.kind, r.id.as_str(), r.message_id.as_str()))
        .collect();
    assert_eq!(keys, expected);

    // Smaller pages cut the same sequence, each record exactly once.
    let largest = whole.iter().map(|r| r.json.len()).max().unwrap();
    for max_bytes in [0, 1, 60, 150, largest as u32, 400, 1000] {
        let (records, pages) = fx.snapshot(max_bytes).await;
        assert_eq!(records, whole, "max_bytes {max_bytes}");
        if max_bytes <= 1 {
            assert_eq!(pages, count, "one record per page");
        }
    }
    let (_, pages) = fx.snapshot(150).await;
    assert!(pages > 3, "150-byte pages: {pages}");

    let r = fx
        .backend
        .snapshot_page(fx.viewer.clone(), "garbage".into(), 100)
        .await;
    assert!(matches!(r, Err(LedgerError::InvalidArgument(_))), "{r:?}");
}

pub(crate) async fn a_snapshot_resumes_where_it_stopped_even_if_records_changed(fx: Fixture) {
    fx.append(vec![
        op("m1", OpKind::MessageUpsert, message("msg_1")),
        op("p1", OpKind::PartUpsert, part("prt_1", "msg_1")),
        op("p2", OpKind::PartUpsert, part("prt_2", "msg_1")),
        op("m2", OpKind::MessageUpsert, message("msg_2")),
    ])
    .await;
    // One record per page: msg_1, then prt_1.
    let first = fx
        .backend
        .snapshot_page(fx.viewer.clone(), String::new(), 1)
        .await
        .unwrap();
    assert_eq!(first.records[0].id, "msg_1");
    let second = fx
        .backend
        .snapshot_page(fx.viewer.clone(), first.next_page, 1)
        .await
        .unwrap();
    assert_eq!(second.records[0].id, "prt_1");
    // The message we are in the middle of disappears.
    fx.append(vec![op("r", OpKind::MessageRemove, json!({"id": "msg_1"}))])
        .await;
    let third = fx
        .backend
        .snapshot_page(fx.viewer.clone(), second.next_page, 1000)
        .await
        .unwrap();
    assert_eq!(third.cursor, Cursor(5), "a changed cursor tells the reader");
    let ids: Vec<&str> = third.records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["msg_2"]);
    assert!(third.next_page.is_empty());
}

pub(crate) async fn an_empty_share_has_an_empty_snapshot(fx: Fixture) {
    let page = fx
        .backend
        .snapshot_page(fx.viewer.clone(), String::new(), 100)
        .await
        .unwrap();
    assert!(page.records.is_empty());
    assert!(page.next_page.is_empty());
    assert_eq!(page.cursor, Cursor(0));
}

pub(crate) async fn ops_since_pages_through_the_ledger_in_cursor_order(fx: Fixture) {
    let ops: Vec<OpIn> = (0..25).map(|i| model_op(&format!("o{i:02}"))).collect();
    fx.append(ops).await;
    let mut seen = Vec::new();
    let mut after = Cursor(0);
    loop {
        let page = fx
            .backend
            .ops_since(fx.viewer.clone(), after, 10)
            .await
            .unwrap();
        assert_eq!(page.cursor, Cursor(25));
        assert!(page.ops.len() <= 10);
        let Some(last) = page.ops.last() else { break };
        after = last.cursor;
        seen.extend(page.ops.into_iter().map(|o| (o.cursor.0, o.op_id.0)));
    }
    let expected: Vec<(u64, String)> = (0..25).map(|i| (i + 1, format!("o{i:02}"))).collect();
    assert_eq!(seen, expected);
}

/// The rules read records from storage 64 at a time (`rules/snapshot.rs`), so
/// a page that spans batches, and a page that ends or resumes inside one, must
/// still give each record once and in order: more than 64 models, more than 64
/// messages, more than 64 parts of one message and more than 64 parts whose
/// message has not arrived, across two missing messages.
pub(crate) async fn pages_of_more_than_one_storage_batch_return_every_record_once_in_order(
    fx: Fixture,
) {
    const MODELS: usize = 70;
    const MESSAGES: usize = 70;
    /// The parts of the one large message, `msg_010`.
    const LARGE: usize = 150;
    /// Parts of each of the two missing messages.
    const ORPHANS: usize = 40;
    /// The missing messages, with the prefix of their parts' ids.
    const ORPHANED: [(&str, &str); 2] = [("aaa_missing", "y"), ("zzz_missing", "b")];

    let mut ops = vec![
        op("s", OpKind::SessionUpsert, session()),
        op("d", OpKind::DiffSet, json!([{"file": "a.rs"}])),
    ];
    // Sent in reverse id order, so that nothing comes out in the order it went in.
    for m in (0..MODELS).rev() {
        ops.push(model_op(&format!("mdl_{m:03}")));
    }
    for m in (0..MESSAGES).rev() {
        let message_id = format!("msg_{m:03}");
        ops.push(op(
            &format!("op-{message_id}"),
            OpKind::MessageUpsert,
            message(&message_id),
        ));
        let parts = if m == 10 { LARGE } else { m % 3 };
        for p in (0..parts).rev() {
            let part_id = format!("prt_{m:03}_{p:03}");
            ops.push(op(
                &format!("op-{part_id}"),
                OpKind::PartUpsert,
                part(&part_id, &message_id),
            ));
        }
    }
    // Parts of two messages that never arrive: one sorts before every message
    // id, one after; both come after every message and its parts, ordered by
    // message id first (the part ids sort the other way round).
    for (missing, prefix) in ORPHANED {
        for p in (0..ORPHANS).rev() {
            let part_id = format!("prt_{prefix}_{p:03}");
            ops.push(op(
                &format!("op-{part_id}"),
                OpKind::PartUpsert,
                part(&part_id, missing),
            ));
        }
    }
    let count = ops.len();
    for chunk in ops.chunks(100) {
        let ack = fx
            .backend
            .append(fx.writer.clone(), batch(chunk.to_vec()))
            .await
            .unwrap();
        assert_eq!(ack.applied(), chunk.len(), "{ack:?}");
    }

    // The order, written out independently of the engine.
    let mut expected: Vec<(RecordKind, String, String)> =
        vec![(RecordKind::Session, "".into(), "".into())];
    for m in 0..MODELS {
        expected.push((RecordKind::Model, format!("mdl_{m:03}"), String::new()));
    }
    expected.push((RecordKind::Diffs, String::new(), String::new()));
    for m in 0..MESSAGES {
        let message_id = format!("msg_{m:03}");
        expected.push((RecordKind::Message, message_id.clone(), String::new()));
        let parts = if m == 10 { LARGE } else { m % 3 };
        for p in 0..parts {
            expected.push((
                RecordKind::Part,
                format!("prt_{m:03}_{p:03}"),
                message_id.clone(),
            ));
        }
    }
    for (missing, prefix) in ORPHANED {
        for p in 0..ORPHANS {
            expected.push((
                RecordKind::Part,
                format!("prt_{prefix}_{p:03}"),
                missing.to_owned(),
            ));
        }
    }
    assert_eq!(expected.len(), count, "one record per op sent");
    let keys = |records: &[Record]| -> Vec<(RecordKind, String, String)> {
        records
            .iter()
            .map(|r| (r.kind, r.id.clone(), r.message_id.clone()))
            .collect()
    };

    // One page: every batch of every stage read in turn.
    let (whole, pages) = fx.snapshot(1 << 20).await;
    assert_eq!(pages, 1);
    assert_eq!(keys(&whole), expected);

    // Small pages end and resume inside batches, and on their edges.
    let part_bytes = whole
        .iter()
        .find(|r| r.kind == RecordKind::Part)
        .map(|r| r.json.len() + r.id.len() + r.message_id.len())
        .unwrap();
    for max_bytes in [
        0,
        1,
        200,
        (64 * part_bytes) as u32,
        (65 * part_bytes) as u32,
        5000,
    ] {
        let (records, pages) = fx.snapshot(max_bytes).await;
        assert_eq!(keys(&records), expected, "max_bytes {max_bytes}");
        assert_eq!(records, whole, "max_bytes {max_bytes}");
        if max_bytes <= 1 {
            assert_eq!(pages, count, "one record per page");
        } else {
            assert!(pages > 1, "max_bytes {max_bytes}: {pages} page");
        }
    }
}

/// Ids are ordered by their bytes (as Rust orders `str`), whatever the
/// characters: upper case before `_` before lower case, punctuation by its
/// code, and any non-ASCII character after all of ASCII. A storage engine
/// that sorts text by a locale's collation would show records in another
/// order, and list shares in another order, than the others do.
pub(crate) async fn records_are_ordered_by_the_bytes_of_their_ids(fx: Fixture) {
    let ids = [
        "b", "B", "a", "Z", "_x", "a_b", "a-b", "a.b", "aB", "ab", "é", "~", "1", "A1", "a b",
    ];
    let mut sorted: Vec<&str> = ids.to_vec();
    sorted.sort();

    let mut ops = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        ops.push(op(
            &format!("mdl-{n}"),
            OpKind::ModelUpsert,
            json!({"id": id}),
        ));
        let message_id = format!("m{id}");
        ops.push(op(
            &format!("msg-{n}"),
            OpKind::MessageUpsert,
            message(&message_id),
        ));
        // The parts of one message, and parts of a message that never arrives.
        ops.push(op(
            &format!("prt-{n}"),
            OpKind::PartUpsert,
            part(&format!("p{id}"), "m~"),
        ));
        ops.push(op(
            &format!("orphan-{n}"),
            OpKind::PartUpsert,
            part(&format!("o{id}"), &format!("missing{id}")),
        ));
    }
    fx.append(ops).await;

    let (records, _) = fx.snapshot(1 << 20).await;
    let of = |kind: RecordKind, pick: &dyn Fn(&Record) -> bool| -> Vec<String> {
        records
            .iter()
            .filter(|r| r.kind == kind && pick(r))
            .map(|r| r.id.clone())
            .collect()
    };
    let prefixed =
        |prefix: &str| -> Vec<String> { sorted.iter().map(|id| format!("{prefix}{id}")).collect() };
    assert_eq!(of(RecordKind::Model, &|_| true), sorted);
    assert_eq!(of(RecordKind::Message, &|_| true), prefixed("m"));
    assert_eq!(
        of(RecordKind::Part, &|r| r.message_id == "m~"),
        prefixed("p")
    );
    let orphans: Vec<(String, String)> = records
        .iter()
        .filter(|r| r.kind == RecordKind::Part && r.message_id.starts_with("missing"))
        .map(|r| (r.message_id.clone(), r.id.clone()))
        .collect();
    let expected: Vec<(String, String)> = sorted
        .iter()
        .map(|id| (format!("missing{id}"), format!("o{id}")))
        .collect();
    assert_eq!(orphans, expected);
    // Paged one record at a time, resuming at each id: the same order.
    let (paged, _) = fx.snapshot(1).await;
    assert_eq!(paged, records);

    // Listings too, and paging a listing resumes after an id in that order.
    for (n, id) in ids.iter().enumerate() {
        let share_id = format!("sh{id}");
        fx.backend
            .create_share(
                fx.agent.clone(),
                NewShare {
                    share_id: share_id.as_str().into(),
                    session_id: format!("ses-{n}"),
                    project_id: "prj".into(),
                    parent_session_id: String::new(),
                    title: String::new(),
                },
                token(&format!("w-{n}")),
                token(&format!("v-{n}")),
            )
            .await
            .unwrap();
        // Each share's own viewer reads it.
        let viewer = authority(&format!("v-{n}"), TokenKind::Viewer, Some((&share_id, 0)));
        fx.backend.share_state(viewer).await.unwrap();
    }
    let mut expected_shares = prefixed("sh");
    expected_shares.push(fx.share.0.clone());
    expected_shares.sort();
    let mut listed = Vec::new();
    let mut after = String::new();
    loop {
        let page = fx
            .backend
            .list_shares(fx.admin.clone(), after.clone(), 4, false)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = last.state.share_id.0.clone();
        listed.extend(page.into_iter().map(|s| s.state.share_id.0));
    }
    assert_eq!(listed, expected_shares);
}
