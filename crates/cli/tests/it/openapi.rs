//! The admin API against its OpenAPI description: every documented operation is called on
//! the real server, every answer's status must be documented for it, and every JSON body
//! must match the documented schema. Operations the server has but the document lacks
//! (or the reverse) fail the test.

use std::collections::BTreeSet;

use berth_auth::AuthSettings;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::auth::{push_image_as, Who};
use crate::http;

const SPEC: &str = include_str!("../../../server/api/openapi.json");

/// Checks `value` against `schema` (the subset of JSON Schema the document uses).
fn validate(spec: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        return validate(
            spec,
            &spec["components"]["schemas"][name],
            value,
            at,
            problems,
        );
    }
    if let Some(types) = schema.get("type") {
        let allowed: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let ok = allowed.contains(&actual) || (actual == "integer" && allowed.contains(&"number"));
        if !ok {
            problems.push(format!("{at}: {actual} where {allowed:?} is documented"));
            return;
        }
    }
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(value) {
            problems.push(format!("{at}: {value} is not one of {options:?}"));
        }
    }
    if let Some(required) = schema["required"].as_array() {
        for key in required.iter().filter_map(Value::as_str) {
            if value.get(key).is_none() {
                problems.push(format!("{at}: required property {key} is missing"));
            }
        }
    }
    if let (Some(properties), Some(object)) = (schema["properties"].as_object(), value.as_object())
    {
        for (key, v) in object {
            match properties.get(key) {
                Some(s) => validate(spec, s, v, &format!("{at}.{key}"), problems),
                None => problems.push(format!("{at}: undocumented property {key}")),
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            validate(spec, items, v, &format!("{at}[{i}]"), problems);
        }
    }
}

/// One call of the walk: who calls which documented operation with what.
struct Call {
    method: Method,
    template: &'static str,
    path: String,
    who: Who,
    body: Option<Value>,
    text: Option<&'static str>,
    want: StatusCode,
}

fn call(
    method: Method,
    template: &'static str,
    path: &str,
    who: &Who,
    body: Option<Value>,
    want: StatusCode,
) -> Call {
    Call {
        method,
        template,
        path: path.to_owned(),
        who: who.clone(),
        body,
        text: None,
        want,
    }
}

