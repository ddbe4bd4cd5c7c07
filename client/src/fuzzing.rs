//! Entry point of the `export_reader` fuzz target in `fuzz/` (`cargo fuzz`):
//! what `capsync push` and `capsync sync` read from a file (an ops file, JSON
//! array or JSON Lines, or an opencode-style export) and the ops they make of
//! it, checked against what the server and the client's own documents rely on.
//!
//! The tests below replay the checked-in corpus through it on stable Rust.

use std::collections::HashMap;

use capsync_shared::limits::{MAX_DEPENDS_ON, MAX_OP_ID_BYTES};
use capsync_shared::ops::{OpKind, OpSpec};
use serde_json::Value;

use crate::document::SessionDocument;
use crate::export::{SessionExport, op_id};
use crate::ops_file::{InputFormat, read_push_input};
use crate::types::LoggedOp;

/// What a fuzz input's first byte picks, as `capsync push --format` does.
const FORMATS: [InputFormat; 3] = [InputFormat::Auto, InputFormat::Ops, InputFormat::Export];

/// One fuzz input: a byte choosing the format, then the file's text.
pub fn export_reader(data: &[u8]) {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    // The CLI reads files with `read_to_string`, which refuses anything but UTF-8.
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let format = FORMATS[usize::from(selector) % FORMATS.len()];
    let Ok(input) = read_push_input(text, format) else {
        return;
    };
    check_ops(&input.ops);
    if let Some(export) = &input.export {
        check_export(export, &input.ops);
    }
}

/// The input that [`export_reader`] reads as a file of `format`.
#[cfg(test)]
pub(crate) fn encode(format: InputFormat, text: &str) -> Vec<u8> {
    let index = FORMATS.iter().position(|f| *f == format).unwrap_or(0);
    let mut data = vec![index as u8];
    data.extend_from_slice(text.as_bytes());
    data
}

/// What the server checks of a batch, and what the outbox relies on: valid
/// op ids, bounded dependencies, one op per op id, and payloads that travel
/// as JSON text unchanged.
fn check_ops(ops: &[OpSpec]) {
    let mut seen: HashMap<&str, &OpSpec> = HashMap::new();
    for op in ops {
        assert!(
            (1..=MAX_OP_ID_BYTES).contains(&op.op_id.len()),
            "op id of {} bytes",
            op.op_id.len()
        );
        assert!(op.depends_on.len() <= MAX_DEPENDS_ON);
        assert!(
            op.depends_on
                .iter()
                .all(|d| (1..=MAX_OP_ID_BYTES).contains(&d.len())),
            "dependsOn {:?}",
            op.depends_on
        );
        if let Some(first) = seen.insert(&op.op_id, op) {
            assert_eq!(first, op, "op id {:?} names two different ops", op.op_id);
        }
        let text = op.payload.to_string();
        let sent: Value = serde_json::from_str(&text).expect("a payload is sent as JSON");
        assert_eq!(sent, op.payload, "payload {text} changes on the wire");
    }
}

