//! Repository names, tags and the `<reference>` of a manifest URL.

use std::fmt;

use crate::{Digest, ParseError};

/// Longest repository name accepted, as Distribution does (the spec leaves it open,
/// clients and file systems do not).
pub const MAX_NAME_LEN: usize = 255;

/// A repository name per the spec grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
/// Holding one proves the name is safe as a path and SQL key: no `..`, no empty or
/// upper-case components.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// Validates a full name such as `team/app/api`.
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        let bad = |reason| ParseError::Name {
            input: input.chars().take(300).collect(),
            reason,
        };
        if input.is_empty() {
            return Err(bad("empty"));
        }
        if input.len() > MAX_NAME_LEN {
            return Err(bad("longer than 255 characters"));
        }
        for component in input.split('/') {
            check_component(component).map_err(bad)?;
        }
        Ok(RepoName(input.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first path segment: the project in berth's permission model.
    pub fn project(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }
}

fn check_component(c: &str) -> Result<(), &'static str> {
    if c.is_empty() {
        return Err("empty path component");
    }
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err("components must start and end with [a-z0-9]");
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or one or more '-'.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err("only lowercase letters, digits and the separators . _ __ - are allowed");
        }
    }
    Ok(())
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoName({})", self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Tag(String);

impl Tag {
    /// Validates a tag.
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        if !Tag::is_valid(input) {
            return Err(ParseError::Tag {
                input: input.chars().take(200).collect(),
            });
        }
        Ok(Tag(input.to_owned()))
    }

    /// Whether `input` is a tag, without making one: for callers that only need to tell
    /// a tag from a digest (per request, where the copy would be wasted).
    pub fn is_valid(input: &str) -> bool {
        let bytes = input.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
        let rest_ok = bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        first_ok && rest_ok && bytes.len() <= 128
    }

    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `<reference>` of `/v2/<name>/manifests/<reference>`: a tag or a digest.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Reference {
    /// A mutable name.
    Tag(Tag),
    /// An immutable content address.
    Digest(Digest),
}

impl Reference {
    /// A reference containing ':' is a digest, anything else must be a tag.
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        if input.contains(':') {
            Digest::parse(input).map(Reference::Digest)
        } else {
            Tag::parse(input).map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_names() {
        for ok in [
            "a",
            "library/ubuntu",
            "team/app/api",
            "a.b_c__d---e",
            "0",
            "x/y-z/0.1",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok:?} should be accepted");
        }
        assert_eq!(RepoName::parse("team/app").unwrap().project(), "team");
    }

    #[test]
    fn rejects_bad_names() {
        let long = "a".repeat(256);
        for bad in [
            "",
            "../x",
            "x/..",
            "x/../y",
            "A",
            "Team/app",
            "a//b",
            "/a",
            "a/",
            "-a",
            "a-",
            "a.-b",
            "a___b",
            "a..b",
            "a b",
            "a%2fb",
            ".",
            "a/.hidden",
            long.as_str(),
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn tags_follow_grammar() {
        for good in ["v1.0_rc-1", "_x", &"a".repeat(128)] {
            assert!(Tag::parse(good).is_ok(), "{good:?} should be a tag");
            assert!(Tag::is_valid(good));
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "é", &"a".repeat(129)] {
            assert!(Tag::parse(bad).is_err(), "{bad:?} should be refused");
            assert!(!Tag::is_valid(bad));
        }
    }

    #[test]
    fn references_split_on_colon() {
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        let d = format!("sha256:{}", "b".repeat(64));
        assert!(matches!(Reference::parse(&d), Ok(Reference::Digest(_))));
        assert!(Reference::parse("sha256:zz").is_err());
    }
}
