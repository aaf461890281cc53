//! A proxy cache's settings as the API takes and shows them (and as they are stored):
//! JSON with the config file's names. Every field is bounded; unknown ones are refused.

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::{ProxyError, ProxySettings, DEFAULT_TAG_TTL};

/// The most mirror URLs one cache takes, and the longest a string may be.
const MAX_URLS: usize = 8;
const MAX_TEXT: usize = 2048;

impl ProxySettings {
    /// The stored (and API) form; with the password, which [`ProxySettings::shown`] leaves out.
    pub fn to_json(&self) -> Value {
        json!({
            "urls": self.urls,
            "username": self.username,
            "password": self.password,
            "tag_ttl_secs": self.tag_ttl.as_secs(),
            "ns": self.ns,
            "docker_mirror": self.docker_mirror,
            "rate_limit_reserve": self.rate_limit_reserve,
            "max_concurrent_fetches": self.max_concurrent_fetches,
            "max_bytes": self.max_bytes,
            "idle_secs": self.idle.map(|d| d.as_secs()),
        })
    }

    /// What the API shows: everything but the password (`"password_set"` says whether
    /// there is one).
    pub fn shown(&self) -> Value {
        let mut value = self.to_json();
        if let Some(fields) = value.as_object_mut() {
            fields.remove("password");
            fields.insert("password_set".to_owned(), self.password.is_some().into());
            fields.insert("project".to_owned(), self.project.clone().into());
        }
        value
    }

    /// Settings for `project` from their JSON form; absent fields take the defaults.
    pub fn from_json(project: &str, bytes: &[u8]) -> Result<ProxySettings, ProxyError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| ProxyError::Invalid(format!("proxy cache settings: {e}")))?;
        Self::from_value(project, &value)
    }

    /// [`ProxySettings::from_json`] of a parsed value.
    pub fn from_value(project: &str, value: &Value) -> Result<ProxySettings, ProxyError> {
        let invalid = |what: &str| ProxyError::Invalid(format!("proxy cache settings: {what}"));
        let fields: &Map<String, Value> = value
            .as_object()
            .ok_or_else(|| invalid("expected an object"))?;
        const KNOWN: [&str; 10] = [
            "urls",
            "username",
            "password",
            "tag_ttl_secs",
            "ns",
            "docker_mirror",
            "rate_limit_reserve",
            "max_concurrent_fetches",
            "max_bytes",
            "idle_secs",
        ];
        if let Some(unknown) = fields.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            let shown: String = unknown.chars().take(64).collect();
            return Err(invalid(&format!("unknown field {shown:?}")));
        }
        let text = |name: &str| -> Result<Option<String>, ProxyError> {
            match fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_TEXT => {
                    Ok(Some(s.clone()))
                }
                Some(_) => Err(invalid(&format!(
                    "{name}: a string of 1 to {MAX_TEXT} bytes"
                ))),
            }
        };
        let number = |name: &str| -> Result<Option<u64>, ProxyError> {
            match fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| invalid(&format!("{name}: a whole number"))),
            }
        };
        let urls: Vec<String> = fields
            .get("urls")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("urls: a list of upstream base URLs"))?
            .iter()
            .map(|u| {
                u.as_str()
                    .filter(|u| !u.is_empty() && u.len() <= MAX_TEXT)
                    .map(str::to_owned)
                    .ok_or_else(|| invalid("urls: strings of 1 to 2048 bytes"))
            })
            .collect::<Result<_, _>>()?;
        if urls.is_empty() || urls.len() > MAX_URLS {
            return Err(invalid(&format!("urls: 1 to {MAX_URLS} of them")));
        }
        let mut settings = ProxySettings::new(project, urls);
        settings.username = text("username")?;
        settings.password = text("password")?;
        settings.tag_ttl = number("tag_ttl_secs")?.map_or(DEFAULT_TAG_TTL, Duration::from_secs);
        settings.ns = text("ns")?;
        settings.docker_mirror = match fields.get("docker_mirror") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("docker_mirror: true or false")),
        };
        settings.rate_limit_reserve = number("rate_limit_reserve")?.unwrap_or(0);
        if let Some(n) = number("max_concurrent_fetches")? {
            if n == 0 || n > 1024 {
                return Err(invalid("max_concurrent_fetches: 1 to 1024"));
            }
            settings.max_concurrent_fetches = n as usize;
        }
        settings.max_bytes = number("max_bytes")?;
        settings.idle = match number("idle_secs")? {
            Some(0) => return Err(invalid("idle_secs: above 0")),
            secs => secs.map(Duration::from_secs),
        };
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_hostile_ones_are_refused() {
        let mut s = ProxySettings::new("hub", vec!["https://upstream.example".to_owned()]);
        s.username = Some("u".to_owned());
        s.password = Some("p".to_owned());
        s.idle = Some(Duration::from_secs(60));
        let back = ProxySettings::from_value("hub", &s.to_json()).unwrap();
        assert_eq!(back, s);
        assert!(s.shown().get("password").is_none());
        assert_eq!(s.shown()["password_set"], true);
        for bad in [
            json!({}),
            json!({"urls": []}),
            json!({"urls": ["x"], "extra": 1}),
            json!({"urls": ["x"], "tag_ttl_secs": -1}),
            json!({"urls": ["x"], "idle_secs": 0}),
            json!({"urls": ["x"], "max_concurrent_fetches": 0}),
            json!({"urls": ["x"], "username": "a".repeat(5000)}),
            json!({"urls": vec!["https://a.example"; 9]}),
            json!({"urls": ["x"], "docker_mirror": "yes"}),
        ] {
            assert!(ProxySettings::from_value("hub", &bad).is_err(), "{bad}");
        }
    }
}
