//! The access service: settings, the shared state of its parts ([`Logins`], [`Tokens`],
//! [`crate::Accounts`]), and the one authorization decision.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_meta::read_cache::{ReadBegan, ReadCache};
use berth_meta::{AccountStore, MetaError, ProjectAccess, RobotRecord, UserRecord};
use berth_oci::RepoName;

use crate::audit::{AuditLog, Outcome};
use crate::limiter::LoginLimiter;
use crate::policy::{
    project_of, project_permissions, Caller, Permission, Permissions, Principal, ProjectFacts,
    Proof, Role,
};
use crate::recent::Recent;
use crate::time::now_ms;
use crate::token::{Claims, IssuerKey, ResourceAccess, TokenSigner, TokenVerifier};
use crate::{AuthError, AuthMode, AuthSettings, Logins, Tokens};

/// Credentials as the edge found them, borrowed from the request where they can be (a
/// bearer token is some 500 bytes, presented with every request).
#[derive(Debug, Clone)]
pub enum Credentials<'a> {
    /// None given.
    None,
    /// HTTP Basic, or the token endpoint's `grant_type=password`.
    Password {
        /// Login name (`robot$…` for robots).
        user: Cow<'a, str>,
        /// Password or robot secret.
        password: Cow<'a, str>,
    },
    /// `Authorization: Bearer`.
    Bearer(Cow<'a, str>),
    /// The token endpoint's `grant_type=refresh_token`.
    Refresh(Cow<'a, str>),
}

/// What a go-ahead implies beyond itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "a grant may name a project to create"]
pub struct Grant {
    /// The caller pushes into a project that does not exist yet and may create it: the
    /// registry creates it before the push (`create_projects_on_push`).
    pub project_to_create: Option<ProjectToCreate>,
}

/// A project a push creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectToCreate {
    /// Its name.
    pub name: String,
    /// The pushing user (by id) and the role it gets there (project admin); `None` for
    /// robots and external tokens.
    pub owner: Option<(i64, &'static str)>,
}

/// What an operation needs.
#[derive(Debug, Clone, Copy)]
pub enum Need<'a> {
    /// Any authenticated caller (`GET /v2/`, so that clients discover how to log in).
    Login,
    /// Listing the catalog: anyone, filtered by [`AccessControl::visible_projects`].
    Catalog,
    /// A right on a repository (its project's rights, limited by the caller's token).
    Repository {
        /// The repository.
        name: &'a RepoName,
        /// The right.
        permission: Permission,
    },
    /// A right on a project, proven by password (never by a bearer token).
    Project {
        /// The project.
        name: &'a str,
        /// The right.
        permission: Permission,
    },
    /// A system administrator, proven by password.
    System,
}

/// A token issued by the token endpoint.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The access token.
    pub token: String,
    /// Its lifetime in seconds.
    pub expires_in: u64,
    /// When it was issued (ms since the epoch).
    pub issued_at_ms: i64,
    /// A refresh token, if one was asked for (`offline_token=true`, `access_type=offline`).
    pub refresh_token: Option<String>,
    /// What the access token grants, in scope form.
    pub granted: Vec<ResourceAccess>,
}

/// Which account a cached password check proved.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Proven {
    User { id: i64, generation: i64 },
    Robot { id: i64 },
}

/// How long a successful password check is remembered: Argon2 costs tens of
/// milliseconds on purpose, and clients using Basic send it with every request.
pub(crate) const PASSWORD_CACHE_TTL: Duration = Duration::from_secs(60);
/// Entries per cache before it is cleared.
pub(crate) const CACHE_LIMIT: usize = 4096;

/// A token whose signature and claims were checked, kept by the token so that a request
/// bearing it again costs a lookup and a reference count, not a copy of its claims.
pub(crate) struct VerifiedToken {
    /// The token itself: the cache finds it by [`token_key`], then compares this.
    pub(crate) token: Box<str>,
    pub(crate) claims: Claims,
    /// What its `access` claim grants, shared with every caller that bears it.
    pub(crate) access: Arc<[ResourceAccess]>,
}

