//! Logins: passwords and robot secrets, checked, cached, rate-limited and audited.

use std::time::Instant;

use sha2::{Digest as _, Sha256};

use crate::access::*;
use crate::audit::{self, Outcome};
use crate::password::PasswordCheck;
use crate::policy::{robot_permissions, Caller, Permissions, Principal, Proof};
use crate::time::now_ms;
use crate::{AuthError, AuthMode, ROBOT_PREFIX};

/// Logins: who is calling, from the credentials a request carries. Passwords and robot
/// secrets are checked with Argon2id (a success is remembered for a minute), failures are
/// counted per name and per address and locked out past the limit, and every outcome is
/// audited. Bearer tokens are handed to [`crate::Tokens`].
pub struct Logins<'a> {
    pub(crate) access: &'a AccessControl,
}

impl Logins<'_> {
    /// Checks credentials. Failures are counted by the rate limiter and audited. The
    /// address is taken as given (owned, it becomes the caller's without a copy: this
    /// runs for every request).
    pub async fn authenticate(
        &self,
        credentials: Credentials<'_>,
        address: impl Into<String>,
    ) -> Result<Caller, AuthError> {
        let address = address.into();
        match credentials {
            Credentials::None => Ok(Caller::anonymous(address)),
            _ if !self.access.enabled() => Ok(Caller::anonymous(address)),
            // Boxed: its future is kilobytes and a bearer check's is not; every request
            // carries this one inline.
            Credentials::Password { user, password } => {
                Box::pin(self.check_password(&user, &password, &address)).await
            }
            Credentials::Bearer(token) => {
                self.access
                    .tokens()
                    .check_token(&token, address, false)
                    .await
            }
            Credentials::Refresh(token) => {
                self.access
                    .tokens()
                    .check_token(&token, address, true)
                    .await
            }
        }
    }

    async fn check_password(
        &self,
        user: &str,
        password: &str,
        address: &str,
    ) -> Result<Caller, AuthError> {
        if self.access.inner.settings.mode != AuthMode::Builtin {
            return Err(AuthError::Unauthenticated);
        }
        let now = Instant::now();
        let locked = self.access.inner.limiter.lock().ok().map(|mut l| {
            l.check(user, address, now)
                .map_err(|wait| (wait, l.count_refusal(address, now)))
        });
        if let Some(Err((wait, report))) = locked {
            let counters = &self.access.inner.counters;
            counters
                .logins_locked_out
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let retry_after_secs = wait.as_secs().max(1);
            if let Some(refusals) = report {
                let detail = match refusals {
                    1 => "rate limited".to_owned(),
                    n => format!("rate limited: {n} attempts refused in the last minute"),
                };
                self.access
                    .inner
                    .audit
                    .record(audit::login_event(user, address, Outcome::Denied, &detail))
                    .await;
            }
            return Err(AuthError::RateLimited { retry_after_secs });
        }
        let cache_key = self.password_cache_key(user, password);
        let cached = self.cached_password(&cache_key);
        let principal = match self.resolve_password(user, password, cached).await? {
            Some((principal, proven)) => {
                if cached.is_none() {
                    let counters = &self.access.inner.counters;
                    counters
                        .logins_succeeded
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.remember_password(cache_key, proven);
                    self.access
                        .inner
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
                if let Ok(mut l) = self.access.inner.limiter.lock() {
                    l.record_success(user, address);
                }
                principal
            }
            None => {
                let counters = &self.access.inner.counters;
                counters
                    .logins_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(mut l) = self.access.inner.limiter.lock() {
                    l.record_failure(user, address, Instant::now());
                }
                self.access
                    .inner
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
        h.update(self.access.inner.cache_key);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn cached_password(&self, key: &[u8; 32]) -> Option<Proven> {
        let cache = self.access.inner.passwords.lock().ok()?;
        cache
            .get(key)
            .filter(|(_, at)| at.elapsed() < PASSWORD_CACHE_TTL)
            .map(|(p, _)| *p)
    }

    fn remember_password(&self, key: [u8; 32], proven: Proven) {
        if let Ok(mut cache) = self.access.inner.passwords.lock() {
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
            let Some(record) = self.access.inner.store.robot(project, name).await? else {
                return Ok(None);
            };
            if record.expires_ms.is_some_and(|e| e <= now_ms()) {
                return Ok(None);
            }
            let proven = match cached {
                Some(Proven::Robot { id }) if id == record.id => true,
                _ => {
                    self.access.verify(&record.secret_hash, password).await?
                        != PasswordCheck::Invalid
                }
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
        let Some(record) = self.access.inner.store.user(user).await? else {
            // Spend the same time as a real check, so absent names are not revealed by timing.
            self.access.hash(password).await?;
            return Ok(None);
        };
        let proven = match cached {
            Some(Proven::User { id, generation })
                if id == record.id && generation == record.generation =>
            {
                true
            }
            _ => match self.access.verify(&record.password_hash, password).await? {
                PasswordCheck::Invalid => false,
                PasswordCheck::Valid => true,
                PasswordCheck::ValidNeedsRehash => {
                    if let Ok(hash) = self.access.hash(password).await {
                        self.access
                            .inner
                            .store
                            .rehash_password(record.id, &hash)
                            .await?;
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
}
