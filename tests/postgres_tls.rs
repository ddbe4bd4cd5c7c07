//! TLS to PostgreSQL: `sslmode=require` connects over TLS and verifies the database's
//! certificate (against `--database-ca-file` here, a CA made for the test), and refuses
//! a database it cannot verify or that does not speak TLS. A real PostgreSQL of the
//! test's own serves a certificate signed by that CA.

use std::net::TcpListener;
use std::path::Path;

use capsync_server::config::DatabaseUrl;
use capsync_tests::postgres::{PrivatePostgres, url_or_skip};
use capsync_tests::{TestServer, admin, agent, batch, run_local, share, text_part_op};

/// A CA, and a certificate it signed for `127.0.0.1` and `localhost`, written to `dir`
/// as `ca.pem`, `server.crt` and `server.key`.
fn make_certificates(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "capsync test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.crt"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

fn require_tls(url: &str) -> DatabaseUrl {
    format!("{url}?sslmode=require").parse().unwrap()
}

/// Why a server on `config`'s database does not start.
fn start_error(adjust: impl FnOnce(&mut capsync_server::Config)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut config = capsync_server::Config::for_tests(dir.path().join("data"));
    adjust(&mut config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    match capsync_server::spawn(listener, config) {
        Ok(_) => panic!("the server started"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sslmode_require_connects_over_tls_and_verifies_the_certificate() {
    if url_or_skip().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let postgres = PrivatePostgres::start(dir.path().join("pg"), Some(dir.path()));
    let ca_file = dir.path().join("ca.pem");

    let server = TestServer::start_with(|config| {
        config.database = Some(require_tls(&postgres.url));
        config.database_ca_file = Some(ca_file.clone());
    });
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_tls").await;
        let ack = created
            .writer
            .append(&batch(
                "b1",
                vec![text_part_op("ses_tls", "msg_1", "prt_1")],
            ))
            .await
            .unwrap();
        assert_eq!(ack.cursor.0, 1);
    });
    // Every connection the server holds is encrypted (asked over a plain one).
    let (encrypted, all) = std::thread::spawn({
        let url = format!("{}?sslmode=disable", postgres.url);
        move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let row = client
                .query_one(
                    "SELECT count(*) FILTER (WHERE s.ssl), count(*)
                     FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                     WHERE a.application_name = 'capsync-server'",
                    &[],
                )
                .unwrap();
            (row.get::<_, i64>(0), row.get::<_, i64>(1))
        }
    })
    .join()
    .unwrap();
    assert!(all > 0, "the server holds connections");
    assert_eq!(encrypted, all, "every server connection uses TLS");

    // Without the CA, the certificate is not trusted: the server does not start.
    let error = start_error(|config| config.database = Some(require_tls(&postgres.url)));
    assert!(error.contains("certificate"), "{error}");
}

#[test]
fn sslmode_require_refuses_a_database_without_tls() {
    // The shared test database runs without TLS.
    let Some(url) = url_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let ca_file = dir.path().join("ca.pem");
    let error = start_error(|config| {
        config.database = Some(require_tls(&url));
        config.database_ca_file = Some(ca_file);
    });
    assert!(error.contains("TLS"), "{error}");
}
