//! The audit log: who did what, when, from where, with what result. Records only; the
//! `berth-auth` crate decides what is recorded and queues it (its `audit.rs`).

use crate::changes::Change;
use crate::engine::{args, owned, Row, Tx, Value};
use crate::events::bounded;
use crate::MetaError;

/// One audited operation, as it is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAuditEvent {
    /// When it happened, ms since the epoch.
    pub at_ms: i64,
    /// Who: a user name, `robot$…`, or `anonymous`.
    pub actor: String,
    /// `user`, `robot`, `anonymous` or `token` (an externally issued token).
    pub actor_kind: String,
    /// The client's address.
    pub address: String,
    /// What: `push`, `pull`, `delete`, `login`, `member.add`, …
    pub action: String,
    /// On what: `repo:tag`, `repo@digest`, a project or user name.
    pub resource: String,
    /// `success`, `denied` or `failed`.
    pub result: String,
    /// Anything else worth keeping (a digest, a status, a reason).
    pub detail: String,
    /// The typed event consumers of the event log read (a login); `None` for records
    /// only the audit log shows (refusals, failed requests, pulls). Changes to stored
    /// state are not recorded this way: the store records them with the change.
    pub change: Option<Change>,
    /// How many times it happened, from `at_ms` on: 1, unless identical records arrived
    /// together under load and were written as one.
    pub repeats: u64,
}

/// A recorded audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Increasing with time of recording; the order of the log and its paging key.
    pub id: i64,
    /// The event.
    pub event: NewAuditEvent,
}

/// Which audit events to list. Every set field must match.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Exact actor.
    pub actor: Option<String>,
    /// Exact action.
    pub action: Option<String>,
    /// Resource prefix (a repository, a project).
    pub resource_prefix: Option<String>,
    /// Exact result.
    pub result: Option<String>,
    /// Events at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Events before this time (ms since the epoch).
    pub until_ms: Option<i64>,
    /// Paging: only events with a smaller id (the log is listed newest first).
    pub before_id: Option<i64>,
    /// At most this many events.
    pub limit: usize,
}

/// Appends `events` to the event log in one transaction, in order.
pub(crate) fn append(tx: &mut dyn Tx, events: &[NewAuditEvent]) -> Result<(), MetaError> {
    let first = crate::events::reserve_sequence(tx, events.len())?;
    for (seq, e) in (first..).zip(events.iter()) {
        let change = e
            .change
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| MetaError::Backend(e.to_string()))?;
        let repeats = i64::try_from(e.repeats.max(1)).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO events (seq, at, actor, actor_kind, address, action, resource, result, detail, change, repeats)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            args![
                seq,
                e.at_ms,
                bounded(&e.actor),
                bounded(&e.actor_kind),
                bounded(&e.address),
                bounded(&e.action),
                bounded(&e.resource),
                bounded(&e.result),
                bounded(&e.detail),
                change.as_deref(),
                repeats
            ],
        )?;
    }
    Ok(())
}

/// The audit log, newest first, filtered by the arguments [`filter_args`] makes.
pub(crate) const LIST: &str = "
SELECT seq, at, actor, actor_kind, address, action, resource, result, detail, change, repeats
FROM events
WHERE (CAST(?1 AS TEXT) IS NULL OR actor = ?1)
  AND (CAST(?2 AS TEXT) IS NULL OR action = ?2)
  AND (CAST(?3 AS TEXT) IS NULL OR substr(resource, 1, length(?3)) = ?3)
  AND (CAST(?4 AS TEXT) IS NULL OR result = ?4)
  AND (CAST(?5 AS BIGINT) IS NULL OR at >= ?5)
  AND (CAST(?6 AS BIGINT) IS NULL OR at < ?6)
  AND (CAST(?7 AS BIGINT) IS NULL OR seq < ?7)
ORDER BY seq DESC LIMIT ?8";

/// The arguments of [`LIST`] for `filter`.
pub(crate) fn filter_args(filter: &AuditFilter) -> Vec<Value<'static>> {
    owned![
        filter.actor.as_deref(),
        filter.action.as_deref(),
        filter.resource_prefix.as_deref(),
        filter.result.as_deref(),
        filter.since_ms,
        filter.until_ms,
        filter.before_id,
        i64::try_from(filter.limit).unwrap_or(i64::MAX)
    ]
}

/// A record from the columns [`LIST`] reads.
pub(crate) fn record_row(mut r: Row) -> Result<AuditRecord, MetaError> {
    Ok(AuditRecord {
        id: r.int(0)?,
        event: NewAuditEvent {
            at_ms: r.int(1)?,
            actor: r.text(2)?,
            actor_kind: r.text(3)?,
            address: r.text(4)?,
            action: r.text(5)?,
            resource: r.text(6)?,
            result: r.text(7)?,
            detail: r.text(8)?,
            change: r
                .opt_text(9)?
                .map(|json| serde_json::from_str(&json))
                .transpose()
                .map_err(|e| MetaError::Corrupt(e.to_string()))?,
            repeats: r.size(10)?,
        },
    })
}
