//! The PostgreSQL the tests use: the `postgres://` URL in `CAPSYNC_TEST_POSTGRES`
//! (`.ci/run` starts a throwaway server and sets it), each store in a schema of its own.
//!
//! Without the variable the PostgreSQL tests say that they skipped; with
//! `REQUIRE_POSTGRES=1` (as in CI) they fail instead.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::PostgresOptions;
use crate::clock::Clock;

// The integration tests' own helper, shared so both read the same variable the same way.
#[allow(dead_code)]
#[path = "../../../../tests/support/postgres.rs"]
mod shared;

/// Whether the PostgreSQL tests run (saying that they skipped when they do not).
pub(crate) fn available() -> bool {
    shared::url_or_skip().is_some()
}

/// Options for the store kept for `dir`: a schema named after the directory, created
/// if missing, so opening the same directory again finds the same store.
pub(crate) fn options_for(dir: &Path, clock: Clock) -> PostgresOptions {
    let url = shared::url_or_skip().expect("the PostgreSQL tests run only with a database");
    let digest = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    let schema = format!("capsync_test_{}", &hex::encode(digest)[..20]);
    let mut options =
        PostgresOptions::new(&url).expect("CAPSYNC_TEST_POSTGRES is a postgres:// URL");
    let database = options.database.clone();
    let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    // The synchronous client must not run inside the test's async context.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut client = database
                    .connect()
                    .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", shared::URL_VARIABLE));
                client.batch_execute(&create).unwrap();
            })
            .join()
            .unwrap();
    });
    options
        .database
        .config_mut()
        .options(format!("-csearch_path={schema}"));
    options.connections = 4;
    options.clock = clock;
    options
}