#[test]
fn every_documented_operation_answers_as_documented() {
    let spec: Value = serde_json::from_str(SPEC).expect("openapi.json is JSON");
    let reg = crate::start_with_auth(AuthSettings::default());
    let admin = Who::admin();
    let anonymous = Who::anonymous();
    let zoe = Who::user("zoe", "zoe-password");
    use Method as M;
    use StatusCode as S;
    // A login that keeps a refresh token, as `docker login` does, to list and revoke.
    let login = admin
        .request(
            &http(),
            M::GET,
            &format!(
                "{}/token?service=berth&offline_token=true&client_id=docker",
                reg.url()
            ),
        )
        .send()
        .unwrap();
    assert_eq!(login.status(), S::OK);
    let listed: Value = admin
        .request(
            &http(),
            M::GET,
            &format!("{}/api/v1/users/admin/tokens", reg.url()),
        )
        .send()
        .unwrap()
        .json()
        .unwrap();
    let token_id = listed["tokens"][0]["id"].as_str().unwrap().to_owned();
    let token_path = format!("/api/v1/users/admin/tokens/{token_id}");
    let calls = vec![
        call(M::GET, "/api/v1/openapi.json", "/api/v1/openapi.json", &anonymous, None, S::OK),
        call(M::POST, "/api/v1/users", "/api/v1/users", &admin, Some(json!({"name": "zoe", "password": "zoe-password"})), S::CREATED),
        call(M::POST, "/api/v1/users", "/api/v1/users", &admin, Some(json!({"name": "gen"})), S::CREATED),
        call(M::POST, "/api/v1/users", "/api/v1/users", &admin, Some(json!({"name": "zoe", "password": "zoe-password"})), S::CONFLICT),
        call(M::POST, "/api/v1/users", "/api/v1/users", &admin, Some(json!({"name": "bad name!"})), S::BAD_REQUEST),
        call(M::POST, "/api/v1/users", "/api/v1/users", &admin, Some(json!({"name": "short", "password": "1234"})), S::BAD_REQUEST),
        call(M::POST, "/api/v1/users", "/api/v1/users", &admin, Some(json!({"nom": "x"})), S::BAD_REQUEST),
        call(M::POST, "/api/v1/users", "/api/v1/users", &zoe, Some(json!({"name": "x"})), S::FORBIDDEN),
        call(M::GET, "/api/v1/users", "/api/v1/users", &admin, None, S::OK),
        call(M::GET, "/api/v1/users", "/api/v1/users", &anonymous, None, S::UNAUTHORIZED),
        call(M::GET, "/api/v1/users", "/api/v1/users", &Who::user("zoe", "wrong"), None, S::UNAUTHORIZED),
        call(M::GET, "/api/v1/users/{name}", "/api/v1/users/zoe", &zoe, None, S::OK),
        call(M::GET, "/api/v1/users/{name}", "/api/v1/users/admin", &zoe, None, S::FORBIDDEN),
        call(M::GET, "/api/v1/users/{name}", "/api/v1/users/nobody", &admin, None, S::NOT_FOUND),
        call(M::PUT, "/api/v1/users/{name}", "/api/v1/users/gen", &admin, Some(json!({"admin": false, "password": "gen-password"})), S::OK),
        call(M::PUT, "/api/v1/users/{name}", "/api/v1/users/zoe", &zoe, Some(json!({"admin": true})), S::FORBIDDEN),
        call(M::DELETE, "/api/v1/users/{name}", "/api/v1/users/gen", &admin, None, S::NO_CONTENT),
        call(M::DELETE, "/api/v1/users/{name}", "/api/v1/users/gen", &admin, None, S::NOT_FOUND),
        Call {
            text: Some("# from Distribution\nimported:$2y$05$XkuvP9aMYIv.Qf1R4lQUcuEQ1ZzqiqIWupx5hcf6jeuoLQWIsHU/q\nzoe:$2y$05$XkuvP9aMYIv.Qf1R4lQUcuEQ1ZzqiqIWupx5hcf6jeuoLQWIsHU/q\n"),
            ..call(M::POST, "/api/v1/users/import", "/api/v1/users/import", &admin, None, S::OK)
        },
        Call { text: Some("plain:{SHA}x\n"), ..call(M::POST, "/api/v1/users/import", "/api/v1/users/import", &admin, None, S::BAD_REQUEST) },
        call(M::POST, "/api/v1/projects", "/api/v1/projects", &zoe, Some(json!({"name": "zoes", "public": false})), S::CREATED),
        call(M::POST, "/api/v1/projects", "/api/v1/projects", &admin, Some(json!({"name": "zoes"})), S::CONFLICT),
        call(M::POST, "/api/v1/projects", "/api/v1/projects", &admin, Some(json!({"name": "Upper/Case"})), S::BAD_REQUEST),
        call(M::GET, "/api/v1/projects", "/api/v1/projects", &zoe, None, S::OK),
        call(M::GET, "/api/v1/projects/{name}", "/api/v1/projects/zoes", &zoe, None, S::OK),
        call(M::GET, "/api/v1/projects/{name}", "/api/v1/projects/zoes", &anonymous, None, S::UNAUTHORIZED),
        call(M::GET, "/api/v1/projects/{name}", "/api/v1/projects/ghost", &admin, None, S::NOT_FOUND),
        call(M::PUT, "/api/v1/projects/{name}", "/api/v1/projects/zoes", &zoe, Some(json!({"public": true})), S::OK),
        call(M::POST, "/api/v1/projects", "/api/v1/projects", &admin, Some(json!({"name": "mirror", "proxy_cache": {"urls": ["https://upstream.example"], "ns": "upstream.example"}})), S::CREATED),
        call(M::POST, "/api/v1/projects", "/api/v1/projects", &zoe, Some(json!({"name": "zoemirror", "proxy_cache": {"urls": ["https://upstream.example"]}})), S::FORBIDDEN),
        call(M::POST, "/api/v1/projects", "/api/v1/projects", &admin, Some(json!({"name": "local", "proxy_cache": {"urls": ["http://127.0.0.1:5000"]}})), S::BAD_REQUEST),
        call(M::GET, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/mirror/proxy-cache", &admin, None, S::OK),
        call(M::GET, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/zoes/proxy-cache", &zoe, None, S::NOT_FOUND),
        call(M::GET, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/mirror/proxy-cache", &zoe, None, S::FORBIDDEN),
        call(M::GET, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/mirror/proxy-cache", &anonymous, None, S::UNAUTHORIZED),
        call(M::PUT, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/mirror/proxy-cache", &admin, Some(json!({"urls": ["https://other.example", "https://upstream.example"], "username": "u", "password": "p", "tag_ttl_secs": 60, "ns": "upstream.example", "max_bytes": 1000000000, "idle_secs": 86400})), S::OK),
        call(M::PUT, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/zoes/proxy-cache", &zoe, Some(json!({"urls": ["https://upstream.example"]})), S::FORBIDDEN),
        call(M::PUT, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/zoes/proxy-cache", &admin, Some(json!({"urls": ["https://upstream.example"], "extra": true})), S::BAD_REQUEST),
        call(M::PUT, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/zoes/proxy-cache", &admin, Some(json!({"urls": ["https://u.example"], "ns": "upstream.example"})), S::CONFLICT),
        call(M::PUT, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/ghost/proxy-cache", &admin, Some(json!({"urls": ["https://upstream.example"]})), S::NOT_FOUND),
        call(M::PUT, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/zoes/proxy-cache", &anonymous, Some(json!({"urls": ["https://upstream.example"]})), S::UNAUTHORIZED),
        call(M::DELETE, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/mirror/proxy-cache", &zoe, None, S::FORBIDDEN),
        call(M::DELETE, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/mirror/proxy-cache", &admin, None, S::NO_CONTENT),
        call(M::DELETE, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/mirror/proxy-cache", &admin, None, S::NOT_FOUND),
        call(M::DELETE, "/api/v1/projects/{name}/proxy-cache", "/api/v1/projects/mirror/proxy-cache", &anonymous, None, S::UNAUTHORIZED),
        call(M::POST, "/api/v1/projects/{name}/members", "/api/v1/projects/zoes/members", &zoe, Some(json!({"user": "imported", "role": "guest"})), S::CREATED),
        call(M::POST, "/api/v1/projects/{name}/members", "/api/v1/projects/zoes/members", &zoe, Some(json!({"user": "imported", "role": "developer"})), S::OK),
        call(M::POST, "/api/v1/projects/{name}/members", "/api/v1/projects/zoes/members", &zoe, Some(json!({"user": "imported", "role": "owner"})), S::BAD_REQUEST),
        call(M::POST, "/api/v1/projects/{name}/members", "/api/v1/projects/zoes/members", &zoe, Some(json!({"user": "nobody", "role": "guest"})), S::NOT_FOUND),
        call(M::GET, "/api/v1/projects/{name}/members", "/api/v1/projects/zoes/members", &zoe, None, S::OK),
        call(M::PUT, "/api/v1/projects/{name}/members/{user}", "/api/v1/projects/zoes/members/imported", &zoe, Some(json!({"role": "maintainer"})), S::OK),
        call(M::PUT, "/api/v1/projects/{name}/members/{user}", "/api/v1/projects/zoes/members/imported", &Who::user("imported", "wonderland"), Some(json!({"role": "project_admin"})), S::FORBIDDEN),
        call(M::DELETE, "/api/v1/projects/{name}/members/{user}", "/api/v1/projects/zoes/members/imported", &zoe, None, S::NO_CONTENT),
        call(M::DELETE, "/api/v1/projects/{name}/members/{user}", "/api/v1/projects/zoes/members/imported", &zoe, None, S::NOT_FOUND),
        call(M::POST, "/api/v1/projects/{name}/robots", "/api/v1/projects/zoes/robots", &zoe, Some(json!({"name": "ci", "permissions": ["pull", "push"], "expires_in_days": 7})), S::CREATED),
        call(M::POST, "/api/v1/projects/{name}/robots", "/api/v1/projects/zoes/robots", &zoe, Some(json!({"name": "ci", "permissions": ["pull"]})), S::CONFLICT),
        call(M::POST, "/api/v1/projects/{name}/robots", "/api/v1/projects/zoes/robots", &zoe, Some(json!({"name": "x", "permissions": ["admin"]})), S::BAD_REQUEST),
        call(M::POST, "/api/v1/projects/{name}/robots", "/api/v1/projects/zoes/robots", &zoe, Some(json!({"name": "now", "permissions": ["pull"], "expires_in_days": 0})), S::BAD_REQUEST),
        call(M::GET, "/api/v1/projects/{name}/robots", "/api/v1/projects/zoes/robots", &zoe, None, S::OK),
        call(M::PATCH, "/api/v1/projects/{name}/robots/{robot}", "/api/v1/projects/zoes/robots/ci", &zoe, Some(json!({"expires_in_days": 30})), S::OK),
        call(M::PATCH, "/api/v1/projects/{name}/robots/{robot}", "/api/v1/projects/zoes/robots/ci", &zoe, Some(json!({"expires_in_days": null})), S::OK),
        call(M::PATCH, "/api/v1/projects/{name}/robots/{robot}", "/api/v1/projects/zoes/robots/ci", &zoe, Some(json!({"expires_in_days": -1})), S::BAD_REQUEST),
        call(M::PATCH, "/api/v1/projects/{name}/robots/{robot}", "/api/v1/projects/zoes/robots/ci", &zoe, Some(json!({"expires": 1})), S::BAD_REQUEST),
        call(M::PATCH, "/api/v1/projects/{name}/robots/{robot}", "/api/v1/projects/zoes/robots/nobody", &zoe, Some(json!({"expires_in_days": 1})), S::NOT_FOUND),
        call(M::PATCH, "/api/v1/projects/{name}/robots/{robot}", "/api/v1/projects/zoes/robots/ci", &anonymous, Some(json!({"expires_in_days": 1})), S::UNAUTHORIZED),
        call(M::DELETE, "/api/v1/projects/{name}/robots/{robot}", "/api/v1/projects/zoes/robots/ci", &zoe, None, S::NO_CONTENT),
        call(M::DELETE, "/api/v1/projects/{name}/robots/{robot}", "/api/v1/projects/zoes/robots/ci", &zoe, None, S::NOT_FOUND),
        call(M::GET, "/api/v1/users/{name}/tokens", "/api/v1/users/admin/tokens", &admin, None, S::OK),
        call(M::GET, "/api/v1/users/{name}/tokens", "/api/v1/users/admin/tokens", &zoe, None, S::FORBIDDEN),
        call(M::GET, "/api/v1/users/{name}/tokens", "/api/v1/users/zoe/tokens", &zoe, None, S::OK),
        call(M::DELETE, "/api/v1/users/{name}/tokens/{id}", &token_path, &zoe, None, S::FORBIDDEN),
        call(M::DELETE, "/api/v1/users/{name}/tokens/{id}", &token_path, &admin, None, S::NO_CONTENT),
        call(M::DELETE, "/api/v1/users/{name}/tokens/{id}", &token_path, &admin, None, S::NOT_FOUND),
        call(M::DELETE, "/api/v1/users/{name}/tokens/{id}", &token_path, &anonymous, None, S::UNAUTHORIZED),
        call(M::POST, "/api/v1/registries", "/api/v1/registries", &admin, Some(json!({"name": "far", "url": "https://registry.example", "username": "bot", "password": "secret"})), S::CREATED),
        call(M::POST, "/api/v1/registries", "/api/v1/registries", &admin, Some(json!({"name": "far", "url": "https://registry.example"})), S::CONFLICT),
        call(M::POST, "/api/v1/registries", "/api/v1/registries", &admin, Some(json!({"name": "near", "url": "http://127.0.0.1:5000"})), S::BAD_REQUEST),
        call(M::POST, "/api/v1/registries", "/api/v1/registries", &zoe, Some(json!({"name": "zoes", "url": "https://registry.example"})), S::FORBIDDEN),
        call(M::POST, "/api/v1/registries", "/api/v1/registries", &anonymous, Some(json!({"name": "x", "url": "https://registry.example"})), S::UNAUTHORIZED),
        call(M::GET, "/api/v1/registries", "/api/v1/registries", &admin, None, S::OK),
        call(M::GET, "/api/v1/registries", "/api/v1/registries", &zoe, None, S::FORBIDDEN),
        call(M::GET, "/api/v1/registries", "/api/v1/registries", &anonymous, None, S::UNAUTHORIZED),
        call(M::GET, "/api/v1/registries/{name}", "/api/v1/registries/far", &admin, None, S::OK),
        call(M::GET, "/api/v1/registries/{name}", "/api/v1/registries/ghost", &admin, None, S::NOT_FOUND),
        call(M::GET, "/api/v1/registries/{name}", "/api/v1/registries/far", &zoe, None, S::FORBIDDEN),
        call(M::GET, "/api/v1/registries/{name}", "/api/v1/registries/far", &anonymous, None, S::UNAUTHORIZED),
        call(M::PUT, "/api/v1/registries/{name}", "/api/v1/registries/far", &admin, Some(json!({"url": "https://registry.example", "username": "bot", "insecure": true})), S::OK),
        call(M::PUT, "/api/v1/registries/{name}", "/api/v1/registries/far", &admin, Some(json!({"url": "http://10.1.2.3"})), S::BAD_REQUEST),
        call(M::PUT, "/api/v1/registries/{name}", "/api/v1/registries/ghost", &admin, Some(json!({"url": "https://registry.example"})), S::NOT_FOUND),
        call(M::PUT, "/api/v1/registries/{name}", "/api/v1/registries/far", &zoe, Some(json!({"url": "https://registry.example"})), S::FORBIDDEN),
        call(M::PUT, "/api/v1/registries/{name}", "/api/v1/registries/far", &anonymous, Some(json!({"url": "https://registry.example"})), S::UNAUTHORIZED),
        call(M::POST, "/api/v1/registries/{name}/ping", "/api/v1/registries/ghost/ping", &admin, None, S::NOT_FOUND),
        call(M::POST, "/api/v1/registries/{name}/ping", "/api/v1/registries/far/ping", &zoe, None, S::FORBIDDEN),
        call(M::POST, "/api/v1/registries/{name}/ping", "/api/v1/registries/far/ping", &anonymous, None, S::UNAUTHORIZED),
        call(M::POST, "/api/v1/replication/policies", "/api/v1/replication/policies", &admin, Some(json!({"name": "out", "direction": "push", "registry": "far", "source": "zoes/**", "destination_namespace": "copies", "trigger": "cron:0 3 * * *", "filters": {"tags": ["v*"], "tag_regex": "v[0-9.]+", "artifact_types": ["application/vnd.oci.image.config.v1+json"], "annotations": {"org.example.team": "core"}}, "override": false, "bandwidth_bytes_per_sec": 10000000, "concurrency": 4})), S::CREATED),
        call(M::POST, "/api/v1/replication/policies", "/api/v1/replication/policies", &admin, Some(json!({"name": "out", "direction": "push", "registry": "far", "source": "zoes/**"})), S::CONFLICT),
        call(M::POST, "/api/v1/replication/policies", "/api/v1/replication/policies", &admin, Some(json!({"name": "in", "direction": "pull", "registry": "ghost", "source": "library/*"})), S::NOT_FOUND),
        call(M::POST, "/api/v1/replication/policies", "/api/v1/replication/policies", &admin, Some(json!({"name": "in", "direction": "pull", "registry": "far", "source": "library/*", "trigger": "event"})), S::BAD_REQUEST),
        call(M::POST, "/api/v1/replication/policies", "/api/v1/replication/policies", &zoe, Some(json!({"name": "in", "direction": "pull", "registry": "far", "source": "x"})), S::FORBIDDEN),
        call(M::POST, "/api/v1/replication/policies", "/api/v1/replication/policies", &anonymous, Some(json!({"name": "in", "direction": "pull", "registry": "far", "source": "x"})), S::UNAUTHORIZED),
        call(M::GET, "/api/v1/replication/policies", "/api/v1/replication/policies", &admin, None, S::OK),
        call(M::GET, "/api/v1/replication/policies", "/api/v1/replication/policies", &zoe, None, S::FORBIDDEN),
        call(M::GET, "/api/v1/replication/policies", "/api/v1/replication/policies", &anonymous, None, S::UNAUTHORIZED),
        call(M::GET, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/out", &admin, None, S::OK),
        call(M::GET, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/ghost", &admin, None, S::NOT_FOUND),
        call(M::GET, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/out", &zoe, None, S::FORBIDDEN),
        call(M::GET, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/out", &anonymous, None, S::UNAUTHORIZED),
        call(M::PUT, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/out", &admin, Some(json!({"direction": "push", "registry": "far", "source": "zoes/**", "trigger": "manual", "enabled": true})), S::OK),
        call(M::PUT, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/out", &admin, Some(json!({"direction": "push", "registry": "far", "source": "zoes/**", "trigger": "cron:* * *"})), S::BAD_REQUEST),
        call(M::PUT, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/ghost", &admin, Some(json!({"direction": "push", "registry": "far", "source": "x"})), S::NOT_FOUND),
        call(M::PUT, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/out", &zoe, Some(json!({"direction": "push", "registry": "far", "source": "x"})), S::FORBIDDEN),
        call(M::PUT, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/out", &anonymous, Some(json!({"direction": "push", "registry": "far", "source": "x"})), S::UNAUTHORIZED),
        call(M::POST, "/api/v1/replication/policies/{name}/executions", "/api/v1/replication/policies/out/executions", &admin, None, S::CREATED),
        call(M::POST, "/api/v1/replication/policies/{name}/executions", "/api/v1/replication/policies/ghost/executions", &admin, None, S::NOT_FOUND),
        call(M::POST, "/api/v1/replication/policies/{name}/executions", "/api/v1/replication/policies/out/executions", &zoe, None, S::FORBIDDEN),
        call(M::POST, "/api/v1/replication/policies/{name}/executions", "/api/v1/replication/policies/out/executions", &anonymous, None, S::UNAUTHORIZED),
        call(M::GET, "/api/v1/replication/policies/{name}/executions", "/api/v1/replication/policies/out/executions?n=5", &admin, None, S::OK),
        call(M::GET, "/api/v1/replication/policies/{name}/executions", "/api/v1/replication/policies/out/executions?n=0", &admin, None, S::BAD_REQUEST),
        call(M::GET, "/api/v1/replication/policies/{name}/executions", "/api/v1/replication/policies/ghost/executions", &admin, None, S::NOT_FOUND),
        call(M::GET, "/api/v1/replication/policies/{name}/executions", "/api/v1/replication/policies/out/executions", &zoe, None, S::FORBIDDEN),
        call(M::GET, "/api/v1/replication/policies/{name}/executions", "/api/v1/replication/policies/out/executions", &anonymous, None, S::UNAUTHORIZED),
        call(M::DELETE, "/api/v1/registries/{name}", "/api/v1/registries/far", &admin, None, S::CONFLICT),
        call(M::DELETE, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/out", &zoe, None, S::FORBIDDEN),
        call(M::DELETE, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/out", &anonymous, None, S::UNAUTHORIZED),
        call(M::DELETE, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/out", &admin, None, S::NO_CONTENT),
        call(M::DELETE, "/api/v1/replication/policies/{name}", "/api/v1/replication/policies/out", &admin, None, S::NOT_FOUND),
        call(M::DELETE, "/api/v1/registries/{name}", "/api/v1/registries/far", &zoe, None, S::FORBIDDEN),
        call(M::DELETE, "/api/v1/registries/{name}", "/api/v1/registries/far", &anonymous, None, S::UNAUTHORIZED),
        call(M::DELETE, "/api/v1/registries/{name}", "/api/v1/registries/far", &admin, None, S::NO_CONTENT),
        call(M::DELETE, "/api/v1/registries/{name}", "/api/v1/registries/far", &admin, None, S::NOT_FOUND),
        call(M::GET, "/api/v1/audit", "/api/v1/audit?limit=5&action=user.create", &admin, None, S::OK),
        call(M::GET, "/api/v1/audit", "/api/v1/audit?limit=x", &admin, None, S::BAD_REQUEST),
        call(M::GET, "/api/v1/audit", "/api/v1/audit", &zoe, None, S::FORBIDDEN),
        call(M::POST, "/api/v1/gc", "/api/v1/gc?dry_run=true", &admin, None, S::OK),
        call(M::POST, "/api/v1/gc", "/api/v1/gc", &zoe, None, S::FORBIDDEN),
        call(M::POST, "/api/v1/gc", "/api/v1/gc?dry_run=maybe", &admin, None, S::BAD_REQUEST),
        call(M::GET, "/api/v1/search", "/api/v1/search?q=zoe", &anonymous, None, S::OK),
        call(M::GET, "/api/v1/search", "/api/v1/search", &anonymous, None, S::BAD_REQUEST),
        call(M::GET, "/api/v1/search", "/api/v1/search?q=x", &Who::user("zoe", "nope"), None, S::UNAUTHORIZED),
        call(M::POST, "/api/v1/webhooks", "/api/v1/webhooks", &admin, Some(json!({"name": "all", "url": "https://hooks.example.com/in", "events": ["push", "delete"], "format": "distribution", "secret": "s"})), S::CREATED),
        call(M::POST, "/api/v1/webhooks", "/api/v1/webhooks", &admin, Some(json!({"name": "all", "url": "https://hooks.example.com/in", "events": ["push"]})), S::CONFLICT),
        call(M::POST, "/api/v1/webhooks", "/api/v1/webhooks", &admin, Some(json!({"name": "meta", "url": "http://169.254.169.254/", "events": ["push"]})), S::BAD_REQUEST),
        call(M::POST, "/api/v1/webhooks", "/api/v1/webhooks", &zoe, Some(json!({"name": "z", "url": "https://hooks.example.com/", "events": ["push"]})), S::FORBIDDEN),
        call(M::GET, "/api/v1/webhooks", "/api/v1/webhooks", &admin, None, S::OK),
        call(M::GET, "/api/v1/webhooks", "/api/v1/webhooks", &anonymous, None, S::UNAUTHORIZED),
        call(M::GET, "/api/v1/webhooks/{hook}", "/api/v1/webhooks/all", &admin, None, S::OK),
        call(M::PUT, "/api/v1/webhooks/{hook}", "/api/v1/webhooks/all", &admin, Some(json!({"enabled": false})), S::OK),
        call(M::GET, "/api/v1/webhooks/{hook}/deliveries", "/api/v1/webhooks/all/deliveries?n=10", &admin, None, S::OK),
        call(M::POST, "/api/v1/webhooks/{hook}/deliveries/{event}/redeliver", "/api/v1/webhooks/all/deliveries/1/redeliver", &admin, None, S::NOT_FOUND),
        call(M::DELETE, "/api/v1/webhooks/{hook}", "/api/v1/webhooks/all", &admin, None, S::NO_CONTENT),
        call(M::POST, "/api/v1/projects/{name}/webhooks", "/api/v1/projects/zoes/webhooks", &zoe, Some(json!({"name": "ci", "url": "https://hooks.example.com/zoe", "events": ["push"], "format": "harbor"})), S::CREATED),
        call(M::POST, "/api/v1/projects/{name}/webhooks", "/api/v1/projects/nowhere/webhooks", &admin, Some(json!({"name": "ci", "url": "https://hooks.example.com/", "events": ["push"]})), S::NOT_FOUND),
        call(M::GET, "/api/v1/projects/{name}/webhooks", "/api/v1/projects/zoes/webhooks", &zoe, None, S::OK),
        call(M::GET, "/api/v1/projects/{name}/webhooks/{hook}", "/api/v1/projects/zoes/webhooks/ci", &zoe, None, S::OK),
        call(M::PUT, "/api/v1/projects/{name}/webhooks/{hook}", "/api/v1/projects/zoes/webhooks/ci", &zoe, Some(json!({"events": ["x"]})), S::BAD_REQUEST),
        call(M::GET, "/api/v1/projects/{name}/webhooks/{hook}/deliveries", "/api/v1/projects/zoes/webhooks/ci/deliveries", &zoe, None, S::OK),
        call(M::POST, "/api/v1/projects/{name}/webhooks/{hook}/deliveries/{event}/redeliver", "/api/v1/projects/zoes/webhooks/ci/deliveries/x/redeliver", &zoe, None, S::BAD_REQUEST),
        call(M::DELETE, "/api/v1/projects/{name}/webhooks/{hook}", "/api/v1/projects/zoes/webhooks/ci", &zoe, None, S::NO_CONTENT),
        // Projects holding repositories cannot be removed.
        call(M::DELETE, "/api/v1/projects/{name}", "/api/v1/projects/zoes", &zoe, None, S::CONFLICT),
        call(M::GET, "/api/v1/projects/{name}/repositories", "/api/v1/projects/zoes/repositories", &zoe, None, S::OK),
        call(M::GET, "/api/v1/projects/{name}/repositories", "/api/v1/projects/zoes/repositories?n=1&last=zoes%2Fa", &admin, None, S::OK),
        call(M::GET, "/api/v1/projects/{name}/repositories", "/api/v1/projects/zoes/repositories?n=0", &zoe, None, S::BAD_REQUEST),
        call(M::GET, "/api/v1/projects/{name}/repositories", "/api/v1/projects/zoes/repositories", &Who::user("zoe", "nope"), None, S::UNAUTHORIZED),
        call(M::DELETE, "/api/v1/repositories/{repository}", "/api/v1/repositories/zoes/app", &Who::user("imported", "wonderland"), None, S::FORBIDDEN),
        call(M::DELETE, "/api/v1/repositories/{repository}", "/api/v1/repositories/zoes/app", &anonymous, None, S::UNAUTHORIZED),
        call(M::DELETE, "/api/v1/repositories/{repository}", "/api/v1/repositories/zoes/app", &zoe, None, S::OK),
        call(M::DELETE, "/api/v1/repositories/{repository}", "/api/v1/repositories/zoes/app", &zoe, None, S::NOT_FOUND),
        call(M::DELETE, "/api/v1/repositories/{repository}", "/api/v1/repositories/zoes/..%2Fapp", &zoe, None, S::BAD_REQUEST),
    ];
    let mut exercised = BTreeSet::new();
    let mut problems = Vec::new();
    let push_before = calls
        .iter()
        .position(|c| c.method == M::DELETE && c.path == "/api/v1/projects/zoes")
        .unwrap();
    for (i, c) in calls.iter().enumerate() {
        if i == push_before {
            push_image_as(&reg, &zoe, "zoes/app", "v1", b"zoe's layer");
        }
        let mut request = c.who.request(
            &http(),
            c.method.clone(),
            &format!("{}{}", reg.url(), c.path),
        );
        if let Some(body) = &c.body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        if let Some(text) = c.text {
            request = request.header("content-type", "text/plain").body(text);
        }
        let r = request.send().unwrap();
        let status = r.status();
        let challenge = r.headers().get("www-authenticate").cloned();
        let text = r.text().unwrap();
        let label = format!(
            "{} {} as {:?}",
            c.method,
            c.path,
            c.who.0.as_ref().map(|w| &w.0)
        );
        assert_eq!(status, c.want, "{label}: {text}");
        if status == S::UNAUTHORIZED {
            assert!(challenge.is_some(), "{label}: 401 without a challenge");
        }
        let operation = &spec["paths"][c.template][c.method.as_str().to_lowercase()];
        assert!(
            operation.is_object(),
            "{} {} is not documented",
            c.method,
            c.template
        );
        exercised.insert((c.template.to_owned(), c.method.as_str().to_lowercase()));
        let documented = &operation["responses"][status.as_str()];
        if !documented.is_object() {
            problems.push(format!("{label}: status {status} is not documented"));
            continue;
        }
        if let Some(schema) = documented.pointer("/content/application~1json/schema") {
            match serde_json::from_str::<Value>(&text) {
                Ok(value) => validate(&spec, schema, &value, &label, &mut problems),
                Err(e) => problems.push(format!("{label}: body is not JSON ({e}): {text}")),
            }
        }
        if c.path == "/api/v1/openapi.json" {
            assert_eq!(text, SPEC, "the served document is the file");
        }
    }
    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "parameters")
                .map(move |m| (path.clone(), m.clone()))
        })
        .collect();
    let missing: Vec<_> = documented.difference(&exercised).collect();
    assert!(
        missing.is_empty(),
        "documented but not exercised: {missing:?}"
    );
    assert!(
        problems.is_empty(),
        "answers that do not match the document:\n{}",
        problems.join("\n")
    );
    // The imported htpasswd user logs in with the password it had in Distribution.
    let r = Who::user("imported", "wonderland")
        .request(&http(), M::GET, &format!("{}/v2/", reg.url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), S::OK);
}
