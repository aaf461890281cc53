//! OCI error bodies. The only place that knows the spec's error codes and which HTTP
//! status each domain fault gets.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_auth::AuthError;
use berth_meta::MetaError;
use berth_oci::ParseError;
use berth_registry::RegistryError;
use berth_storage::StorageError;
use berth_webhooks::WebhookError;
use serde_json::json;

/// The error codes of the distribution spec (plus `UNKNOWN` for server faults, as
/// Distribution answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Blob upload invalid.
    BlobUploadInvalid,
    /// Blob upload unknown to registry.
    BlobUploadUnknown,
    /// Provided digest did not match uploaded content.
    DigestInvalid,
    /// Manifest references a manifest or blob unknown to registry.
    ManifestBlobUnknown,
    /// Manifest invalid.
    ManifestInvalid,
    /// Manifest unknown to registry.
    ManifestUnknown,
    /// Invalid repository name.
    NameInvalid,
    /// Repository name not known to registry.
    NameUnknown,
    /// Provided length did not match content length.
    SizeInvalid,
    /// The operation is unsupported.
    Unsupported,
    /// Authentication required.
    Unauthorized,
    /// Requested access to the resource is denied.
    Denied,
    /// Too many requests.
    TooManyRequests,
    /// Admin API only: the request is malformed.
    BadRequest,
    /// Admin API only: the named user, project, member or robot does not exist.
    NotFound,
    /// Admin API only: the name is taken, or the project is not empty.
    Conflict,
    /// A server-side fault; no detail is given to the client.
    Unknown,
}

impl Code {
    /// The code as it appears in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::Unsupported => "UNSUPPORTED",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::BadRequest => "BAD_REQUEST",
            Code::NotFound => "NOT_FOUND",
            Code::Conflict => "CONFLICT",
            Code::Unknown => "UNKNOWN",
        }
    }
}

/// Seconds a client is asked to wait after a backend outage.
pub const RETRY_AFTER_SECS: u64 = 5;

/// An error response in the spec's `{"errors":[{code,message,detail}]}` form.
#[derive(Debug)]
pub struct OciError {
    status: StatusCode,
    code: Code,
    message: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl OciError {
    /// An error with a client-facing message.
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        OciError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// A server fault: logged here with its cause, answered without detail.
    pub fn internal(cause: &dyn std::error::Error) -> Self {
        tracing::error!(error = %cause, "internal error");
        OciError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unknown,
            "internal server error",
        )
    }

    /// A backend outage: logged, answered `503` with a retry hint. Nothing was changed.
    pub fn unavailable(cause: &dyn std::error::Error) -> Self {
        tracing::warn!(error = %cause, "backend unavailable");
        OciError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unknown,
            "a storage backend is unavailable; retry later",
        )
        .with_header(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())
    }

    /// A full disk: logged, answered `507 Insufficient Storage` saying so. Nothing was
    /// kept of what the request wrote; retrying helps only once space is freed.
    pub fn storage_full(cause: &dyn std::error::Error) -> Self {
        tracing::error!(error = %cause, "storage full");
        OciError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            Code::Unknown,
            "the registry's storage is full: nothing was stored; retry once an operator has freed space",
        )
        .with_header(header::RETRY_AFTER, "60".to_owned())
    }

    /// Adds a header to the response (`Range`, `Content-Range`).
    pub fn with_header(mut self, name: HeaderName, value: String) -> Self {
        if let Ok(v) = HeaderValue::from_str(&value) {
            self.headers.push((name, v));
        }
        self
    }

    /// The HTTP status, for tests and logs.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<ParseError> for OciError {
    fn from(e: ParseError) -> Self {
        let (status, code) = match &e {
            ParseError::Digest { .. } => (StatusCode::BAD_REQUEST, Code::DigestInvalid),
            ParseError::Name { .. } => (StatusCode::BAD_REQUEST, Code::NameInvalid),
            ParseError::Tag { .. } => (StatusCode::BAD_REQUEST, Code::ManifestInvalid),
            ParseError::Manifest { .. } => (StatusCode::BAD_REQUEST, Code::ManifestInvalid),
            ParseError::UnsupportedManifest { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, Code::Unsupported)
            }
        };
        OciError::new(status, code, e.to_string())
    }
}

