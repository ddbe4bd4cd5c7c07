//! The `capsync` binary against real servers, linked into one test binary. Each file is
//! a module; run one with a filter, e.g. `cargo test -p capsync-cli --test integration
//! sync_cli::`.

/// The client's test kit (a real server on `127.0.0.1:0`, peers that misbehave).
#[path = "../../client/tests/support/mod.rs"]
mod support;

mod cli;
mod client_kill;
mod follow_cli;
mod process_output;
mod sync_cli;
