//! Entry points of the coverage-guided fuzz targets in `fuzz/` (`cargo fuzz`),
//! one per kind of untrusted input the server parses. Each takes the raw fuzz
//! input, runs the server's own reading code on it and asserts what that code
//! promises, so a broken promise is a crash the fuzzer reports.
//!
//! The tests below replay every checked-in corpus file through the same
//! functions, so `cargo test` on stable Rust keeps the corpus passing.

use capsync_shared::SturdyRef;

pub use crate::http::fuzz::{http_request, markdown};
pub use crate::ledger::sqlite::fuzz::op_payload;
pub use crate::rpc::fuzz::rpc_params;

/// A token that parses is exactly one sturdy ref: it displays back as the text
/// it was read from (without surrounding whitespace).
pub(crate) fn check_token(text: &str) {
    if let Ok(token) = text.parse::<SturdyRef>() {
        assert_eq!(
            token.expose(),
            text.trim(),
            "a token reads back differently"
        );
        assert_eq!(token.expose().parse::<SturdyRef>().ok(), Some(token));
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use capnp::message::Builder;
    use capsync_shared::capsync_capnp::{Scope, admin, agent, gateway, share_viewer, share_writer};
    use capsync_shared::{OpKind, TokenKind};

    use super::*;
    use crate::http::fuzz as http_fuzz;
    use crate::ledger::sqlite::fuzz as payload_fuzz;
    use crate::rpc::fuzz as rpc_fuzz;

    /// What a fuzz target calls with each input.
    type Harness = fn(&[u8]);

    /// Each target with the function its fuzz target calls.
    const TARGETS: [(&str, Harness); 4] = [
        ("op_payload", op_payload),
        ("rpc_params", rpc_params),
        ("http_request", http_request),
        ("markdown", markdown),
    ];

    fn corpus_dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target)
    }

    fn sample_export() -> String {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sessions/fix-login-bug.json");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Seed inputs for every target, each with a name: taken from the sample
    /// session and built with the generated builders, so the fuzzers start
    /// from requests a real client sends.
    fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
        let mut seeds = Vec::new();
        let ops = capsync_client::read_push_input(&sample_export(), Default::default())
            .expect("the sample export reads")
            .ops;
        for (i, op) in ops.iter().enumerate() {
            let payload = op.payload.to_string();
            seeds.push((
                "op_payload",
                format!("sample-{i:02}"),
                payload_fuzz::encode(op.kind, &payload),
            ));
        }
        let extra = [
            (
                OpKind::MessageRemove,
                r#"{"messageID":"msg_01JD4K7M2QX9A7TS002"}"#,
            ),
            (OpKind::PartRemove, r#"{"partID":"prt_01","messageID":"m"}"#),
            (
                OpKind::PartDelta,
                r#"{"partID":"prt_01","delta":"more text","field":"text"}"#,
            ),
            (
                OpKind::DiffSet,
                r#"[{"file":"a.rs","before":"","after":"x","additions":1,"deletions":0}]"#,
            ),
            (
                OpKind::PartUpsert,
                r#"{"id":"prt_9","messageID":"msg_1","sessionID":"ses_01JD4K7M2QX9A7TS1","type":"tool","tool":"bash","state":{"status":"completed","input":{"command":"ls"},"output":"a\nb","attachments":[{"type":"file","url":"data:,x"}],"time":{"start":1,"end":2,"compacted":3}}}"#,
            ),
            (
                OpKind::MessageUpsert,
                r#"{"id":"msg_9","role":"assistant","time":{"created":1,"completed":2},"error":null}"#,
            ),
        ];
        for (i, (kind, payload)) in extra.into_iter().enumerate() {
            seeds.push((
                "op_payload",
                format!("extra-{i:02}"),
                payload_fuzz::encode(kind, payload),
            ));
        }
        for (method, data) in rpc_seeds(&ops) {
            seeds.push(("rpc_params", method.replace('.', "-"), data));
        }
        let token = SturdyRef::generate(TokenKind::Viewer).expose();
        let http = [
            ("authorization", format!("Bearer {token}")),
            ("authorization", format!("bearer   {token}  ")),
            ("authorization", "Basic dXNlcjpwYXNz".to_owned()),
            ("ops-query", "after=5&limit=20".to_owned()),
            ("ops-query", "limit=0".to_owned()),
            ("events-start", "17\nafter=3".to_owned()),
            ("events-start", "\nafter=3".to_owned()),
        ];
        for (i, (part, bytes)) in http.into_iter().enumerate() {
            seeds.push((
                "http_request",
                format!("{part}-{i}"),
                http_fuzz::encode(part, bytes.as_bytes()),
            ));
        }
        let export: serde_json::Value = serde_json::from_str(&sample_export()).unwrap();
        let texts = export["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| m["parts"].as_array().into_iter().flatten())
            .filter_map(|part| part["text"].as_str());
        for (i, text) in texts.enumerate() {
            seeds.push((
                "markdown",
                format!("sample-{i:02}"),
                text.as_bytes().to_vec(),
            ));
        }
        let markdown = [
            "# T\n\n| a | b |\n|:-|-:|\n| 1 | 2 |\n\n- [x] done\n- [ ] not\n\n~~gone~~ **b** *i* `c`\n\n3. three\n\n---\n",
            "[l](https://e.com/a?b=1&c='x') <mailto:a@b.c> ![i](x.png \"t\") [j](javascript:alert(1))\n\n<div>x</div>\n\n> q\n\n```rust\nfn f() {}\n```\n",
        ];
        for (i, text) in markdown.into_iter().enumerate() {
            seeds.push(("markdown", format!("extra-{i}"), text.as_bytes().to_vec()));
        }
        seeds
    }

    /// A well-formed call of every method of [`rpc_fuzz::METHODS`].
    fn rpc_seeds(ops: &[capsync_shared::ops::OpSpec]) -> Vec<(&'static str, Vec<u8>)> {
        let future = capsync_shared::now_millis() + 365 * 24 * 3600 * 1000;
        let mut seeds = Vec::new();
        let mut add = |method: &'static str, message: Builder<capnp::message::HeapAllocator>| {
            seeds.push((method, rpc_fuzz::encode(method, &message)));
        };
        macro_rules! message {
            ($params:ty) => {{
                let mut message = Builder::new_default();
                message.init_root::<$params>();
                message
            }};
            ($params:ty, |$p:ident| $fill:expr) => {{
                let mut message = Builder::new_default();
                #[allow(unused_mut)]
                let mut $p = message.init_root::<$params>();
                $fill;
                message
            }};
        }
        let token = SturdyRef::generate(TokenKind::Writer).expose();
        add(
            "Gateway.redeem",
            message!(gateway::redeem_params::Builder<'_>, |p| p.set_token(&token)),
        );
        add(
            "Admin.mintAgent",
            message!(admin::mint_agent_params::Builder<'_>, |p| {
                p.set_label("laptop");
                p.set_expires_at(future);
            }),
        );
        add(
            "Admin.revokeShare",
            message!(admin::revoke_share_params::Builder<'_>, |p| {
                p.set_share_id("sh_1");
                p.set_scope(Scope::Viewers);
            }),
        );
        add(
            "Admin.revokeToken",
            message!(admin::revoke_token_params::Builder<'_>, |p| p
                .set_token_id("3f9a0c2e7b1d4a5c")),
        );
        add(
            "Admin.listShares",
            message!(admin::list_shares_params::Builder<'_>, |p| {
                p.set_after("sh_1");
                p.set_limit(50);
                p.set_include_archived(true);
            }),
        );
        add(
            "Admin.deleteShare",
            message!(admin::delete_share_params::Builder<'_>, |p| p
                .set_share_id("sh_1")),
        );
        add(
            "Admin.archiveShare",
            message!(admin::archive_share_params::Builder<'_>, |p| p
                .set_share_id("sh_1")),
        );
        add(
            "Admin.unarchiveShare",
            message!(admin::unarchive_share_params::Builder<'_>, |p| p
                .set_share_id("sh_1")),
        );
        add("Admin.stats", message!(admin::stats_params::Builder<'_>));
        add(
            "Admin.prune",
            message!(admin::prune_params::Builder<'_>, |p| {
                let mut options = p.init_options();
                options.set_older_than_ms(30 * 24 * 3600 * 1000);
                options.set_children(true);
                options.set_dry_run(true);
            }),
        );
        add("Admin.vacuum", message!(admin::vacuum_params::Builder<'_>));
        add(
            "Admin.reclaim",
            message!(admin::reclaim_params::Builder<'_>, |p| p.set_dry_run(true)),
        );
        add(
            "Admin.compactLedger",
            message!(admin::compact_ledger_params::Builder<'_>, |p| {
                p.set_older_than_ms(3600 * 1000);
                p.set_dry_run(true);
            }),
        );
        add(
            "Agent.createShare",
            message!(agent::create_share_params::Builder<'_>, |p| {
                p.set_session_id("ses_01JD4K7M2QX9A7TS1");
                p.set_project_id("prj_1");
                p.set_parent_session_id("");
                p.set_title("Fix 500 on login with uppercase email");
                p.set_viewer_expires_at(future);
            }),
        );
        add(
            "Agent.listShares",
            message!(agent::list_shares_params::Builder<'_>, |p| p.set_limit(0)),
        );
        add(
            "Agent.revokeShare",
            message!(agent::revoke_share_params::Builder<'_>, |p| {
                p.set_share_id("sh_1");
                p.set_scope(Scope::All);
            }),
        );
        add(
            "Agent.mintWriter",
            message!(agent::mint_writer_params::Builder<'_>, |p| p
                .set_share_id("sh_1")),
        );
        add(
            "Agent.mintViewer",
            message!(agent::mint_viewer_params::Builder<'_>, |p| {
                p.set_share_id("sh_1");
                p.set_expires_at(future);
            }),
        );
        add(
            "ShareWriter.appendOps",
            message!(share_writer::append_ops_params::Builder<'_>, |p| {
                let mut batch = p.init_batch();
                batch.set_batch_id("batch-1");
                batch.set_expected_cursor(3);
                batch.set_has_expected_cursor(true);
                let sent = &ops[..ops.len().min(rpc_fuzz::BATCH_LIMITS.max_ops)];
                let mut list = batch.init_ops(sent.len() as u32);
                for (i, op) in sent.iter().enumerate() {
                    let mut out = list.reborrow().get(i as u32);
                    out.set_op_id(&op.op_id);
                    out.set_kind(op.kind.into());
                    out.set_payload(op.payload.to_string());
                    if i > 0 {
                        out.init_depends_on(1).set(0, &sent[i - 1].op_id);
                    }
                }
            }),
        );
        add(
            "ShareWriter.mintViewer",
            message!(share_writer::mint_viewer_params::Builder<'_>, |p| p
                .set_expires_at(0)),
        );
        add(
            "ShareWriter.save",
            message!(share_writer::save_params::Builder<'_>),
        );
        add(
            "ShareWriter.state",
            message!(share_writer::state_params::Builder<'_>),
        );
        add(
            "ShareWriter.viewer",
            message!(share_writer::viewer_params::Builder<'_>),
        );
        add(
            "ShareViewer.snapshot",
            message!(share_viewer::snapshot_params::Builder<'_>, |p| {
                p.set_page("m:msg_01JD4K7M2QX9A7TS002");
                p.set_max_bytes(65536);
            }),
        );
        add(
            "ShareViewer.opsSince",
            message!(share_viewer::ops_since_params::Builder<'_>, |p| {
                p.set_after(5);
                p.set_limit(100);
            }),
        );
        add(
            "ShareViewer.state",
            message!(share_viewer::state_params::Builder<'_>),
        );
        add(
            "ShareViewer.subscribe",
            message!(share_viewer::subscribe_params::Builder<'_>, |p| p
                .set_from_cursor(7)),
        );
        add(
            "ShareViewer.presence",
            message!(share_viewer::presence_params::Builder<'_>),
        );
        seeds
    }

    #[test]
    fn every_method_has_a_seed() {
        let ops = capsync_client::read_push_input(&sample_export(), Default::default())
            .unwrap()
            .ops;
        let seeded: Vec<&str> = rpc_seeds(&ops).into_iter().map(|(m, _)| m).collect();
        assert_eq!(seeded, rpc_fuzz::METHODS);
    }

    #[test]
    fn the_seeds_pass() {
        for (target, name, data) in seeds() {
            let run = TARGETS.iter().find(|(t, _)| *t == target).unwrap().1;
            eprintln!("{target}/{name}");
            run(&data);
        }
    }

    #[test]
    fn the_checked_in_corpus_passes() {
        for (target, run) in TARGETS {
            let dir = corpus_dir(target);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let mut replayed = 0;
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                // Named, so a failure says which file.
                eprintln!("{}", path.display());
                run(&data);
                replayed += 1;
            }
            assert!(
                replayed >= 10,
                "{target}: only {replayed} corpus files in {}",
                dir.display()
            );
        }
    }

    /// Every seed is in `fuzz/corpus/` as `seed-<name>`, so a seed added here
    /// cannot be missing there. (By name only: seeds carry fresh random tokens.)
    /// `CAPSYNC_WRITE_SEEDS=1 cargo test -p capsync-server fuzzing` writes them
    /// again first (then fuzz and minimise, keeping the named files).
    #[test]
    fn the_seeds_are_in_the_checked_in_corpus() {
        let write = std::env::var("CAPSYNC_WRITE_SEEDS").as_deref() == Ok("1");
        for (target, name, data) in seeds() {
            let path = corpus_dir(target).join(format!("seed-{name}"));
            if write {
                std::fs::create_dir_all(corpus_dir(target)).unwrap();
                std::fs::write(&path, &data).unwrap();
            }
            assert!(
                path.is_file(),
                "{} is missing (CAPSYNC_WRITE_SEEDS=1 writes it)",
                path.display()
            );
        }
    }

    #[test]
    fn a_generated_token_passes_the_token_check() {
        for kind in TokenKind::ALL {
            check_token(&format!(" {}\n", SturdyRef::generate(kind).expose()));
        }
    }
}
