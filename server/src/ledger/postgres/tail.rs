//! The writes that end an append (the last op's part, the share's new cursor and the
//! audit line), held back and sent as one statement.
//!
//! Nobody reads their answers, and each statement costs PostgreSQL its own execution
//! (and, unpipelined, a round trip). They touch different tables, so one statement of
//! data-modifying `WITH` clauses does exactly what the statements did one by one.
//! [`super::tx::PgTx`] sends the tail just ahead of the next statement, or of `COMMIT`,
//! in the same round trip, so nothing in the transaction sees them missing.

use postgres::types::ToSql;

use crate::ledger::AuditEvent;

/// A parameter of the tail's statement, owned until it is sent.
pub(super) type Param = Box<dyn ToSql + Sync + Send>;

/// Writes waiting to be sent, at most one of each.
#[derive(Default)]
pub(super) struct Tail {
    part: Option<HeldPart>,
    /// `shares.cursor` and `updated_at` of one share.
    cursor: Option<(String, i64, i64)>,
    audit: Option<(i64, AuditEvent)>,
}

/// A part upsert (`LedgerTx::put_part`).
pub(super) struct HeldPart {
    pub share: String,
    pub id: String,
    pub message_id: String,
    pub finished: bool,
    pub json: String,
}

impl Tail {
    pub(super) fn has_part(&self) -> bool {
        self.part.is_some()
    }

    pub(super) fn put_part(&mut self, part: HeldPart) {
        self.part = Some(part);
    }

    /// Whether `set_cursor` can be held back without sending the tail first.
    pub(super) fn has_cursor(&self) -> bool {
        self.cursor.is_some()
    }

    pub(super) fn has_audit(&self) -> bool {
        self.audit.is_some()
    }

    pub(super) fn set_cursor(&mut self, share: &str, cursor: i64, updated_at: i64) {
        self.cursor = Some((share.to_owned(), cursor, updated_at));
    }

    pub(super) fn audit(&mut self, event: &AuditEvent, at: i64) {
        self.audit = Some((at, event.clone()));
    }

    /// The one statement doing every held-back write, and its parameters, leaving the
    /// tail empty; `None` when nothing is held back.
    pub(super) fn take(&mut self) -> Option<(String, Vec<Param>)> {
        let (part, cursor, audit) = (self.part.take(), self.cursor.take(), self.audit.take());
        if part.is_none() && cursor.is_none() && audit.is_none() {
            return None;
        }
        let mut params: Vec<Param> = Vec::new();
        let mut next = |value: Param| {
            params.push(value);
            format!("${}", params.len())
        };
        let mut clauses = Vec::new();
        if let Some(part) = part {
            let values = [
                next(Box::new(part.share)),
                next(Box::new(part.id)),
                next(Box::new(part.message_id)),
                next(Box::new(part.finished)),
                next(Box::new(part.json)),
            ];
            // A part that moved to another message follows it: message_id is replaced too.
            // The snapshot holds the whole text: what deltas appended before it goes.
            clauses.push(format!(
                "part_put AS (INSERT INTO parts (share_id, id, message_id, finished, json) \
                 VALUES ({}) ON CONFLICT (share_id, id) DO UPDATE \
                 SET message_id = excluded.message_id, finished = excluded.finished, \
                 json = excluded.json), \
                 part_text_dropped AS (DELETE FROM part_chunks \
                 WHERE share_id = {} AND part_id = {})",
                values.join(", "),
                values[0],
                values[1]
            ));
        }
        if let Some((share, cursor, updated_at)) = cursor {
            let (share, cursor, updated_at) = (
                next(Box::new(share)),
                next(Box::new(cursor)),
                next(Box::new(updated_at)),
            );
            clauses.push(format!(
                "cursor_moved AS (UPDATE shares SET cursor = {cursor}, updated_at = {updated_at} \
                 WHERE id = {share})"
            ));
        }
        if let Some((at, event)) = audit {
            let values = [
                next(Box::new(at)),
                next(Box::new(event.action)),
                next(Box::new(event.token_id.map(|t| t.0))),
                next(Box::new(event.share_id.map(|s| s.0))),
                next(Box::new(event.outcome)),
                next(Box::new(event.detail)),
            ];
            clauses.push(format!(
                "audited AS (INSERT INTO audit (at, action, token_id, share_id, outcome, detail) \
                 VALUES ({}))",
                values.join(", ")
            ));
        }
        Some((format!("WITH {} SELECT 1", clauses.join(", ")), params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> AuditEvent {
        AuditEvent {
            action: "append",
            token_id: None,
            share_id: None,
            outcome: "ok".into(),
            detail: String::new(),
        }
    }

    #[test]
    fn an_empty_tail_sends_nothing() {
        assert!(Tail::default().take().is_none());
    }

    #[test]
    fn every_held_write_goes_into_one_statement_with_its_parameters_in_order() {
        let mut tail = Tail::default();
        tail.set_cursor("s", 7, 100);
        tail.audit(&event(), 100);
        let (sql, params) = tail.take().expect("a statement");
        assert_eq!(params.len(), 9);
        assert!(sql.starts_with("WITH cursor_moved AS (UPDATE shares SET cursor = $2"));
        assert!(sql.contains("audited AS (INSERT INTO audit"));
        assert!(sql.ends_with("VALUES ($4, $5, $6, $7, $8, $9)) SELECT 1"));
        assert!(tail.take().is_none(), "taking empties the tail");
    }

    #[test]
    fn a_held_part_goes_first_and_numbers_the_rest_after_it() {
        let mut tail = Tail::default();
        tail.put_part(HeldPart {
            share: "s".into(),
            id: "p".into(),
            message_id: "m".into(),
            finished: false,
            json: "{}".into(),
        });
        tail.set_cursor("s", 1, 100);
        let (sql, params) = tail.take().expect("a statement");
        assert_eq!(params.len(), 8);
        assert!(
            sql.starts_with("WITH part_put AS (INSERT INTO parts"),
            "{sql}"
        );
        assert!(
            sql.contains("VALUES ($1, $2, $3, $4, $5) ON CONFLICT"),
            "{sql}"
        );
        assert!(
            sql.contains("cursor = $7, updated_at = $8 WHERE id = $6"),
            "{sql}"
        );
    }

    #[test]
    fn an_audit_line_alone_is_one_clause() {
        let mut tail = Tail::default();
        tail.audit(&event(), 100);
        let (sql, params) = tail.take().expect("a statement");
        assert!(
            sql.starts_with("WITH audited AS (INSERT INTO audit"),
            "{sql}"
        );
        assert_eq!(params.len(), 6);
    }
}
