//! Authentication (passwords, robot secrets, tokens), the one authorization decision, and
//! the token service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_meta::AccountStore;
use berth_oci::RepoName;
use sha2::{Digest as _, Sha256};

use crate::audit::{self, AuditLog, Outcome};
use crate::limiter::LoginLimiter;
use crate::password::{hash_password, verify_password, PasswordCheck};
use crate::policy::{
    project_of, project_permissions, robot_permissions, Caller, Permission, Permissions, Principal,
    ProjectFacts, Proof, Role,
};
use crate::scope::Scope;
use crate::time::now_ms;
use crate::token::{
    Claims, IssuerKey, ResourceAccess, TokenError, TokenSigner, TokenSubject, TokenVerifier,
};
use crate::{AuthError, AuthMode, AuthSettings, ROBOT_PREFIX};

/// Credentials as the edge found them.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// None given.
    None,
    /// HTTP Basic, or the token endpoint's `grant_type=password`.
    Password {
        /// Login name (`robot$…` for robots).
        user: String,
        /// Password or robot secret.
        password: String,
    },
    /// `Authorization: Bearer`.
    Bearer(String),
    /// The token endpoint's `grant_type=refresh_token`.
    Refresh(String),
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
enum Proven {
    User { id: i64, generation: i64 },
    Robot { id: i64 },
}

/// How long a successful password check is remembered: Argon2 costs tens of
/// milliseconds on purpose, and clients using Basic send it with every request.
const PASSWORD_CACHE_TTL: Duration = Duration::from_secs(60);
/// Entries per cache before it is cleared.
const CACHE_LIMIT: usize = 4096;

/// The access service. Cheap to clone.
#[derive(Clone)]
pub struct AccessControl {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) settings: AuthSettings,
    pub(crate) store: Arc<dyn AccountStore>,
    signer: Option<TokenSigner>,
    verifier: Option<TokenVerifier>,
    limiter: Mutex<LoginLimiter>,
    cache_key: [u8; 32],
    passwords: Mutex<HashMap<[u8; 32], (Proven, Instant)>>,
    tokens: Mutex<HashMap<String, Claims>>,
    pub(crate) audit: AuditLog,
}

