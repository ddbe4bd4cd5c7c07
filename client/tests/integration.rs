//! The client library against real servers, linked into one test binary (on 2 cores,
//! linking one per file cost more than running them). Each file is a module; run one
//! with a filter, e.g. `cargo test -p capsync-client --test integration syncer::`. The
//! `capsync` binary's tests are in `cli/tests/`.

mod support;

mod outbox;
mod rpc;
mod syncer;
