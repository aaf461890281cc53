//! Who may use the registry: users, and projects with their members (robot accounts and
//! refresh tokens are `credentials.rs`, the audit log of what they did `audit.rs`).
//! Records only; what a role allows is decided by the `berth-auth` crate, which is the
//! only reader of these fields' meaning.

use std::sync::Arc;

use async_trait::async_trait;

use crate::changes::Change;
use crate::engine::{args, owned, Durability, Row, Tx, Value};
use crate::events::{record, Actor};
use crate::{
    now, AuditFilter, AuditRecord, CredentialStore, Database, MetaError, MetaStore, NewAuditEvent,
};

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

/// How a project came to be, for its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectOrigin {
    /// Created through the API or the command line.
    Requested,
    /// Created by the first push into it.
    FirstPush,
}

/// Storage of accounts, projects and the audit log. Every method is one transaction;
/// every change records its event in it.
#[async_trait]
pub trait AccountStore: MetaStore + CredentialStore {
    /// How many users exist: zero means the first start, when an admin is created.
    async fn count_users(&self) -> Result<u64, MetaError>;
    /// Creates a user; [`MetaError::Conflict`] if the name is taken. `note` says how it
    /// came to be, for its event.
    async fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
        note: &str,
        by: &Actor,
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
        by: &Actor,
    ) -> Result<Option<UserRecord>, MetaError>;
    /// Replaces a legacy password hash by a new one for the same password, keeping the
    /// generation (tokens stay valid).
    async fn rehash_password(&self, user_id: i64, password_hash: &str) -> Result<(), MetaError>;
    /// Removes a user and its memberships; true if it existed.
    async fn delete_user(&self, name: &str, by: &Actor) -> Result<bool, MetaError>;

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
    async fn set_project_public(
        &self,
        name: &str,
        public: bool,
        by: &Actor,
    ) -> Result<bool, MetaError>;
    /// Removes an empty project with its members and robots; [`MetaError::NotEmpty`] while
    /// repositories exist in it; false if there was no such project.
    async fn delete_project(&self, name: &str, by: &Actor) -> Result<bool, MetaError>;

    /// Members of a project, by user name.
    async fn members(&self, project: &str) -> Result<Vec<MemberRecord>, MetaError>;
    /// The role of one user in one project.
    async fn member_role(&self, project: &str, user_id: i64) -> Result<Option<String>, MetaError>;
    /// Projects in which the user has any role.
    async fn member_projects(&self, user_id: i64) -> Result<Vec<(String, String)>, MetaError>;
    /// Adds a member or changes its role; [`MetaError::NotFound`] if the user or project
    /// does not exist. True if the member was added rather than changed.
    async fn set_member(
        &self,
        project: &str,
        user: &str,
        role: &str,
        by: &Actor,
    ) -> Result<bool, MetaError>;
    /// Removes a member; true if it was one.
    async fn remove_member(&self, project: &str, user: &str, by: &Actor)
        -> Result<bool, MetaError>;

    /// The stored value of a registry-wide setting, storing `candidate` first if there is
    /// none (the first node to start wins; every node then agrees). The token signing key
    /// lives here, so that every node verifies every node's tokens.
    async fn setting_or_insert(&self, name: &str, candidate: &str) -> Result<String, MetaError>;

    /// Appends events to the audit log, in order: attempts that changed nothing (a
    /// refusal, a login, a pull), recorded in the event log without a change.
    /// The events are shared, not consumed: a writer that fails (a full disk) keeps them
    /// and tries again.
    async fn append_audit(&self, events: Arc<[NewAuditEvent]>) -> Result<(), MetaError>;
    /// Audit events matching the filter, newest first: every event of the log, changes
    /// included.
    async fn audit(&self, filter: AuditFilter) -> Result<Vec<AuditRecord>, MetaError>;
}

/// The columns [`user_row`] reads.
macro_rules! user_columns {
    () => {
        "id, name, password_hash, admin, generation, created_at"
    };
}