/// Bytes at a token's end that [`token_key`] hashes: its signature's, which differ
/// between any two tokens (an ECDSA signature is drawn anew for each).
const TOKEN_KEY_BYTES: usize = 32;

/// Where the token cache files a token: a hash of its last [`TOKEN_KEY_BYTES`], since
/// hashing all of one (500 bytes and more) on every bearer request cost more than the
/// rest of its lookup. Only verified tokens are filed, so a crafted collision earns
/// nothing: the full comparison after it fails, and the token is checked as if new.
pub(crate) fn token_key(token: &str) -> u64 {
    let tail = &token.as_bytes()[token.len().saturating_sub(TOKEN_KEY_BYTES)..];
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hasher::write(&mut hasher, tail);
    std::hash::Hasher::write_usize(&mut hasher, token.len());
    std::hash::Hasher::finish(&hasher)
}

/// Access services started in this process, numbering them (`Inner::serial`).
static SERVICES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A thread's recent answers of [`AccessControl::rights`] (see [`Recent`]).
type RecentRights = Recent<(Principal, Box<str>), (Permissions, bool)>;

thread_local! {
    static RECENT_RIGHTS: RefCell<RecentRights> = const { RefCell::new(Recent::new()) };
}

/// The access service. Cheap to clone.
#[derive(Clone)]
pub struct AccessControl {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) settings: AuthSettings,
    pub(crate) store: Arc<dyn AccountStore>,
    pub(crate) signer: Option<TokenSigner>,
    pub(crate) verifier: Option<TokenVerifier>,
    pub(crate) limiter: Mutex<LoginLimiter>,
    pub(crate) cache_key: [u8; 32],
    /// Tells this service's entries in the threads' [`Recent`] answers from another's
    /// (one per process in a server, one per test in tests): never reused, unlike an
    /// address.
    pub(crate) serial: usize,
    pub(crate) passwords: Mutex<HashMap<[u8; 32], (Proven, Instant)>>,
    pub(crate) tokens: Mutex<HashMap<u64, Arc<VerifiedToken>>>,
    pub(crate) audit: AuditLog,
    pub(crate) hashing: crate::password::HashPool,
    pub(crate) counters: AuthCounters,
    /// What every authorized request reads, kept while nothing bearing on access changes
    /// (`MetaStore::access_changes`; SQLite only: `berth_meta::read_cache`). Users by
    /// name, robots by project and name, and a project's access for a user (or for
    /// nobody, "").
    /// Shared, not copied: a bearer request reads a user and a project's access, and
    /// cloning their strings cost more than the lookups.
    users: ReadCache<Arc<UserRecord>>,
    robots: ReadCache<Arc<RobotRecord>>,
    projects: ReadCache<Arc<ProjectAccess>>,
}

impl Inner {
    /// A user by name: the store's answer, or the node's copy of one.
    pub(crate) async fn user_record(
        &self,
        name: &str,
    ) -> Result<Option<Arc<UserRecord>>, MetaError> {
        self.cached(&self.users, "", name, || async {
            Ok(self.store.user(name).await?.map(Arc::new))
        })
        .await
    }

    /// A project's robot by name, likewise.
    pub(crate) async fn robot_record(
        &self,
        project: &str,
        name: &str,
    ) -> Result<Option<Arc<RobotRecord>>, MetaError> {
        self.cached(&self.robots, project, name, || async {
            Ok(self.store.robot(project, name).await?.map(Arc::new))
        })
        .await
    }

    /// What an authorization needs of a project for a user (or for nobody), likewise.
    pub(crate) async fn project_access(
        &self,
        project: &str,
        user: Option<i64>,
    ) -> Result<Arc<ProjectAccess>, MetaError> {
        let who = user.map(|id| id.to_string()).unwrap_or_default();
        let found = self
            .cached(&self.projects, project, &who, || async {
                Ok(Some(Arc::new(
                    self.store.project_access(project, user).await?,
                )))
            })
            .await?;
        Ok(found.expect("project access is always an answer"))
    }

