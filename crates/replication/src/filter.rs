//! Patterns for repository names and tags: `*` is any run of characters but `/`, `**`
//! any run at all, `?` one character but `/`; everything else stands for itself.
//! Matched in time proportional to pattern × name, whatever the pattern.

use crate::ReplicationError;

/// The longest pattern taken.
const MAX_PATTERN: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Char(char),
    One,
    Segment,
    Any,
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    tokens: Vec<Token>,
}

impl Glob {
    /// Compiles `text`.
    pub fn parse(text: &str) -> Result<Glob, ReplicationError> {
        if text.is_empty() || text.len() > MAX_PATTERN || text.chars().any(char::is_control) {
            return Err(ReplicationError::Invalid(format!(
                "pattern: 1 to {MAX_PATTERN} printable characters"
            )));
        }
        let mut tokens = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' if chars.peek() == Some(&'*') => {
                    chars.next();
                    Token::Any
                }
                '*' => Token::Segment,
                '?' => Token::One,
                c => Token::Char(c),
            });
        }
        Ok(Glob {
            text: text.to_owned(),
            tokens,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `name` matches the whole pattern.
    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        // reachable[j]: the tokens so far can match the first j characters.
        let mut reachable = vec![false; name.len() + 1];
        reachable[0] = true;
        for token in &self.tokens {
            let mut next = vec![false; name.len() + 1];
            match token {
                Token::Any | Token::Segment => {
                    let mut open = false;
                    for j in 0..=name.len() {
                        if reachable[j] {
                            open = true;
                        }
                        next[j] = open;
                        if j < name.len() && *token == Token::Segment && name[j] == '/' {
                            open = false;
                        }
                    }
                }
                Token::One => {
                    for j in 0..name.len() {
                        next[j + 1] = reachable[j] && name[j] != '/';
                    }
                }
                Token::Char(c) => {
                    for j in 0..name.len() {
                        next[j + 1] = reachable[j] && name[j] == *c;
                    }
                }
            }
            reachable = next;
        }
        reachable[name.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_documented() {
        let cases = [
            ("team/**", "team/app", true),
            ("team/**", "team/app/web", true),
            ("team/**", "teams/app", false),
            ("team/*", "team/app", true),
            ("team/*", "team/app/web", false),
            ("*", "app", true),
            ("*", "a/b", false),
            ("**", "a/b/c", true),
            ("v1.?", "v1.2", true),
            ("v1.?", "v1.23", false),
            ("v*-rc*", "v2-rc1", true),
            ("v*-rc*", "v2", false),
            ("latest", "latest", true),
            ("latest", "latest2", false),
            ("a/**/z", "a/b/c/z", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(
                Glob::parse(pattern).unwrap().matches(name),
                expected,
                "{pattern} {name}"
            );
        }
    }

    #[test]
    fn a_hostile_pattern_stays_quick_and_bounded() {
        let pattern = "*a".repeat(100);
        let glob = Glob::parse(&pattern).unwrap();
        let name = "a".repeat(255) + "b";
        // A backtracking matcher would not finish here; this one takes 200 × 256 steps.
        assert!(!glob.matches(&name));
        assert!(Glob::parse(&"x".repeat(257)).is_err());
        assert!(Glob::parse("a\nb").is_err());
        assert!(Glob::parse("").is_err());
    }
}
