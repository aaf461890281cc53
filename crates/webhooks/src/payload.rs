//! What a receiver is sent: one event per request, in the format its policy names. The
//! three formats carry the same facts (repository, manifest digest, media type, size, tag,
//! who, when, the event id) in the shapes existing receivers parse: Docker Distribution's
//! notification envelope, Harbor's default webhook payload, and CloudEvents 1.0 in
//! structured mode.

use berth_meta::{Change, Event};
use berth_oci::time::rfc3339;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// An event type a policy may subscribe to.
pub const EVENT_TYPES: &[&str] = &["push", "delete"];

/// A payload format a policy may choose.
pub const FORMATS: &[&str] = &["cloudevents", "distribution", "harbor"];

/// The media type of Distribution's notification envelope.
pub const DISTRIBUTION_MEDIA_TYPE: &str = "application/vnd.docker.distribution.events.v2+json";

/// A change a receiver is told about, in the words every format needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Stable across retries and restarts: derived from the registry's instance id and the
    /// event's sequence number, so a receiver de-duplicates by it.
    pub id: String,
    /// `push` or `delete` (the policy's event type).
    pub kind: &'static str,
    /// The repository.
    pub repository: String,
    /// The manifest's digest.
    pub digest: String,
    /// The manifest's media type (pushes only).
    pub media_type: Option<String>,
    /// The manifest's size (pushes only).
    pub size: Option<u64>,
    /// The tag pushed or deleted, if one was.
    pub tag: Option<String>,
    /// The tags deleted with a manifest.
    pub tags: Vec<String>,
    /// Who made the change.
    pub operator: String,
    /// Their address.
    pub address: String,
    /// When it was recorded, ms since the epoch.
    pub at_ms: i64,
}

impl Notice {
    /// The notice for `event`, if it is of a kind webhooks report.
    pub fn of(event: &Event, instance_id: &str) -> Option<Notice> {
        let id = event_id(instance_id, event.seq);
        let base = |kind, repository: &String, digest: &String| Notice {
            id: id.clone(),
            kind,
            repository: repository.clone(),
            digest: digest.clone(),
            media_type: None,
            size: None,
            tag: None,
            tags: Vec::new(),
            operator: event.actor.name.clone(),
            address: event.actor.address.clone(),
            at_ms: event.at_ms,
        };
        match &event.change {
            Change::ManifestPushed {
                repository,
                digest,
                media_type,
                size,
                tag,
                ..
            } => Some(Notice {
                media_type: Some(media_type.clone()),
                size: Some(*size),
                tag: tag.as_ref().map(|(t, _)| t.clone()),
                ..base("push", repository, digest)
            }),
            Change::ManifestDeleted {
                repository,
                digest,
                tags,
            } => Some(Notice {
                tags: tags.clone(),
                ..base("delete", repository, digest)
            }),
            Change::TagDeleted {
                repository,
                tag,
                digest,
            } => Some(Notice {
                tag: Some(tag.clone()),
                ..base("delete", repository, digest)
            }),
            _ => None,
        }
    }

    /// The repository's project (its first path segment).
    pub fn project(&self) -> &str {
        self.repository
            .split('/')
            .next()
            .unwrap_or(&self.repository)
    }

    /// `repo:tag`, or `repo@digest` without a tag.
    fn reference(&self) -> String {
        match &self.tag {
            Some(tag) => format!("{}:{tag}", self.repository),
            None => format!("{}@{}", self.repository, self.digest),
        }
    }
}

/// The event id: a UUID-shaped hash of the instance id and the sequence number.
pub fn event_id(instance_id: &str, seq: i64) -> String {
    let hash = Sha256::new()
        .chain_update(instance_id.as_bytes())
        .chain_update(b"/")
        .chain_update(seq.to_be_bytes())
        .finalize();
    let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// What the registry says about itself in payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// This registry's instance id (shared by the nodes of one store).
    pub instance_id: String,
    /// The registry's address as clients use it (`registry.example.com`), for URLs in
    /// payloads; empty if not configured.
    pub host: String,
}

/// The body and content type of one request in `format`; `public` says whether the
/// repository's project is public (Harbor reports it).
pub fn render(format: &str, notice: &Notice, origin: &Origin, public: bool) -> (String, String) {
    match format {
        "distribution" => (
            DISTRIBUTION_MEDIA_TYPE.to_owned(),
            distribution(notice, origin).to_string(),
        ),
        "harbor" => (
            "application/json".to_owned(),
            harbor(notice, origin, public).to_string(),
        ),
        _ => (
            "application/cloudevents+json".to_owned(),
            cloudevents(notice, origin).to_string(),
        ),
    }
}

fn distribution(n: &Notice, origin: &Origin) -> Value {
    let mut target = json!({
        "repository": n.repository,
        "digest": n.digest,
    });
    if let Some(media_type) = &n.media_type {
        target["mediaType"] = media_type.clone().into();
    }
    if let Some(size) = n.size {
        target["size"] = size.into();
        target["length"] = size.into();
    }
    if let Some(tag) = &n.tag {
        target["tag"] = tag.clone().into();
    }
    if !origin.host.is_empty() {
        target["url"] = format!(
            "https://{}/v2/{}/manifests/{}",
            origin.host, n.repository, n.digest
        )
        .into();
    }
    json!({
        "events": [{
            "id": n.id,
            "timestamp": rfc3339(n.at_ms),
            "action": n.kind,
            "target": target,
            "request": {
                "addr": n.address,
                "host": origin.host,
                "method": if n.kind == "push" { "PUT" } else { "DELETE" },
            },
            "actor": { "name": n.operator },
            "source": { "addr": origin.host, "instanceID": origin.instance_id },
        }]
    })
}

