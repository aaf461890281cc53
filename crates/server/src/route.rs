//! The `/v2` URL grammar. Repository names contain `/`, so routing cannot be a route per
//! name depth: the path is split from its end, where the spec's fixed words are. Pure and
//! table-tested; validating the name and reference is the handler's job, so that a bad
//! name gets `NAME_INVALID` rather than a 404.

/// What a `/v2/...` path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum V2Route<'a> {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/tags/list`.
    Tags { name: &'a str },
    /// `/v2/<name>/manifests/<reference>`.
    Manifest { name: &'a str, reference: &'a str },
    /// `/v2/<name>/blobs/<digest>`.
    Blob { name: &'a str, digest: &'a str },
    /// `/v2/<name>/blobs/uploads/`: open a session.
    UploadStart { name: &'a str },
    /// `/v2/<name>/blobs/uploads/<id>`.
    Upload { name: &'a str, id: &'a str },
    /// `/v2/<name>/referrers/<digest>`.
    Referrers { name: &'a str, digest: &'a str },
}

impl<'a> V2Route<'a> {
    /// Parses a request path; `None` if it is not an API path.
    pub(crate) fn parse(path: &'a str) -> Option<Self> {
        let rest = path.strip_prefix("/v2")?;
        if rest.is_empty() || rest == "/" {
            return Some(V2Route::Base);
        }
        let rest = rest.strip_prefix('/')?;
        if rest == "_catalog" {
            return Some(V2Route::Catalog);
        }
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Some(V2Route::Tags { name });
        }
        if let Some(name) = rest
            .strip_suffix("/blobs/uploads/")
            .or_else(|| rest.strip_suffix("/blobs/uploads"))
        {
            return Some(V2Route::UploadStart { name });
        }
        let (head, last) = rest.rsplit_once('/')?;
        let (name, word) = head.rsplit_once('/')?;
        match word {
            "manifests" => Some(V2Route::Manifest {
                name,
                reference: last,
            }),
            "blobs" => Some(V2Route::Blob { name, digest: last }),
            "referrers" => Some(V2Route::Referrers { name, digest: last }),
            "uploads" => {
                let name = name.strip_suffix("/blobs")?;
                Some(V2Route::Upload { name, id: last })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::V2Route::{self, *};

    #[test]
    fn parses_every_endpoint() {
        let cases: &[(&str, Option<V2Route<'_>>)] = &[
            ("/v2/", Some(Base)),
            ("/v2", Some(Base)),
            ("/v2/_catalog", Some(Catalog)),
            ("/v2/a/b/c/tags/list", Some(Tags { name: "a/b/c" })),
            (
                "/v2/a/manifests/latest",
                Some(Manifest {
                    name: "a",
                    reference: "latest",
                }),
            ),
            (
                "/v2/x/manifests/y/manifests/z",
                Some(Manifest {
                    name: "x/manifests/y",
                    reference: "z",
                }),
            ),
            (
                "/v2/a/b/blobs/sha256:00",
                Some(Blob {
                    name: "a/b",
                    digest: "sha256:00",
                }),
            ),
            ("/v2/a/b/blobs/uploads/", Some(UploadStart { name: "a/b" })),
            ("/v2/a/b/blobs/uploads", Some(UploadStart { name: "a/b" })),
            (
                "/v2/a/b/blobs/uploads/123",
                Some(Upload {
                    name: "a/b",
                    id: "123",
                }),
            ),
            (
                "/v2/a/referrers/sha256:1",
                Some(Referrers {
                    name: "a",
                    digest: "sha256:1",
                }),
            ),
            ("/v2/manifests/latest", None),
            ("/v2/a/unknown/x", None),
            ("/v3/a/manifests/x", None),
            ("/v2x", None),
            ("/v2/a/uploads/1", None),
        ];
        for (path, want) in cases {
            assert_eq!(&V2Route::parse(path), want, "{path}");
        }
    }

    #[test]
    fn keeps_bad_names_for_the_handler_to_reject() {
        assert_eq!(
            V2Route::parse("/v2/../x/manifests/a"),
            Some(Manifest {
                name: "../x",
                reference: "a"
            })
        );
        assert_eq!(
            V2Route::parse("/v2//manifests/a"),
            Some(Manifest {
                name: "",
                reference: "a"
            })
        );
    }
}
