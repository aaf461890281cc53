//! Signing, in the Standard Webhooks scheme: `webhook-id`, `webhook-timestamp` (Unix
//! seconds) and `webhook-signature: v1,<base64 HMAC-SHA256>` over `id.timestamp.body`,
//! keyed by the policy's secret as UTF-8 bytes. The timestamp is inside the signed text,
//! so a receiver that refuses old timestamps (five minutes is usual) refuses replays.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "webhook-signature";
/// The header carrying the event id.
pub const ID_HEADER: &str = "webhook-id";
/// The header carrying the signing time.
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";

/// The `webhook-signature` value for `body` sent as event `id` at `timestamp`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_an_independent_hmac() {
        // `printf id.1.body | openssl dgst -sha256 -hmac key -binary | base64`
        let a = sign("key", "id", 1, b"body");
        assert_eq!(a, "v1,sYA3/+8KvyXbe4KAKZy0QWKFoLKSHDq/QWu0xQZyY7s=");
        let b = sign("key", "id", 1, b"body");
        assert_eq!(a, b);
        assert_ne!(a, sign("key", "id", 2, b"body"), "the timestamp is signed");
        assert_ne!(a, sign("key", "id2", 1, b"body"), "the id is signed");
        assert_ne!(a, sign("other", "id", 1, b"body"), "the key matters");
    }
}
