//! Contract cases of shares among each other: joining an agent's open share
//! of a session, minting tokens for a share, and reading the child shares of
//! sub-agent sessions with the parent's viewer.

use capsync_shared::{Cursor, Epoch, ShareId, TokenId, TokenKind};

use super::{Fixture, SESSION, applied, authority, batch, model_op, new_share, outcomes, token};
use crate::ledger::{LedgerError, NewShare, RevokeScope, ShareInfo};

fn ids(shares: &[ShareInfo]) -> Vec<&str> {
    shares.iter().map(|s| s.state.share_id.as_str()).collect()
}

/// Not covered by the engine tests this suite started from; a second engine
/// must make one share per agent and session however many calls race.
pub(crate) async fn create_or_join_joins_the_agents_open_share_of_the_session(fx: Fixture) {
    fx.append(vec![model_op("o1")]).await;
    // The agent's share of ses_1 exists: joining it adds tokens, makes no share.
    let (info, joined) = fx
        .backend
        .create_or_join_share(
            fx.agent.clone(),
            new_share("sh_unused"),
            token("w-j1"),
            token("v-j1"),
        )
        .await
        .unwrap();
    assert!(joined);
    assert_eq!(info.state.share_id, fx.share);
    assert_eq!(info.state.cursor, Cursor(1));
    let writer = authority("w-j1", TokenKind::Writer, Some(("sh_1", 0)));
    let ack = fx
        .backend
        .append(writer, batch(vec![model_op("o2")]))
        .await
        .unwrap();
    assert_eq!(outcomes(&ack), applied(&[2]));
    let viewer = authority("v-j1", TokenKind::Viewer, Some(("sh_1", 0)));
    assert_eq!(
        fx.backend.share_state(viewer).await.unwrap().cursor,
        Cursor(2)
    );

    // Tokens handed out by a join are at the share's current epochs.
    fx.backend
        .revoke_share(fx.agent.clone(), fx.share.clone(), RevokeScope::Writers)
        .await
        .unwrap();
    let (info, joined) = fx
        .backend
        .create_or_join_share(
            fx.agent.clone(),
            new_share("sh_unused"),
            token("w-j2"),
            token("v-j2"),
        )
        .await
        .unwrap();
    assert!(joined);
    assert_eq!(
        (info.state.writer_epoch, info.state.viewer_epoch),
        (Epoch(1), Epoch(0))
    );
    for (id, epoch) in [("w-j2", 1), ("v-j2", 0)] {
        let found = fx
            .backend
            .find_token(TokenId::from(id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.share_id, found.epoch),
            (Some(fx.share.clone()), Epoch(epoch)),
            "{id}"
        );
    }

    // Another agent's share of the session is not joined: it gets its own.
    fx.backend
        .mint_token(fx.admin.clone(), TokenKind::Agent, token("agt2"))
        .await
        .unwrap();
    let other_agent = authority("agt2", TokenKind::Agent, None);
    let (info, joined) = fx
        .backend
        .create_or_join_share(
            other_agent.clone(),
            new_share("sh_other"),
            token("w-o"),
            token("v-o"),
        )
        .await
        .unwrap();
    assert!(!joined);
    assert_eq!(
        (info.state.share_id.as_str(), info.state.cursor),
        ("sh_other", Cursor(0))
    );
    assert_eq!(info.owner_token_id, other_agent.token_id);

    // An archived share is not joined either: the session starts a new share.
    fx.backend
        .set_archived(fx.admin.clone(), fx.share.clone(), true)
        .await
        .unwrap();
    let (info, joined) = fx
        .backend
        .create_or_join_share(
            fx.agent.clone(),
            new_share("sh_after"),
            token("w-a"),
            token("v-a"),
        )
        .await
        .unwrap();
    assert!(!joined);
    assert_eq!(info.state.share_id.as_str(), "sh_after");
    let mine = fx
        .backend
        .list_shares(fx.agent.clone(), String::new(), 10, true)
        .await
        .unwrap();
    assert_eq!(ids(&mine), ["sh_1", "sh_after"]);

    // Only agents create or join.
    for who in [fx.admin.clone(), fx.writer.clone()] {
        let r = fx
            .backend
            .create_or_join_share(who, new_share("sh_x"), token("w-x"), token("v-x"))
            .await;
        assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");
    }

    // Calls for one new session at once make one share, and every token works.
    let calls: Vec<_> = (0..6)
        .map(|n| {
            fx.backend.create_or_join_share(
                fx.agent.clone(),
                NewShare {
                    session_id: "ses_race".into(),
                    ..new_share(&format!("sh_race_{n}"))
                },
                token(&format!("w-r{n}")),
                token(&format!("v-r{n}")),
            )
        })
        .collect();
    let answers: Vec<(ShareInfo, bool)> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(answers.iter().filter(|(_, joined)| !joined).count(), 1);
    let share = answers[0].0.state.share_id.clone();
    assert!(answers.iter().all(|(info, _)| info.state.share_id == share));
    for n in 0..6 {
        let writer = authority(
            &format!("w-r{n}"),
            TokenKind::Writer,
            Some((share.as_str(), 0)),
        );
        let ack = fx
            .backend
            .append(writer, batch(vec![model_op(&format!("r{n}"))]))
            .await
            .unwrap();
        assert_eq!(ack.cursor, Cursor(n + 1));
    }
}

