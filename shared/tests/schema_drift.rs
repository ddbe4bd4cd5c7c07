//! Checks that the checked-in generated code matches `schema/capsync.capnp`.
//!
//! Needs the C++ `capnp` compiler on PATH. Without it the test prints that it
//! skipped, unless `REQUIRE_CAPNP=1` (as in CI), where it fails instead.
//! `REGEN=1` rewrites the checked-in file instead of comparing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn capnp_available() -> bool {
    Command::new("capnp")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Drops the leading comment block capnpc writes (tool versions), so another
/// capnp or capnpc patch release does not count as drift.
fn without_header(code: &str) -> String {
    code.lines()
        .skip_while(|line| line.starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn generated_code_matches_schema() {
    if !capnp_available() {
        assert!(
            std::env::var("REQUIRE_CAPNP").as_deref() != Ok("1"),
            "REQUIRE_CAPNP=1 but the `capnp` compiler is not on PATH (Debian: apt-get install capnproto)"
        );
        println!("skipped: `capnp` compiler not on PATH; set REQUIRE_CAPNP=1 to make this fail");
        return;
    }
    let root = repo_root();
    let out = tempfile::tempdir().unwrap();
    capnpc::CompilerCommand::new()
        .src_prefix(root.join("schema"))
        .file(root.join("schema/capsync.capnp"))
        .output_path(out.path())
        .run()
        .expect("capnp compile");
    let fresh = std::fs::read_to_string(out.path().join("capsync_capnp.rs")).unwrap();
    let checked_in_path = root.join("shared/src/generated/capsync_capnp.rs");
    if std::env::var("REGEN").as_deref() == Ok("1") {
        std::fs::write(&checked_in_path, &fresh).unwrap();
        println!("rewrote {}", checked_in_path.display());
        return;
    }
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    assert!(
        without_header(&fresh) == without_header(&checked_in),
        "shared/src/generated/capsync_capnp.rs is out of date with schema/capsync.capnp; \
         run `REGEN=1 cargo test -p capsync-shared --test schema_drift` and commit the result"
    );
}
