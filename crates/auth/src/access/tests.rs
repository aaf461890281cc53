use super::*;
use crate::password::hash_password;
use crate::{Scope, TokenError};
use berth_meta::{Actor, CredentialStore, Database, MetaStore, ProjectOrigin};

async fn service(dir: &std::path::Path) -> (AccessControl, Arc<Database>) {
    let store = Arc::new(Database::open_sqlite(&dir.join("meta.db")).unwrap());
    let access = AccessControl::for_mode(
        AuthSettings::default(),
        store.clone(),
        Some(TokenSigner::generate().unwrap()),
        None,
    )
    .unwrap();
    (access, store)
}

async fn create_project(store: &Database, public: bool) {
    store
        .create_project(
            "p",
            public,
            None,
            ProjectOrigin::Requested,
            &Actor::system("test"),
        )
        .await
        .unwrap();
}

/// Creates robot `ci` of project `p`, allowed to pull, expiring at `expires_ms`.
async fn create_robot(store: &Database, expires_ms: i64) {
    let hash = hash_password("robot-secret").unwrap();
    store
        .create_robot(
            "p",
            "ci",
            &hash,
            &["pull".into()],
            Some(expires_ms),
            &Actor::system("test"),
        )
        .await
        .unwrap();
}

fn robot_login() -> Credentials<'static> {
    Credentials::Password {
        user: "robot$p+ci".into(),
        password: "robot-secret".into(),
    }
}

/// Logs robot `ci` in and asks for a token for `scope`.
async fn robot_token(access: &AccessControl, scope: &str) -> IssuedToken {
    let caller = access
        .logins()
        .authenticate(robot_login(), "127.0.0.1")
        .await
        .unwrap();
    let scope = Scope::parse(scope).unwrap();
    access
        .tokens()
        .issue(&caller, &[scope], None)
        .await
        .unwrap()
}

async fn bearer(access: &AccessControl, token: &str) -> Result<Caller, AuthError> {
    access
        .logins()
        .authenticate(Credentials::Bearer(token.into()), "127.0.0.1")
        .await
}

#[tokio::test]
async fn expired_robots_can_neither_log_in_nor_use_their_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (access, store) = service(dir.path()).await;
    create_project(&store, false).await;
    create_robot(&store, now_ms() + 1_000).await;
    let issued = robot_token(&access, "repository:p/app:pull,push").await;
    assert_eq!(
        issued.granted[0].actions,
        ["pull"],
        "robots get only their permissions"
    );
    assert!(bearer(&access, &issued.token).await.is_ok());
    // Expire it (the clock passes the robot's expiry).
    store
        .delete_robot("p", "ci", &Actor::system("test"))
        .await
        .unwrap();
    create_robot(&store, now_ms() - 1).await;
    assert!(matches!(
        access
            .logins()
            .authenticate(robot_login(), "127.0.0.1")
            .await,
        Err(AuthError::BadCredentials)
    ));
    // The token names the old robot's id: a new robot of the same name does not inherit it.
    assert!(matches!(
        bearer(&access, &issued.token).await,
        Err(AuthError::BadToken(TokenError::Revoked))
    ));
}

#[tokio::test]
async fn a_token_ending_like_a_cached_one_is_checked_not_served_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (access, store) = service(dir.path()).await;
    create_project(&store, true).await;
    let anonymous = Caller::anonymous("127.0.0.1");
    let scope = Scope::parse("repository:p/app:pull").unwrap();
    let issued = access
        .tokens()
        .issue(&anonymous, &[scope], None)
        .await
        .unwrap();
    // Cached by the first use.
    assert!(bearer(&access, &issued.token).await.is_ok());
    // Same length, same signature bytes at the end, other claims before them: the
    // same cache key, and a forgery.
    let mut forged = issued.token.clone().into_bytes();
    let first = forged.iter().position(|b| b.is_ascii_alphabetic()).unwrap();
    forged[first] = if forged[first] == b'a' { b'b' } else { b'a' };
    let forged = String::from_utf8(forged).unwrap();
    assert_eq!(token_key(&forged), token_key(&issued.token));
    assert!(matches!(
        bearer(&access, &forged).await,
        Err(AuthError::BadToken(_))
    ));
    // The genuine token still passes.
    assert!(bearer(&access, &issued.token).await.is_ok());
}

#[tokio::test]
async fn a_robot_token_used_again_and_again_stops_when_the_robot_expires() {
    let dir = tempfile::tempdir().unwrap();
    let (access, store) = service(dir.path()).await;
    create_project(&store, false).await;
    let expires = now_ms() + 400;
    create_robot(&store, expires).await;
    let issued = robot_token(&access, "repository:p/app:pull").await;
    // Used often enough to be kept by this thread and the shared caches.
    for _ in 0..5 {
        assert!(bearer(&access, &issued.token).await.is_ok());
    }
    // Nothing changes in the store; only the clock passes the robot's expiry.
    let wait = expires - now_ms() + 20;
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    assert!(matches!(
        bearer(&access, &issued.token).await,
        Err(AuthError::BadToken(
            TokenError::Revoked | TokenError::Expired
        ))
    ));
}
