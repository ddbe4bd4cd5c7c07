//! The client library and the `capsync` binary against real servers, linked into one
//! test binary (on 2 cores, linking one per file cost more than running them). Each
//! file is a module; run one with a filter, e.g. `cargo test -p capsync-client --test
//! integration syncer::`.

mod support;

mod cli;
mod client_kill;
mod follow_cli;
mod outbox;
mod rpc;
mod sync_cli;
mod syncer;
