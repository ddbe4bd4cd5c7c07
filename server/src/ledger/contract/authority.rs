//! Contract cases of authority: epochs and revocation, token expiry, the
//! minting chain, and which kinds of caller each call accepts.

use std::time::Duration;

use capsync_shared::{Cursor, Epoch, ShareId, TokenId, TokenKind};

use super::{
    Fixture, SESSION, SHARE, applied, authority, batch, delete_share, model_op, new_share,
    outcomes, token,
};
use crate::ledger::{LedgerError, NewShare, NewToken, RevokeScope, ShareInfo};

pub(crate) async fn revoking_writers_fences_the_old_epoch_only(fx: Fixture) {
    fx.append(vec![model_op("o1")]).await;
    let state = fx
        .backend
        .revoke_share(fx.agent.clone(), fx.share.clone(), RevokeScope::Writers)
        .await
        .unwrap();
    assert_eq!(
        (state.writer_epoch, state.viewer_epoch),
        (Epoch(1), Epoch(0))
    );
    assert_eq!(state.cursor, Cursor(1));

    let old = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("o2")]));
    assert!(matches!(old.await, Err(LedgerError::Revoked)));
    let mint = fx
        .backend
        .mint_token(fx.writer.clone(), TokenKind::Viewer, token("v2"));
    assert!(matches!(mint.await, Err(LedgerError::Revoked)));

    let current = authority("w-sh_1", TokenKind::Writer, Some((SHARE, 1)));
    let ack = fx
        .backend
        .append(current, batch(vec![model_op("o2")]))
        .await
        .unwrap();
    assert_eq!(outcomes(&ack), applied(&[2]));
    // Viewers were not touched.
    assert_eq!(fx.cursor().await, Cursor(2));
}

pub(crate) async fn revoking_viewers_leaves_writers_working(fx: Fixture) {
    // A viewer derived from the writer capability carries the writer's token id.
    let derived = authority("w-sh_1", TokenKind::Viewer, Some((SHARE, 0)));
    fx.backend.share_state(derived.clone()).await.unwrap();
    let state = fx
        .backend
        .revoke_share(fx.admin.clone(), fx.share.clone(), RevokeScope::Viewers)
        .await
        .unwrap();
    assert_eq!(
        (state.writer_epoch, state.viewer_epoch),
        (Epoch(0), Epoch(1))
    );

    for viewer in [fx.viewer.clone(), derived] {
        let state = fx.backend.share_state(viewer.clone()).await;
        assert!(matches!(state, Err(LedgerError::Revoked)), "{state:?}");
        let ops = fx.backend.ops_since(viewer.clone(), Cursor(0), 10).await;
        assert!(matches!(ops, Err(LedgerError::Revoked)));
        let page = fx.backend.snapshot_page(viewer, String::new(), 100).await;
        assert!(matches!(page, Err(LedgerError::Revoked)));
    }
    let ack = fx.append(vec![model_op("o1")]).await;
    assert_eq!(outcomes(&ack), applied(&[1]));
    let renewed = authority("v-sh_1", TokenKind::Viewer, Some((SHARE, 1)));
    assert_eq!(
        fx.backend.share_state(renewed).await.unwrap().cursor,
        Cursor(1)
    );

    let state = fx
        .backend
        .revoke_share(fx.agent.clone(), fx.share.clone(), RevokeScope::All)
        .await
        .unwrap();
    assert_eq!(
        (state.writer_epoch, state.viewer_epoch),
        (Epoch(1), Epoch(2))
    );
}

