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

/// What a pushed manifest did to its tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "was", rename_all = "snake_case")]
pub enum TagChange {
    /// The tag is new.
    Created,
    /// The tag pointed at another manifest.
    Moved {
        /// The manifest it pointed at.
        from: String,
    },
    /// The tag already pointed at this manifest.
    Unchanged,
}

/// A change to the registry's content, as consumers (webhooks, replication) need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Change {
    /// A manifest was stored, by tag or by digest.
    ManifestPushed {
        /// Its repository.
        repository: String,
        /// Its digest.
        digest: String,
        /// Its media type.
        media_type: String,
        /// Its size in bytes.
        size: u64,
        /// The manifest it refers to, if it is a referrer (a signature, an SBOM).
        subject: Option<String>,
        /// The tag it was pushed by, and what that did.
        tag: Option<(String, TagChange)>,
    },
    /// A manifest was deleted, with every tag that pointed at it.
    ManifestDeleted {
        /// Its repository.
        repository: String,
        /// Its digest.
        digest: String,
        /// The tags that went with it.
        tags: Vec<String>,
    },
    /// A tag was deleted; the manifest stays.
    TagDeleted {
        /// Its repository.
        repository: String,
        /// The tag.
        tag: String,
        /// The manifest it pointed at.
        digest: String,
    },
    /// An upload completed: the blob is now in the repository.
    BlobUploaded {
        /// Its repository.
        repository: String,
        /// Its digest.
        digest: String,
        /// Its size in bytes.
        size: u64,
    },
    /// A blob another repository holds was mounted into this one.
    BlobMounted {
        /// The repository it was mounted into.
        repository: String,
        /// Its digest.
        digest: String,
        /// Its size in bytes.
        size: u64,
    },
    /// A blob was removed from a repository's view (its bytes stay until collected).
    BlobDeleted {
        /// Its repository.
        repository: String,
        /// Its digest.
        digest: String,
    },
    /// Someone logged in (with a password or robot secret, through Basic or the token
    /// endpoint).
    LoginSucceeded {
        /// The name logged in as.
        name: String,
    },
    /// A login was refused.
    LoginFailed {
        /// The name claimed.
        name: String,
        /// Why (wrong credentials, expired robot, rate limited).
        reason: String,
    },
    /// A user account was created.
    UserCreated {
        /// Its login name.
        name: String,
        /// Whether it is a system administrator.
        admin: bool,
        /// How it came to be, for the audit log ("first administrator", "imported from
        /// htpasswd"); empty when created by an administrator.
        note: String,
    },
    /// A user's password or administrator flag changed.
    UserChanged {
        /// Its login name.
        name: String,
        /// The password changed (its tokens are revoked).
        password: bool,
        /// The administrator flag, if it was set.
        admin: Option<bool>,
    },
    /// A user account was removed, with its memberships.
    UserDeleted {
        /// Its login name.
        name: String,
    },
    /// A project was created.
    ProjectCreated {
        /// Its name.
        name: String,
        /// Whether anyone may pull from it.
        public: bool,
        /// Created by the first push into it, rather than explicitly.
        by_push: bool,
    },
    /// A project was made public or private.
    ProjectChanged {
        /// Its name.
        name: String,
        /// Whether anyone may pull from it now.
        public: bool,
    },
    /// An empty project was removed, with its members and robots.
    ProjectDeleted {
        /// Its name.
        name: String,
    },
    /// A user was given a role in a project (added, or their role changed).
    MemberSet {
        /// The project.
        project: String,
        /// The user.
        user: String,
        /// The role.
        role: String,
        /// Newly added rather than changed.
        added: bool,
    },
    /// A user was removed from a project.
    MemberRemoved {
        /// The project.
        project: String,
        /// The user.
        user: String,
    },
    /// A robot account was created.
    RobotCreated {
        /// Its project.
        project: String,
        /// Its short name (it logs in as `robot$<project>+<name>`).
        name: String,
        /// What it may do.
        permissions: Vec<String>,
    },
    /// A refresh token (a login's long-lived credential) was revoked.
    RefreshTokenRevoked {
        /// Whose it was.
        subject: String,
        /// Its id.
        id: String,
    },
    /// A robot account's expiry was changed.
    RobotExpiryChanged {
        /// Its project.
        project: String,
        /// Its short name.
        name: String,
        /// When it now expires, ms since the epoch; `None` for never.
        expires_ms: Option<i64>,
    },
    /// A robot account was removed.
    RobotDeleted {
        /// Its project.
        project: String,
        /// Its short name.
        name: String,
    },
    /// A webhook policy was created.
    WebhookCreated {
        /// Its project; `None` for a system-wide policy.
        project: Option<String>,
        /// Its name.
        name: String,
    },
    /// A webhook policy was changed (its target, events, format, secret or switch).
    WebhookChanged {
        /// Its project; `None` for a system-wide policy.
        project: Option<String>,
        /// Its name.
        name: String,
    },
    /// A webhook policy was removed, with its delivery log.
    WebhookDeleted {
        /// Its project; `None` for a system-wide policy.
        project: Option<String>,
        /// Its name.
        name: String,
    },
    /// A project was made a pull-through cache, or its upstream settings changed.
    ProxyCacheSet {
        /// The project.
        project: String,
    },
    /// A project stopped being a pull-through cache.
    ProxyCacheRemoved {
        /// The project.
        project: String,
    },
    /// A repository was deleted as a whole (its manifests are recorded one by one before).
    RepositoryDeleted {
        /// The repository.
        repository: String,
        /// Manifests deleted with it.
        manifests: u64,
        /// Blob links removed (the bytes go with the next garbage collection).
        blobs: u64,
    },
    /// A registry endpoint for replication was added or changed.
    ReplicationRegistrySet {
        /// Its name.
        name: String,
    },
    /// A registry endpoint for replication was removed.
    ReplicationRegistryRemoved {
        /// Its name.
        name: String,
    },
    /// A replication policy was created or changed.
    ReplicationPolicySet {
        /// Its name.
        name: String,
    },
    /// A replication policy was removed, with its executions.
    ReplicationPolicyRemoved {
        /// Its name.
        name: String,
    },
    /// A replication run was started by hand or by its schedule.
    ReplicationStarted {
        /// The policy.
        policy: String,
        /// The execution's id.
        execution: i64,
        /// What started it (`manual`, `schedule`).
        trigger: String,
    },
    /// A garbage collection pass removed manifests and marked blobs for deletion.
    GarbageCollected {
        /// Untagged manifests removed.
        manifests: u64,
        /// Blobs marked for deletion.
        blobs: u64,
        /// Their total size in bytes.
        bytes: u64,
    },
}

