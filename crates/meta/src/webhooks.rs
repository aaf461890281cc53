//! Webhook policies and their delivery log. A delivery is one (policy, event) row: the
//! event-log consumer enqueues them in the transaction that advances its cursor, so an
//! event is enqueued exactly once per policy however often the consumer restarts, and the
//! sender works through each policy's pending rows in event order.

use async_trait::async_trait;

use crate::accounts::clash;
use crate::engine::{args, owned, Durability, Row, Tx};
use crate::events::{event_row_at, record};
use crate::{now, Actor, Change, Database, Event, MetaError};

/// The most webhook policies one project (or the system scope) may have: each is a sender
/// the registry runs, so an unbounded number would be a way to make it do unbounded work.
pub const MAX_WEBHOOKS_PER_SCOPE: i64 = 32;

/// A webhook policy as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    /// Its row id: deliveries refer to it.
    pub id: i64,
    /// Its project; `None` for a system-wide policy (every repository).
    pub project: Option<String>,
    /// Its name, unique in its scope.
    pub name: String,
    /// Where events are posted.
    pub url: String,
    /// The event types it wants (`push`, `delete`).
    pub events: Vec<String>,
    /// The payload format (`cloudevents`, `distribution`, `harbor`).
    pub format: String,
    /// The signing secret; empty for unsigned requests. Kept as given: signing needs it.
    pub secret: String,
    /// Switched off policies keep their log but are sent nothing.
    pub enabled: bool,
    /// When it was created, ms since the epoch.
    pub created_ms: i64,
    /// The event that recorded its creation: it is sent the events after this one.
    pub created_seq: i64,
}

/// A policy to create: everything but the id and the creation time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewWebhook {
    /// Its project; `None` for system-wide.
    pub project: Option<String>,
    /// Its name.
    pub name: String,
    /// Its target.
    pub url: String,
    /// Its event types.
    pub events: Vec<String>,
    /// Its payload format.
    pub format: String,
    /// Its secret (empty: unsigned).
    pub secret: String,
    /// Whether it is sent events.
    pub enabled: bool,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Not yet accepted by the receiver; retried until the horizon.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Given up on after the retry horizon (or its event left the log).
    Failed,
}

impl DeliveryState {
    /// The word stored and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    fn parse(word: &str) -> Result<Self, MetaError> {
        match word {
            "pending" => Ok(DeliveryState::Pending),
            "delivered" => Ok(DeliveryState::Delivered),
            "failed" => Ok(DeliveryState::Failed),
            other => Err(MetaError::Corrupt(format!("delivery state {other:?}"))),
        }
    }
}

/// One event's delivery to one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// The policy.
    pub policy_id: i64,
    /// The event's sequence number.
    pub seq: i64,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// When it was enqueued (or asked to be delivered again), ms since the epoch: the
    /// retry horizon counts from here.
    pub created_ms: i64,
    /// When the next attempt is due.
    pub next_attempt_ms: i64,
    /// When the last attempt was made.
    pub last_attempt_ms: Option<i64>,
    /// The HTTP status of the last attempt, if the receiver answered.
    pub last_status: Option<u16>,
    /// What went wrong last (empty after a success).
    pub last_error: String,
    /// How long the last attempt took.
    pub latency_ms: Option<i64>,
}

/// The result of one attempt, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryOutcome {
    /// The policy.
    pub policy_id: i64,
    /// The event.
    pub seq: i64,
    /// Where the delivery stands now.
    pub state: DeliveryState,
    /// Attempts made so far, this one included.
    pub attempts: u32,
    /// When the next attempt is due (for a pending delivery).
    pub next_attempt_ms: i64,
    /// When this attempt was made.
    pub attempted_ms: i64,
    /// Its HTTP status, if the receiver answered.
    pub status: Option<u16>,
    /// What went wrong (empty for a success).
    pub error: String,
    /// How long it took.
    pub latency_ms: i64,
}

