//! From a policy to tasks: which repositories and tags of the source it takes, and where
//! each goes; for a whole run by listing the source, for the event trigger from one
//! change in the event log.

use berth_client::MAX_LISTED;
use berth_meta::{Change, Event, NewTask};
use berth_oci::{RepoName, Tag};
use berth_registry::Page;

use crate::settings::{Direction, Policy, Trigger};
use crate::{Replication, ReplicationError};

/// Names asked of this registry's store per page.
const PAGE: usize = 1000;

impl Policy {
    /// Whether the policy takes repository `repo` of its source.
    pub fn takes_repository(&self, repo: &str) -> bool {
        self.source.matches(repo)
            && !self
                .filters
                .exclude_repositories
                .iter()
                .any(|g| g.matches(repo))
    }

    /// Where the source repository `repo` goes: its first `flatten` path components
    /// dropped (the last one always stays), then the destination namespace prefixed.
    pub fn destination_of(&self, repo: &str) -> String {
        let parts: Vec<&str> = repo.split('/').collect();
        let kept = parts[self.flatten.min(parts.len() - 1)..].join("/");
        if self.destination_namespace.is_empty() {
            kept
        } else {
            format!("{}/{kept}", self.destination_namespace)
        }
    }

    fn copy(&self, repo: &str, tag: &str) -> NewTask {
        NewTask {
            operation: "copy".to_owned(),
            source: format!("{repo}:{tag}"),
            destination: format!("{}:{tag}", self.destination_of(repo)),
        }
    }

    /// Copy tasks for the `tags` of `repo` the filters take, appended to `tasks`.
    fn add_tags(
        &self,
        repo: &str,
        tags: Vec<String>,
        tasks: &mut Vec<NewTask>,
    ) -> Result<(), ReplicationError> {
        for tag in tags {
            // The referrers tag schema's index tags travel with their subjects; names a
            // registry lists that are no tags (too long, odd characters) are no business
            // of a task and are left out.
            let fallback_index = tag.starts_with("sha256-") && tag.len() == 71;
            if fallback_index || Tag::parse(&tag).is_err() || !self.filters.takes_tag(&tag) {
                continue;
            }
            if tasks.len() >= MAX_LISTED {
                return Err(ReplicationError::Invalid(format!(
                    "policy {} takes more than {MAX_LISTED} tags in one run: narrow its filters",
                    self.name
                )));
            }
            tasks.push(self.copy(repo, &tag));
        }
        Ok(())
    }

    /// The tasks one change in this registry asks of the policy (event-triggered push
    /// policies only; the change must come after the policy was made).
    pub fn tasks_for(&self, event: &Event, created_seq: i64) -> Vec<NewTask> {
        if self.trigger != Trigger::Event
            || self.direction != Direction::Push
            || !self.enabled
            || event.seq <= created_seq
        {
            return Vec::new();
        }
        match &event.change {
            Change::ManifestPushed {
                repository,
                digest,
                tag,
                subject,
                ..
            } if self.takes_repository(repository) => match (tag, subject) {
                (Some((tag, _)), _) if self.filters.takes_tag(tag) => {
                    vec![self.copy(repository, tag)]
                }
                // A referrer pushed by digest (a signature, an SBOM): it follows its subject.
                (None, Some(_)) => vec![NewTask {
                    operation: "copy".to_owned(),
                    source: format!("{repository}@{digest}"),
                    destination: format!("{}@{digest}", self.destination_of(repository)),
                }],
                _ => Vec::new(),
            },
            Change::TagDeleted {
                repository, tag, ..
            } if self.replicate_deletions
                && self.takes_repository(repository)
                && self.filters.takes_tag(tag) =>
            {
                vec![NewTask {
                    operation: "delete".to_owned(),
                    source: format!("{repository}:{tag}"),
                    destination: format!("{}:{tag}", self.destination_of(repository)),
                }]
            }
            Change::ManifestDeleted {
                repository, digest, ..
            } if self.replicate_deletions && self.takes_repository(repository) => vec![NewTask {
                operation: "delete".to_owned(),
                source: format!("{repository}@{digest}"),
                destination: format!("{}@{digest}", self.destination_of(repository)),
            }],
            _ => Vec::new(),
        }
    }
}

