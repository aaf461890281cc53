//! Property tests of the parsers an attacker reaches before any credential is checked:
//! scopes and tokens. Whatever the text, no panic; a valid scope prints back as it came;
//! no token but a signed one is ever accepted. 10,000 cases each.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use berth_auth::{Scope, TokenSigner, TokenVerifier};
use proptest::prelude::*;

fn scope_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z()]{0,12}:[a-z0-9/:._-]{0,40}:[a-z*,]{0,20}",
        "(repository|registry):[a-z0-9/]{1,30}:(pull|push|delete|\\*)(,(pull|push|delete))*( [a-z:,/]{0,30}){0,3}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn scopes_never_panic_and_round_trip(text in scope_text()) {
        for scope in Scope::parse_list(&text) {
            prop_assert!(!scope.kind.is_empty() && !scope.name.is_empty());
            let again = Scope::parse(&scope.to_challenge()).expect("a printed scope parses");
            prop_assert_eq!(again, scope);
        }
    }

    #[test]
    fn well_formed_scopes_are_read_as_written(
        name in "[a-z0-9]{1,10}(/[a-z0-9]{1,10}){0,3}",
        actions in proptest::collection::vec(prop_oneof![Just("pull"), Just("push"), Just("delete")], 1..4),
    ) {
        let text = format!("repository:{name}:{}", actions.join(","));
        let scope = Scope::parse(&text).unwrap();
        prop_assert_eq!(&scope.name, &name);
        prop_assert_eq!(scope.to_challenge(), text);
    }

    #[test]
    fn no_unsigned_text_passes_as_a_token(
        text in prop_oneof![
            any::<String>(),
            "[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,100}",
        ],
        header in "[ -~]{0,80}",
        payload in "[ -~]{0,200}",
    ) {
        let (_, verifier) = keys();
        prop_assert!(verifier.verify(&text, 1_000).is_err());
        let forged = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.as_bytes()),
            URL_SAFE_NO_PAD.encode(payload.as_bytes()),
            URL_SAFE_NO_PAD.encode([0u8; 64]),
        );
        prop_assert!(verifier.verify(&forged, 1_000).is_err());
    }
}

/// One key pair for every case (generating one per case would dominate the run).
fn keys() -> &'static (TokenSigner, TokenVerifier) {
    static KEYS: std::sync::OnceLock<(TokenSigner, TokenVerifier)> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let signer = TokenSigner::generate().unwrap();
        let verifier = TokenVerifier::new(signer.verifying_key(), "berth", "berth");
        (signer, verifier)
    })
}
