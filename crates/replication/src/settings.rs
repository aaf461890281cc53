//! Registry endpoints and replication policies as the API takes and shows them (and as
//! they are stored): JSON, every field bounded, unknown fields refused.

use serde_json::{json, Map, Value};

use crate::filter::Glob;
use crate::ReplicationError;

/// The longest name, URL, credential or pattern taken.
const MAX_TEXT: usize = 2048;

/// The most parallel tasks a policy may ask for.
const MAX_CONCURRENCY: u64 = 16;

/// Another registry, to replicate to or from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEndpoint {
    /// Its name, which policies use.
    pub name: String,
    /// Its base URL (`https://host[:port]`, or `http://` for a plain one).
    pub url: String,
    /// Credentials, if it wants them.
    pub username: Option<String>,
    /// The password or token.
    pub password: Option<String>,
    /// Accept a certificate that does not verify (a registry with a self-made one).
    pub insecure: bool,
}

/// Which way images go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From this registry to the other.
    Push,
    /// From the other registry to this one.
    Pull,
}

/// What starts a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Only the API.
    Manual,
    /// Every change in a source repository, within seconds (push policies).
    Event,
    /// A schedule, as cron's five fields.
    Schedule(crate::schedule::Schedule),
}

/// A replication policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Its name.
    pub name: String,
    /// Push or pull.
    pub direction: Direction,
    /// The other registry's endpoint name.
    pub registry: String,
    /// The source repositories (`team/**`, `library/*`, `app`).
    pub source: Glob,
    /// Prefixed to every destination repository (`""`: none).
    pub destination_namespace: String,
    /// Leading path components dropped from the source repository before the namespace
    /// is prefixed (`team/app/web` with 1 is `app/web`).
    pub flatten: usize,
    /// What starts it.
    pub trigger: Trigger,
    /// Which tags go.
    pub filters: Filters,
    /// Whether deleting a tag or manifest at the source deletes it at the destination.
    pub replicate_deletions: bool,
    /// Whether a destination tag that points elsewhere is replaced.
    pub overwrite: bool,
    /// Blob bytes per second across the policy's tasks (`None`: unlimited).
    pub bandwidth: Option<u64>,
    /// Tasks run at once.
    pub concurrency: usize,
    /// Switched off policies start no run.
    pub enabled: bool,
}

/// A regular expression a whole tag must match (linear-time matching; its compiled size
/// is bounded).
#[derive(Debug, Clone)]
pub struct TagRegex {
    text: String,
    regex: regex::Regex,
}

impl PartialEq for TagRegex {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for TagRegex {}

impl TagRegex {
    fn parse(text: &str) -> Result<TagRegex, ReplicationError> {
        if text.is_empty() || text.len() > 256 {
            return Err(ReplicationError::Invalid(
                "filters: tag_regex is 1 to 256 characters".to_owned(),
            ));
        }
        let regex = regex::RegexBuilder::new(&format!("^(?:{text})$"))
            .size_limit(1 << 20)
            .build()
            .map_err(|e| ReplicationError::Invalid(format!("filters: tag_regex: {e}")))?;
        Ok(TagRegex {
            text: text.to_owned(),
            regex,
        })
    }
}

/// Which images of the source repositories go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filters {
    /// Tags that go (all when empty).
    pub tags: Vec<Glob>,
    /// A regular expression tags must also match, when set.
    pub tag_regex: Option<TagRegex>,
    /// Artifact types that go (a manifest's `artifactType`, else its config's media type;
    /// all when empty).
    pub artifact_types: Vec<String>,
    /// Annotations a manifest must carry, each with this value.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Tags that do not, even when `tags` takes them.
    pub exclude_tags: Vec<Glob>,
    /// Repositories left out, even when `source` takes them.
    pub exclude_repositories: Vec<Glob>,
}

fn text(
    fields: &Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<String>, ReplicationError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_TEXT && !s.chars().any(char::is_control) => {
            Ok(Some(s.clone()))
        }
        Some(Value::String(_)) => Err(ReplicationError::Invalid(format!(
            "{what}: {key} is longer than {MAX_TEXT} bytes or holds control characters"
        ))),
        Some(_) => Err(ReplicationError::Invalid(format!(
            "{what}: {key} must be a string"
        ))),
    }
}

