//! The event log: one append-only record of what happened in the registry, written in the
//! same transaction as the change it reports (an outbox). A consumer that reads "every
//! event after N" never sees an event of a change that rolled back and never misses one
//! of a change that committed, across crashes and across nodes sharing PostgreSQL:
//!
//! - sequence numbers come from one counter row, incremented by the appending
//!   transaction. Two transactions that append cannot interleave there (SQLite has one
//!   writer; on PostgreSQL the second waits for the first's row lock and, SERIALIZABLE,
//!   runs again after it), so numbers are handed out in commit order: once a reader sees
//!   event N, every event before N has committed or never will exist;
//! - the audit log is a view of this log: audited attempts that changed nothing (a
//!   refusal, a login, a pull) are events without a [`Change`].

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::changes::Change;
use crate::engine::{args, owned, Durability, Row, Tx};
use crate::{now, Database, MetaError};

/// Who made a change, as the audit log names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// A user name, `robot$…`, `anonymous`, or the job (for `system`).
    pub name: String,
    /// `user`, `robot`, `anonymous`, `token` (an external issuer's) or `system`.
    pub kind: String,
    /// The client's address; empty for the registry's own jobs.
    pub address: String,
}

impl Actor {
    /// Work the registry does on its own (garbage collection, maintenance).
    pub fn system(job: &str) -> Self {
        Actor {
            name: job.to_owned(),
            kind: "system".to_owned(),
            address: String::new(),
        }
    }
}

/// One committed change, as a consumer reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its place in the log: strictly increasing in commit order.
    pub seq: i64,
    /// When it was recorded, ms since the epoch.
    pub at_ms: i64,
    /// Who made it.
    pub actor: Actor,
    /// What changed.
    pub change: Change,
}

/// Appends `changes`, made by `actor`, inside the transaction that makes them.
pub(crate) fn record(tx: &mut dyn Tx, actor: &Actor, changes: &[Change]) -> Result<(), MetaError> {
    if changes.is_empty() {
        return Ok(());
    }
    let at = now();
    let first = reserve_sequence(tx, changes.len())?;
    for (seq, change) in (first..).zip(changes) {
        let (action, resource, detail) = change.audit_words();
        let json = serde_json::to_string(change).map_err(|e| MetaError::Backend(e.to_string()))?;
        tx.execute(
            "INSERT INTO events (seq, at, actor, actor_kind, address, action, resource, result, detail, change)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'success', ?8, ?9)",
            args![
                seq,
                at,
                bounded(&actor.name),
                bounded(&actor.kind),
                bounded(&actor.address),
                action,
                bounded(&resource),
                bounded(&detail),
                &json
            ],
        )?;
    }
    Ok(())
}

/// The most of one text field the log keeps, in bytes: names, resources and details come
/// from clients (a login name claimed in a failed attempt is whatever the client sent),
/// and the log must not be a way to fill the disk.
pub(crate) const MAX_FIELD: usize = 1024;

/// `text`, cut to [`MAX_FIELD`] bytes at a character boundary, with `…` if it was cut.
pub(crate) fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_FIELD {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = MAX_FIELD - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…", &text[..end]))
}

/// Takes `n` sequence numbers; returns the first. The counter row serialises appending
/// transactions (see the module's documentation).
pub(crate) fn reserve_sequence(tx: &mut dyn Tx, n: usize) -> Result<i64, MetaError> {
    let n = n as i64;
    let last = tx
        .query_one(
            "UPDATE event_counter SET last_seq = last_seq + ?1 WHERE id = 1 RETURNING last_seq",
            args![n],
        )?
        .int(0)?;
    Ok(last - n + 1)
}

fn event_row(mut r: Row) -> Result<Event, MetaError> {
    event_row_at(&mut r, 0)
}

/// An event from the six columns `seq, at, actor, actor_kind, address, change` starting
/// at column `first` (a join puts other columns before them).
pub(crate) fn event_row_at(r: &mut Row, first: usize) -> Result<Event, MetaError> {
    let json = r.text(first + 5)?;
    Ok(Event {
        seq: r.int(first)?,
        at_ms: r.int(first + 1)?,
        actor: Actor {
            name: r.text(first + 2)?,
            kind: r.text(first + 3)?,
            address: r.text(first + 4)?,
        },
        change: serde_json::from_str(&json).map_err(|e| MetaError::Corrupt(e.to_string()))?,
    })
}