/// An export's ops: in dependency order, with content-addressed ids, and
/// holding exactly the export's records.
fn check_export(export: &SessionExport, ops: &[OpSpec]) {
    assert_eq!(ops, export.to_ops(), "reading is deterministic");
    let session_id = export.session_id();
    assert_eq!(ops.first().map(|op| op.kind), Some(OpKind::SessionUpsert));
    let mut message_id = None;
    for op in ops {
        let record_id = if op.kind == OpKind::DiffSet {
            session_id
        } else {
            op.payload["id"].as_str().unwrap_or_default()
        };
        assert!(!record_id.is_empty(), "{} without a record id", op.kind);
        assert_eq!(op.op_id, op_id(op.kind, record_id, &op.payload));
        match op.kind {
            OpKind::MessageUpsert => {
                assert_eq!(op.payload["sessionID"], session_id);
                message_id = Some(record_id);
            }
            OpKind::PartUpsert => {
                assert_eq!(op.payload["sessionID"], session_id);
                assert_eq!(
                    op.payload["messageID"].as_str(),
                    message_id,
                    "a part follows its message"
                );
            }
            _ => {}
        }
    }

    // The export as a snapshot document reads back as the same export.
    let document = export.to_document();
    let again = SessionExport::from_value(&document.to_json())
        .unwrap_or_else(|e| panic!("the export's own document does not read: {e}"));
    assert_eq!(&again, export);

    // A mutated export can hold records the server refuses (a part without a type):
    // their ops never reach a share's log, so the log cannot rebuild the export.
    if ops.iter().any(|op| {
        capsync_shared::model::op::parse(op.kind, &op.payload.to_string(), Some(session_id))
            .is_err()
    }) {
        return;
    }
    // Applied in order, as a viewer applies the share's log, the ops build the export's records.
    let mut applied = SessionDocument::default();
    for (i, op) in ops.iter().enumerate() {
        applied.apply(&LoggedOp {
            cursor: capsync_shared::Cursor(i as u64 + 1),
            op_id: capsync_shared::OpId(op.op_id.clone()),
            kind: op.kind,
            payload: op.payload.to_string(),
            applied_at: 0,
        });
    }
    assert!(
        applied.same_content(&document),
        "the ops of an export build {applied:?}, not {document:?}"
    );
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn repository() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn corpus_dir() -> PathBuf {
        repository().join("fuzz/corpus/export_reader")
    }

    /// The sample export in each format, and small ops files of each form.
    fn seeds() -> Vec<(String, Vec<u8>)> {
        let path = repository().join("examples/sessions/fix-login-bug.json");
        let sample =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let ops = read_push_input(&sample, InputFormat::Export).unwrap().ops;
        let lines: String = ops
            .iter()
            .take(6)
            .map(|op| serde_json::to_string(op).unwrap() + "\n")
            .collect();
        let array = serde_json::to_string_pretty(&ops[..4]).unwrap();
        let minimal = r#"{"session": {"id": "s", "title": "t", "parentID": "p"}, "models": [{"id": "m1"}], "diffs": [], "messages": [{"info": {"id": "m", "role": "user"}, "parts": [{"id": "p1", "type": "text", "text": "hi"}]}, {"info": {"id": "n", "sessionID": "s"}, "parts": null}]}"#;
        let one_op = "{\n  \"opId\": \"o1\",\n  \"kind\": \"part.delta\",\n  \"payload\": {\"partID\": \"p\", \"delta\": \"x\"},\n  \"dependsOn\": [\"o0\"]\n}\n";
        vec![
            ("sample-auto".into(), encode(InputFormat::Auto, &sample)),
            ("sample-export".into(), encode(InputFormat::Export, &sample)),
            ("lines-auto".into(), encode(InputFormat::Auto, &lines)),
            ("lines-ops".into(), encode(InputFormat::Ops, &lines)),
            ("array-auto".into(), encode(InputFormat::Auto, &array)),
            ("minimal-export".into(), encode(InputFormat::Auto, minimal)),
            ("one-op".into(), encode(InputFormat::Auto, one_op)),
        ]
    }

    /// Found while checking the harness's last property by hand (the fuzzer
    /// had not reached it): an export naming one model twice read as two
    /// models, while its ops (and so the server) hold one.
    #[test]
    fn an_export_repeating_a_model_id_is_refused() {
        let text = r#"{"info": {"id": "s"}, "models": [{"id": "m", "v": 1}, {"id": "m", "v": 2}]}"#;
        let err = read_push_input(text, InputFormat::Auto).unwrap_err();
        assert!(err.to_string().contains("repeats model id"), "{err}");
        export_reader(&encode(InputFormat::Auto, text));
    }

    #[test]
    fn the_seeds_pass() {
        for (name, data) in seeds() {
            eprintln!("{name}");
            export_reader(&data);
        }
    }

    #[test]
    fn the_checked_in_corpus_passes() {
        let dir = corpus_dir();
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut replayed = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            // Named, so a failure says which file.
            eprintln!("{}", path.display());
            export_reader(&std::fs::read(&path).unwrap());
            replayed += 1;
        }
        assert!(
            replayed >= 10,
            "only {replayed} corpus files in {}",
            dir.display()
        );
    }

    /// Every seed is in `fuzz/corpus/export_reader/` as `seed-<name>`, as built
    /// today. `CAPSYNC_WRITE_SEEDS=1 cargo test -p capsync-client fuzzing` writes
    /// them again first (then fuzz and minimise, keeping the named files).
    #[test]
    fn the_seeds_are_in_the_checked_in_corpus() {
        let write = std::env::var("CAPSYNC_WRITE_SEEDS").as_deref() == Ok("1");
        let dir = corpus_dir();
        for (name, data) in seeds() {
            let path = dir.join(format!("seed-{name}"));
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &data).unwrap();
            }
            let stored = std::fs::read(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (CAPSYNC_WRITE_SEEDS=1 writes it)", path.display())
            });
            assert_eq!(stored, data, "{} differs from its seed", path.display());
        }
    }
}