impl From<RegistryError> for OciError {
    fn from(e: RegistryError) -> Self {
        use RegistryError as E;
        let (status, code) = match &e {
            E::BlobUnknown { .. } => (StatusCode::NOT_FOUND, Code::BlobUnknown),
            E::UploadUnknown { .. } => (StatusCode::NOT_FOUND, Code::BlobUploadUnknown),
            E::UploadOutOfOrder { expected, .. } => {
                let range = if *expected == 0 {
                    "0-0".to_owned()
                } else {
                    format!("0-{}", expected - 1)
                };
                return OciError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    Code::BlobUploadInvalid,
                    e.to_string(),
                )
                .with_header(header::RANGE, range);
            }
            E::DigestMismatch { .. } => (StatusCode::BAD_REQUEST, Code::DigestInvalid),
            E::Invalid(_) => {
                let E::Invalid(parse) = e else {
                    unreachable!("matched above")
                };
                return parse.into();
            }
            E::ManifestUnknown { .. } => (StatusCode::NOT_FOUND, Code::ManifestUnknown),
            E::ManifestBlobUnknown { .. } => (StatusCode::BAD_REQUEST, Code::ManifestBlobUnknown),
            E::ManifestTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, Code::ManifestInvalid),
            E::NameUnknown { .. } => (StatusCode::NOT_FOUND, Code::NameUnknown),
            E::RangeNotSatisfiable { size } => {
                let content_range = format!("bytes */{size}");
                return OciError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    Code::SizeInvalid,
                    e.to_string(),
                )
                .with_header(header::CONTENT_RANGE, content_range);
            }
            E::BodyInterrupted(_) => (StatusCode::BAD_REQUEST, Code::BlobUploadInvalid),
            E::JobRunning { .. } => (StatusCode::CONFLICT, Code::Conflict),
            E::TooManyUploads { .. } => (StatusCode::TOO_MANY_REQUESTS, Code::TooManyRequests),
            E::BlobBusy { .. } => {
                return OciError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::Unknown,
                    e.to_string(),
                )
                .with_header(header::RETRY_AFTER, "1".to_owned());
            }
            E::Meta(MetaError::Unavailable(_)) | E::Storage(StorageError::Unavailable(_)) => {
                return OciError::unavailable(&e)
            }
            E::Meta(MetaError::Full(_)) => return OciError::storage_full(&e),
            E::Storage(s) if s.is_full() => return OciError::storage_full(&e),
            E::Storage(_) | E::Meta(_) => return OciError::internal(&e),
        };
        OciError::new(status, code, e.to_string())
    }
}

impl From<AuthError> for OciError {
    fn from(e: AuthError) -> Self {
        use AuthError as E;
        let (status, code) = match &e {
            E::Unauthenticated | E::BadCredentials | E::BadToken(_) => {
                (StatusCode::UNAUTHORIZED, Code::Unauthorized)
            }
            // RFC 6750 §3.1: a valid token without the scope is forbidden, and the
            // challenge (added by the edge) names the scope to ask for.
            E::InsufficientScope(_) => (StatusCode::FORBIDDEN, Code::Denied),
            E::RateLimited { retry_after_secs } => {
                let retry = retry_after_secs.to_string();
                return OciError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    Code::TooManyRequests,
                    e.to_string(),
                )
                .with_header(header::RETRY_AFTER, retry);
            }
            E::Denied(_) => (StatusCode::FORBIDDEN, Code::Denied),
            E::Invalid(_) => (StatusCode::BAD_REQUEST, Code::BadRequest),
            E::NotFound(_) => (StatusCode::NOT_FOUND, Code::NotFound),
            E::Conflict(_) => (StatusCode::CONFLICT, Code::Conflict),
            E::Unavailable(_) => (StatusCode::NOT_FOUND, Code::Unsupported),
            E::Meta(MetaError::Unavailable(_)) => return OciError::unavailable(&e),
            E::Meta(MetaError::Full(_)) => return OciError::storage_full(&e),
            E::Crypto(_) | E::Meta(_) => return OciError::internal(&e),
        };
        OciError::new(status, code, e.to_string())
    }
}

impl From<WebhookError> for OciError {
    fn from(e: WebhookError) -> Self {
        use WebhookError as E;
        let (status, code) = match &e {
            E::Invalid(_) | E::Outbound(_) => (StatusCode::BAD_REQUEST, Code::BadRequest),
            E::Meta(MetaError::NotFound(_)) => (StatusCode::NOT_FOUND, Code::NotFound),
            E::Meta(MetaError::Conflict(_)) => (StatusCode::CONFLICT, Code::Conflict),
            E::Meta(MetaError::Unavailable(_)) => return OciError::unavailable(&e),
            E::Meta(MetaError::Full(_)) => return OciError::storage_full(&e),
            E::Meta(_) => return OciError::internal(&e),
        };
        OciError::new(status, code, e.to_string())
    }
}

impl From<berth_replication::ReplicationError> for OciError {
    fn from(e: berth_replication::ReplicationError) -> Self {
        use berth_replication::ReplicationError as E;
        let (status, code) = match e {
            E::Registry(e) => return OciError::from(e),
            E::Invalid(_) | E::Refused(_) => (StatusCode::BAD_REQUEST, Code::BadRequest),
            E::NotFound(_) => (StatusCode::NOT_FOUND, Code::NotFound),
            E::Conflict(_) => (StatusCode::CONFLICT, Code::Conflict),
            // The other registry's answer, made printable by the client.
            E::Remote(_) => (StatusCode::BAD_GATEWAY, Code::Unknown),
            E::Meta(MetaError::Unavailable(_)) => return OciError::unavailable(&e),
            E::Meta(MetaError::Full(_)) => return OciError::storage_full(&e),
            E::Meta(_) => return OciError::internal(&e),
        };
        OciError::new(status, code, e.to_string())
    }
}

impl IntoResponse for OciError {
    fn into_response(self) -> Response {
        let body = json!({ "errors": [{ "code": self.code.as_str(), "message": self.message, "detail": null }] });
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        response.headers_mut().extend(self.headers);
        response
    }
}
