//! Credentials where the container tools keep them, so that a `docker login` (or `podman
//! login`, or `berth login`) is enough: docker's `config.json` (`$DOCKER_CONFIG` or
//! `~/.docker`) with its credential helpers (`credHelpers`, `credsStore`) and inline
//! `auths`, then the containers `auth.json` (`$REGISTRY_AUTH_FILE`,
//! `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.config/containers/auth.json`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::{ClientError, Credentials};

/// Docker's `config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".docker/config.json"))
}

fn containers_auth_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(file) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|f| !f.is_empty()) {
        paths.push(PathBuf::from(file));
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        paths.push(PathBuf::from(dir).join("containers/auth.json"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        paths.push(PathBuf::from(home).join(".config/containers/auth.json"));
    }
    paths
}

/// The keys a registry may be stored under (Docker Hub's historical URL among them).
fn keys(registry: &str) -> Vec<String> {
    let mut keys = vec![
        registry.to_owned(),
        format!("https://{registry}"),
        format!("http://{registry}"),
    ];
    if registry == "docker.io" {
        keys.push("https://index.docker.io/v1/".to_owned());
        keys.push("index.docker.io".to_owned());
    }
    keys
}

fn read_json(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// The stored credentials for `registry`, if any. Blocking (a helper is a process).
pub fn lookup(registry: &str) -> Result<Option<Credentials>, ClientError> {
    if let Some(config) = docker_config_path().and_then(|p| read_json(&p)) {
        let helper = keys(registry)
            .iter()
            .find_map(|k| config["credHelpers"][k].as_str().map(str::to_owned))
            .or_else(|| config["credsStore"].as_str().map(str::to_owned));
        if let Some(helper) = helper {
            if let Some(found) = from_helper(&helper, registry)? {
                return Ok(Some(found));
            }
        }
        if let Some(found) = from_auths(&config, registry) {
            return Ok(Some(found));
        }
    }
    for path in containers_auth_paths() {
        if let Some(found) = read_json(&path).and_then(|c| from_auths(&c, registry)) {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

fn from_auths(config: &Value, registry: &str) -> Option<Credentials> {
    keys(registry).iter().find_map(|k| {
        let entry = &config["auths"][k];
        if let Some(token) = entry["identitytoken"].as_str().filter(|t| !t.is_empty()) {
            return Some(Credentials {
                username: crate::auth::IDENTITY_TOKEN_USER.to_owned(),
                password: token.to_owned(),
            });
        }
        let encoded = entry["auth"].as_str()?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let pair = String::from_utf8(decoded).ok()?;
        let (username, password) = pair.split_once(':')?;
        Some(Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        })
    })
}

/// Asks `docker-credential-<helper> get`; `None` when it has nothing for the registry.
fn from_helper(helper: &str, registry: &str) -> Result<Option<Credentials>, ClientError> {
    if !helper
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ClientError::Protocol(format!(
            "credential helper name {helper:?} is not a plain name"
        )));
    }
    let program = format!("docker-credential-{helper}");
    let mut child = match Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            return Err(ClientError::Protocol(format!(
                "credential helper {program}: {e}"
            )))
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(registry.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| ClientError::Protocol(format!("credential helper {program}: {e}")))?;
    if !out.status.success() {
        // "credentials not found in native keychain": nothing stored for this registry.
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| ClientError::Protocol(format!("credential helper {program}: {e}")))?;
    match (value["Username"].as_str(), value["Secret"].as_str()) {
        (Some(username), Some(secret)) => Ok(Some(Credentials {
            username: username.to_owned(),
            password: secret.to_owned(),
        })),
        _ => Ok(None),
    }
}

/// Stores `credentials` for `registry` in docker's `config.json` (created readable by the
/// owner only), as `docker login` does without a helper.
pub fn store(registry: &str, credentials: &Credentials) -> Result<PathBuf, ClientError> {
    edit(|config| {
        let pair = format!("{}:{}", credentials.username, credentials.password);
        let auth = base64::engine::general_purpose::STANDARD.encode(pair);
        if !config["auths"].is_object() {
            config["auths"] = json!({});
        }
        config["auths"][registry] = json!({ "auth": auth });
        true
    })
}

/// Removes what is stored for `registry`; whether there was anything.
pub fn remove(registry: &str) -> Result<bool, ClientError> {
    let mut removed = false;
    edit(|config| {
        if let Some(auths) = config["auths"].as_object_mut() {
            for key in keys(registry) {
                removed |= auths.remove(&key).is_some();
            }
        }
        removed
    })?;
    Ok(removed)
}

/// Reads, changes and (if `change` says so) writes back docker's `config.json`, keeping
/// every other key, through a temporary file renamed into place.
fn edit(change: impl FnOnce(&mut Value) -> bool) -> Result<PathBuf, ClientError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path = docker_config_path().ok_or_else(|| {
        ClientError::Protocol("no HOME or DOCKER_CONFIG to keep credentials in".to_owned())
    })?;
    let io = |e: std::io::Error| ClientError::Protocol(format!("{}: {e}", path.display()));
    let mut config = read_json(&path).unwrap_or_else(|| json!({}));
    if !config.is_object() {
        config = json!({});
    }
    if !change(&mut config) {
        return Ok(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io)?;
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| ClientError::Protocol(e.to_string()))?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, &path).map_err(io)?;
    Ok(path)
}
