//! The whole capsync flow in one program, with nothing else to start:
//! an embedded server, an agent that shares a session, a viewer that reads it,
//! and a revocation that cuts the viewer off while the writer keeps working.
//!
//!     cargo run -p capsync-examples --example quickstart
//!
//! The same calls work against a `capsync-server serve` elsewhere: replace the
//! embedded server with `capsync_client::connect("host:7420")`.

use capsync_client::{NewShare, Scope, SessionExport, push_ops};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // An embedded server on a free loopback port, with its data in a temp dir.
    let data = tempfile::tempdir()?;
    let config = capsync_server::Config::for_tests(data.path());
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let server = capsync_server::spawn(listener, config.clone())?;
    let admin_token = std::fs::read_to_string(config.admin_token_path())?;

    // capnp-rpc clients are !Send: run them on a LocalSet.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio::task::LocalSet::new().block_on(&runtime, async {
        let conn = capsync_client::connect(server.addr()).await?;

        // Admin → agent: the agent token is what a coding agent is configured with.
        let admin = conn.redeem(admin_token.trim()).await?.into_admin()?;
        let agent_token = admin.mint_agent("quickstart", None).await?.token;
        let agent = conn.redeem(&agent_token).await?.into_agent()?;

        // Agent → share: a live writer plus two sturdy refs (writer, viewer).
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/sessions/fix-login-bug.json");
        let export = SessionExport::from_json(&std::fs::read_to_string(path)?)?;
        let created = agent
            .create_share(NewShare {
                session_id: export.session_id().to_owned(),
                project_id: export.project_id().to_owned(),
                parent_session_id: export.parent_id().map(str::to_owned),
                title: export.title().to_owned(),
                ..NewShare::default()
            })
            .await?;
        let share_id = created.info.state.share_id.clone();
        println!(
            "share {share_id} created for session {}",
            export.session_id()
        );

        // Push the session as ops; a second push is all duplicates.
        let ops = export.to_ops();
        let first = push_ops(&created.writer, &ops, 100, |_| {}).await?;
        let second = push_ops(&created.writer, &ops, 100, |_| {}).await?;
        println!(
            "pushed {} ops: {} applied, cursor {}; pushed again: {} duplicates, cursor {}",
            ops.len(),
            first.applied,
            first.cursor,
            second.duplicates,
            second.cursor
        );

        // A viewer redeems the read-only link and reads the session.
        let viewer = conn
            .redeem(&created.viewer_token.token)
            .await?
            .into_viewer()?;
        let document = viewer.snapshot().await?.to_document();
        println!(
            "viewer sees {} messages at cursor {}",
            document.messages.len(),
            document.cursor
        );

        // The owner unshares the viewers: the live viewer stops at once.
        agent.revoke_share(&share_id, Scope::Viewers).await?;
        match viewer.state().await {
            Err(err) => println!("viewer after revocation: {err}"),
            Ok(_) => println!("viewer after revocation: still works (unexpected)"),
        }
        println!(
            "writer after revocation: cursor {}",
            created.writer.state().await?.cursor
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    server.shutdown()?;
    Ok(())
}