/// Pending deliveries of one policy, for the metrics: how many and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryBacklog {
    /// The policy.
    pub policy_id: i64,
    /// Pending deliveries.
    pub pending: u64,
    /// When the oldest was enqueued, ms since the epoch.
    pub oldest_ms: Option<i64>,
}

/// What may be changed in a policy; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookPatch {
    /// A new target.
    pub url: Option<String>,
    /// New event types.
    pub events: Option<Vec<String>>,
    /// A new payload format.
    pub format: Option<String>,
    /// A new secret (empty: unsigned).
    pub secret: Option<String>,
    /// Switched on or off.
    pub enabled: Option<bool>,
}

/// Webhook policies and deliveries.
#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    /// Creates a policy; [`MetaError::Conflict`] if the name is taken in its scope or the
    /// scope has [`MAX_WEBHOOKS_PER_SCOPE`] already, [`MetaError::NotFound`] if its
    /// project does not exist.
    async fn create_webhook(
        &self,
        new: &NewWebhook,
        by: &Actor,
    ) -> Result<WebhookRecord, MetaError>;
    /// One policy by scope and name.
    async fn webhook(
        &self,
        project: Option<&str>,
        name: &str,
    ) -> Result<Option<WebhookRecord>, MetaError>;
    /// The policies of one scope, by name.
    async fn webhooks(&self, project: Option<&str>) -> Result<Vec<WebhookRecord>, MetaError>;
    /// Every policy of every scope: what the sender works from.
    async fn all_webhooks(&self) -> Result<Vec<WebhookRecord>, MetaError>;
    /// Changes a policy; the changed policy, or `None` if there is none of that name.
    async fn update_webhook(
        &self,
        project: Option<&str>,
        name: &str,
        patch: &WebhookPatch,
        by: &Actor,
    ) -> Result<Option<WebhookRecord>, MetaError>;
    /// Removes a policy with its delivery log; true if it existed.
    async fn delete_webhook(
        &self,
        project: Option<&str>,
        name: &str,
        by: &Actor,
    ) -> Result<bool, MetaError>;

    /// Enqueues deliveries `(policy id, event seq)` and advances the consumer's cursor to
    /// `position`, in one transaction; false (and nothing written) unless `holder` still
    /// holds the cursor. A delivery enqueued before is left as it is.
    async fn enqueue_deliveries(
        &self,
        consumer: &str,
        holder: &str,
        position: i64,
        deliveries: Vec<(i64, i64)>,
    ) -> Result<bool, MetaError>;
    /// The oldest `limit` pending deliveries of a policy, in event order, each with its
    /// event (`None` if the event left the log).
    async fn pending_deliveries(
        &self,
        policy_id: i64,
        limit: usize,
    ) -> Result<Vec<(DeliveryRecord, Option<Event>)>, MetaError>;
    /// Records attempts' outcomes, in one transaction.
    async fn record_deliveries(&self, outcomes: Vec<DeliveryOutcome>) -> Result<(), MetaError>;
    /// A policy's delivery log, newest first: at most `limit` deliveries of events before
    /// `before` (all if `None`).
    async fn deliveries(
        &self,
        policy_id: i64,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, MetaError>;
    /// Puts a delivery back in the queue (due now, attempts and horizon reset); false if
    /// there is no such delivery.
    async fn redeliver(&self, policy_id: i64, seq: i64) -> Result<bool, MetaError>;
    /// Pending deliveries per policy that has any.
    async fn delivery_backlog(&self) -> Result<Vec<DeliveryBacklog>, MetaError>;
    /// Forgets finished deliveries enqueued before `cutoff_ms`; how many went.
    async fn prune_deliveries(&self, cutoff_ms: i64) -> Result<u64, MetaError>;
}

macro_rules! webhook_columns {
    () => {
        "id, project, name, url, events, format, secret, enabled, created_at, created_seq"
    };
}

