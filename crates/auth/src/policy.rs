//! The permission model, as pure functions: roles and what they allow, who the caller is,
//! and what an operation needs. [`crate::AccessControl::authorize`] feeds these with
//! records from the store; nothing else decides.

use crate::token::ResourceAccess;

/// One right on a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Pull: manifests, blobs, tags, referrers.
    Read,
    /// Push: uploads, manifests, tags.
    Write,
    /// Delete manifests, tags and blobs.
    Delete,
    /// See the project's repositories in the catalog.
    Search,
    /// Manage the project: members, robots, visibility.
    Manage,
}

impl Permission {
    const ALL: [Permission; 5] = [
        Permission::Read,
        Permission::Write,
        Permission::Delete,
        Permission::Search,
        Permission::Manage,
    ];

    fn bit(self) -> u8 {
        match self {
            Permission::Read => 1,
            Permission::Write => 2,
            Permission::Delete => 4,
            Permission::Search => 8,
            Permission::Manage => 16,
        }
    }

    /// The token action that carries this permission, if any (`pull`, `push`, `delete`).
    pub fn token_action(self) -> Option<&'static str> {
        match self {
            Permission::Read => Some("pull"),
            Permission::Write => Some("push"),
            Permission::Delete => Some("delete"),
            Permission::Search | Permission::Manage => None,
        }
    }

    /// The permission a token action grants.
    pub fn from_token_action(action: &str) -> Option<Permission> {
        match action {
            "pull" => Some(Permission::Read),
            "push" => Some(Permission::Write),
            "delete" => Some(Permission::Delete),
            _ => None,
        }
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions(u8);

impl Permissions {
    /// No rights.
    pub const NONE: Permissions = Permissions(0);
    /// Every right.
    pub const ALL: Permissions = Permissions(31);

    /// The set of the given permissions.
    pub fn of(list: &[Permission]) -> Self {
        Permissions(list.iter().fold(0, |acc, p| acc | p.bit()))
    }

    /// Whether `p` is in the set.
    pub fn allows(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    /// Both sets' rights.
    pub fn union(self, other: Permissions) -> Self {
        Permissions(self.0 | other.0)
    }

    /// The rights in both sets.
    pub fn intersect(self, other: Permissions) -> Self {
        Permissions(self.0 & other.0)
    }

    /// The permissions in the set.
    pub fn list(self) -> Vec<Permission> {
        Permission::ALL
            .into_iter()
            .filter(|p| self.allows(*p))
            .collect()
    }
}

/// A member's role in a project, as Harbor defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything in the project, including its members and robots.
    ProjectAdmin,
    /// Pull, push, delete and search; not membership.
    Maintainer,
    /// Pull, push and search.
    Developer,
    /// Pull and search.
    Guest,
}

impl Role {
    /// Parses the API spelling.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "project_admin" => Some(Role::ProjectAdmin),
            "maintainer" => Some(Role::Maintainer),
            "developer" => Some(Role::Developer),
            "guest" => Some(Role::Guest),
            _ => None,
        }
    }

    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ProjectAdmin => "project_admin",
            Role::Maintainer => "maintainer",
            Role::Developer => "developer",
            Role::Guest => "guest",
        }
    }

    /// What the role allows.
    pub fn permissions(self) -> Permissions {
        use Permission::*;
        match self {
            Role::ProjectAdmin => Permissions::ALL,
            Role::Maintainer => Permissions::of(&[Read, Write, Delete, Search]),
            Role::Developer => Permissions::of(&[Read, Write, Search]),
            Role::Guest => Permissions::of(&[Read, Search]),
        }
    }
}

/// Robot permissions by their API names: `pull`, `push`, `delete`. A robot that may pull
/// may also see its project's repositories in the catalog.
pub fn robot_permissions(names: &[String]) -> Option<Permissions> {
    let mut set = Permissions::NONE;
    for name in names {
        let p = Permission::from_token_action(name)?;
        set = set.union(Permissions::of(&[p]));
        if p == Permission::Read {
            set = set.union(Permissions::of(&[Permission::Search]));
        }
    }
    Some(set)
}