impl Replication {
    /// Every tag the policy's source holds that its filters take, as copy tasks.
    pub(crate) async fn plan(&self, policy: &Policy) -> Result<Vec<NewTask>, ReplicationError> {
        let mut tasks = Vec::new();
        match policy.direction {
            Direction::Push => {
                let mut after: Option<String> = None;
                loop {
                    let page = Page {
                        limit: Some(PAGE),
                        after: after.as_deref(),
                    };
                    let repos = self.registry.catalog(page, None).await?;
                    let Some(last) = repos.last().cloned() else {
                        break;
                    };
                    for repo in repos.iter().filter(|r| policy.takes_repository(r)) {
                        let name = RepoName::parse(repo)
                            .map_err(|e| ReplicationError::Invalid(e.to_string()))?;
                        let all = Page {
                            limit: None,
                            after: None,
                        };
                        let tags = match self.registry.list_tags(&name, all).await {
                            Ok(tags) => tags,
                            Err(berth_registry::RegistryError::NameUnknown { .. }) => continue,
                            Err(e) => return Err(e.into()),
                        };
                        policy.add_tags(repo, tags, &mut tasks)?;
                    }
                    after = Some(last);
                }
            }
            Direction::Pull => {
                let endpoint = self.registry_endpoint(&policy.registry).await?;
                let client = self.client_for(&endpoint)?;
                for repo in client.catalog().await? {
                    if !policy.takes_repository(&repo) || RepoName::parse(&repo).is_err() {
                        continue;
                    }
                    let tags = client.tags(&repo).await?;
                    policy.add_tags(&repo, tags, &mut tasks)?;
                }
            }
        }
        Ok(tasks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_meta::{Actor, TagChange};

    fn policy(extra: serde_json::Value) -> Policy {
        let mut value = serde_json::json!({
            "name": "p", "direction": "push", "registry": "r", "source": "team/**",
            "trigger": "event",
        });
        for (k, v) in extra.as_object().unwrap() {
            value[k] = v.clone();
        }
        Policy::from_value(&value).unwrap()
    }

    fn pushed(seq: i64, repository: &str, tag: &str) -> Event {
        Event {
            seq,
            at_ms: 0,
            actor: Actor::system("test"),
            change: Change::ManifestPushed {
                repository: repository.to_owned(),
                digest: format!("sha256:{}", "a".repeat(64)),
                media_type: "application/vnd.oci.image.manifest.v1+json".to_owned(),
                size: 1,
                subject: None,
                tag: Some((tag.to_owned(), TagChange::Created)),
            },
        }
    }

    #[test]
    fn tag_regexes_artifact_types_and_annotations_filter() {
        let p = policy(serde_json::json!({"filters": {
            "tag_regex": "v[0-9]+\\.[0-9]+", "artifact_types": ["application/vnd.example.sbom"],
            "annotations": {"org.example.team": "core"},
        }}));
        assert!(p.filters.takes_tag("v1.2"));
        assert!(!p.filters.takes_tag("v1.2-rc"), "the whole tag must match");
        assert!(!p.filters.takes_tag("latest"));
        let sbom = br#"{"artifactType": "application/vnd.example.sbom", "annotations": {"org.example.team": "core"}}"#;
        assert_eq!(p.filters.refuses_manifest(sbom), None);
        let image = br#"{"config": {"mediaType": "application/vnd.oci.image.config.v1+json"}}"#;
        assert!(p
            .filters
            .refuses_manifest(image)
            .unwrap()
            .contains("artifact type"));
        let other_team = br#"{"artifactType": "application/vnd.example.sbom", "annotations": {"org.example.team": "web"}}"#;
        assert!(p
            .filters
            .refuses_manifest(other_team)
            .unwrap()
            .contains("annotation"));
        for bad in [
            serde_json::json!({"tag_regex": "("}),
            serde_json::json!({"tag_regex": "a".repeat(300)}),
            serde_json::json!({"tag_regex": "(a{1000}){1000}"}),
            serde_json::json!({"artifact_types": "one"}),
            serde_json::json!({"annotations": {"k": 1}}),
        ] {
            let mut value = p.to_json();
            value["filters"] = bad.clone();
            assert!(Policy::from_value(&value).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_a_registry_lists_that_are_no_tags_make_no_tasks() {
        let p = policy(serde_json::json!({}));
        let listed = vec![
            "v1".to_owned(),
            "x".repeat(200),
            "bad\ntag".to_owned(),
            "../../etc".to_owned(),
            format!("sha256-{}", "a".repeat(64)),
        ];
        let mut tasks = Vec::new();
        p.add_tags("team/app", listed, &mut tasks).unwrap();
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].source, "team/app:v1");
    }

    #[test]
    fn destinations_flatten_and_prefix() {
        let p = policy(serde_json::json!({"destination_namespace": "mirror", "flatten": 1}));
        assert_eq!(p.destination_of("team/app/web"), "mirror/app/web");
        assert_eq!(p.destination_of("team"), "mirror/team");
        let plain = policy(serde_json::json!({}));
        assert_eq!(plain.destination_of("team/app"), "team/app");
    }

    #[test]
    fn events_become_tasks_only_as_the_filters_say() {
        let p = policy(serde_json::json!({
            "filters": {"tags": ["v*"], "exclude_tags": ["*-rc*"], "exclude_repositories": ["team/secret"]},
            "replicate_deletions": true,
        }));
        assert_eq!(p.tasks_for(&pushed(10, "team/app", "v1"), 5).len(), 1);
        assert!(p.tasks_for(&pushed(10, "team/app", "latest"), 5).is_empty());
        assert!(p.tasks_for(&pushed(10, "team/app", "v2-rc1"), 5).is_empty());
        assert!(p.tasks_for(&pushed(10, "team/secret", "v1"), 5).is_empty());
        assert!(p.tasks_for(&pushed(10, "other/app", "v1"), 5).is_empty());
        // Before the policy existed: not its business.
        assert!(p.tasks_for(&pushed(4, "team/app", "v1"), 5).is_empty());
        let deleted = Event {
            seq: 11,
            at_ms: 0,
            actor: Actor::system("test"),
            change: Change::TagDeleted {
                repository: "team/app".to_owned(),
                tag: "v1".to_owned(),
                digest: format!("sha256:{}", "a".repeat(64)),
            },
        };
        let tasks = p.tasks_for(&deleted, 5);
        assert_eq!(tasks[0].operation, "delete");
        assert_eq!(tasks[0].destination, "team/app:v1");
        let keeps = policy(serde_json::json!({"replicate_deletions": false}));
        assert!(keeps.tasks_for(&deleted, 5).is_empty());
    }
}