fn user_row(mut r: Row) -> Result<UserRecord, MetaError> {
    Ok(UserRecord {
        id: r.int(0)?,
        name: r.text(1)?,
        password_hash: r.text(2)?,
        admin: r.bool(3)?,
        generation: r.int(4)?,
        created_ms: r.int(5)?,
    })
}

pub(crate) fn project_row(mut r: Row) -> Result<ProjectRecord, MetaError> {
    Ok(ProjectRecord {
        name: r.text(0)?,
        public: r.bool(1)?,
        created_ms: r.int(2)?,
    })
}

/// Names what clashed when a statement met a uniqueness violation.
pub(crate) fn clash(what: String) -> impl FnOnce(MetaError) -> MetaError {
    move |e| match e {
        MetaError::Conflict(_) => MetaError::Conflict(what),
        other => other,
    }
}

/// Whether repositories (with manifests, or only blobs so far) live under a project name.
/// `name > p/ AND name < p0` is the index range of `p/…` (`0` follows `/`).
macro_rules! holds_repositories {
    () => {
        "EXISTS (SELECT 1 FROM repositories WHERE name = ?1 OR (name > ?1 || '/' AND name < ?1 || '0'))
         OR EXISTS (SELECT 1 FROM repo_blobs WHERE repo = ?1 OR (repo > ?1 || '/' AND repo < ?1 || '0'))"
    };
}
const HOLDS_REPOSITORIES: &str = concat!("SELECT ", holds_repositories!());

pub(crate) fn project_exists(tx: &mut dyn Tx, name: &str) -> Result<bool, MetaError> {
    tx.exists("SELECT 1 FROM projects WHERE name = ?1", args![name])
}

impl Database {
    /// One statement that is a change of its own: recorded if it changed a row; true if
    /// it did.
    pub(crate) async fn change_statement(
        &self,
        sql: &'static str,
        args: Vec<Value<'static>>,
        change: Change,
        by: &Actor,
    ) -> Result<bool, MetaError> {
        let by = by.clone();
        self.engine
            .write_recorded(move |tx| {
                let changed = tx.execute(sql, &args)? > 0;
                if changed {
                    record(tx, &by, std::slice::from_ref(&change))?;
                }
                Ok(changed)
            })
            .await
    }
}

#[async_trait]
impl AccountStore for Database {
    async fn count_users(&self) -> Result<u64, MetaError> {
        let count = self.read_row("SELECT count(*) FROM users", vec![], |mut r| r.size(0));
        Ok(count.await?.unwrap_or(0))
    }

