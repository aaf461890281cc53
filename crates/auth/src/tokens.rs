//! Bearer tokens as a service: issued by the token endpoint for what a caller may do,
//! and what a presented one proves. (`token` is their format: claims, signing, checking.)

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_meta::RefreshTokenRecord;
use berth_oci::RepoName;

use crate::access::*;
use crate::audit::Outcome;
use crate::policy::{
    project_of, robot_permissions, Caller, Permission, Permissions, Principal, Proof,
};
use crate::recent::Recent;
use crate::scope::Scope;
use crate::time::now_ms;
use crate::token::{Claims, ResourceAccess, TokenError, TokenSubject};
use crate::{AuthError, AuthMode, ROBOT_PREFIX};

/// A bearer token a thread checked lately (filed by [`token_key`] and the token), and
/// what it proved.
type RecentToken = Recent<(u64, Box<str>), Proved>;

/// What a bearer token proved, as [`Tokens::verify_token`] answers it; `access` is the
/// thread's own copy, so that its reference count stays in this thread's cache.
struct Proved {
    principal: Principal,
    access: Arc<[ResourceAccess]>,
    /// The token's expiry, in seconds since the epoch.
    expires: i64,
    /// The account's own expiry (robots), in milliseconds: it passes without a change
    /// to the store, so it is checked on every use, as the record is.
    account_expires_ms: Option<i64>,
}

thread_local! {
    static RECENT_TOKENS: RefCell<RecentToken> = const { RefCell::new(Recent::new()) };
}

/// Tokens in the Docker token format: issued for what a caller may do, and verified
/// (signature, audience, expiry, and the account's current password generation).
pub struct Tokens<'a> {
    pub(crate) access: &'a AccessControl,
}