fn flag(
    fields: &Map<String, Value>,
    key: &str,
    default: bool,
    what: &str,
) -> Result<bool, ReplicationError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ReplicationError::Invalid(format!(
            "{what}: {key} must be true or false"
        ))),
    }
}

fn number(
    fields: &Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<u64>, ReplicationError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ReplicationError::Invalid(format!("{what}: {key} must be a whole number"))
        }),
    }
}

fn object<'v>(
    value: &'v Value,
    what: &str,
    known: &[&str],
) -> Result<&'v Map<String, Value>, ReplicationError> {
    let fields = value
        .as_object()
        .ok_or_else(|| ReplicationError::Invalid(format!("{what}: expected an object")))?;
    if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ReplicationError::Invalid(format!(
            "{what}: unknown field {:?}",
            unknown.chars().take(64).collect::<String>()
        )));
    }
    Ok(fields)
}

/// Names of endpoints and policies: they appear in URLs, metrics and logs.
pub(crate) fn check_name(name: &str, what: &str) -> Result<(), ReplicationError> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
        && !name.starts_with(['.', '-']);
    if fine {
        Ok(())
    } else {
        Err(ReplicationError::Invalid(format!(
            "{what} name: 1 to 64 of a-z, 0-9, '-', '_', '.', not starting with '.' or '-'"
        )))
    }
}

impl RegistryEndpoint {
    /// From the API's JSON.
    pub fn from_value(value: &Value) -> Result<RegistryEndpoint, ReplicationError> {
        const WHAT: &str = "registry";
        let fields = object(
            value,
            WHAT,
            &["name", "url", "username", "password", "insecure", "kind"],
        )?;
        let name = text(fields, "name", WHAT)?
            .ok_or_else(|| ReplicationError::Invalid("registry: name is required".to_owned()))?;
        check_name(&name, WHAT)?;
        let url = text(fields, "url", WHAT)?
            .ok_or_else(|| ReplicationError::Invalid("registry: url is required".to_owned()))?;
        let url = url.trim_end_matches('/').to_owned();
        let username = text(fields, "username", WHAT)?;
        let password = text(fields, "password", WHAT)?;
        if username.is_some() != password.is_some() {
            return Err(ReplicationError::Invalid(
                "registry: username and password go together".to_owned(),
            ));
        }
        // `kind` is accepted for Harbor's API shape; every OCI registry is spoken to alike.
        text(fields, "kind", WHAT)?;
        Ok(RegistryEndpoint {
            name,
            url,
            username,
            password,
            insecure: flag(fields, "insecure", false, WHAT)?,
        })
    }

    /// The stored form, with the password.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "url": self.url,
            "username": self.username,
            "password": self.password,
            "insecure": self.insecure,
        })
    }

    /// What the API shows: never the password.
    pub fn shown(&self) -> Value {
        let mut value = self.to_json();
        if let Some(fields) = value.as_object_mut() {
            fields.remove("password");
            fields.insert("password_set".to_owned(), self.password.is_some().into());
        }
        value
    }
}

