//! Projects and their members: creating, listing, publishing and deleting projects, and
//! who holds which role in them.

use berth_meta::{MemberRecord, ProjectOrigin, ProjectRecord};

use super::{check_component, Accounts};
use crate::access::Need;
use crate::policy::{Caller, Permission, Principal, Proof, Role};
use crate::AuthError;

impl Accounts<'_> {
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
}