macro_rules! delivery_columns {
    () => {
        "d.policy_id, d.seq, d.state, d.attempts, d.created_at, d.next_attempt_at,
         d.last_attempt_at, d.last_status, d.last_error, d.latency_ms"
    };
}

fn webhook_row(mut r: Row) -> Result<WebhookRecord, MetaError> {
    Ok(WebhookRecord {
        id: r.int(0)?,
        project: r.opt_text(1)?,
        name: r.text(2)?,
        url: r.text(3)?,
        events: split_list(&r.text(4)?),
        format: r.text(5)?,
        secret: r.text(6)?,
        enabled: r.bool(7)?,
        created_ms: r.int(8)?,
        created_seq: r.int(9)?,
    })
}

fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn delivery_row(r: &mut Row) -> Result<DeliveryRecord, MetaError> {
    Ok(DeliveryRecord {
        policy_id: r.int(0)?,
        seq: r.int(1)?,
        state: DeliveryState::parse(&r.text(2)?)?,
        attempts: u32::try_from(r.int(3)?).unwrap_or(u32::MAX),
        created_ms: r.int(4)?,
        next_attempt_ms: r.int(5)?,
        last_attempt_ms: r.opt_int(6)?,
        last_status: r.opt_int(7)?.and_then(|s| u16::try_from(s).ok()),
        last_error: r.text(8)?,
        latency_ms: r.opt_int(9)?,
    })
}

/// The scope a policy lives in, as its unique index spells it.
fn scope_of(project: Option<&str>) -> &str {
    project.unwrap_or("")
}

fn select_webhook(
    tx: &mut dyn Tx,
    project: Option<&str>,
    name: &str,
) -> Result<Option<WebhookRecord>, MetaError> {
    let sql = concat!(
        "SELECT ",
        webhook_columns!(),
        " FROM webhooks WHERE COALESCE(project, '') = ?1 AND name = ?2"
    );
    tx.query_opt(sql, args![scope_of(project), name])?
        .map(webhook_row)
        .transpose()
}