impl Policy {
    /// From the API's JSON.
    pub fn from_value(value: &Value) -> Result<Policy, ReplicationError> {
        const WHAT: &str = "replication policy";
        let fields = object(
            value,
            WHAT,
            &[
                "name",
                "direction",
                "registry",
                "source",
                "destination_namespace",
                "flatten",
                "trigger",
                "filters",
                "replicate_deletions",
                "override",
                "bandwidth_bytes_per_sec",
                "concurrency",
                "enabled",
            ],
        )?;
        let required = |key: &str| -> Result<String, ReplicationError> {
            text(fields, key, WHAT)?
                .ok_or_else(|| ReplicationError::Invalid(format!("{WHAT}: {key} is required")))
        };
        let name = required("name")?;
        check_name(&name, WHAT)?;
        let direction = match required("direction")?.as_str() {
            "push" => Direction::Push,
            "pull" => Direction::Pull,
            _ => {
                return Err(ReplicationError::Invalid(format!(
                    "{WHAT}: direction is push or pull"
                )))
            }
        };
        let registry = required("registry")?;
        check_name(&registry, "registry")?;
        let source = Glob::parse(&required("source")?)?;
        let destination_namespace = text(fields, "destination_namespace", WHAT)?
            .unwrap_or_default()
            .trim_matches('/')
            .to_owned();
        if !destination_namespace.is_empty() {
            // The namespace must make valid repository names with what follows it.
            berth_oci::RepoName::parse(&format!("{destination_namespace}/x")).map_err(|e| {
                ReplicationError::Invalid(format!("{WHAT}: destination_namespace: {e}"))
            })?;
        }
        let trigger = match text(fields, "trigger", WHAT)?.as_deref() {
            None | Some("manual") => Trigger::Manual,
            Some("event") if direction == Direction::Push => Trigger::Event,
            Some("event") => {
                return Err(ReplicationError::Invalid(format!(
                    "{WHAT}: the event trigger is for push policies (the other registry's events do not reach this one); schedule a pull policy"
                )))
            }
            Some(other) => match other.strip_prefix("cron:") {
                Some(expression) => Trigger::Schedule(crate::schedule::Schedule::parse(expression)?),
                None => {
                    return Err(ReplicationError::Invalid(format!(
                        "{WHAT}: trigger is manual, event or cron:<five fields>"
                    )))
                }
            },
        };
        let filters = match fields.get("filters") {
            None | Some(Value::Null) => Filters::default(),
            Some(value) => Filters::from_value(value)?,
        };
        let flatten = number(fields, "flatten", WHAT)?.unwrap_or(0);
        if flatten > 16 {
            return Err(ReplicationError::Invalid(format!(
                "{WHAT}: flatten is at most 16"
            )));
        }
        let concurrency = number(fields, "concurrency", WHAT)?.unwrap_or(2);
        if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
            return Err(ReplicationError::Invalid(format!(
                "{WHAT}: concurrency is 1 to {MAX_CONCURRENCY}"
            )));
        }
        let bandwidth = number(fields, "bandwidth_bytes_per_sec", WHAT)?;
        if bandwidth.is_some_and(|b| b < 1024) {
            return Err(ReplicationError::Invalid(format!(
                "{WHAT}: bandwidth_bytes_per_sec is at least 1024"
            )));
        }
        Ok(Policy {
            name,
            direction,
            registry,
            source,
            destination_namespace,
            flatten: flatten as usize,
            trigger,
            filters,
            replicate_deletions: flag(fields, "replicate_deletions", false, WHAT)?,
            overwrite: flag(fields, "override", true, WHAT)?,
            bandwidth,
            concurrency: concurrency as usize,
            enabled: flag(fields, "enabled", true, WHAT)?,
        })
    }

    /// The stored (and shown) form.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "direction": match self.direction { Direction::Push => "push", Direction::Pull => "pull" },
            "registry": self.registry,
            "source": self.source.as_str(),
            "destination_namespace": self.destination_namespace,
            "flatten": self.flatten,
            "trigger": match &self.trigger {
                Trigger::Manual => "manual".to_owned(),
                Trigger::Event => "event".to_owned(),
                Trigger::Schedule(s) => format!("cron:{}", s.as_str()),
            },
            "filters": self.filters.to_json(),
            "replicate_deletions": self.replicate_deletions,
            "override": self.overwrite,
            "bandwidth_bytes_per_sec": self.bandwidth,
            "concurrency": self.concurrency,
            "enabled": self.enabled,
        })
    }
}

