//! Docker registry tokens: JSON Web Tokens whose `access` claim lists what the bearer may
//! do (the Docker token specification). berth signs with ES256; tokens of an external
//! issuer may also be RS256. The header's `alg` must be exactly the trusted key's
//! algorithm: `none`, HMAC and any other are refused before any claim is read, so a forged
//! header cannot choose how it is checked.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::AuthError;

/// Why a token was refused. Each is answered with 401; the reason is logged and audited.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts of JSON.
    #[error("malformed token")]
    Malformed,
    /// The header names an algorithm other than ES256 (including `none`).
    #[error("unsupported signing algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The signature does not verify with the trusted key.
    #[error("bad signature")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not valid yet")]
    NotYetValid,
    /// `iss` is not the trusted issuer.
    #[error("token issued by {0:?}, not by the trusted issuer")]
    WrongIssuer(String),
    /// `aud` does not name this registry's service.
    #[error("token is for another service")]
    WrongAudience,
    /// The account it was issued to was removed, or changed its password since.
    #[error("the account behind this token was removed or changed its password")]
    Revoked,
    /// A refresh token where an access token is needed, or the reverse.
    #[error("wrong kind of token")]
    WrongKind,
}

/// One entry of the `access` claim: `actions` on the resource `type:name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceAccess {
    /// `repository` or `registry`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The repository name, or `catalog`.
    pub name: String,
    /// `pull`, `push`, `delete` or `*`.
    pub actions: Vec<String>,
}

/// Which local account a token was issued to, so that removing the account (or changing
/// its password) revokes the token at once rather than at expiry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSubject {
    /// `user`, `robot` or `anonymous`.
    pub kind: String,
    /// The account's id (0 for anonymous).
    pub id: i64,
    /// The user's password generation at issue time (0 for robots and anonymous).
    #[serde(default)]
    pub generation: i64,
}

/// The claims berth issues and checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Subject: the account name, empty for anonymous.
    pub sub: String,
    /// Audience: the registry's service name (a string or a list in JSON).
    #[serde(with = "audience")]
    pub aud: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Not before, seconds since the epoch.
    pub nbf: i64,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Unique id.
    pub jti: String,
    /// What the bearer may do.
    #[serde(default)]
    pub access: Vec<ResourceAccess>,
    /// The local account, for tokens berth issued itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub berth: Option<TokenSubject>,
    /// `refresh` for refresh tokens (docker's offline tokens); absent for access tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
}

mod audience {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(aud: &[String], s: S) -> Result<S::Ok, S::Error> {
        match aud {
            [one] => s.serialize_str(one),
            many => s.collect_seq(many),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(a) => vec![a],
            OneOrMany::Many(a) => a,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

fn key_id(key: &VerifyingKey) -> String {
    let der = key
        .to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default();
    let hash = Sha256::digest(&der);
    hash[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// The registry's own signing key.
pub struct TokenSigner {
    key: SigningKey,
    kid: String,
}

impl TokenSigner {
    /// A fresh random P-256 key.
    pub fn generate() -> Result<Self, AuthError> {
        loop {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| AuthError::Crypto(e.to_string()))?;
            // Fails only for the (astronomically rare) out-of-range scalars: draw again.
            if let Ok(key) = SigningKey::from_slice(&bytes) {
                return Ok(Self::from_key(key));
            }
        }
    }

    /// Reads a PKCS#8 PEM private key (`openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`).
    pub fn from_pem(pem: &str) -> Result<Self, AuthError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self::from_key)
            .map_err(|e| AuthError::Crypto(format!("reading the token signing key: {e}")))
    }

    fn from_key(key: SigningKey) -> Self {
        let kid = key_id(key.verifying_key());
        TokenSigner { key, kid }
    }

    /// The key as PKCS#8 PEM, to keep it across restarts.
    pub fn to_pem(&self) -> Result<String, AuthError> {
        self.key
            .to_pkcs8_pem(Default::default())
            .map(|s| s.to_string())
            .map_err(|e| AuthError::Crypto(e.to_string()))
    }

    /// The public half as SPKI PEM, for resource servers that trust berth's tokens.
    pub fn public_pem(&self) -> Result<String, AuthError> {
        self.key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .map_err(|e| AuthError::Crypto(e.to_string()))
    }

    /// The public key that verifies this signer's tokens.
    pub fn verifying_key(&self) -> VerifyingKey {
        *self.key.verifying_key()
    }

    /// Encodes and signs `claims` as a compact JWS.
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        let header = Header {
            alg: "ES256".into(),
            typ: Some("JWT".into()),
            kid: Some(self.kid.clone()),
        };
        let header = serde_json::to_vec(&header).map_err(|e| AuthError::Crypto(e.to_string()))?;
        let claims = serde_json::to_vec(claims).map_err(|e| AuthError::Crypto(e.to_string()))?;
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature: Signature = self.key.sign(signing_input.as_bytes());
        // Low-s form: the only one verifiers accept (see `IssuerKey::verify`).
        let signature = signature.normalize_s().unwrap_or(signature);
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        ))
    }
}