/// Reading the log and remembering how far each consumer got.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Committed changes after `after`, oldest first, at most `limit`.
    async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, MetaError>;
    /// The highest sequence number handed out so far.
    async fn last_event(&self) -> Result<i64, MetaError>;
    /// Takes (or renews) the named consumer's cursor for `holder` for `ttl_ms`, and
    /// returns the position it was last advanced to (0 for a new consumer); `None` while
    /// another holder has it. Nodes sharing a store run each consumer once.
    async fn claim_cursor(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<Option<i64>, MetaError>;
    /// Records that the consumer delivered everything up to `position`; false (and
    /// nothing changed) unless `holder` still holds the cursor. Never moves it back.
    async fn advance_cursor(
        &self,
        name: &str,
        holder: &str,
        position: i64,
    ) -> Result<bool, MetaError>;
    /// Deletes events recorded before `cutoff_ms` that every consumer has passed: the
    /// audit log's retention. A consumer that has not held its cursor since the cutoff
    /// (one that was removed, or stopped for longer than the retention) no longer holds
    /// the log back, so the log cannot grow without bound. Returns how many went.
    async fn prune_events(&self, cutoff_ms: i64) -> Result<u64, MetaError>;
    /// Every consumer's name and position, for the lag the metrics report.
    async fn cursors(&self) -> Result<Vec<(String, i64)>, MetaError>;
}

/// Advances `name`'s cursor to `position` inside `tx`, if `holder` still holds it (and
/// never backwards); whether it did. Consumers that write their work in the same
/// transaction (webhook deliveries, replication tasks) write nothing when it did not.
pub(crate) fn advance_cursor_in(
    tx: &mut dyn Tx,
    name: &str,
    holder: &str,
    position: i64,
) -> Result<bool, MetaError> {
    let advanced = tx.execute(
        "UPDATE event_cursors SET position = ?3
         WHERE name = ?1 AND position <= ?3 AND EXISTS
           (SELECT 1 FROM leases WHERE name = ?4 AND holder = ?2 AND expires_at >= ?5)",
        args![name, holder, position, cursor_lease(name).as_str(), now()],
    )?;
    Ok(advanced > 0)
}

/// The changes after a position, in order: on the partial index of events with a change
/// (migration 15), whatever number of audit records without one lie in between.
pub(crate) const EVENTS_AFTER: &str =
    "SELECT seq, at, actor, actor_kind, address, change FROM events
     WHERE seq > ?1 AND change IS NOT NULL ORDER BY seq LIMIT ?2";

/// A consumer's cursor is held through a lease of this name (the prefix is spelled again
/// in `prune_events`' statement).
pub(crate) fn cursor_lease(name: &str) -> String {
    format!("event-consumer:{name}")
}

#[async_trait]
impl EventLog for Database {
    async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, MetaError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_rows(EVENTS_AFTER, owned![after, limit], event_row)
            .await
    }

    async fn last_event(&self) -> Result<i64, MetaError> {
        let sql = "SELECT last_seq FROM event_counter WHERE id = 1";
        Ok(self
            .read_row(sql, vec![], |mut r| r.int(0))
            .await?
            .unwrap_or(0))
    }

    async fn claim_cursor(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<Option<i64>, MetaError> {
        let (name, lease, holder) = (name.to_owned(), cursor_lease(name), holder.to_owned());
        self.engine
            .write(Durability::Synced, move |tx| {
                if !crate::maintenance::take_lease(tx, &lease, &holder, ttl_ms)? {
                    return Ok(None);
                }
                tx.execute(
                    "INSERT INTO event_cursors (name, position) VALUES (?1, 0) ON CONFLICT (name) DO NOTHING",
                    args![&name],
                )?;
                let position = tx
                    .query_one("SELECT position FROM event_cursors WHERE name = ?1", args![&name])?
                    .int(0)?;
                Ok(Some(position))
            })
            .await
    }

    async fn advance_cursor(
        &self,
        name: &str,
        holder: &str,
        position: i64,
    ) -> Result<bool, MetaError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.engine
            .write(Durability::Synced, move |tx| {
                advance_cursor_in(tx, &name, &holder, position)
            })
            .await
    }

    async fn prune_events(&self, cutoff_ms: i64) -> Result<u64, MetaError> {
        let sql = "DELETE FROM events WHERE at < ?1
                   AND seq <= COALESCE(
                       (SELECT MIN(c.position) FROM event_cursors c
                        JOIN leases l ON l.name = 'event-consumer:' || c.name
                        WHERE l.expires_at >= ?1),
                       (SELECT last_seq FROM event_counter WHERE id = 1))";
        self.write_statement(Durability::Synced, sql, owned![cutoff_ms])
            .await
    }

    async fn cursors(&self) -> Result<Vec<(String, i64)>, MetaError> {
        let sql = "SELECT name, position FROM event_cursors ORDER BY name";
        self.read_rows(sql, vec![], |mut r| Ok((r.text(0)?, r.int(1)?)))
            .await
    }
}
