//! Robot accounts: a project's machine logins, with permissions and an expiry, whose
//! secret is shown once.

use std::time::Duration;

use berth_meta::RobotRecord;

use super::{check_component, Accounts, NewRobot};
use crate::access::Need;
use crate::password::random_secret;
use crate::policy::{robot_permissions, Caller, Permission};
use crate::time::now_ms;
use crate::AuthError;

impl Accounts<'_> {
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
}