fn now_secs() -> i64 {
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
                settings,
                store,
                signer,
                verifier,
                limiter: Mutex::new(limiter),
                cache_key,
                passwords: Mutex::new(HashMap::new()),
                tokens: Mutex::new(HashMap::new()),
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

    /// Queues an audit event (push, pull, delete…) for `caller`.
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
            .record(audit::event(caller, action, resource, outcome, detail))
            .await;
    }

    /// Writes out the audit events still queued; the server calls this once it stopped
    /// serving, so a clean shutdown loses none.
    pub async fn flush_audit(&self) {
        self.inner.audit.flush().await;
    }

    /// Checks credentials. Failures are counted by the rate limiter and audited.
    pub async fn authenticate(
        &self,
        credentials: Credentials,
        address: &str,
    ) -> Result<Caller, AuthError> {
        match credentials {
            Credentials::None => Ok(Caller::anonymous(address)),
            _ if !self.enabled() => Ok(Caller::anonymous(address)),
            Credentials::Password { user, password } => {
                self.check_password(&user, &password, address).await
            }
            Credentials::Bearer(token) => self.check_token(&token, address, false).await,
            Credentials::Refresh(token) => self.check_token(&token, address, true).await,
        }
    }

    async fn check_password(
        &self,
        user: &str,
        password: &str,
        address: &str,
    ) -> Result<Caller, AuthError> {
        if self.inner.settings.mode != AuthMode::Builtin {
            return Err(AuthError::Unauthenticated);
        }
        let locked = self
            .inner
            .limiter
            .lock()
            .ok()
            .map(|mut l| l.check(user, address, Instant::now()));
        if let Some(Err(wait)) = locked {
            let retry_after_secs = wait.as_secs().max(1);
            self.inner
                .audit
                .record(audit::login_event(
                    user,
                    address,
                    Outcome::Denied,
                    "rate limited",
                ))
                .await;
            return Err(AuthError::RateLimited { retry_after_secs });
        }
        let cache_key = self.password_cache_key(user, password);
        let cached = self.cached_password(&cache_key);
        let principal = match self.resolve_password(user, password, cached).await? {
            Some((principal, proven)) => {
                if cached.is_none() {
                    self.remember_password(cache_key, proven);
                    self.inner
                        .audit
                        .record(audit::event(
                            &Caller {
                                principal: principal.clone(),
                                proof: Proof::Password,
                                address: address.to_owned(),
                            },
                            "login",
                            user,
                            Outcome::Success,
                            "",
                        ))
                        .await;
                }
                if let Ok(mut l) = self.inner.limiter.lock() {
                    l.record_success(user);
                }
                principal
            }
            None => {
                if let Ok(mut l) = self.inner.limiter.lock() {
                    l.record_failure(user, address, Instant::now());
                }
                self.inner
                    .audit
                    .record(audit::login_event(
                        user,
                        address,
                        Outcome::Failed,
                        "invalid credentials",
                    ))
                    .await;
                return Err(AuthError::BadCredentials);
            }
        };
        Ok(Caller {
            principal,
            proof: Proof::Password,
            address: address.to_owned(),
        })
    }

    fn password_cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.inner.cache_key);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn cached_password(&self, key: &[u8; 32]) -> Option<Proven> {
        let cache = self.inner.passwords.lock().ok()?;
        cache
            .get(key)
            .filter(|(_, at)| at.elapsed() < PASSWORD_CACHE_TTL)
            .map(|(p, _)| *p)
    }

    fn remember_password(&self, key: [u8; 32], proven: Proven) {
        if let Ok(mut cache) = self.inner.passwords.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(key, (proven, Instant::now()));
        }
    }

    /// The account the password proves, if it does. A cached proof is trusted only while
    /// the account still has the same id (and password generation).
    async fn resolve_password(
        &self,
        user: &str,
        password: &str,
        cached: Option<Proven>,
    ) -> Result<Option<(Principal, Proven)>, AuthError> {
        if let Some(robot) = user.strip_prefix(ROBOT_PREFIX) {
            let Some((project, name)) = robot.split_once('+') else {
                return Ok(None);
            };
            let Some(record) = self.inner.store.robot(project, name).await? else {
                return Ok(None);
            };
            if record.expires_ms.is_some_and(|e| e <= now_ms()) {
                return Ok(None);
            }
            let proven = match cached {
                Some(Proven::Robot { id }) if id == record.id => true,
                _ => verify_password(&record.secret_hash, password) != PasswordCheck::Invalid,
            };
            if !proven {
                return Ok(None);
            }
            let permissions = robot_permissions(&record.permissions).unwrap_or(Permissions::NONE);
            let principal = Principal::Robot {
                id: record.id,
                name: user.to_owned(),
                project: record.project,
                permissions,
            };
            return Ok(Some((principal, Proven::Robot { id: record.id })));
        }
        let Some(record) = self.inner.store.user(user).await? else {
            // Spend the same time as a real check, so absent names are not revealed by timing.
            let _ = hash_password(password);
            return Ok(None);
        };
        let proven = match cached {
            Some(Proven::User { id, generation })
                if id == record.id && generation == record.generation =>
            {
                true
            }
            _ => match verify_password(&record.password_hash, password) {
                PasswordCheck::Invalid => false,
                PasswordCheck::Valid => true,
                PasswordCheck::ValidNeedsRehash => {
                    if let Ok(hash) = hash_password(password) {
                        self.inner.store.rehash_password(record.id, &hash).await?;
                    }
                    true
                }
            },
        };
        if !proven {
            return Ok(None);
        }
        let proof = Proven::User {
            id: record.id,
            generation: record.generation,
        };
        Ok(Some((
            Principal::User {
                id: record.id,
                name: record.name,
                admin: record.admin,
            },
            proof,
        )))
    }

    async fn check_token(
        &self,
        token: &str,
        address: &str,
        refresh: bool,
    ) -> Result<Caller, AuthError> {
        let result = self.verify_token(token, refresh).await;
        match result {
            Ok((principal, access)) => Ok(Caller {
                principal,
                proof: if refresh {
                    Proof::Password
                } else {
                    Proof::Token(access)
                },
                address: address.to_owned(),
            }),
            Err(e) => {
                let caller = Caller::anonymous(address);
                self.inner
                    .audit
                    .record(audit::event(
                        &caller,
                        "token",
                        "",
                        Outcome::Failed,
                        &e.to_string(),
                    ))
                    .await;
                Err(e)
            }
        }
    }

    async fn verify_token(
        &self,
        token: &str,
        refresh: bool,
    ) -> Result<(Principal, Vec<ResourceAccess>), AuthError> {
        let Some(verifier) = &self.inner.verifier else {
            return Err(AuthError::Unauthenticated);
        };
        let now = now_secs();
        let cached = self
            .inner
            .tokens
            .lock()
            .ok()
            .and_then(|c| c.get(token).cloned());
        let claims = match cached {
            Some(c) if now < c.exp => c,
            Some(_) => return Err(TokenError::Expired.into()),
            None => {
                let c = verifier.verify(token, now)?;
                if let Ok(mut cache) = self.inner.tokens.lock() {
                    if cache.len() >= CACHE_LIMIT {
                        cache.clear();
                    }
                    cache.insert(token.to_owned(), c.clone());
                }
                c
            }
        };
        if claims.typ.as_deref() == Some("refresh") && !refresh
            || claims.typ.as_deref() != Some("refresh") && refresh
        {
            return Err(TokenError::WrongKind.into());
        }
        let principal = if self.inner.settings.mode == AuthMode::ExternalToken {
            Principal::External {
                subject: claims.sub.clone(),
            }
        } else {
            self.token_principal(&claims).await?
        };
        Ok((principal, claims.access))
    }

    /// The live account behind a token berth issued: refused if it was removed, or (for
    /// users) changed its password since.
    async fn token_principal(&self, claims: &Claims) -> Result<Principal, AuthError> {
        let revoked = || AuthError::BadToken(TokenError::Revoked);
        let Some(subject) = &claims.berth else {
            return Err(revoked());
        };
        match subject.kind.as_str() {
            "anonymous" => Ok(Principal::Anonymous),
            "user" => {
                let user = self
                    .inner
                    .store
                    .user(&claims.sub)
                    .await?
                    .ok_or_else(revoked)?;
                if user.id != subject.id || user.generation != subject.generation {
                    return Err(revoked());
                }
                Ok(Principal::User {
                    id: user.id,
                    name: user.name,
                    admin: user.admin,
                })
            }
            "robot" => {
                let (project, name) = claims
                    .sub
                    .strip_prefix(ROBOT_PREFIX)
                    .and_then(|r| r.split_once('+'))
                    .ok_or_else(revoked)?;
                let robot = self
                    .inner
                    .store
                    .robot(project, name)
                    .await?
                    .ok_or_else(revoked)?;
                if robot.id != subject.id || robot.expires_ms.is_some_and(|e| e <= now_ms()) {
                    return Err(revoked());
                }
                Ok(Principal::Robot {
                    id: robot.id,
                    name: claims.sub.clone(),
                    project: robot.project,
                    permissions: robot_permissions(&robot.permissions).unwrap_or(Permissions::NONE),
                })
            }
            _ => Err(revoked()),
        }
    }

    /// The rights `principal` has on `project`, before any token limits them.
    pub(crate) async fn rights(
        &self,
        principal: &Principal,
        project: &str,
    ) -> Result<(Permissions, bool), AuthError> {
        if matches!(principal, Principal::External { .. }) {
            return Ok((Permissions::ALL, true));
        }
        // A member's role matters only for users who are not administrators.
        let user = match principal {
            Principal::User {
                id, admin: false, ..
            } => Some(*id),
            _ => None,
        };
        let access = self.inner.store.project_access(project, user).await?;
        let record = access.project;
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
                if anonymous {
                    Err(AuthError::Unauthenticated)
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

    /// The token endpoint: a token granting what the caller asked for and may do. Never
    /// an error for scopes the caller may not use: those are simply not granted (the
    /// registry then answers the request with 401/403), as the Docker token spec says.
    pub async fn issue_token(
        &self,
        caller: &Caller,
        scopes: &[Scope],
        offline: bool,
    ) -> Result<IssuedToken, AuthError> {
        let Some(signer) = &self.inner.signer else {
            return Err(AuthError::Unavailable(
                "this registry does not issue tokens".into(),
            ));
        };
        let mut granted: Vec<ResourceAccess> = Vec::new();
        for scope in scopes {
            let actions = match scope.kind.as_str() {
                "repository" => {
                    let Ok(name) = RepoName::parse(&scope.name) else {
                        continue;
                    };
                    let (rights, _) = self
                        .rights(&caller.principal, project_of(name.as_str()))
                        .await?;
                    scope
                        .actions
                        .iter()
                        .flat_map(|a| {
                            if a == "*" {
                                vec!["pull".to_owned(), "push".to_owned(), "delete".to_owned()]
                            } else {
                                vec![a.clone()]
                            }
                        })
                        .filter(|a| {
                            Permission::from_token_action(a).is_some_and(|p| rights.allows(p))
                        })
                        .collect::<Vec<_>>()
                }
                "registry"
                    if scope.name == "catalog" && caller.principal != Principal::Anonymous =>
                {
                    vec!["*".to_owned()]
                }
                _ => Vec::new(),
            };
            if actions.is_empty() {
                continue;
            }
            match granted
                .iter_mut()
                .find(|g| g.kind == scope.kind && g.name == scope.name)
            {
                Some(entry) => {
                    for a in actions {
                        if !entry.actions.contains(&a) {
                            entry.actions.push(a);
                        }
                    }
                }
                None => granted.push(ResourceAccess {
                    kind: scope.kind.clone(),
                    name: scope.name.clone(),
                    actions,
                }),
            }
        }
        let issued_at_ms = now_ms();
        let now = issued_at_ms / 1000;
        let settings = &self.inner.settings;
        let mut subject = token_subject(&caller.principal);
        if let Principal::User { name, .. } = &caller.principal {
            if let Some(user) = self.inner.store.user(name).await? {
                subject.generation = user.generation;
            }
        }
        let claims = |ttl: Duration,
                      access: Vec<ResourceAccess>,
                      typ: Option<&str>|
         -> Result<Claims, AuthError> {
            Ok(Claims {
                iss: settings.issuer.clone(),
                sub: match caller.principal {
                    Principal::Anonymous => String::new(),
                    _ => caller.principal.actor().to_owned(),
                },
                aud: vec![settings.service.clone()],
                exp: now + ttl.as_secs() as i64,
                nbf: now,
                iat: now,
                jti: crate::password::random_secret()?,
                access,
                berth: Some(subject.clone()),
                typ: typ.map(str::to_owned),
            })
        };
        let token = signer.sign(&claims(settings.token_ttl, granted.clone(), None)?)?;
        let refresh_token = if offline && caller.principal != Principal::Anonymous {
            Some(signer.sign(&claims(settings.refresh_ttl, Vec::new(), Some("refresh"))?)?)
        } else {
            None
        };
        Ok(IssuedToken {
            token,
            expires_in: settings.token_ttl.as_secs(),
            issued_at_ms,
            refresh_token,
            granted,
        })
    }
}

fn token_subject(principal: &Principal) -> TokenSubject {
    match principal {
        Principal::User { id, .. } => TokenSubject {
            kind: "user".into(),
            id: *id,
            generation: 0,
        },
        Principal::Robot { id, .. } => TokenSubject {
            kind: "robot".into(),
            id: *id,
            generation: 0,
        },
        Principal::Anonymous | Principal::External { .. } => TokenSubject {
            kind: "anonymous".into(),
            id: 0,
            generation: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_meta::{Actor, Database, MetaStore, ProjectOrigin};

    async fn service(dir: &std::path::Path) -> (AccessControl, Arc<Database>) {
        let store = Arc::new(Database::open_sqlite(&dir.join("meta.db")).unwrap());
        let access = AccessControl::for_mode(
            AuthSettings::default(),
            store.clone(),
            Some(TokenSigner::generate().unwrap()),
            None,
        )
        .unwrap();
        (access, store)
    }

    #[tokio::test]
    async fn expired_robots_can_neither_log_in_nor_use_their_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let (access, store) = service(dir.path()).await;
        store
            .create_project(
                "p",
                false,
                None,
                ProjectOrigin::Requested,
                &Actor::system("test"),
            )
            .await
            .unwrap();
        let hash = hash_password("robot-secret").unwrap();
        let soon = now_ms() + 1_000;
        store
            .create_robot(
                "p",
                "ci",
                &hash,
                &["pull".into()],
                Some(soon),
                &Actor::system("test"),
            )
            .await
            .unwrap();
        let login = || Credentials::Password {
            user: "robot$p+ci".into(),
            password: "robot-secret".into(),
        };
        let caller = access.authenticate(login(), "127.0.0.1").await.unwrap();
        let scope = Scope::parse("repository:p/app:pull,push").unwrap();
        let issued = access.issue_token(&caller, &[scope], false).await.unwrap();
        assert_eq!(
            issued.granted[0].actions,
            ["pull"],
            "robots get only their permissions"
        );
        let bearer = || Credentials::Bearer(issued.token.clone());
        assert!(access.authenticate(bearer(), "127.0.0.1").await.is_ok());
        // Expire it (the clock passes the robot's expiry).
        store
            .delete_robot("p", "ci", &Actor::system("test"))
            .await
            .unwrap();
        store
            .create_robot(
                "p",
                "ci",
                &hash,
                &["pull".into()],
                Some(now_ms() - 1),
                &Actor::system("test"),
            )
            .await
            .unwrap();
        assert!(matches!(
            access.authenticate(login(), "127.0.0.1").await,
            Err(AuthError::BadCredentials)
        ));
        // The token names the old robot's id: a new robot of the same name does not inherit it.
        assert!(matches!(
            access.authenticate(bearer(), "127.0.0.1").await,
            Err(AuthError::BadToken(TokenError::Revoked))
        ));
    }
}
