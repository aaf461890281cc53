//! Account administration: users, projects, members, robots and reading the audit log.
//! Every operation authorizes first (through [`AccessControl::authorize`]) and is audited,
//! refusals included. Users and the audit log are here; projects and members in
//! `projects`, robot accounts in `robots`.

use std::time::Duration;

use berth_meta::{
    AuditFilter, AuditRecord, ProjectRecord, RefreshTokenRecord, RobotRecord, UserRecord,
};
use berth_oci::RepoName;

use crate::access::{AccessControl, Need};
use crate::audit::{self, Outcome};
use crate::password::{parse_htpasswd, random_secret};
use crate::policy::{Caller, Principal, Proof};
use crate::AuthError;

mod projects;
mod robots;

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
