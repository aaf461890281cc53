//! Property tests of every parser clients feed: whatever the bytes, no panic; what is
//! accepted prints back as it came (round trip); what the grammar allows is accepted.
//! 10,000 cases each, beside the table tests in the modules.

use berth_oci::{media_type as mt, Digest, ParsedManifest, Reference, RepoName, Tag};
use proptest::prelude::*;

/// Text near the grammars: their alphabet plus the characters that break them.
fn near_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9:./_@#%+ -]{0,300}",
        "(sha256|sha512|SHA256|md5|)?:?[0-9a-fA-F]{0,140}",
    ]
}

fn hex(len: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(0u8..16, len)
        .prop_map(|v| v.iter().map(|n| format!("{n:x}")).collect())
}

fn valid_digest() -> impl Strategy<Value = String> {
    prop_oneof![
        hex(64).prop_map(|h| format!("sha256:{h}")),
        hex(128).prop_map(|h| format!("sha512:{h}")),
    ]
}

fn valid_name() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}", 1..5)
        .prop_map(|parts| parts.join("/"))
        .prop_filter("at most 255 characters", |n| n.len() <= 255)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn digests_never_panic_and_round_trip(input in near_text()) {
        if let Ok(d) = Digest::parse(&input) {
            prop_assert_eq!(d.to_string(), input);
        }
    }

    #[test]
    fn every_well_formed_digest_is_accepted(input in valid_digest()) {
        let d = Digest::parse(&input).unwrap();
        prop_assert_eq!(d.as_str(), input.as_str());
    }

    #[test]
    fn names_never_panic_and_round_trip(input in near_text()) {
        if let Ok(n) = RepoName::parse(&input) {
            prop_assert_eq!(n.to_string(), input.clone());
            prop_assert!(!input.contains(".."), "no path tricks: {}", input);
            prop_assert!(!input.starts_with('/') && !input.ends_with('/'));
        }
    }

    #[test]
    fn every_well_formed_name_is_accepted(input in valid_name()) {
        prop_assert!(RepoName::parse(&input).is_ok(), "{}", input);
    }

    #[test]
    fn references_never_panic_and_round_trip(input in near_text()) {
        if let Ok(r) = Reference::parse(&input) {
            prop_assert_eq!(r.to_string(), input);
        }
    }

    #[test]
    fn every_well_formed_tag_is_accepted(input in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}") {
        let tag = Tag::parse(&input).unwrap();
        prop_assert_eq!(tag.as_str(), input.as_str());
        prop_assert!(matches!(Reference::parse(&input), Ok(Reference::Tag(_))));
    }

    #[test]
    fn manifests_never_panic_on_any_bytes(raw in proptest::collection::vec(any::<u8>(), 0..2048),
                                          typed in any::<bool>()) {
        let _ = ParsedManifest::parse(&raw, typed.then_some(mt::OCI_MANIFEST));
    }

    #[test]
    fn manifests_never_panic_on_json_shaped_input(json in manifest_like()) {
        let _ = ParsedManifest::parse(json.as_bytes(), None);
        let _ = ParsedManifest::parse(json.as_bytes(), Some(mt::DOCKER_MANIFEST_LIST));
    }

    #[test]
    fn every_well_formed_image_manifest_is_accepted_with_its_edges(
        config in valid_digest(),
        layers in proptest::collection::vec(valid_digest(), 0..8),
        subject in proptest::option::of(valid_digest()),
    ) {
        let layer_json: Vec<String> = layers
            .iter()
            .map(|d| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":1}}"#))
            .collect();
        let subject_json = subject
            .as_ref()
            .map(|d| format!(r#","subject":{{"mediaType":"{}","digest":"{d}","size":1}}"#, mt::OCI_MANIFEST))
            .unwrap_or_default();
        let raw = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{config}","size":2}},"layers":[{}]{subject_json}}}"#,
            mt::OCI_MANIFEST,
            mt::OCI_CONFIG,
            layer_json.join(",")
        );
        let parsed = ParsedManifest::parse(raw.as_bytes(), Some(mt::OCI_MANIFEST)).unwrap();
        prop_assert_eq!(parsed.edges.len(), 1 + layers.len());
        prop_assert_eq!(parsed.subject.map(|d| d.to_string()), subject);
        prop_assert_eq!(parsed.artifact_type.as_deref(), Some(mt::OCI_CONFIG));
    }
}

/// JSON-like text made of the manifest's own keys and values, nested at random.
fn manifest_like() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("2".to_owned()),
        Just("-1".to_owned()),
        Just("1e400".to_owned()),
        Just("\"sha256:\"".to_owned()),
        valid_digest().prop_map(|d| format!("\"{d}\"")),
        "\"[a-z./+:]{0,40}\"",
    ];
    let keys = prop_oneof![
        Just("schemaVersion"),
        Just("mediaType"),
        Just("config"),
        Just("layers"),
        Just("manifests"),
        Just("digest"),
        Just("size"),
        Just("subject"),
        Just("urls"),
        Just("artifactType"),
        Just("annotations"),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec((keys.clone(), inner), 0..6).prop_map(|kv| {
                let fields: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}