    async fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
        note: &str,
        by: &Actor,
    ) -> Result<UserRecord, MetaError> {
        let change = Change::UserCreated {
            name: name.to_owned(),
            admin,
            note: note.to_owned(),
        };
        let (name, hash, by) = (name.to_owned(), password_hash.to_owned(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                // Names differing only in case are one name to the people who read them
                // (and to the audit log): the second is refused, in the same transaction.
                let folded = tx.query(
                    "SELECT name FROM users WHERE lower(name) = lower(?1)",
                    args![&name],
                )?;
                if !folded.is_empty() {
                    return Err(MetaError::Conflict(format!(
                        "user {name} exists (user names are unique regardless of case)"
                    )));
                }
                let row = tx
                    .query_one(
                        concat!(
                            "INSERT INTO users (name, password_hash, admin, created_at) VALUES (?1, ?2, ?3, ?4) RETURNING ",
                            user_columns!()
                        ),
                        args![&name, &hash, admin, now()],
                    )
                    .map_err(clash(format!("user {name} exists")))?;
                record(tx, &by, std::slice::from_ref(&change))?;
                user_row(row)
            })
            .await
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, MetaError> {
        let sql = concat!("SELECT ", user_columns!(), " FROM users WHERE name = ?1");
        self.read_row(sql, owned![name], user_row).await
    }

    async fn users(&self) -> Result<Vec<UserRecord>, MetaError> {
        let sql = concat!("SELECT ", user_columns!(), " FROM users ORDER BY name");
        self.read_rows(sql, vec![], user_row).await
    }

    async fn update_user(
        &self,
        name: &str,
        password_hash: Option<&str>,
        admin: Option<bool>,
        by: &Actor,
    ) -> Result<Option<UserRecord>, MetaError> {
        let change = Change::UserChanged {
            name: name.to_owned(),
            password: password_hash.is_some(),
            admin,
        };
        let (name, by) = (name.to_owned(), by.clone());
        let hash = password_hash.map(str::to_owned);
        self.engine
            .write_recorded(move |tx| {
                if let Some(hash) = &hash {
                    tx.execute(
                        "UPDATE users SET password_hash = ?2, generation = generation + 1 WHERE name = ?1",
                        args![&name, hash],
                    )?;
                }
                if let Some(admin) = admin {
                    tx.execute("UPDATE users SET admin = ?2 WHERE name = ?1", args![&name, admin])?;
                }
                let sql = concat!("SELECT ", user_columns!(), " FROM users WHERE name = ?1");
                let Some(row) = tx.query_opt(sql, args![&name])? else {
                    return Ok(None);
                };
                record(tx, &by, std::slice::from_ref(&change))?;
                user_row(row).map(Some)
            })
            .await
    }

    async fn rehash_password(&self, user_id: i64, password_hash: &str) -> Result<(), MetaError> {
        let sql = "UPDATE users SET password_hash = ?2 WHERE id = ?1";
        self.write_statement(Durability::Synced, sql, owned![user_id, password_hash])
            .await
            .map(drop)
    }

    async fn delete_user(&self, name: &str, by: &Actor) -> Result<bool, MetaError> {
        let sql = "DELETE FROM users WHERE name = ?1";
        let change = Change::UserDeleted {
            name: name.to_owned(),
        };
        self.change_statement(sql, owned![name], change, by).await
    }

    async fn project_access(
        &self,
        project: &str,
        user_id: Option<i64>,
    ) -> Result<ProjectAccess, MetaError> {
        // One statement, one round trip per authorization.
        let sql = concat!(
            "SELECT p.name, p.public, p.created_at,
                    (SELECT role FROM members m WHERE m.project = ?1 AND m.user_id = ?2),
                    p.name IS NULL AND (",
            holds_repositories!(),
            ") FROM (SELECT CAST(?1 AS TEXT) AS wanted) q LEFT JOIN projects p ON p.name = q.wanted"
        );
        let access = self.read_row(sql, owned![project, user_id], |mut r| {
            let role = r.opt_text(3)?;
            let unrecorded_repositories = r.bool(4)?;
            let project = match r.opt_text(0)? {
                Some(name) => Some(ProjectRecord {
                    name,
                    public: r.bool(1)?,
                    created_ms: r.int(2)?,
                }),
                None => None,
            };
            Ok(ProjectAccess {
                project,
                role,
                unrecorded_repositories,
            })
        });
        access
            .await?
            .ok_or_else(|| MetaError::Corrupt("project access query returned no row".into()))
    }

    async fn project_in_use(&self, name: &str) -> Result<bool, MetaError> {
        let held = self.read_row(HOLDS_REPOSITORIES, owned![name], |mut r| r.bool(0));
        Ok(held.await? == Some(true))
    }

    async fn set_project_public(
        &self,
        name: &str,
        public: bool,
        by: &Actor,
    ) -> Result<bool, MetaError> {
        let sql = "UPDATE projects SET public = ?2 WHERE name = ?1";
        let change = Change::ProjectChanged {
            name: name.to_owned(),
            public,
        };
        self.change_statement(sql, owned![name, public], change, by)
            .await
    }

    async fn delete_project(&self, name: &str, by: &Actor) -> Result<bool, MetaError> {
        let change = Change::ProjectDeleted {
            name: name.to_owned(),
        };
        let (name, by) = (name.to_owned(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                if tx.query_one(HOLDS_REPOSITORIES, args![&name])?.bool(0)? {
                    return Err(MetaError::NotEmpty(format!(
                        "project {name} still holds repositories"
                    )));
                }
                if tx.execute("DELETE FROM projects WHERE name = ?1", args![&name])? == 0 {
                    return Ok(false);
                }
                record(tx, &by, std::slice::from_ref(&change))?;
                Ok(true)
            })
            .await
    }

    async fn members(&self, project: &str) -> Result<Vec<MemberRecord>, MetaError> {
        let sql = "SELECT u.name, m.role FROM members m JOIN users u ON u.id = m.user_id
                   WHERE m.project = ?1 ORDER BY u.name";
        self.read_rows(sql, owned![project], |mut r| {
            Ok(MemberRecord {
                user: r.text(0)?,
                role: r.text(1)?,
            })
        })
        .await
    }

    async fn member_role(&self, project: &str, user_id: i64) -> Result<Option<String>, MetaError> {
        let sql = "SELECT role FROM members WHERE project = ?1 AND user_id = ?2";
        self.read_row(sql, owned![project, user_id], |mut r| r.text(0))
            .await
    }

    async fn member_projects(&self, user_id: i64) -> Result<Vec<(String, String)>, MetaError> {
        let sql = "SELECT project, role FROM members WHERE user_id = ?1 ORDER BY project";
        self.read_rows(sql, owned![user_id], |mut r| Ok((r.text(0)?, r.text(1)?)))
            .await
    }

    async fn set_member(
        &self,
        project: &str,
        user: &str,
        role: &str,
        by: &Actor,
    ) -> Result<bool, MetaError> {
        let (project, user, role) = (project.to_owned(), user.to_owned(), role.to_owned());
        let by = by.clone();
        self.engine
            .write_recorded(move |tx| {
                if !project_exists(tx, &project)? {
                    return Err(MetaError::NotFound(format!("project {project}")));
                }
                let Some(mut found) =
                    tx.query_opt("SELECT id FROM users WHERE name = ?1", args![&user])?
                else {
                    return Err(MetaError::NotFound(format!("user {user}")));
                };
                let id = found.int(0)?;
                let updated = tx.execute(
                    "UPDATE members SET role = ?3 WHERE project = ?1 AND user_id = ?2",
                    args![&project, id, &role],
                )?;
                if updated == 0 {
                    tx.execute(
                        "INSERT INTO members (project, user_id, role) VALUES (?1, ?2, ?3)",
                        args![&project, id, &role],
                    )?;
                }
                let change = Change::MemberSet {
                    project: project.clone(),
                    user: user.clone(),
                    role: role.clone(),
                    added: updated == 0,
                };
                record(tx, &by, &[change])?;
                Ok(updated == 0)
            })
            .await
    }

    async fn remove_member(
        &self,
        project: &str,
        user: &str,
        by: &Actor,
    ) -> Result<bool, MetaError> {
        let sql = "DELETE FROM members WHERE project = ?1
                   AND user_id = (SELECT id FROM users WHERE name = ?2)";
        let change = Change::MemberRemoved {
            project: project.to_owned(),
            user: user.to_owned(),
        };
        self.change_statement(sql, owned![project, user], change, by)
            .await
    }

    async fn setting_or_insert(&self, name: &str, candidate: &str) -> Result<String, MetaError> {
        let (name, candidate) = (name.to_owned(), candidate.to_owned());
        self.engine
            .write(Durability::Synced, move |tx| {
                tx.execute(
                    "INSERT INTO settings (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
                    args![&name, &candidate],
                )?;
                tx.query_one("SELECT value FROM settings WHERE name = ?1", args![&name])?
                    .text(0)
            })
            .await
    }

    async fn append_audit(&self, events: Arc<[NewAuditEvent]>) -> Result<(), MetaError> {
        // An audit record is read by nobody deciding anything: the change it may report
        // was counted by the write that made it.
        self.engine
            .write_recorded_unread(move |tx| crate::audit::append(tx, &events))
            .await
    }

    async fn audit(&self, filter: AuditFilter) -> Result<Vec<AuditRecord>, MetaError> {
        let args = crate::audit::filter_args(&filter);
        self.read_rows(crate::audit::LIST, args, crate::audit::record_row)
            .await
    }
}