/// Not covered by the engine tests this suite started from.
pub(crate) async fn owners_and_admins_mint_tokens_for_a_share_at_its_current_epochs(fx: Fixture) {
    fx.backend
        .revoke_share(fx.agent.clone(), fx.share.clone(), RevokeScope::Writers)
        .await
        .unwrap();
    let minted = fx
        .backend
        .mint_for_share(
            fx.agent.clone(),
            fx.share.clone(),
            TokenKind::Writer,
            token("w-new"),
        )
        .await
        .unwrap();
    assert_eq!(
        (minted.kind, minted.share_id.clone(), minted.epoch),
        (TokenKind::Writer, Some(fx.share.clone()), Epoch(1))
    );
    let writer = authority("w-new", TokenKind::Writer, Some(("sh_1", 1)));
    let ack = fx
        .backend
        .append(writer, batch(vec![model_op("o1")]))
        .await
        .unwrap();
    assert_eq!(outcomes(&ack), applied(&[1]));
    let minted = fx
        .backend
        .mint_for_share(
            fx.admin.clone(),
            fx.share.clone(),
            TokenKind::Viewer,
            token("v-new"),
        )
        .await
        .unwrap();
    assert_eq!(minted.epoch, Epoch(0));
    let viewer = authority("v-new", TokenKind::Viewer, Some(("sh_1", 0)));
    assert_eq!(
        fx.backend.share_state(viewer).await.unwrap().cursor,
        Cursor(1)
    );

    // Another agent's share, or none, is NotFound; other callers and kinds are refused.
    fx.backend
        .mint_token(fx.admin.clone(), TokenKind::Agent, token("agt2"))
        .await
        .unwrap();
    let other_agent = authority("agt2", TokenKind::Agent, None);
    for (who, share) in [(other_agent, "sh_1"), (fx.agent.clone(), "sh_404")] {
        let r = fx
            .backend
            .mint_for_share(who, ShareId::from(share), TokenKind::Viewer, token("x1"))
            .await;
        assert!(matches!(r, Err(LedgerError::NotFound)), "{share}: {r:?}");
    }
    for (who, kind) in [
        (fx.writer.clone(), TokenKind::Viewer),
        (fx.viewer.clone(), TokenKind::Viewer),
        (fx.agent.clone(), TokenKind::Agent),
        (fx.admin.clone(), TokenKind::Admin),
    ] {
        let r = fx
            .backend
            .mint_for_share(who, fx.share.clone(), kind, token("x2"))
            .await;
        assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");
    }
    for id in ["x1", "x2"] {
        let found = fx.backend.find_token(TokenId::from(id)).await.unwrap();
        assert!(found.is_none(), "{id}: {found:?}");
    }
}

