//! The `scope` parameter of the token endpoint and of `WWW-Authenticate` challenges:
//! `repository:<name>:<action>[,<action>…]` or `registry:catalog:*`, several separated by
//! spaces (or given as repeated parameters).

/// One requested scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `repository` or `registry` (a `repository(plugin)` class suffix is dropped).
    pub kind: String,
    /// Repository name, or `catalog`.
    pub name: String,
    /// Requested actions.
    pub actions: Vec<String>,
}

impl Scope {
    /// Parses one scope; `None` if it lacks a part. The name is everything between the
    /// first and the last colon, as Docker writes it.
    pub fn parse(text: &str) -> Option<Scope> {
        let (kind, rest) = text.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        let kind = kind.split('(').next().unwrap_or(kind);
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        Some(Scope {
            kind: kind.to_owned(),
            name: name.to_owned(),
            actions: actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    /// Parses a space-separated list, skipping malformed entries (a client asking for
    /// nonsense simply gets no access for it).
    pub fn parse_list(text: &str) -> Vec<Scope> {
        text.split_whitespace().filter_map(Scope::parse).collect()
    }

    /// The scope in challenge form.
    pub fn to_challenge(&self) -> String {
        format!("{}:{}:{}", self.kind, self.name, self.actions.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_scopes() {
        let s = Scope::parse("repository:team/app:pull,push").unwrap();
        assert_eq!(s.kind, "repository");
        assert_eq!(s.name, "team/app");
        assert_eq!(s.actions, ["pull", "push"]);
        let s = Scope::parse("repository(plugin):a/b:pull").unwrap();
        assert_eq!(s.kind, "repository");
        assert_eq!(Scope::parse("registry:catalog:*").unwrap().actions, ["*"]);
        assert!(Scope::parse("repository").is_none());
        assert!(Scope::parse("repository::pull").is_none());
        assert_eq!(
            Scope::parse_list("repository:a:pull  repository:b:push bad").len(),
            2
        );
        assert_eq!(s.to_challenge(), "repository:a/b:pull");
    }
}