impl Change {
    /// The audit log's action, resource and detail for this change: the words the audit
    /// trail has always used for the same operations.
    fn audit_words(&self) -> (&'static str, String, String) {
        match self {
            Change::ManifestPushed {
                repository,
                digest,
                tag,
                ..
            } => match tag {
                Some((tag, _)) => ("push", format!("{repository}:{tag}"), digest.clone()),
                None => ("push", format!("{repository}@{digest}"), digest.clone()),
            },
            Change::ManifestDeleted {
                repository, digest, ..
            }
            | Change::BlobDeleted { repository, digest } => {
                ("delete", format!("{repository}@{digest}"), String::new())
            }
            Change::TagDeleted {
                repository,
                tag,
                digest,
            } => ("delete", format!("{repository}:{tag}"), digest.clone()),
            Change::BlobUploaded {
                repository,
                digest,
                size,
            } => (
                "blob.upload",
                format!("{repository}@{digest}"),
                size.to_string(),
            ),
            Change::BlobMounted {
                repository,
                digest,
                size,
            } => (
                "blob.mount",
                format!("{repository}@{digest}"),
                size.to_string(),
            ),
            Change::LoginSucceeded { name } => ("login", name.clone(), String::new()),
            Change::LoginFailed { name, reason } => ("login", name.clone(), reason.clone()),
            Change::UserCreated { name, admin, note } => {
                let detail = match (note.is_empty(), admin) {
                    (false, _) => note.clone(),
                    (true, true) => "admin".to_owned(),
                    (true, false) => String::new(),
                };
                ("user.create", name.clone(), detail)
            }
            Change::UserChanged {
                name,
                password,
                admin,
            } => {
                let mut changed = Vec::new();
                if *password {
                    changed.push("password");
                }
                if let Some(a) = admin {
                    changed.push(if *a { "admin=true" } else { "admin=false" });
                }
                ("user.update", name.clone(), changed.join(" "))
            }
            Change::UserDeleted { name } => ("user.delete", name.clone(), String::new()),
            Change::ProjectCreated {
                name,
                public,
                by_push,
            } => {
                let detail = match (by_push, public) {
                    (true, _) => "created by push",
                    (false, true) => "public",
                    (false, false) => "private",
                };
                ("project.create", name.clone(), detail.to_owned())
            }
            Change::ProjectChanged { name, public } => {
                let detail = if *public { "public" } else { "private" };
                ("project.update", name.clone(), detail.to_owned())
            }
            Change::ProjectDeleted { name } => ("project.delete", name.clone(), String::new()),
            Change::MemberSet {
                project,
                user,
                role,
                added,
            } => (
                if *added {
                    "member.add"
                } else {
                    "member.update"
                },
                project.clone(),
                format!("{user} as {role}"),
            ),
            Change::MemberRemoved { project, user } => {
                ("member.remove", project.clone(), user.clone())
            }
            Change::RobotCreated {
                project,
                name,
                permissions,
            } => (
                "robot.create",
                project.clone(),
                format!("robot${project}+{name} [{}]", permissions.join(",")),
            ),
            Change::RefreshTokenRevoked { subject, id } => {
                ("token.revoke", subject.clone(), id.clone())
            }
            Change::RobotExpiryChanged {
                project,
                name,
                expires_ms,
            } => (
                "robot.update",
                project.clone(),
                match expires_ms {
                    Some(at) => format!("robot${project}+{name} expires at {at} ms"),
                    None => format!("robot${project}+{name} never expires"),
                },
            ),
            Change::RobotDeleted { project, name } => (
                "robot.delete",
                project.clone(),
                format!("robot${project}+{name}"),
            ),
            Change::WebhookCreated { project, name } => (
                "webhook.create",
                webhook_resource(project, name),
                String::new(),
            ),
            Change::WebhookChanged { project, name } => (
                "webhook.update",
                webhook_resource(project, name),
                String::new(),
            ),
            Change::WebhookDeleted { project, name } => (
                "webhook.delete",
                webhook_resource(project, name),
                String::new(),
            ),
            Change::ProxyCacheSet { project } => {
                ("proxy_cache.set", project.clone(), String::new())
            }
            Change::ProxyCacheRemoved { project } => {
                ("proxy_cache.remove", project.clone(), String::new())
            }
            Change::RepositoryDeleted {
                repository,
                manifests,
                blobs,
            } => (
                "repository.delete",
                repository.clone(),
                format!("{manifests} manifests, {blobs} blob links"),
            ),
            Change::ReplicationRegistrySet { name } => {
                ("replication.registry.set", name.clone(), String::new())
            }
            Change::ReplicationRegistryRemoved { name } => {
                ("replication.registry.remove", name.clone(), String::new())
            }
            Change::ReplicationPolicySet { name } => {
                ("replication.policy.set", name.clone(), String::new())
            }
            Change::ReplicationPolicyRemoved { name } => {
                ("replication.policy.remove", name.clone(), String::new())
            }
            Change::ReplicationStarted {
                policy,
                execution,
                trigger,
            } => (
                "replication.start",
                policy.clone(),
                format!("execution {execution}, {trigger}"),
            ),
            Change::GarbageCollected {
                manifests,
                blobs,
                bytes,
            } => (
                "gc",
                String::new(),
                format!("{manifests} manifests, {blobs} blobs, {bytes} bytes"),
            ),
        }
    }
}

/// How the audit log names a webhook policy: `<project>/<name>`, or `system/<name>`.
fn webhook_resource(project: &Option<String>, name: &str) -> String {
    format!("{}/{name}", project.as_deref().unwrap_or("system"))
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