/// Not covered by the engine tests this suite started from.
/// A share whose parent session is its own session (a client's mistake, or a
/// loop) is not its own child: listing children never returns the share itself.
pub(crate) async fn a_share_is_never_its_own_child(fx: Fixture) {
    fx.backend
        .create_share(
            fx.agent.clone(),
            NewShare {
                share_id: ShareId::from("sh_loop"),
                session_id: "ses_loop".into(),
                project_id: "prj".into(),
                parent_session_id: "ses_loop".into(),
                title: "its own parent".into(),
            },
            token("w-loop"),
            token("v-loop"),
        )
        .await
        .unwrap();
    let viewer = authority("v-loop", TokenKind::Viewer, Some(("sh_loop", 0)));
    let children = fx.backend.child_shares(viewer).await.unwrap();
    assert!(children.is_empty(), "{:?}", ids(&children));
}

pub(crate) async fn a_parents_viewer_reads_its_child_shares_until_its_viewers_are_revoked(
    fx: Fixture,
) {
    let child = |id: &str, session: &str| NewShare {
        share_id: ShareId::from(id),
        session_id: session.into(),
        project_id: "prj".into(),
        parent_session_id: SESSION.into(),
        title: format!("child {id}"),
    };
    for (id, session) in [("sh_c2", "ses_c2"), ("sh_c1", "ses_c1")] {
        fx.backend
            .create_share(
                fx.agent.clone(),
                child(id, session),
                token(&format!("w-{id}")),
                token(&format!("v-{id}")),
            )
            .await
            .unwrap();
    }
    // Another agent's child of the same session is not this share's.
    fx.backend
        .mint_token(fx.admin.clone(), TokenKind::Agent, token("agt2"))
        .await
        .unwrap();
    fx.backend
        .create_share(
            authority("agt2", TokenKind::Agent, None),
            child("sh_c3", "ses_c3"),
            token("w-c3"),
            token("v-c3"),
        )
        .await
        .unwrap();
    let w_c1 = authority("w-sh_c1", TokenKind::Writer, Some(("sh_c1", 0)));
    fx.backend
        .append(w_c1, batch(vec![model_op("c1")]))
        .await
        .unwrap();

    for who in [fx.viewer.clone(), fx.writer.clone()] {
        let children = fx.backend.child_shares(who).await.unwrap();
        assert_eq!(ids(&children), ["sh_c1", "sh_c2"], "by session id");
    }
    let r = fx.backend.child_shares(fx.agent.clone()).await;
    assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");

    // The parent's viewer token reads a child, at the parent's viewer epoch.
    let through_parent = authority("v-sh_1", TokenKind::Viewer, Some(("sh_c1", 0)));
    let state = fx
        .backend
        .share_state(through_parent.clone())
        .await
        .unwrap();
    assert_eq!(
        (state.share_id.as_str(), state.cursor),
        ("sh_c1", Cursor(1))
    );
    let page = fx
        .backend
        .snapshot_page(through_parent.clone(), String::new(), 1 << 20)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1);
    // Not another agent's child, and never to write.
    let elsewhere = authority("v-sh_1", TokenKind::Viewer, Some(("sh_c3", 0)));
    let r = fx.backend.share_state(elsewhere).await;
    assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");
    let write = authority("w-sh_1", TokenKind::Writer, Some(("sh_c1", 0)));
    let r = fx.backend.append(write, batch(vec![model_op("x")])).await;
    assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");

    // Revoking the parent's viewers ends it; the child's own viewers are untouched.
    fx.backend
        .revoke_share(fx.agent.clone(), fx.share.clone(), RevokeScope::Viewers)
        .await
        .unwrap();
    let r = fx.backend.share_state(through_parent).await;
    assert!(matches!(r, Err(LedgerError::Revoked)), "{r:?}");
    let renewed = authority("v-sh_1", TokenKind::Viewer, Some(("sh_c1", 1)));
    fx.backend.share_state(renewed).await.unwrap();
    let own = authority("v-sh_c1", TokenKind::Viewer, Some(("sh_c1", 0)));
    fx.backend.share_state(own).await.unwrap();
}