fn harbor(n: &Notice, origin: &Origin, public: bool) -> Value {
    let kind = if n.kind == "push" {
        "PUSH_ARTIFACT"
    } else {
        "DELETE_ARTIFACT"
    };
    let (namespace, name) = n
        .repository
        .split_once('/')
        .unwrap_or((n.repository.as_str(), n.repository.as_str()));
    let mut resource = json!({ "digest": n.digest });
    if let Some(tag) = &n.tag {
        resource["tag"] = tag.clone().into();
    }
    let reference = match &n.tag {
        Some(tag) => format!("{}:{tag}", n.repository),
        None => format!("{}@{}", n.repository, n.digest),
    };
    resource["resource_url"] = if origin.host.is_empty() {
        reference
    } else {
        format!("{}/{reference}", origin.host)
    }
    .into();
    json!({
        "type": kind,
        "occur_at": n.at_ms.div_euclid(1000),
        "operator": n.operator,
        "event_data": {
            "resources": [resource],
            "repository": {
                "name": name,
                "namespace": namespace,
                "repo_full_name": n.repository,
                "repo_type": if public { "public" } else { "private" },
            },
        },
    })
}

fn cloudevents(n: &Notice, origin: &Origin) -> Value {
    let kind = match (n.kind, &n.tag) {
        ("push", _) => "io.berth.artifact.pushed",
        (_, Some(_)) => "io.berth.tag.deleted",
        _ => "io.berth.artifact.deleted",
    };
    let source = if origin.host.is_empty() {
        format!("urn:berth:{}", origin.instance_id)
    } else {
        format!("https://{}", origin.host)
    };
    json!({
        "specversion": "1.0",
        "id": n.id,
        "source": source,
        "type": kind,
        "subject": n.reference(),
        "time": rfc3339(n.at_ms),
        "datacontenttype": "application/json",
        "data": {
            "repository": n.repository,
            "digest": n.digest,
            "mediaType": n.media_type,
            "size": n.size,
            "tag": n.tag,
            "tags": n.tags,
            "operator": n.operator,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_meta::{Actor, TagChange};

    fn pushed() -> Event {
        Event {
            seq: 42,
            at_ms: 1_795_372_969_000,
            actor: Actor {
                name: "ci".to_owned(),
                kind: "user".to_owned(),
                address: "10.0.0.9".to_owned(),
            },
            change: Change::ManifestPushed {
                repository: "team/app".to_owned(),
                digest: "sha256:abc".to_owned(),
                media_type: "application/vnd.oci.image.manifest.v1+json".to_owned(),
                size: 512,
                subject: None,
                tag: Some(("v1".to_owned(), TagChange::Created)),
            },
        }
    }

    fn origin() -> Origin {
        Origin {
            instance_id: "inst".to_owned(),
            host: "registry.example.com".to_owned(),
        }
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(event_id("a", 1), event_id("a", 1));
        assert_ne!(event_id("a", 1), event_id("a", 2));
        assert_ne!(event_id("a", 1), event_id("b", 1));
        assert_eq!(event_id("a", 1).len(), 36);
    }

    #[test]
    fn only_manifest_and_tag_changes_are_reported() {
        let notice = Notice::of(&pushed(), "inst").unwrap();
        assert_eq!(notice.kind, "push");
        assert_eq!(notice.project(), "team");
        let login = Event {
            change: Change::LoginSucceeded {
                name: "x".to_owned(),
            },
            ..pushed()
        };
        assert!(Notice::of(&login, "inst").is_none());
    }

    #[test]
    fn each_format_carries_repository_digest_and_id() {
        let notice = Notice::of(&pushed(), "inst").unwrap();
        for format in FORMATS {
            let (content_type, body) = render(format, &notice, &origin(), false);
            let value: Value = serde_json::from_str(&body).unwrap();
            assert!(body.contains("team/app"), "{format}: {body}");
            assert!(body.contains("sha256:abc"), "{format}: {body}");
            match *format {
                "distribution" => {
                    assert_eq!(content_type, DISTRIBUTION_MEDIA_TYPE);
                    let e = &value["events"][0];
                    assert_eq!(e["id"], notice.id);
                    assert_eq!(e["action"], "push");
                    assert_eq!(e["target"]["tag"], "v1");
                    assert_eq!(e["target"]["size"], 512);
                    assert_eq!(e["timestamp"], "2026-11-22T18:42:49.000Z");
                }
                "harbor" => {
                    assert_eq!(value["type"], "PUSH_ARTIFACT");
                    assert_eq!(value["operator"], "ci");
                    assert_eq!(value["event_data"]["repository"]["namespace"], "team");
                    assert_eq!(value["event_data"]["repository"]["name"], "app");
                    assert_eq!(value["event_data"]["repository"]["repo_type"], "private");
                    assert_eq!(
                        value["event_data"]["resources"][0]["resource_url"],
                        "registry.example.com/team/app:v1"
                    );
                }
                _ => {
                    assert_eq!(content_type, "application/cloudevents+json");
                    assert_eq!(value["specversion"], "1.0");
                    assert_eq!(value["id"], notice.id);
                    assert_eq!(value["type"], "io.berth.artifact.pushed");
                    assert_eq!(value["subject"], "team/app:v1");
                    assert_eq!(value["data"]["digest"], "sha256:abc");
                }
            }
        }
    }
}
