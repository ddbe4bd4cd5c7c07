//! The integration tests of this crate, linked into one binary (on 2 cores, linking
//! one ~70 MB test binary per file cost more than running most of them). Each file
//! is a module; run one area with a filter, e.g.
//! `cargo test -p capsync-tests --test integration opencode::`. The HTTP tests are a
//! binary of their own (`http.rs`): they capture every server log line of their
//! process, which must not include every other test's servers.
//!
//! All of them start real servers on `127.0.0.1:0` and talk through the public APIs;
//! the browser and opencode tests drive the real programs where installed.

#[path = "bad_input.rs"]
mod bad_input;
#[path = "browser.rs"]
mod browser;
/// Headless Chromium, for the page tests of `browser` and `opencode`.
#[path = "browser_driver.rs"]
mod browser_driver;
#[path = "cli.rs"]
mod cli;
// Not `core`: that would shadow the `core` crate.
#[path = "core.rs"]
mod core_flow;
#[path = "faults.rs"]
mod faults;
#[path = "lifecycle.rs"]
mod lifecycle;
#[path = "migrate.rs"]
mod migrate;
#[path = "nodes.rs"]
mod nodes;
#[path = "opencode.rs"]
mod opencode;
#[path = "parity.rs"]
mod parity;
#[path = "postgres_tls.rs"]
mod postgres_tls;
#[path = "property.rs"]
mod property;
#[path = "prune.rs"]
mod prune;
#[path = "retention.rs"]
mod retention;
#[path = "subscriptions.rs"]
mod subscriptions;
#[path = "tokens.rs"]
mod tokens;
