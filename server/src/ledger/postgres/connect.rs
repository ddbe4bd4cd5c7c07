//! How this server reaches PostgreSQL: the parsed URL, and TLS that verifies the
//! server's certificate when the URL asks for it.
//!
//! `sslmode=require` (and libpq's `verify-ca` and `verify-full`, accepted as the same)
//! connects over TLS only and verifies the certificate and the host name, against the
//! machine's trusted roots or against a CA file (`sslrootcert=` in the URL, or
//! `--database-ca-file`). This is stricter than libpq's `require`, which encrypts
//! without checking who answers. `sslmode=prefer` (the default) and `disable` connect
//! without TLS. Client certificates are not supported.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use postgres::{Client, NoTls};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::pool::CONNECT_TIMEOUT;
use crate::ledger::{LedgerError, LedgerResult};

/// A PostgreSQL database and how to connect to it.
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    /// `None`: no TLS (`sslmode` other than `require`).
    tls: Option<MakeRustlsConnect>,
}

impl std::fmt::Debug for Database {
    // The configuration holds the password: show where, never how.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("dbname", &self.config.get_dbname())
            .field("user", &self.config.get_user())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Database {
    /// The database at `url` (a `postgres://` URL with libpq's query parameters),
    /// trusting the CA certificates in `ca_file` (PEM) for TLS if given, else the
    /// machine's.
    pub fn new(url: &str, ca_file: Option<&Path>) -> LedgerResult<Self> {
        let (url, root_cert) = libpq_parameters(url)?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| invalid(format!("not a PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("capsync-server");
        }
        let ca_file = match (ca_file, root_cert) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "the CA file is given twice (sslrootcert in the URL and --database-ca-file)"
                        .to_owned(),
                ));
            }
            (Some(file), None) => Some(file.to_path_buf()),
            (None, file) => file,
        };
        let tls = match config.get_ssl_mode() {
            SslMode::Require => Some(MakeRustlsConnect::new(tls_config(ca_file.as_deref())?)),
            _ if ca_file.is_some() => {
                return Err(invalid(
                    "a CA file is only used with sslmode=require (or verify-full) in the URL"
                        .to_owned(),
                ));
            }
            _ => None,
        };
        Ok(Self { config, tls })
    }

    /// Opens a connection, with the blocking client.
    pub fn connect(&self) -> Result<Client, CannotConnect> {
        let config = postgres::Config::from(self.config.clone());
        match &self.tls {
            Some(tls) => config.connect(tls.clone()),
            None => config.connect(NoTls),
        }
        .map_err(|e| CannotConnect::from(&e))
    }

    /// Opens a connection with the asynchronous client, whose connection runs as a task
    /// of the runtime this is called in (it makes progress while that runtime runs).
    pub async fn connect_async(&self) -> Result<tokio_postgres::Client, CannotConnect> {
        let failed = |e: tokio_postgres::Error| CannotConnect::from(&e);
        match &self.tls {
            Some(tls) => {
                let (client, connection) =
                    self.config.connect(tls.clone()).await.map_err(failed)?;
                tokio::spawn(connection);
                Ok(client)
            }
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(failed)?;
                tokio::spawn(connection);
                Ok(client)
            }
        }
    }

    /// The parsed URL, e.g. to set a connection option before connecting.
    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    /// Whether connections use TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// Why a connection could not be opened, with every cause (the client's own message
/// says only "error performing TLS handshake", its cause says which certificate).
#[derive(Debug)]
pub struct CannotConnect(String);

impl From<&postgres::Error> for CannotConnect {
    fn from(error: &postgres::Error) -> Self {
        let mut text = error.to_string();
        let mut cause = std::error::Error::source(error);
        while let Some(e) = cause {
            let said = e.to_string();
            if !text.contains(&said) {
                text = format!("{text}: {said}");
            }
            cause = e.source();
        }
        Self(text)
    }
}

impl std::fmt::Display for CannotConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CannotConnect {}

fn invalid(what: String) -> LedgerError {
    LedgerError::InvalidArgument(what)
}

/// `url` with what the PostgreSQL client does not read itself taken out: `sslmode`'s
/// libpq spellings `verify-ca` and `verify-full` (TLS here always verifies, so they
/// become `require`), and `sslrootcert`, returned as a path.
fn libpq_parameters(url: &str) -> LedgerResult<(String, Option<PathBuf>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut root_cert = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslrootcert" => {
                let path = percent_encoding::percent_decode_str(value)
                    .decode_utf8()
                    .map_err(|_| invalid("sslrootcert is not UTF-8".to_owned()))?;
                root_cert = Some(PathBuf::from(path.as_ref()));
            }
            "sslmode" if matches!(value, "verify-ca" | "verify-full") => {
                kept.push("sslmode=require".to_owned());
            }
            _ => kept.push(pair.to_owned()),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, root_cert))
}

/// TLS that trusts the certificates in `ca_file`, or the machine's trusted roots.
fn tls_config(ca_file: Option<&Path>) -> LedgerResult<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(file) => {
            let unreadable = |e: rustls::pki_types::pem::Error| {
                invalid(format!("CA file {}: {e}", file.display()))
            };
            for cert in CertificateDer::pem_file_iter(file).map_err(unreadable)? {
                roots
                    .add(cert.map_err(unreadable)?)
                    .map_err(|e| invalid(format!("CA file {}: {e}", file.display())))?;
            }
            if roots.is_empty() {
                return Err(invalid(format!(
                    "CA file {} holds no certificate",
                    file.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(invalid(
                    "sslmode=require, but this machine has no trusted CA certificates: give the \
                     database's CA with --database-ca-file or sslrootcert= in the URL"
                        .to_owned(),
                ));
            }
        }
    }
    // ring builds with a C compiler alone (aws-lc, rustls's other provider, is a far
    // larger build); rustls deprecates it for lacking post-quantum key exchange, which a
    // database connection inside a deployment can do without for now.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LedgerError::Storage(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_spellings_are_read_and_taken_out() {
        let (url, cert) = libpq_parameters(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca%20file.pem&options=-cx%3D1",
        )
        .unwrap();
        assert_eq!(url, "postgres://u@h/db?sslmode=require&options=-cx%3D1");
        assert_eq!(cert, Some(PathBuf::from("/tmp/ca file.pem")));
        let (url, cert) = libpq_parameters("postgres://u@h/db").unwrap();
        assert_eq!((url.as_str(), cert), ("postgres://u@h/db", None));
    }

    #[test]
    fn prefer_and_disable_connect_without_tls() {
        for url in ["postgres://u@h/db", "postgres://u@h/db?sslmode=disable"] {
            assert!(!Database::new(url, None).unwrap().uses_tls(), "{url}");
        }
    }

    #[test]
    fn a_ca_file_without_require_is_refused_rather_than_ignored() {
        let error = Database::new("postgres://u@h/db", Some(Path::new("/nonexistent.pem")))
            .unwrap_err()
            .to_string();
        assert!(error.contains("only used with sslmode=require"), "{error}");
    }

    #[test]
    fn a_ca_file_that_cannot_be_read_is_named() {
        let error = Database::new(
            "postgres://u@h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }

    #[test]
    fn the_password_is_never_shown() {
        let database = Database::new("postgres://u:hunter2@h/db", None).unwrap();
        assert!(!format!("{database:?}").contains("hunter2"));
    }
}
