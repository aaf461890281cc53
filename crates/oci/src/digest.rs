//! Content digests (`algorithm:encoded`), the identity of every blob and manifest.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

use crate::ParseError;

/// The hash algorithms the spec registers. Anything else is refused as `DIGEST_INVALID`,
/// because berth could not verify the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// The default everywhere.
    Sha256,
    /// Optional in the spec; accepted for blobs and manifests pushed by digest.
    Sha512,
}

impl Algorithm {
    /// The name used in the digest string and in Distribution's directory layout.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated digest. The string form is kept so that `as_str` costs nothing on hot paths
/// (headers, SQL keys).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    text: String,
    algorithm: Algorithm,
}

impl Digest {
    /// Parses `algorithm:hex`, requiring lowercase hex of the algorithm's exact length.
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        let bad = |reason| ParseError::Digest {
            input: input.chars().take(200).collect(),
            reason,
        };
        let (algo, hex) = input.split_once(':').ok_or_else(|| bad("missing ':'"))?;
        let algorithm = match algo {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            "" => return Err(bad("empty algorithm")),
            _ => return Err(bad("unsupported algorithm")),
        };
        if hex.len() != algorithm.hex_len() {
            return Err(bad("wrong length for its algorithm"));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad("encoded part must be lowercase hex"));
        }
        Ok(Digest {
            text: input.to_owned(),
            algorithm,
        })
    }

    /// The sha256 digest of `bytes`: what a manifest pushed by tag is addressed by.
    pub fn sha256_of(bytes: &[u8]) -> Self {
        let mut h = DigestHasher::new(Algorithm::Sha256);
        h.update(bytes);
        h.finish()
    }

    /// The digest of `bytes` with this digest's algorithm, to check content against it.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        let mut h = DigestHasher::new(self.algorithm);
        h.update(bytes);
        h.finish() == *self
    }

    /// The algorithm part.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex part after the colon.
    pub fn hex(&self) -> &str {
        &self.text[self.algorithm.as_str().len() + 1..]
    }

    /// The full `algorithm:hex` text.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.text)
    }
}

impl FromStr for Digest {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// Incremental hashing for streamed content; `sha2` picks SHA-NI at run time where the CPU
/// has it, which is what makes hashing while writing cheap.
#[derive(Clone)]
pub enum DigestHasher {
    /// SHA-256 state.
    Sha256(Sha256),
    /// SHA-512 state.
    Sha512(Sha512),
}

impl DigestHasher {
    /// A fresh state for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => DigestHasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => DigestHasher::Sha512(Sha512::new()),
        }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(bytes),
            DigestHasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        let (algorithm, raw) = match self {
            DigestHasher::Sha256(h) => (Algorithm::Sha256, h.finalize().to_vec()),
            DigestHasher::Sha512(h) => (Algorithm::Sha512, h.finalize().to_vec()),
        };
        let mut text = String::with_capacity(algorithm.hex_len() + 7);
        text.push_str(algorithm.as_str());
        text.push(':');
        for byte in raw {
            text.push(char::from(HEX[usize::from(byte >> 4)]));
            text.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        Digest { text, algorithm }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_digests() {
        let d = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.hex(), "a".repeat(64));
        assert!(Digest::parse(&format!("sha512:{}", "0".repeat(128))).is_ok());
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}", "g".repeat(64)),
            &format!("md5:{}", "a".repeat(32)),
            &format!(":{}", "a".repeat(64)),
            &format!("sha512:{}", "a".repeat(64)),
            &format!("sha256:{}/../x", "a".repeat(58)),
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn hashes_known_values() {
        assert_eq!(
            Digest::sha256_of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            Digest::sha256_of(b"{}").as_str(),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        let d = Digest::sha256_of(b"abc");
        assert!(d.matches(b"abc"));
        assert!(!d.matches(b"abd"));
    }
}