impl Filters {
    fn from_value(value: &Value) -> Result<Filters, ReplicationError> {
        const WHAT: &str = "filters";
        let fields = object(
            value,
            WHAT,
            &[
                "tags",
                "tag_regex",
                "exclude_tags",
                "exclude_repositories",
                "artifact_types",
                "annotations",
            ],
        )?;
        let globs = |key: &str| -> Result<Vec<Glob>, ReplicationError> {
            let list = match fields.get(key) {
                None | Some(Value::Null) => return Ok(Vec::new()),
                Some(Value::String(one)) => vec![Value::String(one.clone())],
                Some(Value::Array(many)) if many.len() <= 64 => many.clone(),
                Some(_) => {
                    return Err(ReplicationError::Invalid(format!(
                        "{WHAT}: {key} is a pattern or a list of at most 64"
                    )))
                }
            };
            list.iter()
                .map(|v| match v.as_str() {
                    Some(pattern) => Glob::parse(pattern),
                    None => Err(ReplicationError::Invalid(format!(
                        "{WHAT}: {key} holds patterns (strings)"
                    ))),
                })
                .collect()
        };
        let tag_regex = text(fields, "tag_regex", WHAT)?
            .map(|t| TagRegex::parse(&t))
            .transpose()?;
        let artifact_types = match fields.get("artifact_types") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(types)) if types.len() <= 32 => types
                .iter()
                .map(|t| match t.as_str() {
                    Some(t)
                        if !t.is_empty() && t.len() <= 255 && !t.chars().any(char::is_control) =>
                    {
                        Ok(t.to_owned())
                    }
                    _ => Err(ReplicationError::Invalid(format!(
                        "{WHAT}: artifact_types holds media types (1 to 255 printable characters)"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(ReplicationError::Invalid(format!(
                    "{WHAT}: artifact_types is a list of at most 32"
                )))
            }
        };
        let annotations = match fields.get("annotations") {
            None | Some(Value::Null) => Default::default(),
            Some(Value::Object(pairs)) if pairs.len() <= 32 => pairs
                .iter()
                .map(|(k, v)| match v.as_str() {
                    Some(v) if k.len() <= 255 && v.len() <= MAX_TEXT => {
                        Ok((k.clone(), v.to_owned()))
                    }
                    _ => Err(ReplicationError::Invalid(format!(
                        "{WHAT}: annotations maps names to string values"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(ReplicationError::Invalid(format!(
                    "{WHAT}: annotations is an object of at most 32"
                )))
            }
        };
        Ok(Filters {
            tags: globs("tags")?,
            tag_regex,
            artifact_types,
            annotations,
            exclude_tags: globs("exclude_tags")?,
            exclude_repositories: globs("exclude_repositories")?,
        })
    }

    fn to_json(&self) -> Value {
        let list = |globs: &[Glob]| {
            globs
                .iter()
                .map(|g| g.as_str().to_owned())
                .collect::<Vec<_>>()
        };
        json!({
            "tags": list(&self.tags),
            "tag_regex": self.tag_regex.as_ref().map(|r| r.text.clone()),
            "exclude_tags": list(&self.exclude_tags),
            "exclude_repositories": list(&self.exclude_repositories),
            "artifact_types": self.artifact_types,
            "annotations": self.annotations,
        })
    }

    /// Whether `tag` goes.
    pub fn takes_tag(&self, tag: &str) -> bool {
        (self.tags.is_empty() || self.tags.iter().any(|g| g.matches(tag)))
            && self
                .tag_regex
                .as_ref()
                .is_none_or(|r| r.regex.is_match(tag))
            && !self.exclude_tags.iter().any(|g| g.matches(tag))
    }

    /// Why the manifest `raw` does not go (its artifact type or annotations), if it
    /// does not.
    pub fn refuses_manifest(&self, raw: &[u8]) -> Option<String> {
        if self.artifact_types.is_empty() && self.annotations.is_empty() {
            return None;
        }
        let manifest: Value = serde_json::from_slice(raw).unwrap_or_default();
        if !self.artifact_types.is_empty() {
            let kind = manifest["artifactType"]
                .as_str()
                .or(manifest["config"]["mediaType"].as_str())
                .unwrap_or_default();
            if !self.artifact_types.iter().any(|t| t == kind) {
                return Some(format!("artifact type {kind:?} is not among the filter's"));
            }
        }
        for (name, wanted) in &self.annotations {
            if manifest["annotations"][name].as_str() != Some(wanted.as_str()) {
                return Some(format!("annotation {name} is not {wanted:?}"));
            }
        }
        None
    }
}
