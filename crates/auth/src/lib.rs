//! Who may do what. Users, projects (the first path segment of repository names) with
//! members in roles, robot accounts, password hashing, the Docker token flow's signed
//! JWTs, login rate limits and the audit trail.
//!
//! [`AccessControl::authorize`] is the single place that decides whether a caller may do
//! something: the HTTP edge calls it for every `/v2` request, and every account
//! operation here calls it first. The rules themselves are pure functions in [`policy`].
//! No HTTP here: credentials come in as [`Credentials`], answers go out as values and
//! [`AuthError`]s.

mod access;
mod accounts;
pub mod audit;
mod limiter;
mod logins;
pub mod password;
pub mod policy;
mod recent;
pub mod scope;
pub mod time;
pub mod token;
mod tokens;

use std::time::Duration;

use berth_meta::MetaError;

pub use access::{
    AccessControl, AuthCounters, Credentials, Grant, IssuedToken, Need, ProjectToCreate,
};
pub use accounts::{robot_login, Accounts, ImportOutcome, NewRobot, NewUser, ROBOT_PREFIX};
pub use audit::Outcome;
/// The account records whose meaning this crate owns (the metadata store keeps them).
pub use berth_meta::{
    AuditFilter, AuditRecord, MemberRecord, ProjectRecord, RefreshTokenRecord, RobotRecord,
    UserRecord,
};
pub use limiter::LoginLimiter;
pub use logins::Logins;
pub use policy::{Caller, Permission, Permissions, Principal, Proof, Role};
pub use scope::Scope;
pub use token::{verifying_key_from_pem, IssuerKey, TokenError, TokenSigner, TokenVerifier};
pub use tokens::Tokens;

/// How the registry authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Everyone may do everything: Distribution's default. For trusted networks only.
    Disabled,
    /// Berth's own users, projects and token service.
    Builtin,
    /// Berth only checks tokens issued by an external service (Distribution's
    /// `auth.token`); their `access` claims are all a caller may do.
    ExternalToken,
}

/// Authentication settings.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Which mode.
    pub mode: AuthMode,
    /// The service name tokens are issued for (`aud`), announced in challenges.
    pub service: String,
    /// The issuer tokens name (`iss`).
    pub issuer: String,
    /// The token endpoint's absolute URL for challenges; `None` derives it from the
    /// request's host (`http://<host>/token`).
    pub realm: Option<String>,
    /// Lifetime of access tokens.
    pub token_ttl: Duration,
    /// Lifetime of refresh tokens (docker's stored "identity token").
    pub refresh_ttl: Duration,
    /// Whether a user may create a project by pushing to it (becoming its project admin).
    pub create_projects_on_push: bool,
    /// Failed logins allowed per name and per address within the window.
    pub max_login_failures: u32,
    /// The rate-limit window.
    pub login_failure_window: Duration,
    /// Whether every manifest pull is audited (as Harbor does). Registries serving
    /// thousands of pulls a second may turn it off; pushes, deletes, logins and account
    /// changes are always audited.
    pub audit_pulls: bool,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            mode: AuthMode::Builtin,
            service: "berth".into(),
            issuer: "berth".into(),
            realm: None,
            token_ttl: Duration::from_secs(300),
            refresh_ttl: Duration::from_secs(30 * 86_400),
            create_projects_on_push: true,
            max_login_failures: 10,
            login_failure_window: Duration::from_secs(300),
            audit_pulls: true,
        }
    }
}

/// Why an authentication or account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credentials where some are needed.
    #[error("authentication required")]
    Unauthenticated,
    /// Wrong name or password, unknown or expired robot.
    #[error("invalid username or password")]
    BadCredentials,
    /// Too many failed logins for this name or from this address.
    #[error("too many failed logins; retry in {retry_after_secs} s")]
    RateLimited {
        /// Seconds until logins are accepted again.
        retry_after_secs: u64,
    },
    /// A bearer token was refused.
    #[error("invalid token: {0}")]
    BadToken(#[from] TokenError),
    /// The token is valid but does not grant this; a new token may.
    #[error("the token does not grant {0}")]
    InsufficientScope(String),
    /// The caller is known and may not do this.
    #[error("access denied: {0}")]
    Denied(String),
    /// Bad input: a malformed name, an unknown role, a weak password.
    #[error("{0}")]
    Invalid(String),
    /// The named user, project, member or robot does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The name is taken, or the project still holds repositories.
    #[error("{0}")]
    Conflict(String),
    /// The operation needs a mode the registry is not in (tokens without the builtin
    /// token service).
    #[error("{0}")]
    Unavailable(String),
    /// Key handling or randomness failed.
    #[error("crypto: {0}")]
    Crypto(String),
    /// The store failed.
    #[error(transparent)]
    Meta(MetaError),
}

impl From<MetaError> for AuthError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Conflict(m) | MetaError::NotEmpty(m) => AuthError::Conflict(m),
            MetaError::NotFound(m) => AuthError::NotFound(m),
            other => AuthError::Meta(other),
        }
    }
}