impl Tokens<'_> {
    /// Checks a bearer (or, with `refresh`, a refresh) token presented by `address`.
    pub(crate) async fn check_token(
        &self,
        token: &str,
        address: String,
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
                address,
            }),
            Err(e) => {
                let caller = Caller::anonymous(&address);
                let detail = e.to_string();
                Box::pin(
                    self.access
                        .record(&caller, "token", "", Outcome::Failed, &detail),
                )
                .await;
                Err(e)
            }
        }
    }

    async fn verify_token(
        &self,
        token: &str,
        refresh: bool,
    ) -> Result<(Principal, std::sync::Arc<[ResourceAccess]>), AuthError> {
        if let Some(proved) = self.recently_proved(token, refresh) {
            return Ok(proved);
        }
        // Boxed: the full check's future is kilobytes, and every request with a token
        // carries this one inline, where the answer above is almost always found.
        Box::pin(self.verify_token_fully(token, refresh)).await
    }

    /// What this thread proved of `token` lately, if nothing changed since.
    fn recently_proved(
        &self,
        token: &str,
        refresh: bool,
    ) -> Option<(Principal, std::sync::Arc<[ResourceAccess]>)> {
        let store = &self.access.inner.store;
        // Refresh tokens are looked up in the store on every use, so never kept here.
        if refresh || !store.node_local() || self.access.inner.verifier.is_none() {
            return None;
        }
        let now = now_secs();
        let key = token_key(token);
        let is = |k: &(u64, Box<str>)| k.0 == key && *k.1 == *token;
        RECENT_TOKENS.with_borrow(|r| {
            r.get(self.access.inner.serial, store.access_changes(), is)
                .filter(|p| now < p.expires)
                .filter(|p| p.account_expires_ms.is_none_or(|e| now_ms() < e))
                .map(|p| (p.principal.clone(), p.access.clone()))
        })
    }

    async fn verify_token_fully(
        &self,
        token: &str,
        refresh: bool,
    ) -> Result<(Principal, std::sync::Arc<[ResourceAccess]>), AuthError> {
        let Some(verifier) = &self.access.inner.verifier else {
            return Err(AuthError::Unauthenticated);
        };
        let now = now_secs();
        let key = token_key(token);
        let store = &self.access.inner.store;
        let recent = !refresh && store.node_local();
        let owner = self.access.inner.serial;
        let changes = store.access_changes();
        let is = |k: &(u64, Box<str>)| k.0 == key && *k.1 == *token;
        let began = Instant::now();
        let cached = self
            .access
            .inner
            .tokens
            .lock()
            .ok()
            .and_then(|c| c.get(&key).filter(|v| *v.token == *token).cloned());
        let verified = match cached {
            Some(v) if now < v.claims.exp => v,
            Some(_) => return Err(TokenError::Expired.into()),
            None => {
                let claims = verifier.verify(token, now)?;
                let verified = std::sync::Arc::new(VerifiedToken {
                    token: token.into(),
                    access: claims.access.clone().into(),
                    claims,
                });
                if let Ok(mut cache) = self.access.inner.tokens.lock() {
                    if cache.len() >= CACHE_LIMIT {
                        cache.clear();
                    }
                    cache.insert(key, verified.clone());
                }
                verified
            }
        };
        let claims = &verified.claims;
        if claims.typ.as_deref() == Some("refresh") && !refresh
            || claims.typ.as_deref() != Some("refresh") && refresh
        {
            return Err(TokenError::WrongKind.into());
        }
        let (principal, account_expires_ms) =
            if self.access.inner.settings.mode == AuthMode::ExternalToken {
                let subject = claims.sub.clone();
                (Principal::External { subject }, None)
            } else {
                self.token_principal(claims).await?
            };
        if refresh {
            // A refresh token is good only while its record lives: revoked (or issued
            // before records were kept) means refused.
            let recorded = self
                .access
                .inner
                .store
                .use_refresh_token(&claims.jti)
                .await?;
            if recorded.is_none_or(|r| r.subject != claims.sub) {
                return Err(AuthError::BadToken(TokenError::Revoked));
            }
        }
        if recent {
            let proved = Proved {
                principal: principal.clone(),
                access: verified.access.iter().cloned().collect(),
                expires: verified.claims.exp,
                account_expires_ms,
            };
            RECENT_TOKENS
                .with_borrow_mut(|r| r.put(owner, (key, token.into()), proved, changes, began, is));
        }
        Ok((principal, verified.access.clone()))
    }

    /// The live account behind a token berth issued: refused if it was removed, or (for
    /// users) changed its password since, or (for robots) expired. With the account's
    /// expiry, if it has one.
    async fn token_principal(
        &self,
        claims: &Claims,
    ) -> Result<(Principal, Option<i64>), AuthError> {
        let revoked = || AuthError::BadToken(TokenError::Revoked);
        let Some(subject) = &claims.berth else {
            return Err(revoked());
        };
        match subject.kind.as_str() {
            "anonymous" => Ok((Principal::Anonymous, None)),
            "user" => {
                let user = self
                    .access
                    .inner
                    .user_record(&claims.sub)
                    .await?
                    .ok_or_else(revoked)?;
                if user.id != subject.id || user.generation != subject.generation {
                    return Err(revoked());
                }
                let principal = Principal::User {
                    id: user.id,
                    name: user.name.clone(),
                    admin: user.admin,
                };
                Ok((principal, None))
            }
            "robot" => {
                let (project, name) = claims
                    .sub
                    .strip_prefix(ROBOT_PREFIX)
                    .and_then(|r| r.split_once('+'))
                    .ok_or_else(revoked)?;
                let robot = self
                    .access
                    .inner
                    .robot_record(project, name)
                    .await?
                    .ok_or_else(revoked)?;
                if robot.id != subject.id || robot.expires_ms.is_some_and(|e| e <= now_ms()) {
                    return Err(revoked());
                }
                let principal = Principal::Robot {
                    id: robot.id,
                    name: claims.sub.clone(),
                    project: robot.project.clone(),
                    permissions: robot_permissions(&robot.permissions).unwrap_or(Permissions::NONE),
                };
                Ok((principal, robot.expires_ms))
            }
            _ => Err(revoked()),
        }
    }

    /// The token endpoint: a token granting what the caller asked for and may do. Never
    /// an error for scopes the caller may not use: those are simply not granted (the
    /// registry then answers the request with 401/403), as the Docker token spec says.
    ///
    /// With `offline_for` (a login asking for offline access: `docker login`), a refresh
    /// token for that client is issued too and recorded, so that it can be listed and
    /// revoked. A refresh grant never asks for one: a login holds one refresh token for
    /// its lifetime, instead of every refresh minting another.
    pub async fn issue(
        &self,
        caller: &Caller,
        scopes: &[Scope],
        offline_for: Option<&str>,
    ) -> Result<IssuedToken, AuthError> {
        let Some(signer) = &self.access.inner.signer else {
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
                        .access
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
        let settings = &self.access.inner.settings;
        let mut subject = token_subject(&caller.principal);
        if let Principal::User { name, .. } = &caller.principal {
            if let Some(user) = self.access.inner.store.user(name).await? {
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
        let refresh_token = match offline_for {
            Some(client) if caller.principal != Principal::Anonymous => {
                let refresh = claims(settings.refresh_ttl, Vec::new(), Some("refresh"))?;
                let record = RefreshTokenRecord {
                    id: refresh.jti.clone(),
                    subject: caller.principal.actor().to_owned(),
                    subject_kind: subject.kind.clone(),
                    subject_id: subject.id,
                    client: printable(client, 64),
                    address: printable(&caller.address, 64),
                    created_ms: issued_at_ms,
                    expires_ms: issued_at_ms
                        .saturating_add(settings.refresh_ttl.as_millis() as i64),
                    last_used_ms: issued_at_ms,
                };
                let token = signer.sign(&refresh)?;
                self.access
                    .inner
                    .store
                    .record_refresh_token(&record)
                    .await?;
                Some(token)
            }
            _ => None,
        };
        let counters = &self.access.inner.counters;
        counters
            .tokens_issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(IssuedToken {
            token,
            expires_in: settings.token_ttl.as_secs(),
            issued_at_ms,
            refresh_token,
            granted,
        })
    }
}

/// At most `max` characters of `text`, control characters dropped: client-chosen text
/// kept in the store and shown to administrators.
fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
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
