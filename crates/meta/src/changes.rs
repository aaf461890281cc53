//! What the event log records: every kind of change the registry makes, and the words
//! the audit log uses for each.

use serde::{Deserialize, Serialize};

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
    pub(crate) fn audit_words(&self) -> (&'static str, String, String) {
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