/// A public key that checks tokens, with the one algorithm it accepts.
#[derive(Clone, Debug)]
pub enum IssuerKey {
    /// ECDSA P-256 with SHA-256: berth's own tokens, and issuers that use EC keys.
    Es256(VerifyingKey),
    /// RSA PKCS#1 v1.5 with SHA-256: the common choice of external token services.
    Rs256(rsa::pkcs1v15::VerifyingKey<Sha256>),
}

impl IssuerKey {
    fn algorithm(&self) -> &'static str {
        match self {
            IssuerKey::Es256(_) => "ES256",
            IssuerKey::Rs256(_) => "RS256",
        }
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), TokenError> {
        match self {
            IssuerKey::Es256(key) => {
                let signature =
                    Signature::from_slice(signature).map_err(|_| TokenError::BadSignature)?;
                // (r, n - s) verifies as well as (r, s): accepting both would give one
                // token two spellings. Only the low-s form, which berth signs, is valid.
                if signature.normalize_s().is_some() {
                    return Err(TokenError::BadSignature);
                }
                key.verify(message, &signature)
                    .map_err(|_| TokenError::BadSignature)
            }
            IssuerKey::Rs256(key) => {
                let signature = rsa::pkcs1v15::Signature::try_from(signature)
                    .map_err(|_| TokenError::BadSignature)?;
                key.verify(message, &signature)
                    .map_err(|_| TokenError::BadSignature)
            }
        }
    }
}

impl From<VerifyingKey> for IssuerKey {
    fn from(key: VerifyingKey) -> Self {
        IssuerKey::Es256(key)
    }
}

/// Reads a PEM public key (SPKI, or PKCS#1 for RSA): the key of an external token issuer.
pub fn verifying_key_from_pem(pem: &str) -> Result<IssuerKey, AuthError> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    if let Ok(key) = VerifyingKey::from_public_key_pem(pem) {
        return Ok(IssuerKey::Es256(key));
    }
    rsa::RsaPublicKey::from_public_key_pem(pem)
        .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem))
        .map(|key| IssuerKey::Rs256(rsa::pkcs1v15::VerifyingKey::new(key)))
        .map_err(|e| {
            AuthError::Crypto(format!(
                "reading the token issuer's public key (P-256 or RSA): {e}"
            ))
        })
}

/// Checks tokens from one issuer for one service.
#[derive(Clone)]
pub struct TokenVerifier {
    key: IssuerKey,
    issuer: String,
    service: String,
}

/// Clock skew tolerated on `nbf`.
const LEEWAY_SECS: i64 = 30;

impl TokenVerifier {
    /// Trusts tokens signed by `key`, issued by `issuer` for `service`.
    pub fn new(key: impl Into<IssuerKey>, issuer: &str, service: &str) -> Self {
        TokenVerifier {
            key: key.into(),
            issuer: issuer.to_owned(),
            service: service.to_owned(),
        }
    }

