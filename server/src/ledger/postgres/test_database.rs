//! The PostgreSQL the tests use: the `postgres://` URL in `CAPSYNC_TEST_POSTGRES`
//! (`.ci/run` starts a throwaway server and sets it), each store in a schema of its own.
//!
//! Without the variable the PostgreSQL tests say that they skipped; with
//! `REQUIRE_POSTGRES=1` (as in CI) they fail instead.

use std::path::Path;
use std::sync::Once;

use sha2::{Digest, Sha256};

use super::PostgresOptions;
use crate::clock::Clock;

/// The variable holding the tests' database URL.
pub(crate) const URL_VARIABLE: &str = "CAPSYNC_TEST_POSTGRES";

/// The tests' database URL, or `None` (and a note, once) when there is none.
pub(crate) fn url() -> Option<String> {
    match std::env::var(URL_VARIABLE) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!(
                    "REQUIRE_POSTGRES=1 but {URL_VARIABLE} is not set: start one with .ci/postgres"
                );
            }
            static NOTE: Once = Once::new();
            NOTE.call_once(|| {
                println!(
                    "skipped: the PostgreSQL tests need {URL_VARIABLE}=postgres://… (.ci/postgres starts one); set REQUIRE_POSTGRES=1 to fail"
                );
            });
            None
        }
    }
}

/// Whether the PostgreSQL tests run.
pub(crate) fn available() -> bool {
    url().is_some()
}

/// Options for the store kept for `dir`: a schema named after the directory, created
/// if missing, so opening the same directory again finds the same store.
pub(crate) fn options_for(dir: &Path, clock: Clock) -> PostgresOptions {
    let url = url().expect("the PostgreSQL tests run only with a database");
    let digest = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    let schema = format!("capsync_test_{}", &hex::encode(digest)[..20]);
    let mut options =
        PostgresOptions::new(&url).expect("CAPSYNC_TEST_POSTGRES is a postgres:// URL");
    let config = options.config.clone();
    let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    // The synchronous client must not run inside the test's async context.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut client = config
                    .connect(postgres::NoTls)
                    .unwrap_or_else(|e| panic!("cannot connect to {URL_VARIABLE}: {e}"));
                client.batch_execute(&create).unwrap();
            })
            .join()
            .unwrap();
    });
    options.config.options(&format!("-csearch_path={schema}"));
    options.connections = 4;
    options.clock = clock;
    options
}
