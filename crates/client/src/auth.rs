//! Authentication as registries ask for it: a 401's `WWW-Authenticate` challenge says
//! Basic (send the credentials) or Bearer (fetch a token from the realm for the service
//! and scope, with the credentials if any, and cache it per scope until it expires).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::ClientError;

/// The user name docker's credential stores give an identity (refresh) token under.
pub const IDENTITY_TOKEN_USER: &str = "<token>";

/// A user name and password for one registry; with the user name `<token>`, the password
/// is an identity (refresh) token, as docker stores them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The `Authorization: Basic` value.
    pub(crate) fn basic(&self) -> String {
        let pair = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }
}

/// What a 401 asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// HTTP Basic.
    Basic,
    /// A bearer token from `realm`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses a `WWW-Authenticate` value (`Bearer realm="…",service="…",scope="…"`).
    pub(crate) fn parse(header: &str) -> Option<Challenge> {
        let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut values: HashMap<String, String> = HashMap::new();
        let mut rest = params;
        while let Some((key, after)) = rest.split_once('=') {
            let key = key
                .trim()
                .trim_start_matches(',')
                .trim()
                .to_ascii_lowercase();
            let after = after.trim_start();
            let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (&after[..end], &after[end..])
            };
            values.insert(key, value.to_owned());
            rest = remaining;
        }
        Some(Challenge::Bearer {
            realm: values.remove("realm")?,
            service: values.remove("service"),
            scope: values.remove("scope"),
        })
    }
}

/// Tokens by scope, until they expire (with a margin).
#[derive(Default)]
pub(crate) struct TokenCache {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

/// The most of a token endpoint's answer read: tokens are a few kilobytes.
const MAX_TOKEN_ANSWER: usize = 256 * 1024;

/// How long a token is trusted when the issuer does not say (the spec's default is 60 s).
const DEFAULT_TTL: Duration = Duration::from_secs(60);

impl TokenCache {
    pub(crate) fn get(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().ok()?;
        let (token, until) = tokens.get(scope)?;
        (Instant::now() < *until).then(|| token.clone())
    }

    fn put(&self, scope: &str, token: String, ttl: Duration) {
        if let Ok(mut tokens) = self.tokens.lock() {
            // Renewed ten seconds early, so a token does not expire in flight.
            let until = Instant::now() + ttl.saturating_sub(Duration::from_secs(10));
            tokens.insert(scope.to_owned(), (token, until));
        }
    }

    /// Fetches a token for `scope` from the challenge's realm.
    pub(crate) async fn fetch(
        &self,
        http: &reqwest::Client,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        credentials: Option<&Credentials>,
    ) -> Result<String, ClientError> {
        let mut url = url::Url::parse(realm)
            .map_err(|e| ClientError::Protocol(format!("token realm {realm:?}: {e}")))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for one in scope.split(' ').filter(|s| !s.is_empty()) {
                query.append_pair("scope", one);
            }
        }
        let request = match credentials {
            // An identity (refresh) token, as `docker login` keeps for token registries:
            // exchanged with the OAuth2 grant rather than sent as a password.
            Some(c) if c.username == IDENTITY_TOKEN_USER => {
                let mut form = vec![
                    ("grant_type", "refresh_token".to_owned()),
                    ("refresh_token", c.password.clone()),
                    ("client_id", "berth".to_owned()),
                    ("scope", scope.to_owned()),
                ];
                if let Some(service) = service {
                    form.push(("service", service.to_owned()));
                }
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
                    .finish();
                let realm_only = url::Url::parse(realm)
                    .map_err(|e| ClientError::Protocol(format!("token realm {realm:?}: {e}")))?;
                http.post(realm_only.as_str())
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body)
            }
            Some(c) => http.get(url.as_str()).header("authorization", c.basic()),
            None => http.get(url.as_str()),
        };
        let response = request.send().await.map_err(ClientError::unreachable)?;
        let status = response.status();
        if !status.is_success() {
            let message = crate::read_bounded(response, MAX_TOKEN_ANSWER, realm)
                .await
                .unwrap_or_default();
            let message = String::from_utf8_lossy(&message);
            return Err(ClientError::from_status(status.as_u16(), &message, realm));
        }
        let bytes = crate::read_bounded(response, MAX_TOKEN_ANSWER, realm).await?;
        let body: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("token endpoint answer: {e}")))?;
        let token = body["token"]
            .as_str()
            .or(body["access_token"].as_str())
            .ok_or_else(|| ClientError::Protocol("token endpoint answered no token".to_owned()))?
            .to_owned();
        let ttl = body["expires_in"]
            .as_u64()
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TTL);
        self.put(scope, token.clone(), ttl);
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_as_registries_send_them() {
        assert_eq!(
            Challenge::parse("Basic realm=\"registry\""),
            Some(Challenge::Basic)
        );
        assert_eq!(
            Challenge::parse(
                "Bearer realm=\"https://auth.example.com/token\",service=\"registry\",scope=\"repository:a/b:pull,push\""
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example.com/token".to_owned(),
                service: Some("registry".to_owned()),
                scope: Some("repository:a/b:pull,push".to_owned()),
            })
        );
        assert_eq!(Challenge::parse("Negotiate abc"), None);
        assert_eq!(Challenge::parse("Bearer service=\"x\""), None, "no realm");
    }

    #[test]
    fn credentials_never_show_their_password() {
        let c = Credentials {
            username: "ci".to_owned(),
            password: "hunter2".to_owned(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.basic(), "Basic Y2k6aHVudGVyMg==");
    }
}
