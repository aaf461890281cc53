//! Who may use the registry: users, projects with their members, robot accounts, and the
//! audit log of what they did. Records only; what a role allows is decided by the
//! `berth-auth` crate, which is the only reader of these fields' meaning.

use async_trait::async_trait;

use crate::MetaError;

/// A person who logs in with a name and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Stable id; tokens carry it, so a user removed and created again under the same name
    /// does not inherit the old tokens.
    pub id: i64,
    /// Login name.
    pub name: String,
    /// A PHC string (Argon2id) or, for users imported from htpasswd, a bcrypt hash.
    pub password_hash: String,
    /// System administrator: may do everything.
    pub admin: bool,
    /// Bumped on every password change; tokens carry it, so a password change revokes them.
    pub generation: i64,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
}

/// A project: the first path segment of repository names, the unit of permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRecord {
    /// The project's name (a single path component).
    pub name: String,
    /// Anyone, even anonymous, may pull and search.
    pub public: bool,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
}

/// A user's role in a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRecord {
    /// The user's name.
    pub user: String,
    /// The role's name, as `berth-auth` spells it.
    pub role: String,
}

/// A project's robot account: a machine credential with chosen permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RobotRecord {
    /// Stable id; tokens carry it.
    pub id: i64,
    /// The project it belongs to.
    pub project: String,
    /// Its short name; it logs in as `robot$<project>+<name>`.
    pub name: String,
    /// Hash of its secret (Argon2id PHC string).
    pub secret_hash: String,
    /// Permission names, as `berth-auth` spells them.
    pub permissions: Vec<String>,
    /// After this time (ms since the epoch) it can no longer log in; `None` for never.
    pub expires_ms: Option<i64>,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
}

/// What an authorization needs to know of a project, read at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectAccess {
    /// The project's record, if it has one.
    pub project: Option<ProjectRecord>,
    /// The user's role in it, if a user was named and is a member.
    pub role: Option<String>,
    /// Whether repositories live under the name although there is no record.
    pub unrecorded_repositories: bool,
}

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

/// Storage of accounts, projects and the audit log. Every method is one transaction.
#[async_trait]
pub trait AccountStore: Send + Sync + 'static {
    /// How many users exist: zero means the first start, when an admin is created.
    async fn count_users(&self) -> Result<u64, MetaError>;
    /// Creates a user; [`MetaError::Conflict`] if the name is taken.
    async fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
    ) -> Result<UserRecord, MetaError>;
    /// A user by name.
    async fn user(&self, name: &str) -> Result<Option<UserRecord>, MetaError>;
    /// Every user, by name.
    async fn users(&self) -> Result<Vec<UserRecord>, MetaError>;
    /// Changes a user's password (bumping its generation) and/or admin flag; `None` if
    /// there is no such user.
    async fn update_user(
        &self,
        name: &str,
        password_hash: Option<&str>,
        admin: Option<bool>,
    ) -> Result<Option<UserRecord>, MetaError>;
    /// Replaces a legacy password hash by a new one for the same password, keeping the
    /// generation (tokens stay valid).
    async fn rehash_password(&self, user_id: i64, password_hash: &str) -> Result<(), MetaError>;
    /// Removes a user and its memberships; true if it existed.
    async fn delete_user(&self, name: &str) -> Result<bool, MetaError>;

    /// Creates a project, with `owner` (a user id) as its first project admin;
    /// [`MetaError::Conflict`] if it exists.
    async fn create_project(
        &self,
        name: &str,
        public: bool,
        owner: Option<(i64, &str)>,
    ) -> Result<ProjectRecord, MetaError>;
    /// A project by name.
    async fn project(&self, name: &str) -> Result<Option<ProjectRecord>, MetaError>;
    /// Every project, by name.
    async fn projects(&self) -> Result<Vec<ProjectRecord>, MetaError>;
    /// The project's record, `user_id`'s role in it and, when there is no record, whether
    /// repositories live under the name: one round trip per authorization.
    async fn project_access(
        &self,
        project: &str,
        user_id: Option<i64>,
    ) -> Result<ProjectAccess, MetaError>;
    /// Whether any repository lives under the name (`<name>` or `<name>/…`), with or
    /// without a project record: repositories pushed while access control was off.
    async fn project_in_use(&self, name: &str) -> Result<bool, MetaError>;
    /// Makes a project public or private; false if there is no such project.
    async fn set_project_public(&self, name: &str, public: bool) -> Result<bool, MetaError>;
    /// Removes an empty project with its members and robots; [`MetaError::NotEmpty`] while
    /// repositories exist in it; false if there was no such project.
    async fn delete_project(&self, name: &str) -> Result<bool, MetaError>;

    /// Members of a project, by user name.
    async fn members(&self, project: &str) -> Result<Vec<MemberRecord>, MetaError>;
    /// The role of one user in one project.
    async fn member_role(&self, project: &str, user_id: i64) -> Result<Option<String>, MetaError>;
    /// Projects in which the user has any role.
    async fn member_projects(&self, user_id: i64) -> Result<Vec<(String, String)>, MetaError>;
    /// Adds a member or changes its role; [`MetaError::NotFound`] if the user or project
    /// does not exist. True if the member was added rather than changed.
    async fn set_member(&self, project: &str, user: &str, role: &str) -> Result<bool, MetaError>;
    /// Removes a member; true if it was one.
    async fn remove_member(&self, project: &str, user: &str) -> Result<bool, MetaError>;

    /// Creates a robot account; [`MetaError::Conflict`] if the name is taken in the
    /// project, [`MetaError::NotFound`] if the project does not exist.
    async fn create_robot(
        &self,
        project: &str,
        name: &str,
        secret_hash: &str,
        permissions: &[String],
        expires_ms: Option<i64>,
    ) -> Result<RobotRecord, MetaError>;
    /// A robot by project and name.
    async fn robot(&self, project: &str, name: &str) -> Result<Option<RobotRecord>, MetaError>;
    /// A project's robots, by name.
    async fn robots(&self, project: &str) -> Result<Vec<RobotRecord>, MetaError>;
    /// Removes a robot; true if it existed.
    async fn delete_robot(&self, project: &str, name: &str) -> Result<bool, MetaError>;

    /// The stored value of a registry-wide setting, storing `candidate` first if there is
    /// none (the first node to start wins; every node then agrees). The token signing key
    /// lives here, so that every node verifies every node's tokens.
    async fn setting_or_insert(&self, name: &str, candidate: &str) -> Result<String, MetaError>;

    /// Appends events to the audit log, in order.
    async fn append_audit(&self, events: Vec<NewAuditEvent>) -> Result<(), MetaError>;
    /// Audit events matching the filter, newest first.
    async fn audit(&self, filter: AuditFilter) -> Result<Vec<AuditRecord>, MetaError>;
}