/// Who is calling, once credentials are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credentials: may read public projects.
    Anonymous,
    /// A user.
    User {
        /// Its id.
        id: i64,
        /// Its name.
        name: String,
        /// System administrator.
        admin: bool,
    },
    /// A project's robot account.
    Robot {
        /// Its id.
        id: i64,
        /// Its full login name, `robot$<project>+<name>`.
        name: String,
        /// The only project it acts in.
        project: String,
        /// What it may do there.
        permissions: Permissions,
    },
    /// The bearer of a token from a trusted external issuer: its `access` claim is all it
    /// may do.
    External {
        /// The token's subject.
        subject: String,
    },
}

impl Principal {
    /// The name written in the audit log.
    pub fn actor(&self) -> &str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::User { name, .. } | Principal::Robot { name, .. } => name,
            Principal::External { subject } => subject,
        }
    }

    /// The kind written in the audit log.
    pub fn kind(&self) -> &'static str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::User { .. } => "user",
            Principal::Robot { .. } => "robot",
            Principal::External { .. } => "token",
        }
    }

    /// A system administrator.
    pub fn is_admin(&self) -> bool {
        matches!(self, Principal::User { admin: true, .. })
    }
}

/// How the caller proved who it is; a bearer token also limits what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// Nothing: anonymous.
    None,
    /// A password or robot secret (HTTP Basic).
    Password,
    /// A token, which grants only what its `access` claim lists.
    Token(std::sync::Arc<[ResourceAccess]>),
}

/// An authenticated caller: who, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Who.
    pub principal: Principal,
    /// How.
    pub proof: Proof,
    /// The client's address, for the audit log and rate limits.
    pub address: String,
}

impl Caller {
    /// The caller as the event log names whoever made a change.
    pub fn as_actor(&self) -> berth_meta::Actor {
        berth_meta::Actor {
            name: self.principal.actor().to_owned(),
            kind: self.principal.kind().to_owned(),
            address: self.address.clone(),
        }
    }

    /// An anonymous caller from `address`.
    pub fn anonymous(address: impl Into<String>) -> Self {
        Caller {
            principal: Principal::Anonymous,
            proof: Proof::None,
            address: address.into(),
        }
    }

    /// What a bearer token grants on a repository (`None` when not authenticated by token).
    pub fn token_grants(&self, repository: &str) -> Option<Permissions> {
        let Proof::Token(access) = &self.proof else {
            return None;
        };
        let mut set = Permissions::NONE;
        for entry in access
            .iter()
            .filter(|a| a.kind == "repository" && a.name == repository)
        {
            for action in &entry.actions {
                if action == "*" {
                    set = set.union(Permissions::of(&[
                        Permission::Read,
                        Permission::Write,
                        Permission::Delete,
                    ]));
                } else if let Some(p) = Permission::from_token_action(action) {
                    set = set.union(Permissions::of(&[p]));
                }
            }
        }
        Some(set)
    }

    /// Whether a bearer token grants `registry:<name>:*` (catalog, admin).
    pub fn token_grants_registry(&self, name: &str) -> bool {
        match &self.proof {
            Proof::Token(access) => access.iter().any(|a| {
                a.kind == "registry" && a.name == name && a.actions.iter().any(|x| x == "*")
            }),
            _ => false,
        }
    }
}

/// What a project looks like to the permission check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectFacts {
    /// The project exists.
    pub exists: bool,
    /// It is public.
    pub public: bool,
    /// The caller's role in it, if a user and a member.
    pub role: Option<Role>,
}