    /// Verifies the signature first, then the claims, at `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| TokenError::Malformed)
        };
        let parsed: Header =
            serde_json::from_slice(&decode(header)?).map_err(|_| TokenError::Malformed)?;
        if parsed.alg != self.key.algorithm() {
            return Err(TokenError::UnsupportedAlgorithm(parsed.alg));
        }
        let signing_input = &token[..header.len() + 1 + payload.len()];
        self.key
            .verify(signing_input.as_bytes(), &decode(signature)?)?;
        let claims: Claims =
            serde_json::from_slice(&decode(payload)?).map_err(|_| TokenError::Malformed)?;
        if claims.iss != self.issuer {
            return Err(TokenError::WrongIssuer(claims.iss));
        }
        if !claims.aud.iter().any(|a| a == &self.service) {
            return Err(TokenError::WrongAudience);
        }
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        if claims.nbf > now + LEEWAY_SECS {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> Claims {
        Claims {
            iss: "berth".into(),
            sub: "alice".into(),
            aud: vec!["registry".into()],
            exp: now + 300,
            nbf: now,
            iat: now,
            jti: "1".into(),
            access: vec![ResourceAccess {
                kind: "repository".into(),
                name: "team/app".into(),
                actions: vec!["pull".into()],
            }],
            berth: None,
            typ: None,
        }
    }

    #[test]
    fn signs_and_verifies() {
        let signer = TokenSigner::generate().unwrap();
        let verifier = TokenVerifier::new(signer.verifying_key(), "berth", "registry");
        let token = signer.sign(&claims(1000)).unwrap();
        assert_eq!(verifier.verify(&token, 1001).unwrap(), claims(1000));
        assert_eq!(verifier.verify(&token, 1300), Err(TokenError::Expired));
        assert_eq!(verifier.verify(&token, 900), Err(TokenError::NotYetValid));
        let other = TokenVerifier::new(signer.verifying_key(), "berth", "elsewhere");
        assert_eq!(other.verify(&token, 1001), Err(TokenError::WrongAudience));
        let other = TokenVerifier::new(signer.verifying_key(), "someone", "registry");
        assert!(matches!(
            other.verify(&token, 1001),
            Err(TokenError::WrongIssuer(_))
        ));
        let stranger = TokenSigner::generate().unwrap();
        let other = TokenVerifier::new(stranger.verifying_key(), "berth", "registry");
        assert_eq!(other.verify(&token, 1001), Err(TokenError::BadSignature));
    }

    #[test]
    fn signs_low_s_and_refuses_the_high_s_twin_of_a_valid_signature() {
        let signer = TokenSigner::generate().unwrap();
        let verifier = TokenVerifier::new(signer.verifying_key(), "berth", "registry");
        for i in 0..16 {
            let token = signer.sign(&claims(1000 + i)).unwrap();
            assert!(verifier.verify(&token, 1001 + i).is_ok());
            let (input, signature) = token.rsplit_once('.').unwrap();
            let signature =
                Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).unwrap()).unwrap();
            assert!(signature.normalize_s().is_none(), "berth signs low-s");
            // The twin: s replaced by n - s.
            let (r, s) = signature.split_scalars();
            let twin = Signature::from_scalars(r, -*s).unwrap();
            let forged = format!("{input}.{}", URL_SAFE_NO_PAD.encode(twin.to_bytes()));
            assert_eq!(
                verifier.verify(&forged, 1001 + i),
                Err(TokenError::BadSignature)
            );
        }
    }

    #[test]
    fn refuses_tampering_and_alg_none() {
        let signer = TokenSigner::generate().unwrap();
        let verifier = TokenVerifier::new(signer.verifying_key(), "berth", "registry");
        let token = signer.sign(&claims(1000)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut forged = claims(1000);
        forged.access[0].actions.push("push".into());
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(
            verifier.verify(&tampered, 1001),
            Err(TokenError::BadSignature)
        );
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let unsigned = format!("{none_header}.{forged_payload}.");
        assert_eq!(
            verifier.verify(&unsigned, 1001),
            Err(TokenError::UnsupportedAlgorithm("none".into()))
        );
        assert_eq!(verifier.verify("a.b", 1001), Err(TokenError::Malformed));
        assert_eq!(verifier.verify("", 1001), Err(TokenError::Malformed));
    }

    /// A 2048-bit RSA key made with `openssl genpkey` for these tests only.
    const TEST_RSA_KEY: &str = include_str!("../testdata/test-rsa-key.pem");

    #[test]
    fn external_rs256_tokens_verify_and_cannot_pass_as_es256() {
        use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
        use rsa::signature::{SignatureEncoding, Signer};
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(TEST_RSA_KEY).unwrap();
        let public_pem = private
            .to_public_key()
            .to_public_key_pem(Default::default())
            .unwrap();
        let key = verifying_key_from_pem(&public_pem).unwrap();
        assert!(matches!(key, IssuerKey::Rs256(_)));
        let verifier = TokenVerifier::new(key, "berth", "registry");
        let sign = |alg: &str| {
            let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(1000)).unwrap());
            let input = format!("{header}.{payload}");
            let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new(private.clone());
            let signature = signer.sign(input.as_bytes()).to_bytes();
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
        };
        assert_eq!(verifier.verify(&sign("RS256"), 1001).unwrap(), claims(1000));
        assert_eq!(
            verifier.verify(&sign("ES256"), 1001),
            Err(TokenError::UnsupportedAlgorithm("ES256".into())),
            "the algorithm is the key's, not the header's"
        );
        let es = TokenSigner::generate()
            .unwrap()
            .sign(&claims(1000))
            .unwrap();
        assert!(verifier.verify(&es, 1001).is_err());
        let mut tampered = sign("RS256");
        tampered.insert(tampered.len() - 5, 'A');
        assert!(verifier.verify(&tampered, 1001).is_err());
    }

    #[test]
    fn keys_survive_pem() {
        let signer = TokenSigner::generate().unwrap();
        let again = TokenSigner::from_pem(&signer.to_pem().unwrap()).unwrap();
        let IssuerKey::Es256(public) =
            verifying_key_from_pem(&signer.public_pem().unwrap()).unwrap()
        else {
            panic!("a P-256 key");
        };
        assert_eq!(again.verifying_key(), public);
        let token = again.sign(&claims(5)).unwrap();
        assert!(TokenVerifier::new(public, "berth", "registry")
            .verify(&token, 6)
            .is_ok());
    }
}