pub(crate) async fn each_call_accepts_only_its_kinds_of_authority(fx: Fixture) {
    let denied =
        |r: &dyn std::fmt::Debug, ok: bool| assert!(ok, "expected PermissionDenied: {r:?}");
    let b = || batch(vec![model_op("o")]);

    let r = fx.backend.append(fx.viewer.clone(), b()).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = fx.backend.append(fx.agent.clone(), b()).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    // Claiming more than the token grants.
    let forged = authority("v-sh_1", TokenKind::Writer, Some((SHARE, 0)));
    let r = fx.backend.append(forged, b()).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let forged = authority("agt", TokenKind::Admin, None);
    let r = fx
        .backend
        .mint_token(forged, TokenKind::Agent, token("x1"))
        .await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    // A token of one share does not open another.
    let (_, _) = fx.new_share(&fx.agent, "sh_2").await;
    let cross = authority("w-sh_1", TokenKind::Writer, Some(("sh_2", 0)));
    let r = fx.backend.append(cross, b()).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));

    // Minting only goes down the chain.
    for (issuer, kind) in [
        (fx.admin.clone(), TokenKind::Admin),
        (fx.admin.clone(), TokenKind::Writer),
        (fx.agent.clone(), TokenKind::Agent),
        (fx.agent.clone(), TokenKind::Writer),
        (fx.writer.clone(), TokenKind::Agent),
        (fx.viewer.clone(), TokenKind::Viewer),
        (fx.viewer.clone(), TokenKind::Writer),
    ] {
        let r = fx.backend.mint_token(issuer, kind, token("x2")).await;
        denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    }
    let r = fx
        .backend
        .create_share(
            fx.admin.clone(),
            new_share("sh_3"),
            token("w3"),
            token("v3"),
        )
        .await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = fx
        .backend
        .list_shares(fx.writer.clone(), String::new(), 10, false)
        .await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = fx
        .backend
        .revoke_share(fx.writer.clone(), fx.share.clone(), RevokeScope::All)
        .await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = fx
        .backend
        .revoke_token(fx.agent.clone(), TokenId::from("w-sh_1"))
        .await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = delete_share(&fx.backend, &fx.agent, &fx.share).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = fx.backend.share_state(fx.admin.clone()).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));

    // None of it left anything behind.
    for id in ["x1", "x2", "w3", "v3"] {
        let found = fx.backend.find_token(TokenId::from(id)).await.unwrap();
        assert!(found.is_none(), "{id}: {found:?}");
    }
    let listed = fx
        .backend
        .list_shares(fx.admin.clone(), String::new(), 10, true)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(fx.stats().await.ledger_ops, 0);
    assert_eq!(fx.cursor().await, Cursor(0));
    // Writers read too.
    fx.backend.share_state(fx.writer.clone()).await.unwrap();
    fx.backend
        .ops_since(fx.writer.clone(), Cursor(0), 10)
        .await
        .unwrap();
}

pub(crate) async fn revoked_expired_and_unknown_tokens_grant_nothing(fx: Fixture) {
    // A saved writer that expires in a minute: it works until then.
    let expiring = NewToken {
        expires_at: Some(fx.now() + 60_000),
        ..token("w-old")
    };
    fx.backend
        .mint_token(fx.writer.clone(), TokenKind::Writer, expiring)
        .await
        .unwrap();
    let old = authority("w-old", TokenKind::Writer, Some((SHARE, 0)));
    fx.backend.share_state(old.clone()).await.unwrap();
    fx.clock.advance(Duration::from_secs(61));
    let r = fx.backend.append(old, batch(vec![model_op("o")])).await;
    assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");

    let unknown = authority("nobody", TokenKind::Writer, Some((SHARE, 0)));
    let r = fx.backend.share_state(unknown).await;
    assert!(matches!(r, Err(LedgerError::Revoked)), "{r:?}");
    let gone = authority("w-sh_9", TokenKind::Writer, Some(("sh_9", 0)));
    let r = fx.backend.share_state(gone).await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");

    fx.backend
        .revoke_token(fx.admin.clone(), TokenId::from("w-sh_1"))
        .await
        .unwrap();
    // Idempotent.
    fx.backend
        .revoke_token(fx.admin.clone(), TokenId::from("w-sh_1"))
        .await
        .unwrap();
    let r = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("o")]))
        .await;
    assert!(matches!(r, Err(LedgerError::Revoked)), "{r:?}");
    // The viewer token of the same share is its own row.
    fx.backend.share_state(fx.viewer.clone()).await.unwrap();
    let found = fx
        .backend
        .find_token(TokenId::from("w-sh_1"))
        .await
        .unwrap()
        .unwrap();
    assert!(found.revoked);

    let r = fx
        .backend
        .revoke_token(fx.admin.clone(), TokenId::from("nobody"))
        .await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");
    // Revoking the agent stops it creating shares.
    fx.backend
        .revoke_token(fx.admin.clone(), TokenId::from("agt"))
        .await
        .unwrap();
    let r = fx
        .backend
        .create_share(
            fx.agent.clone(),
            new_share("sh_5"),
            token("w5"),
            token("v5"),
        )
        .await;
    assert!(matches!(r, Err(LedgerError::Revoked)), "{r:?}");
}