    /// `read`'s answer, served from `cache` while the store is the node's own and no
    /// write went through it since the copy was read. Absent answers are not kept.
    async fn cached<V, F, Fut>(
        &self,
        cache: &ReadCache<V>,
        scope: &str,
        name: &str,
        read: F,
    ) -> Result<Option<V>, MetaError>
    where
        V: Clone,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<V>, MetaError>>,
    {
        let local = self.store.node_local();
        if local {
            if let Some(value) = cache.get(scope, name, self.store.access_changes()) {
                return Ok(Some(value));
            }
        }
        let began = ReadBegan::now(self.store.access_changes());
        let value = read().await?;
        if let (true, Some(value)) = (local, &value) {
            cache.put(
                scope,
                name,
                value.clone(),
                began,
                self.store.access_changes(),
            );
        }
        Ok(value)
    }
}

/// What logins and the token endpoint did since the node started, for the metrics.
#[derive(Debug, Default)]
pub struct AuthCounters {
    /// Passwords and robot secrets accepted (cached proofs not counted again).
    pub logins_succeeded: std::sync::atomic::AtomicU64,
    /// Wrong names, passwords or secrets.
    pub logins_failed: std::sync::atomic::AtomicU64,
    /// Attempts refused by the lockout before any check.
    pub logins_locked_out: std::sync::atomic::AtomicU64,
    /// Tokens issued by the token endpoint.
    pub tokens_issued: std::sync::atomic::AtomicU64,
}

impl AccessControl {
    /// Login and token counts since the node started.
    pub fn counters(&self) -> &AuthCounters {
        &self.inner.counters
    }

    /// Hashes a new password or secret on the hashing pool.
    pub(crate) async fn hash(&self, secret: &str) -> Result<String, AuthError> {
        let secret = secret.to_owned();
        self.inner
            .hashing
            .run(move || crate::password::hash_password(&secret))
            .await?
    }

    /// Checks a password against a stored hash on the hashing pool.
    pub(crate) async fn verify(
        &self,
        stored: &str,
        candidate: &str,
    ) -> Result<crate::password::PasswordCheck, AuthError> {
        let (stored, candidate) = (stored.to_owned(), candidate.to_owned());
        self.inner
            .hashing
            .run(move || crate::password::verify_password(&stored, &candidate))
            .await
    }
}

pub(crate) fn now_secs() -> i64 {
    now_ms() / 1000
}

impl AccessControl {
    /// Builds the service. `signer` is the registry's own key (builtin mode);
    /// `verifier` checks bearer tokens (the signer's key in builtin mode, the external
    /// issuer's in token mode). Must run inside a Tokio runtime (starts the audit writer).
    pub fn new(
        settings: AuthSettings,
        store: Arc<dyn AccountStore>,
        signer: Option<TokenSigner>,
        verifier: Option<TokenVerifier>,
    ) -> Result<Self, AuthError> {
        let mut cache_key = [0u8; 32];
        getrandom::fill(&mut cache_key).map_err(|e| AuthError::Crypto(e.to_string()))?;
        let limiter = LoginLimiter::new(settings.max_login_failures, settings.login_failure_window);
        Ok(AccessControl {
            inner: Arc::new(Inner {
                audit: AuditLog::start(store.clone()),
                hashing: crate::password::HashPool::for_this_machine(),
                counters: AuthCounters::default(),
                settings,
                store,
                signer,
                verifier,
                limiter: Mutex::new(limiter),
                cache_key,
                serial: SERVICES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                passwords: Mutex::new(HashMap::new()),
                tokens: Mutex::new(HashMap::new()),
                users: ReadCache::default(),
                robots: ReadCache::default(),
                projects: ReadCache::default(),
            }),
        })
    }

