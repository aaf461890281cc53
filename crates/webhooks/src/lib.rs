//! Webhooks: policies (system-wide or per project) and their delivery from the event log.
//!
//! Delivery is driven by the event log, not by the request that made a change: an event
//! exists exactly when its change committed, so a refused push is never announced and a
//! crash after a commit never loses one. One consumer (on one node at a time, through the
//! log's cursor lease) turns events into delivery rows, one per (policy, event), in the
//! transaction that advances its cursor; one sender task per policy works through that
//! policy's rows in event order, retrying the oldest with exponential backoff and jitter
//! until the retry horizon, so a receiver sees events in order and each at least once,
//! with an id stable across retries and restarts to de-duplicate by.
//!
//! Administration ([`Webhooks`]) validates what an administrator asks for; who may ask is
//! access control's decision, made by the caller.

mod payload;
mod sender;
mod signature;

use std::sync::Arc;
use std::time::Duration;

use berth_meta::{
    Actor, Database, DeliveryRecord, EventLog, MetaError, NewWebhook, WebhookPatch, WebhookRecord,
    WebhookStore,
};
use berth_outbound::{OutboundError, OutboundPolicy};

pub use payload::{
    event_id, render, Notice, Origin, DISTRIBUTION_MEDIA_TYPE, EVENT_TYPES, FORMATS,
};
pub use sender::{run_sender, WebhookCounters, LATENCY_BUCKETS_MS};
pub use signature::{sign, ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};

/// Why a webhook operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The request is not a valid policy.
    #[error("{0}")]
    Invalid(String),
    /// The target is in a range outbound connections may not reach.
    #[error("url: {0}")]
    Outbound(#[from] OutboundError),
    /// The metadata store refused or failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// How webhooks are delivered.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// How long a delivery is retried before it is recorded as failed.
    pub retry_for: Duration,
    /// The longest pause between two attempts.
    pub max_backoff: Duration,
    /// The most one attempt may take (connect, send, answer).
    pub timeout: Duration,
    /// How long finished deliveries stay in the log.
    pub log_retention: Duration,
    /// Which non-public ranges targets may be in.
    pub outbound: OutboundPolicy,
    /// The registry's address as clients use it, for URLs in payloads (may be empty).
    pub public_host: String,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            retry_for: Duration::from_secs(24 * 3600),
            max_backoff: Duration::from_secs(600),
            timeout: Duration::from_secs(10),
            log_retention: Duration::from_secs(7 * 86_400),
            outbound: OutboundPolicy::default(),
            public_host: String::new(),
        }
    }
}

/// A policy as an administrator asks for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookRequest {
    /// Its name.
    pub name: String,
    /// Its target.
    pub url: String,
    /// The event types it wants.
    pub events: Vec<String>,
    /// Its payload format (`cloudevents` if not given).
    pub format: Option<String>,
    /// Its signing secret (unsigned if not given).
    pub secret: Option<String>,
    /// Whether it is sent events (yes if not given).
    pub enabled: Option<bool>,
}

/// The longest policy name.
const MAX_NAME: usize = 64;
/// The longest secret: well beyond any key length HMAC-SHA256 benefits from.
const MAX_SECRET: usize = 256;

/// Webhook administration: validates, then stores.
#[derive(Clone)]
pub struct Webhooks {
    store: Arc<Database>,
    settings: Arc<WebhookSettings>,
    counters: Arc<WebhookCounters>,
}

impl Webhooks {
    /// Administration over `store`, judging targets by `settings`.
    pub fn new(store: Arc<Database>, settings: WebhookSettings) -> Self {
        Webhooks {
            store,
            settings: Arc::new(settings),
            counters: Arc::default(),
        }
    }

    /// What this node's senders did, for the metrics.
    pub fn counters(&self) -> &WebhookCounters {
        &self.counters
    }

    /// How many events each event-log consumer has yet to read, by consumer name.
    pub async fn consumer_lag(&self) -> Result<Vec<(String, i64)>, WebhookError> {
        let last = self.store.last_event().await?;
        let cursors = self.store.cursors().await?;
        Ok(cursors
            .into_iter()
            .map(|(name, position)| (name, (last - position).max(0)))
            .collect())
    }

    /// The delivery settings.
    pub fn settings(&self) -> &WebhookSettings {
        &self.settings
    }

    /// Creates a policy in `project` (system-wide if `None`).
    pub async fn create(
        &self,
        project: Option<&str>,
        request: WebhookRequest,
        by: &Actor,
    ) -> Result<WebhookRecord, WebhookError> {
        check_name(&request.name)?;
        let new = NewWebhook {
            project: project.map(str::to_owned),
            name: request.name,
            url: self.check_url(&request.url)?,
            events: check_events(&request.events)?,
            format: check_format(request.format.as_deref().unwrap_or("cloudevents"))?,
            secret: check_secret(request.secret.as_deref().unwrap_or(""))?,
            enabled: request.enabled.unwrap_or(true),
        };
        Ok(self.store.create_webhook(&new, by).await?)
    }