/// The rights a principal has on a project, before any token limits them.
/// `create_on_push`: whether users may create a project by pushing to it.
pub fn project_permissions(
    principal: &Principal,
    project: &str,
    facts: ProjectFacts,
    create_on_push: bool,
) -> Permissions {
    use Permission::*;
    let public = if facts.exists && facts.public {
        Permissions::of(&[Read, Search])
    } else {
        Permissions::NONE
    };
    match principal {
        Principal::User { admin: true, .. } => Permissions::ALL,
        Principal::User { .. } if !facts.exists => {
            // The pusher of a new project becomes its project admin.
            if create_on_push {
                Permissions::ALL
            } else {
                Permissions::NONE
            }
        }
        Principal::User { .. } => public.union(
            facts
                .role
                .map(Role::permissions)
                .unwrap_or(Permissions::NONE),
        ),
        Principal::Robot {
            project: own,
            permissions,
            ..
        } if own == project && facts.exists => public.union(*permissions),
        Principal::Robot { .. } | Principal::Anonymous => public,
        // Resource servers trusting an external issuer use the token's grants alone.
        Principal::External { .. } => Permissions::ALL,
    }
}

/// The project of a repository: its first path segment.
pub fn project_of(repository: &str) -> &str {
    repository.split('/').next().unwrap_or(repository)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Permission::*;

    fn user(admin: bool) -> Principal {
        Principal::User {
            id: 1,
            name: "u".into(),
            admin,
        }
    }

    const PRIVATE: ProjectFacts = ProjectFacts {
        exists: true,
        public: false,
        role: None,
    };

    #[test]
    fn roles_nest() {
        let order = [
            Role::Guest,
            Role::Developer,
            Role::Maintainer,
            Role::ProjectAdmin,
        ];
        for pair in order.windows(2) {
            let (lower, higher) = (pair[0].permissions(), pair[1].permissions());
            assert_eq!(lower.intersect(higher), lower, "{pair:?}");
            assert_ne!(lower, higher);
        }
        assert!(!Role::Maintainer.permissions().allows(Manage));
        assert!(!Role::Developer.permissions().allows(Delete));
        assert!(!Role::Guest.permissions().allows(Write));
        for role in order {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
    }

    #[test]
    fn public_projects_are_readable_by_everyone_and_nothing_more() {
        let public = ProjectFacts {
            public: true,
            ..PRIVATE
        };
        for who in [Principal::Anonymous, user(false)] {
            let p = project_permissions(&who, "p", public, true);
            assert_eq!(p, Permissions::of(&[Read, Search]), "{who:?}");
            assert_eq!(
                project_permissions(&who, "p", PRIVATE, true),
                Permissions::NONE
            );
        }
        assert_eq!(
            project_permissions(&user(true), "p", PRIVATE, false),
            Permissions::ALL
        );
    }

    #[test]
    fn robots_act_only_in_their_project() {
        let robot = Principal::Robot {
            id: 1,
            name: "robot$p+ci".into(),
            project: "p".into(),
            permissions: robot_permissions(&["pull".into()]).unwrap(),
        };
        assert!(project_permissions(&robot, "p", PRIVATE, true).allows(Read));
        assert!(!project_permissions(&robot, "p", PRIVATE, true).allows(Write));
        assert_eq!(
            project_permissions(&robot, "q", PRIVATE, true),
            Permissions::NONE
        );
        let missing = ProjectFacts {
            exists: false,
            ..PRIVATE
        };
        assert_eq!(
            project_permissions(&robot, "p", missing, true),
            Permissions::NONE
        );
        assert!(robot_permissions(&["admin".into()]).is_none());
    }

    #[test]
    fn tokens_grant_only_listed_actions() {
        let caller = Caller {
            principal: user(false),
            proof: Proof::Token(std::sync::Arc::from(vec![ResourceAccess {
                kind: "repository".into(),
                name: "p/a".into(),
                actions: vec!["pull".into()],
            }])),
            address: "127.0.0.1".into(),
        };
        assert_eq!(caller.token_grants("p/a"), Some(Permissions::of(&[Read])));
        assert_eq!(caller.token_grants("p/b"), Some(Permissions::NONE));
        assert_eq!(Caller::anonymous("x").token_grants("p/a"), None);
        assert_eq!(project_of("p/a/b"), "p");
        assert_eq!(project_of("solo"), "solo");
    }
}