    /// The usual wiring for the mode in `settings`: builtin mode signs with `signer` and
    /// trusts its own tokens; token mode trusts `issuer_key`; disabled mode needs neither.
    pub fn for_mode(
        settings: AuthSettings,
        store: Arc<dyn AccountStore>,
        signer: Option<TokenSigner>,
        issuer_key: Option<IssuerKey>,
    ) -> Result<Self, AuthError> {
        let key = match settings.mode {
            AuthMode::Disabled => None,
            AuthMode::Builtin => signer.as_ref().map(|s| IssuerKey::from(s.verifying_key())),
            AuthMode::ExternalToken => issuer_key,
        };
        let verifier = key.map(|k| TokenVerifier::new(k, &settings.issuer, &settings.service));
        let signer = if settings.mode == AuthMode::Builtin {
            signer
        } else {
            None
        };
        Self::new(settings, store, signer, verifier)
    }

    /// The settings in force.
    pub fn settings(&self) -> &AuthSettings {
        &self.inner.settings
    }

    /// Whether requests are checked at all.
    pub fn enabled(&self) -> bool {
        self.inner.settings.mode != AuthMode::Disabled
    }

    /// Records an audit event without a change (a pull, a refusal, a failure) for
    /// `caller`; identical ones still waiting to be written are counted into one.
    pub async fn record(
        &self,
        caller: &Caller,
        action: &str,
        resource: &str,
        outcome: Outcome,
        detail: &str,
    ) {
        self.inner
            .audit
            .count(caller, action, resource, outcome, detail)
            .await;
    }

    /// Writes out the audit events still queued; the server calls this once it stopped
    /// serving, so a clean shutdown loses none.
    pub async fn flush_audit(&self) {
        self.inner.audit.flush().await;
    }