#[async_trait]
impl WebhookStore for Database {
    async fn create_webhook(
        &self,
        new: &NewWebhook,
        by: &Actor,
    ) -> Result<WebhookRecord, MetaError> {
        let change = Change::WebhookCreated {
            project: new.project.clone(),
            name: new.name.clone(),
        };
        let (new, by) = (new.clone(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                let scope = scope_of(new.project.as_deref());
                if let Some(project) = &new.project {
                    if !tx.exists("SELECT 1 FROM projects WHERE name = ?1", args![project])? {
                        return Err(MetaError::NotFound(format!("project {project}")));
                    }
                }
                let count = tx
                    .query_one(
                        "SELECT COUNT(*) FROM webhooks WHERE COALESCE(project, '') = ?1",
                        args![scope],
                    )?
                    .int(0)?;
                if count >= MAX_WEBHOOKS_PER_SCOPE {
                    return Err(MetaError::Conflict(format!(
                        "{} has {count} webhooks already, the most it may have",
                        new.project.as_deref().unwrap_or("the system scope")
                    )));
                }
                // Recorded first, so the policy can name the event of its creation.
                record(tx, &by, std::slice::from_ref(&change))?;
                let row = tx
                    .query_one(
                        concat!(
                            "INSERT INTO webhooks (project, name, url, events, format, secret, enabled, created_at, created_seq)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8,
                                     (SELECT last_seq FROM event_counter WHERE id = 1)) RETURNING ",
                            webhook_columns!()
                        ),
                        args![
                            new.project.as_deref(),
                            &new.name,
                            &new.url,
                            new.events.join(",").as_str(),
                            &new.format,
                            &new.secret,
                            new.enabled,
                            now()
                        ],
                    )
                    .map_err(clash(format!("a webhook named {} exists already", new.name)))?;
                webhook_row(row)
            })
            .await
    }

    async fn webhook(
        &self,
        project: Option<&str>,
        name: &str,
    ) -> Result<Option<WebhookRecord>, MetaError> {
        let (project, name) = (project.map(str::to_owned), name.to_owned());
        self.engine
            .read(move |tx| select_webhook(tx, project.as_deref(), &name))
            .await
    }

    async fn webhooks(&self, project: Option<&str>) -> Result<Vec<WebhookRecord>, MetaError> {
        let sql = concat!(
            "SELECT ",
            webhook_columns!(),
            " FROM webhooks WHERE COALESCE(project, '') = ?1 ORDER BY name"
        );
        self.read_rows(sql, owned![scope_of(project)], webhook_row)
            .await
    }

    async fn all_webhooks(&self) -> Result<Vec<WebhookRecord>, MetaError> {
        let sql = concat!("SELECT ", webhook_columns!(), " FROM webhooks ORDER BY id");
        self.read_rows(sql, vec![], webhook_row).await
    }

    async fn update_webhook(
        &self,
        project: Option<&str>,
        name: &str,
        patch: &WebhookPatch,
        by: &Actor,
    ) -> Result<Option<WebhookRecord>, MetaError> {
        let change = Change::WebhookChanged {
            project: project.map(str::to_owned),
            name: name.to_owned(),
        };
        let (project, name) = (project.map(str::to_owned), name.to_owned());
        let (patch, by) = (patch.clone(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                let Some(old) = select_webhook(tx, project.as_deref(), &name)? else {
                    return Ok(None);
                };
                let events = patch.events.clone().unwrap_or(old.events.clone());
                tx.execute(
                    "UPDATE webhooks SET url = ?2, events = ?3, format = ?4, secret = ?5, enabled = ?6
                     WHERE id = ?1",
                    args![
                        old.id,
                        patch.url.as_ref().unwrap_or(&old.url),
                        events.join(",").as_str(),
                        patch.format.as_ref().unwrap_or(&old.format),
                        patch.secret.as_ref().unwrap_or(&old.secret),
                        patch.enabled.unwrap_or(old.enabled)
                    ],
                )?;
                record(tx, &by, std::slice::from_ref(&change))?;
                select_webhook(tx, project.as_deref(), &name)
            })
            .await
    }

    async fn delete_webhook(
        &self,
        project: Option<&str>,
        name: &str,
        by: &Actor,
    ) -> Result<bool, MetaError> {
        let change = Change::WebhookDeleted {
            project: project.map(str::to_owned),
            name: name.to_owned(),
        };
        let (project, name, by) = (project.map(str::to_owned), name.to_owned(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                let Some(old) = select_webhook(tx, project.as_deref(), &name)? else {
                    return Ok(false);
                };
                tx.execute(
                    "DELETE FROM webhook_deliveries WHERE policy_id = ?1",
                    args![old.id],
                )?;
                tx.execute("DELETE FROM webhooks WHERE id = ?1", args![old.id])?;
                record(tx, &by, std::slice::from_ref(&change))?;
                Ok(true)
            })
            .await
    }

    async fn enqueue_deliveries(
        &self,
        consumer: &str,
        holder: &str,
        position: i64,
        deliveries: Vec<(i64, i64)>,
    ) -> Result<bool, MetaError> {
        let (consumer, holder) = (consumer.to_owned(), holder.to_owned());
        self.engine
            .write(Durability::Synced, move |tx| {
                if !crate::events::advance_cursor_in(tx, &consumer, &holder, position)? {
                    return Ok(false);
                }
                let at = now();
                for (policy_id, seq) in &deliveries {
                    // A policy removed meanwhile has no row to refer to: skip it.
                    tx.execute(
                        "INSERT INTO webhook_deliveries
                           (policy_id, seq, state, attempts, created_at, next_attempt_at, last_error)
                         SELECT ?1, ?2, 'pending', 0, ?3, ?3, '' WHERE EXISTS
                           (SELECT 1 FROM webhooks WHERE id = ?1)
                         ON CONFLICT (policy_id, seq) DO NOTHING",
                        args![*policy_id, *seq, at],
                    )?;
                }
                Ok(true)
            })
            .await
    }

    async fn pending_deliveries(
        &self,
        policy_id: i64,
        limit: usize,
    ) -> Result<Vec<(DeliveryRecord, Option<Event>)>, MetaError> {
        let sql = concat!(
            "SELECT ",
            delivery_columns!(),
            ", e.seq, e.seq, e.at, e.actor, e.actor_kind, e.address, e.change
             FROM webhook_deliveries d LEFT JOIN events e ON e.seq = d.seq
             WHERE d.policy_id = ?1 AND d.state = 'pending' ORDER BY d.seq LIMIT ?2"
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_rows(sql, owned![policy_id, limit], |mut r| {
            let delivery = delivery_row(&mut r)?;
            let event = match r.opt_int(10)? {
                // Column 10 says whether the event is still there; its columns follow.
                Some(_) => Some(event_row_at(&mut r, 11)?),
                None => None,
            };
            Ok((delivery, event))
        })
        .await
    }

    async fn record_deliveries(&self, outcomes: Vec<DeliveryOutcome>) -> Result<(), MetaError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        self.engine
            .write(Durability::Synced, move |tx| {
                for o in &outcomes {
                    // Only a pending delivery moves: one redelivered meanwhile is left be.
                    tx.execute(
                        "UPDATE webhook_deliveries SET state = ?3, attempts = ?4,
                           next_attempt_at = ?5, last_attempt_at = ?6, last_status = ?7,
                           last_error = ?8, latency_ms = ?9
                         WHERE policy_id = ?1 AND seq = ?2 AND state = 'pending'",
                        args![
                            o.policy_id,
                            o.seq,
                            o.state.as_str(),
                            i64::from(o.attempts),
                            o.next_attempt_ms,
                            o.attempted_ms,
                            o.status.map(i64::from),
                            crate::events::bounded(&o.error),
                            o.latency_ms
                        ],
                    )?;
                }
                Ok(())
            })
            .await
    }

    async fn deliveries(
        &self,
        policy_id: i64,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, MetaError> {
        let sql = concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM webhook_deliveries d WHERE d.policy_id = ?1 AND d.seq < ?2
             ORDER BY d.seq DESC LIMIT ?3"
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let before = before.unwrap_or(i64::MAX);
        self.read_rows(sql, owned![policy_id, before, limit], |mut r| {
            delivery_row(&mut r)
        })
        .await
    }

    async fn redeliver(&self, policy_id: i64, seq: i64) -> Result<bool, MetaError> {
        let at = now();
        let sql = "UPDATE webhook_deliveries SET state = 'pending', attempts = 0,
                     created_at = ?3, next_attempt_at = ?3
                   WHERE policy_id = ?1 AND seq = ?2";
        Ok(self
            .write_statement(Durability::Synced, sql, owned![policy_id, seq, at])
            .await?
            > 0)
    }

    async fn delivery_backlog(&self) -> Result<Vec<DeliveryBacklog>, MetaError> {
        let sql = "SELECT policy_id, COUNT(*), MIN(created_at) FROM webhook_deliveries
                   WHERE state = 'pending' GROUP BY policy_id ORDER BY policy_id";
        self.read_rows(sql, vec![], |mut r| {
            Ok(DeliveryBacklog {
                policy_id: r.int(0)?,
                pending: r.size(1)?,
                oldest_ms: r.opt_int(2)?,
            })
        })
        .await
    }

    async fn prune_deliveries(&self, cutoff_ms: i64) -> Result<u64, MetaError> {
        let sql = "DELETE FROM webhook_deliveries WHERE created_at < ?1 AND state <> 'pending'";
        self.write_statement(Durability::Synced, sql, owned![cutoff_ms])
            .await
    }
}
