//! Account administration: users, projects, members, robots and reading the audit log.
//! Every operation authorizes first (through [`AccessControl::authorize`]) and is audited,
//! refusals included.

use std::time::Duration;

use berth_meta::{
    AuditFilter, AuditRecord, MemberRecord, ProjectOrigin, ProjectRecord, RefreshTokenRecord,
    RobotRecord, UserRecord,
};
use berth_oci::RepoName;

use crate::access::{AccessControl, Need};
use crate::audit::{self, Outcome};
use crate::password::{parse_htpasswd, random_secret};
use crate::policy::{robot_permissions, Caller, Permission, Principal, Proof, Role};
use crate::time::now_ms;
use crate::AuthError;

/// Robots log in as `robot$<project>+<name>`, as in Harbor; `$` cannot start a user name.
pub const ROBOT_PREFIX: &str = "robot$";

/// Shortest password accepted when one is chosen rather than generated.
const MIN_PASSWORD_LEN: usize = 8;

/// A user to create.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Login name.
    pub name: String,
    /// Its password; `None` generates one (returned once).
    pub password: Option<String>,
    /// System administrator.
    pub admin: bool,
}

/// A robot account to create.
#[derive(Debug, Clone)]
pub struct NewRobot {
    /// Its short name.
    pub name: String,
    /// `pull`, `push`, `delete`.
    pub permissions: Vec<String>,
    /// Lifetime; `None` for no expiry.
    pub expires_in: Option<Duration>,
}

/// What importing one htpasswd entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    /// A new user with the file's bcrypt hash.
    Created,
    /// A user of that name exists; left as it is.
    Exists,
    /// The name is not a valid user name.
    Invalid(String),
}

fn check_user_name(name: &str) -> Result<(), AuthError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!(
            "user name {name:?}: 1-64 letters, digits, '.', '_', '-' or '@', starting with a letter or digit"
        )))
    }
}

/// A project or robot name: one repository path component.
fn check_component(what: &str, name: &str) -> Result<(), AuthError> {
    if name.len() <= 64 && !name.contains('/') && RepoName::parse(name).is_ok() {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!(
            "{what} name {name:?}: lowercase letters and digits, separated by '.', '_' or '-'"
        )))
    }
}

fn check_password(password: &str) -> Result<(), AuthError> {
    if password.chars().count() >= MIN_PASSWORD_LEN {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!(
            "passwords need at least {MIN_PASSWORD_LEN} characters"
        )))
    }
}

impl AccessControl {
    /// The caller for local administration (`berth user …`): a system administrator whose
    /// actions are audited as `berth-cli`.
    pub fn local_admin() -> Caller {
        Caller {
            principal: Principal::User {
                id: 0,
                name: "berth-cli".into(),
                admin: true,
            },
            proof: Proof::Password,
            address: "local".into(),
        }
    }

    /// Account administration, every operation authorized first.
    pub fn accounts(&self) -> Accounts<'_> {
        Accounts { access: self }
    }
}

/// Account administration: users, projects, members, robots and the audit log. Every
/// operation asks [`AccessControl::authorize`] first (and a refusal is audited); every
/// change is recorded by the metadata store with the change.
pub struct Accounts<'a> {
    access: &'a AccessControl,
}