    /// Logins: passwords and robot secrets, with the limiter that locks out guessing.
    pub fn logins(&self) -> Logins<'_> {
        Logins { access: self }
    }

    /// Tokens: issued by the token endpoint, verified on every bearer request.
    pub fn tokens(&self) -> Tokens<'_> {
        Tokens { access: self }
    }

    /// The rights `principal` has on `project`, before any token limits them, and
    /// whether the project exists (or has repositories).
    pub(crate) async fn rights(
        &self,
        principal: &Principal,
        project: &str,
    ) -> Result<(Permissions, bool), AuthError> {
        if matches!(principal, Principal::External { .. }) {
            return Ok((Permissions::ALL, true));
        }
        let store = &self.inner.store;
        let recent = store.node_local();
        let owner = self.inner.serial;
        let changes = store.access_changes();
        let is = |k: &(Principal, Box<str>)| k.0 == *principal && *k.1 == *project;
        if recent {
            if let Some(rights) = RECENT_RIGHTS.with_borrow(|r| r.get(owner, changes, is).copied())
            {
                return Ok(rights);
            }
        }
        let began = Instant::now();
        let rights = self.read_rights(principal, project).await?;
        if recent {
            RECENT_RIGHTS.with_borrow_mut(|r| {
                r.put(
                    owner,
                    (principal.clone(), project.into()),
                    rights,
                    changes,
                    began,
                    is,
                )
            });
        }
        Ok(rights)
    }

    /// [`AccessControl::rights`] from the project's record and the caller's role in it.
    async fn read_rights(
        &self,
        principal: &Principal,
        project: &str,
    ) -> Result<(Permissions, bool), AuthError> {
        // A member's role matters only for users who are not administrators.
        let user = match principal {
            Principal::User {
                id, admin: false, ..
            } => Some(*id),
            _ => None,
        };
        let access = self.inner.project_access(project, user).await?;
        let record = &access.project;
        let role = access.role.as_deref().and_then(Role::parse);
        // Repositories pushed while access control was off have no project record: they
        // belong to a private project without members (administrators only) until an
        // administrator creates the project, rather than to whoever pushes there first.
        let exists = record.is_some() || access.unrecorded_repositories;
        let facts = ProjectFacts {
            exists,
            public: record.as_ref().is_some_and(|p| p.public),
            role,
        };
        let rights = project_permissions(
            principal,
            project,
            facts,
            self.inner.settings.create_projects_on_push,
        );
        Ok((rights, facts.exists))
    }

    /// The one authorization decision. `Ok` means go ahead, with what else the go-ahead
    /// implies (a [`Grant`]); the errors say how to answer: [`AuthError::Unauthenticated`]
    /// (log in), [`AuthError::InsufficientScope`] (fetch a token for this),
    /// [`AuthError::Denied`] (not allowed). Deciding changes nothing: a push into a project
    /// that does not exist yet is granted with the project to create, and creating it is
    /// the registry's.
    pub async fn authorize(&self, caller: &Caller, need: Need<'_>) -> Result<Grant, AuthError> {
        if !self.enabled() {
            return Ok(Grant::default());
        }
        let anonymous = caller.proof == Proof::None || caller.principal == Principal::Anonymous;
        match need {
            Need::Login => {
                if caller.proof == Proof::None {
                    return Err(AuthError::Unauthenticated);
                }
                Ok(Grant::default())
            }
            Need::Catalog => Ok(Grant::default()),
            Need::Repository { name, permission } => {
                let project = project_of(name.as_str());
                let (rights, exists) = self.rights(&caller.principal, project).await?;
                let granted = match caller.token_grants(name.as_str()) {
                    Some(token) => rights.intersect(token),
                    None => rights,
                };
                if granted.allows(permission) {
                    let creates = !exists && permission == Permission::Write;
                    return Ok(Grant {
                        project_to_create: creates.then(|| ProjectToCreate {
                            name: project.to_owned(),
                            owner: match &caller.principal {
                                Principal::User { id, .. } => {
                                    Some((*id, Role::ProjectAdmin.as_str()))
                                }
                                _ => None,
                            },
                        }),
                    });
                }
                let what = format!(
                    "{} on {name}",
                    permission.token_action().unwrap_or("access")
                );
                if caller.proof == Proof::None {
                    Err(AuthError::Unauthenticated)
                } else if anonymous {
                    // An anonymous token: the client has been through the token flow
                    // already, and another 401 would only send it round again. Denied
                    // tells it (and docker's user: "may require 'docker login'") to log in.
                    Err(AuthError::Denied(format!("{what}: log in first")))
                } else if rights.allows(permission) {
                    Err(AuthError::InsufficientScope(what))
                } else {
                    Err(AuthError::Denied(what))
                }
            }
            Need::Project { name, permission } => {
                if anonymous {
                    return Err(AuthError::Unauthenticated);
                }
                let (rights, _) = self.rights(&caller.principal, name).await?;
                if caller.proof == Proof::Password && rights.allows(permission) {
                    Ok(Grant::default())
                } else {
                    Err(AuthError::Denied(format!(
                        "{permission:?} on project {name}"
                    )))
                }
            }
            Need::System => {
                if anonymous {
                    return Err(AuthError::Unauthenticated);
                }
                if caller.proof == Proof::Password && caller.principal.is_admin() {
                    Ok(Grant::default())
                } else {
                    Err(AuthError::Denied("system administrators only".into()))
                }
            }
        }
    }

    /// Projects whose repositories the caller may see in the catalog; `None` for all.
    pub async fn visible_projects(
        &self,
        caller: &Caller,
    ) -> Result<Option<Vec<String>>, AuthError> {
        if !self.enabled() || caller.principal.is_admin() {
            return Ok(None);
        }
        if let Principal::External { .. } = caller.principal {
            let all = caller.token_grants_registry("catalog");
            return Ok(if all { None } else { Some(Vec::new()) });
        }
        let mut visible: Vec<String> = self
            .inner
            .store
            .projects()
            .await?
            .into_iter()
            .filter(|p| p.public)
            .map(|p| p.name)
            .collect();
        match &caller.principal {
            Principal::User { id, .. } => {
                for (project, role) in self.inner.store.member_projects(*id).await? {
                    if Role::parse(&role)
                        .is_some_and(|r| r.permissions().allows(Permission::Search))
                    {
                        visible.push(project);
                    }
                }
            }
            Principal::Robot {
                project,
                permissions,
                ..
            } if permissions.allows(Permission::Search) => {
                visible.push(project.clone());
            }
            _ => {}
        }
        visible.sort();
        visible.dedup();
        Ok(Some(visible))
    }
}

#[cfg(test)]
mod tests;