    /// Changes a policy; `None` if there is none of that name.
    pub async fn update(
        &self,
        project: Option<&str>,
        name: &str,
        patch: WebhookPatch,
        by: &Actor,
    ) -> Result<Option<WebhookRecord>, WebhookError> {
        let patch = WebhookPatch {
            url: patch.url.map(|u| self.check_url(&u)).transpose()?,
            events: patch.events.map(|e| check_events(&e)).transpose()?,
            format: patch.format.map(|f| check_format(&f)).transpose()?,
            secret: patch.secret.map(|s| check_secret(&s)).transpose()?,
            enabled: patch.enabled,
        };
        Ok(self.store.update_webhook(project, name, &patch, by).await?)
    }

    /// The policies of a scope.
    pub async fn list(&self, project: Option<&str>) -> Result<Vec<WebhookRecord>, WebhookError> {
        Ok(self.store.webhooks(project).await?)
    }

    /// One policy.
    pub async fn get(
        &self,
        project: Option<&str>,
        name: &str,
    ) -> Result<Option<WebhookRecord>, WebhookError> {
        Ok(self.store.webhook(project, name).await?)
    }

    /// Removes a policy and its log; true if it existed.
    pub async fn delete(
        &self,
        project: Option<&str>,
        name: &str,
        by: &Actor,
    ) -> Result<bool, WebhookError> {
        Ok(self.store.delete_webhook(project, name, by).await?)
    }

    /// A policy's delivery log, newest first (`None` if there is no such policy).
    pub async fn deliveries(
        &self,
        project: Option<&str>,
        name: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Option<Vec<DeliveryRecord>>, WebhookError> {
        let Some(policy) = self.store.webhook(project, name).await? else {
            return Ok(None);
        };
        Ok(Some(self.store.deliveries(policy.id, before, limit).await?))
    }

    /// Queues one delivery again; false if the policy or the delivery does not exist.
    pub async fn redeliver(
        &self,
        project: Option<&str>,
        name: &str,
        seq: i64,
    ) -> Result<bool, WebhookError> {
        let Some(policy) = self.store.webhook(project, name).await? else {
            return Ok(false);
        };
        Ok(self.store.redeliver(policy.id, seq).await?)
    }

    fn check_url(&self, url: &str) -> Result<String, WebhookError> {
        Ok(self.settings.outbound.check_url(url)?.to_string())
    }
}

fn check_name(name: &str) -> Result<(), WebhookError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(WebhookError::Invalid(format!(
            "name: 1 to {MAX_NAME} characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
        )))
    }
}

fn check_events(events: &[String]) -> Result<Vec<String>, WebhookError> {
    if events.is_empty() {
        return Err(WebhookError::Invalid(format!(
            "events: name at least one of {}",
            EVENT_TYPES.join(", ")
        )));
    }
    let mut wanted: Vec<String> = Vec::new();
    for event in events {
        let Some(known) = EVENT_TYPES.iter().find(|t| **t == event.as_str()) else {
            return Err(WebhookError::Invalid(format!(
                "events: {:?} is not one of {}",
                truncated(event),
                EVENT_TYPES.join(", ")
            )));
        };
        if !wanted.iter().any(|w| w == known) {
            wanted.push((*known).to_owned());
        }
    }
    Ok(wanted)
}

fn check_format(format: &str) -> Result<String, WebhookError> {
    match FORMATS.iter().find(|f| **f == format) {
        Some(f) => Ok((*f).to_owned()),
        None => Err(WebhookError::Invalid(format!(
            "format: {:?} is not one of {}",
            truncated(format),
            FORMATS.join(", ")
        ))),
    }
}

fn check_secret(secret: &str) -> Result<String, WebhookError> {
    if secret.len() > MAX_SECRET || secret.chars().any(char::is_control) {
        return Err(WebhookError::Invalid(format!(
            "secret: at most {MAX_SECRET} bytes, without control characters"
        )));
    }
    Ok(secret.to_owned())
}

/// A client's string cut short for an error message.
fn truncated(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_field_by_field() {
        assert!(check_name("ci-notify.v2").is_ok());
        for bad in ["", "-x", "UPPER", "a/b", "x y", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_events(&["push".into(), "delete".into(), "push".into()]).unwrap(),
            vec!["push", "delete"]
        );
        assert!(check_events(&[]).is_err());
        assert!(check_events(&["pull\u{1b}[31m".into()]).is_err());
        assert!(check_format("harbor").is_ok());
        assert!(check_format("slack").is_err());
        assert!(check_secret(&"k".repeat(256)).is_ok());
        assert!(check_secret(&"k".repeat(257)).is_err());
        assert!(check_secret("line\nbreak").is_err());
    }
}