impl Accounts<'_> {
    /// Authorizes, auditing a refusal.
    async fn permit(
        &self,
        caller: &Caller,
        need: Need<'_>,
        action: &str,
        resource: &str,
    ) -> Result<(), AuthError> {
        if let Err(e) = self.access.authorize(caller, need).await {
            if matches!(
                e,
                AuthError::Denied(_) | AuthError::Unauthenticated | AuthError::InsufficientScope(_)
            ) {
                self.access
                    .inner
                    .audit
                    .record_now(audit::event(
                        caller,
                        action,
                        resource,
                        Outcome::Denied,
                        &e.to_string(),
                    ))
                    .await;
            }
            return Err(e);
        }
        Ok(())
    }

    /// On first start (no users at all), creates `admin` with the given password or a
    /// generated one, which is returned so it can be shown once.
    pub async fn bootstrap_admin(
        &self,
        password: Option<String>,
    ) -> Result<Option<String>, AuthError> {
        if self.access.inner.store.count_users().await? > 0 {
            return Ok(None);
        }
        let (password, generated) = match password {
            Some(p) => (p, false),
            None => (random_secret()?, true),
        };
        self.access
            .inner
            .store
            .create_user(
                "admin",
                &self.access.hash(&password).await?,
                true,
                "first administrator",
                &AccessControl::local_admin().as_actor(),
            )
            .await?;
        Ok(generated.then_some(password))
    }

    /// Creates a user; returns the generated password when none was given.
    pub async fn create_user(
        &self,
        caller: &Caller,
        new: NewUser,
    ) -> Result<(UserRecord, Option<String>), AuthError> {
        self.permit(caller, Need::System, "user.create", &new.name)
            .await?;
        check_user_name(&new.name)?;
        let (password, generated) = match new.password {
            Some(p) => {
                check_password(&p)?;
                (p, false)
            }
            None => (random_secret()?, true),
        };
        let user = self
            .access
            .inner
            .store
            .create_user(
                &new.name,
                &self.access.hash(&password).await?,
                new.admin,
                "",
                &caller.as_actor(),
            )
            .await?;
        Ok((user, generated.then_some(password)))
    }

    /// Every user.
    pub async fn users(&self, caller: &Caller) -> Result<Vec<UserRecord>, AuthError> {
        self.permit(caller, Need::System, "user.list", "").await?;
        Ok(self.access.inner.store.users().await?)
    }

    /// One user: administrators see anyone, users themselves.
    pub async fn user(&self, caller: &Caller, name: &str) -> Result<UserRecord, AuthError> {
        if !is_self(caller, name) {
            self.permit(caller, Need::System, "user.get", name).await?;
        }
        self.access
            .inner
            .store
            .user(name)
            .await?
            .ok_or_else(|| AuthError::NotFound(format!("user {name}")))
    }

    /// The live refresh tokens (logins that keep a token, as `docker login` does) of a
    /// user or robot: the user itself, or an administrator.
    pub async fn refresh_tokens(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Vec<RefreshTokenRecord>, AuthError> {
        if !is_self(caller, name) {
            self.permit(caller, Need::System, "token.list", name)
                .await?;
        }
        Ok(self.access.inner.store.refresh_tokens(name).await?)
    }

    /// Revokes one refresh token: every client holding it must log in again. The user
    /// itself, or an administrator.
    pub async fn revoke_refresh_token(
        &self,
        caller: &Caller,
        name: &str,
        id: &str,
    ) -> Result<(), AuthError> {
        if !is_self(caller, name) {
            self.permit(caller, Need::System, "token.revoke", name)
                .await?;
        }
        let revoked = self
            .access
            .inner
            .store
            .revoke_refresh_token(name, id, &caller.as_actor())
            .await?;
        if !revoked {
            return Err(AuthError::NotFound(format!("token {id} of {name}")));
        }
        Ok(())
    }

    /// Changes a password (administrators, or the user itself) or the admin flag
    /// (administrators only). A password change revokes the user's tokens.
    pub async fn update_user(
        &self,
        caller: &Caller,
        name: &str,
        password: Option<String>,
        admin: Option<bool>,
    ) -> Result<UserRecord, AuthError> {
        let own_password =
            is_self(caller, name) && admin.is_none() && caller.proof == Proof::Password;
        if !own_password {
            self.permit(caller, Need::System, "user.update", name)
                .await?;
        }
        let hash = match &password {
            Some(p) => {
                check_password(p)?;
                Some(self.access.hash(p).await?)
            }
            None => None,
        };
        let user = self
            .access
            .inner
            .store
            .update_user(name, hash.as_deref(), admin, &caller.as_actor())
            .await?
            .ok_or_else(|| AuthError::NotFound(format!("user {name}")))?;
        Ok(user)
    }

    /// Removes a user, its memberships and (at once) its tokens.
    pub async fn delete_user(&self, caller: &Caller, name: &str) -> Result<(), AuthError> {
        self.permit(caller, Need::System, "user.delete", name)
            .await?;
        if !self
            .access
            .inner
            .store
            .delete_user(name, &caller.as_actor())
            .await?
        {
            return Err(AuthError::NotFound(format!("user {name}")));
        }
        Ok(())
    }

    /// Imports the users of a Distribution htpasswd file, keeping their bcrypt hashes
    /// (replaced by Argon2id at each user's first login). Existing users are left alone.
    pub async fn import_htpasswd(
        &self,
        caller: &Caller,
        text: &str,
    ) -> Result<Vec<(String, ImportOutcome)>, AuthError> {
        self.permit(caller, Need::System, "user.import", "").await?;
        let mut outcomes = Vec::new();
        for entry in parse_htpasswd(text)? {
            let outcome = match check_user_name(&entry.user) {
                Err(e) => ImportOutcome::Invalid(e.to_string()),
                Ok(()) => match self
                    .access
                    .inner
                    .store
                    .create_user(
                        &entry.user,
                        &entry.bcrypt_hash,
                        false,
                        "imported from htpasswd",
                        &caller.as_actor(),
                    )
                    .await
                {
                    Ok(_) => ImportOutcome::Created,
                    Err(berth_meta::MetaError::Conflict(_)) => ImportOutcome::Exists,
                    Err(e) => return Err(e.into()),
                },
            };
            outcomes.push((entry.user, outcome));
        }
        Ok(outcomes)
    }

    /// Creates a project. Administrators may always; other users when projects may be
    /// created by users (`create_projects_on_push`). The creator becomes project admin.
    pub async fn create_project(
        &self,
        caller: &Caller,
        name: &str,
        public: bool,
    ) -> Result<ProjectRecord, AuthError> {
        check_component("project", name)?;
        let allowed = caller.principal.is_admin()
            || (self.access.inner.settings.create_projects_on_push
                && matches!(caller.principal, Principal::User { .. })
                && caller.proof == Proof::Password);
        if !allowed {
            self.permit(caller, Need::System, "project.create", name)
                .await?;
        }
        let owner = match &caller.principal {
            Principal::User { id, .. } if *id > 0 => Some((*id, Role::ProjectAdmin.as_str())),
            _ => None,
        };
        let project = self
            .access
            .inner
            .store
            .create_project(
                name,
                public,
                owner,
                ProjectOrigin::Requested,
                &caller.as_actor(),
            )
            .await?;
        Ok(project)
    }

    /// The projects the caller can see.
    pub async fn projects(&self, caller: &Caller) -> Result<Vec<ProjectRecord>, AuthError> {
        let all = self.access.inner.store.projects().await?;
        Ok(match self.access.visible_projects(caller).await? {
            None => all,
            Some(visible) => all
                .into_iter()
                .filter(|p| visible.contains(&p.name))
                .collect(),
        })
    }

    /// One project the caller may read.
    pub async fn project(&self, caller: &Caller, name: &str) -> Result<ProjectRecord, AuthError> {
        self.permit(
            caller,
            Need::Project {
                name,
                permission: Permission::Read,
            },
            "project.get",
            name,
        )
        .await?;
        self.access
            .inner
            .store
            .project(name)
            .await?
            .ok_or_else(|| AuthError::NotFound(format!("project {name}")))
    }

    /// Makes a project public or private (project admins).
    pub async fn set_project_public(
        &self,
        caller: &Caller,
        name: &str,
        public: bool,
    ) -> Result<ProjectRecord, AuthError> {
        self.permit(
            caller,
            Need::Project {
                name,
                permission: Permission::Manage,
            },
            "project.update",
            name,
        )
        .await?;
        if !self
            .access
            .inner
            .store
            .set_project_public(name, public, &caller.as_actor())
            .await?
        {
            return Err(AuthError::NotFound(format!("project {name}")));
        }
        self.access
            .inner
            .store
            .project(name)
            .await?
            .ok_or_else(|| AuthError::NotFound(format!("project {name}")))
    }

    /// Removes an empty project with its members and robots (project admins).
    pub async fn delete_project(&self, caller: &Caller, name: &str) -> Result<(), AuthError> {
        self.permit(
            caller,
            Need::Project {
                name,
                permission: Permission::Manage,
            },
            "project.delete",
            name,
        )
        .await?;
        if !self
            .access
            .inner
            .store
            .delete_project(name, &caller.as_actor())
            .await?
        {
            return Err(AuthError::NotFound(format!("project {name}")));
        }
        Ok(())
    }

    /// A project's members (visible to whoever may read the project).
    pub async fn members(
        &self,
        caller: &Caller,
        project: &str,
    ) -> Result<Vec<MemberRecord>, AuthError> {
        self.permit(
            caller,
            Need::Project {
                name: project,
                permission: Permission::Read,
            },
            "member.list",
            project,
        )
        .await?;
        self.existing_project(project).await?;
        Ok(self.access.inner.store.members(project).await?)
    }

    /// Adds a member or changes its role (project admins); true if added.
    pub async fn set_member(
        &self,
        caller: &Caller,
        project: &str,
        user: &str,
        role: &str,
    ) -> Result<bool, AuthError> {
        self.permit(
            caller,
            Need::Project {
                name: project,
                permission: Permission::Manage,
            },
            "member.set",
            project,
        )
        .await?;
        let role = Role::parse(role).ok_or_else(|| {
            AuthError::Invalid(format!(
                "role {role:?}: expected project_admin, maintainer, developer or guest"
            ))
        })?;
        let added = self
            .access
            .inner
            .store
            .set_member(project, user, role.as_str(), &caller.as_actor())
            .await?;
        Ok(added)
    }

    /// Removes a member (project admins).
    pub async fn remove_member(
        &self,
        caller: &Caller,
        project: &str,
        user: &str,
    ) -> Result<(), AuthError> {
        self.permit(
            caller,
            Need::Project {
                name: project,
                permission: Permission::Manage,
            },
            "member.remove",
            project,
        )
        .await?;
        if !self
            .access
            .inner
            .store
            .remove_member(project, user, &caller.as_actor())
            .await?
        {
            return Err(AuthError::NotFound(format!(
                "member {user} of project {project}"
            )));
        }
        Ok(())
    }

    /// Creates a robot account (project admins). The secret is returned once and only
    /// its hash is kept.
    pub async fn create_robot(
        &self,
        caller: &Caller,
        project: &str,
        new: NewRobot,
    ) -> Result<(RobotRecord, String), AuthError> {
        self.permit(
            caller,
            Need::Project {
                name: project,
                permission: Permission::Manage,
            },
            "robot.create",
            project,
        )
        .await?;
        check_component("robot", &new.name)?;
        if new.permissions.is_empty() || robot_permissions(&new.permissions).is_none() {
            return Err(AuthError::Invalid(
                "robot permissions: one or more of pull, push, delete".into(),
            ));
        }
        let secret = random_secret()?;
        let expires_ms = new.expires_in.map(|d| now_ms() + d.as_millis() as i64);
        let robot = self
            .access
            .inner
            .store
            .create_robot(
                project,
                &new.name,
                &self.access.hash(&secret).await?,
                &new.permissions,
                expires_ms,
                &caller.as_actor(),
            )
            .await?;
        Ok((robot, secret))
    }

    /// A project's robots (project admins).
    pub async fn robots(
        &self,
        caller: &Caller,
        project: &str,
    ) -> Result<Vec<RobotRecord>, AuthError> {
        self.permit(
            caller,
            Need::Project {
                name: project,
                permission: Permission::Manage,
            },
            "robot.list",
            project,
        )
        .await?;
        Ok(self.access.inner.store.robots(project).await?)
    }

    /// Changes when a robot expires (project admins): `Some(d)` from now (zero expires it
    /// at once, and its tokens with it), `None` never.
    pub async fn set_robot_expiry(
        &self,
        caller: &Caller,
        project: &str,
        name: &str,
        expires_in: Option<Duration>,
    ) -> Result<RobotRecord, AuthError> {
        self.permit(
            caller,
            Need::Project {
                name: project,
                permission: Permission::Manage,
            },
            "robot.update",
            project,
        )
        .await?;
        let store = &self.access.inner.store;
        let expires_ms = expires_in.map(|d| now_ms() + d.as_millis() as i64);
        let missing = || AuthError::NotFound(format!("robot {name} of project {project}"));
        if !store
            .set_robot_expiry(project, name, expires_ms, &caller.as_actor())
            .await?
        {
            return Err(missing());
        }
        store.robot(project, name).await?.ok_or_else(missing)
    }

    /// Removes a robot (project admins); its tokens stop working at once.
    pub async fn delete_robot(
        &self,
        caller: &Caller,
        project: &str,
        name: &str,
    ) -> Result<(), AuthError> {
        self.permit(
            caller,
            Need::Project {
                name: project,
                permission: Permission::Manage,
            },
            "robot.delete",
            project,
        )
        .await?;
        if !self
            .access
            .inner
            .store
            .delete_robot(project, name, &caller.as_actor())
            .await?
        {
            return Err(AuthError::NotFound(format!(
                "robot {name} of project {project}"
            )));
        }
        Ok(())
    }

    /// The audit log, newest first (system administrators).
    pub async fn audit_log(
        &self,
        caller: &Caller,
        filter: AuditFilter,
    ) -> Result<Vec<AuditRecord>, AuthError> {
        self.permit(caller, Need::System, "audit.list", "").await?;
        // What happened before this request is in the answer, though the writer gathers
        // events for a moment before writing them.
        self.access.inner.audit.flush().await;
        Ok(self.access.inner.store.audit(filter).await?)
    }

    async fn existing_project(&self, name: &str) -> Result<ProjectRecord, AuthError> {
        self.access
            .inner
            .store
            .project(name)
            .await?
            .ok_or_else(|| AuthError::NotFound(format!("project {name}")))
    }
}

/// The name a robot logs in with.
pub fn robot_login(robot: &RobotRecord) -> String {
    format!("{ROBOT_PREFIX}{}+{}", robot.project, robot.name)
}

fn is_self(caller: &Caller, name: &str) -> bool {
    matches!(&caller.principal, Principal::User { name: own, .. } if own == name)
}