/// Who issued a token is stored for the audit trail; the engines' own tests
/// check that, the seam does not show it.
pub(crate) async fn minted_tokens_follow_the_chain_and_the_current_epochs(fx: Fixture) {
    fx.backend
        .revoke_share(fx.agent.clone(), fx.share.clone(), RevokeScope::Viewers)
        .await
        .unwrap();
    let saved = fx
        .backend
        .mint_token(fx.writer.clone(), TokenKind::Writer, token("w-saved"))
        .await
        .unwrap();
    assert_eq!(saved.kind, TokenKind::Writer);
    assert_eq!(saved.share_id, Some(fx.share.clone()));
    assert_eq!(saved.epoch, Epoch(0));
    let viewer = fx
        .backend
        .mint_token(
            fx.writer.clone(),
            TokenKind::Viewer,
            NewToken {
                expires_at: Some(i64::MAX),
                ..token("v-new")
            },
        )
        .await
        .unwrap();
    assert_eq!(viewer.epoch, Epoch(1));

    let found = fx
        .backend
        .find_token(TokenId::from("v-new"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.kind, TokenKind::Viewer);
    assert_eq!(found.share_id, Some(fx.share.clone()));
    assert_eq!(found.epoch, Epoch(1));
    assert_eq!(found.expires_at, Some(i64::MAX));
    assert_eq!(found.secret_hash, "$argon2id$fake$v-new");
    assert!(!found.revoked);
    let state = found.share.unwrap();
    assert_eq!(
        (state.share_id, state.viewer_epoch),
        (fx.share.clone(), Epoch(1))
    );

    let agent = fx
        .backend
        .find_token(TokenId::from("agt"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (agent.kind, agent.share_id, agent.share),
        (TokenKind::Agent, None, None)
    );
    assert!(
        fx.backend
            .find_token(TokenId::from("nobody"))
            .await
            .unwrap()
            .is_none()
    );
}

/// The first admin token is decided in one transaction: of two servers
/// starting at once on one database, one stores its token, the other none.
pub(crate) async fn only_the_first_admin_token_is_created(fx: Fixture) {
    let (_dir, backend) = fx.empty_store();
    let (first, second) = futures::join!(
        backend.create_first_admin_token(token("adm-a")),
        backend.create_first_admin_token(token("adm-b")),
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert!(first != second, "exactly one creates: {first} {second}");
    let (won, lost) = if first {
        ("adm-a", "adm-b")
    } else {
        ("adm-b", "adm-a")
    };
    let r = backend
        .list_shares(
            authority(won, TokenKind::Admin, None),
            String::new(),
            10,
            false,
        )
        .await;
    assert!(r.is_ok(), "{r:?}");
    let r = backend
        .list_shares(
            authority(lost, TokenKind::Admin, None),
            String::new(),
            10,
            false,
        )
        .await;
    assert!(matches!(r, Err(LedgerError::Revoked)), "{r:?}");
    // With a live admin token there is nothing to create.
    assert!(
        !backend
            .create_first_admin_token(token("adm-c"))
            .await
            .unwrap()
    );
    backend.close().await;
}

pub(crate) async fn replacing_the_admin_token_revokes_the_old_one(fx: Fixture) {
    let (_dir, backend) = fx.empty_store();
    assert!(!backend.has_admin_token().await.unwrap());
    // An admin token that expires in a minute counts until then.
    backend
        .replace_admin_token(NewToken {
            expires_at: Some(fx.now() + 60_000),
            ..token("adm-expiring")
        })
        .await
        .unwrap();
    assert!(backend.has_admin_token().await.unwrap());
    fx.clock.advance(Duration::from_secs(61));
    assert!(!backend.has_admin_token().await.unwrap(), "expired");
    backend.replace_admin_token(token("adm1")).await.unwrap();
    assert!(backend.has_admin_token().await.unwrap());
    backend.replace_admin_token(token("adm2")).await.unwrap();
    let old = authority("adm1", TokenKind::Admin, None);
    let r = backend.list_shares(old, String::new(), 10, false).await;
    assert!(matches!(r, Err(LedgerError::Revoked)), "{r:?}");
    let new = authority("adm2", TokenKind::Admin, None);
    assert!(
        backend
            .list_shares(new, String::new(), 10, false)
            .await
            .unwrap()
            .is_empty()
    );
    backend.close().await;
}

pub(crate) async fn create_share_refuses_unusable_session_ids(fx: Fixture) {
    for session_id in [String::new(), "s".repeat(257)] {
        let r = fx
            .backend
            .create_share(
                fx.agent.clone(),
                NewShare {
                    session_id,
                    ..new_share("sh_bad")
                },
                token("wb"),
                token("vb"),
            )
            .await;
        assert!(matches!(r, Err(LedgerError::InvalidArgument(_))), "{r:?}");
    }
    let listed = fx
        .backend
        .list_shares(fx.admin.clone(), String::new(), 100, true)
        .await
        .unwrap();
    assert!(
        !listed.iter().any(|s| s.state.share_id.as_str() == "sh_bad"),
        "{listed:?}"
    );
    for id in ["wb", "vb"] {
        assert!(
            fx.backend
                .find_token(TokenId::from(id))
                .await
                .unwrap()
                .is_none()
        );
    }
}

pub(crate) async fn agents_list_and_revoke_only_their_own_shares(fx: Fixture) {
    fx.backend
        .mint_token(fx.admin.clone(), TokenKind::Agent, token("agt2"))
        .await
        .unwrap();
    let other_agent = authority("agt2", TokenKind::Agent, None);
    fx.new_share(&fx.agent, "sh_3").await;
    fx.new_share(&other_agent, "sh_2").await;
    fx.new_share(&other_agent, "sh_4").await;

    let ids = |shares: Vec<ShareInfo>| -> Vec<String> {
        shares.into_iter().map(|s| s.state.share_id.0).collect()
    };
    let all = fx
        .backend
        .list_shares(fx.admin.clone(), String::new(), 100, false)
        .await
        .unwrap();
    assert_eq!(ids(all), ["sh_1", "sh_2", "sh_3", "sh_4"]);
    let page = fx
        .backend
        .list_shares(fx.admin.clone(), "sh_1".into(), 2, false)
        .await
        .unwrap();
    assert_eq!(ids(page), ["sh_2", "sh_3"]);
    let mine = fx
        .backend
        .list_shares(fx.agent.clone(), String::new(), 100, false)
        .await
        .unwrap();
    assert_eq!(mine[0].session_id, SESSION);
    assert_eq!(mine[0].title, "a session");
    assert_eq!(mine[0].owner_token_id, fx.agent.token_id);
    assert_eq!(ids(mine), ["sh_1", "sh_3"]);
    let theirs = fx
        .backend
        .list_shares(other_agent.clone(), "sh_2".into(), 100, false)
        .await
        .unwrap();
    assert_eq!(ids(theirs), ["sh_4"]);

    // Someone else's share looks exactly like a missing one.
    for share in ["sh_2", "sh_404"] {
        let r = fx
            .backend
            .revoke_share(fx.agent.clone(), ShareId::from(share), RevokeScope::All)
            .await;
        assert!(matches!(r, Err(LedgerError::NotFound)), "{share}: {r:?}");
    }
    let r = fx
        .backend
        .revoke_share(fx.admin.clone(), ShareId::from("sh_404"), RevokeScope::All)
        .await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");
    let state = fx
        .backend
        .revoke_share(
            fx.admin.clone(),
            ShareId::from("sh_2"),
            RevokeScope::Writers,
        )
        .await
        .unwrap();
    assert_eq!(state.writer_epoch, Epoch(1));
}
