//! PostgreSQL for the tests (the integration tests, and the server's own unit and crash
//! tests): the server at `CAPSYNC_TEST_POSTGRES` (`.ci/run` starts a throwaway one), a
//! schema of its own for each test server.
//!
//! Without the variable the PostgreSQL runs say that they skipped; with
//! `REQUIRE_POSTGRES=1` (as in CI) they fail instead.

use std::sync::atomic::{AtomicU64, Ordering};

/// The variable holding the tests' database URL.
pub const URL_VARIABLE: &str = "CAPSYNC_TEST_POSTGRES";

/// The tests' database URL, or `None` (and a note) when there is none.
pub fn url_or_skip() -> Option<String> {
    match std::env::var(URL_VARIABLE) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!(
                    "REQUIRE_POSTGRES=1 but {URL_VARIABLE} is not set: start one with .ci/postgres"
                );
            }
            println!(
                "skipped: the PostgreSQL tests need {URL_VARIABLE}=postgres://… (.ci/postgres starts one); set REQUIRE_POSTGRES=1 to fail"
            );
            None
        }
    }
}

/// A schema of its own in the tests' database, dropped with everything in it when
/// this is dropped.
pub struct TestSchema {
    url: String,
    name: String,
}

impl TestSchema {
    /// A new, empty schema in the database at `url`.
    pub fn create(url: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "capsync_it_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let schema = Self {
            url: url.to_owned(),
            name,
        };
        schema.execute(&format!(
            "DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0}",
            schema.name
        ));
        schema
    }

    /// The URL a server uses to keep its ledger in this schema.
    pub fn server_url(&self) -> String {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        format!(
            "{}{separator}options=-csearch_path%3D{}",
            self.url, self.name
        )
    }

    /// Runs `sql` on a connection of its own.
    pub fn execute(&self, sql: &str) {
        let sql = sql.to_owned();
        on_own_connection(&self.url, move |client| {
            client
                .batch_execute(&sql)
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        });
    }

    /// The first column of each row `sql` (with text parameters) gives, in this schema.
    pub fn query_strings(&self, sql: &str, params: &[&str]) -> Vec<String> {
        let sql = sql.to_owned();
        let params: Vec<String> = params.iter().map(|p| (*p).to_owned()).collect();
        on_own_connection(&self.server_url(), move |client| {
            let params: Vec<&(dyn postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p as &(dyn postgres::types::ToSql + Sync))
                .collect();
            client
                .query(&sql, &params)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|row| row.get::<_, String>(0))
                .collect()
        })
    }
}

/// Runs `work` on a new connection to `url`, on a thread of its own: the synchronous
/// client must not run (or be dropped) inside an async context.
fn on_own_connection<T: Send + 'static>(
    url: &str,
    work: impl FnOnce(&mut postgres::Client) -> T + Send + 'static,
) -> T {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to {URL_VARIABLE}: {e}"));
        work(&mut client)
    })
    .join()
    .expect("the database thread")
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        let url = self.url.clone();
        // Best effort: a schema left behind in a throwaway database harms nothing.
        let _ = std::thread::spawn(move || {
            if let Ok(mut client) = postgres::Client::connect(&url, postgres::NoTls) {
                let _ = client.batch_execute(&sql);
            }
        })
        .join();
    }
}

/// A PostgreSQL cluster of a test's own (`.ci/postgres`), for what the shared one must
/// not do: restart, or serve TLS. Stopped and deleted when dropped.
pub struct PrivatePostgres {
    dir: std::path::PathBuf,
    pub url: String,
}

impl PrivatePostgres {
    const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/postgres");

    /// Runs `.ci/postgres <action> <dir>`; its output, having checked that it succeeded.
    fn script(action: &str, dir: &std::path::Path, tls: Option<&std::path::Path>) -> String {
        let mut command = std::process::Command::new("bash");
        command.arg(Self::SCRIPT).arg(action).arg(dir);
        if let Some(tls) = tls {
            command.env("CAPSYNC_PG_TLS", tls);
        }
        let out = command.output().expect("run .ci/postgres");
        assert!(
            out.status.success(),
            ".ci/postgres {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// Starts a cluster in `dir`; with `tls`, a directory holding `server.crt` and
    /// `server.key`, it serves TLS with that certificate.
    pub fn start(dir: std::path::PathBuf, tls: Option<&std::path::Path>) -> Self {
        let line = Self::script("start", &dir, tls);
        let url = line
            .trim()
            .strip_prefix("export CAPSYNC_TEST_POSTGRES=")
            .expect("the URL line")
            .to_owned();
        Self { dir, url }
    }

    /// Stops the cluster in `dir` at once, as a crash would, and starts it again on the
    /// same port.
    pub fn restart(dir: &std::path::Path) {
        Self::script("restart", dir, None);
    }

    /// Where the cluster lives.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // `stop` always succeeds; a panic here would hide the test's own failure.
        let _ = std::process::Command::new("bash")
            .arg(Self::SCRIPT)
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}
