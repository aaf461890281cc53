use super::*;

#[test]
fn event_retention_defaults_to_90_days_and_0_keeps_forever() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let retention = |toml: &str| {
        std::fs::write(&path, toml).unwrap();
        Settings::load(Some(&path), Overrides::default())
            .unwrap()
            .gc
            .options
            .event_retention
    };
    assert_eq!(retention(""), Some(Duration::from_secs(90 * 86400)));
    assert_eq!(
        retention("[audit]\nretention_days = 7\n"),
        Some(Duration::from_secs(7 * 86400))
    );
    assert_eq!(retention("[audit]\nretention_days = 0\n"), None);
    std::fs::write(&path, "[audit]\nretention = 7\n").unwrap();
    assert!(
        Settings::load(Some(&path), Overrides::default()).is_err(),
        "unknown keys are refused"
    );
}

#[test]
fn tls_needs_a_certificate_and_its_key_and_limits_must_be_positive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    std::fs::write(&path, "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[limits]\nheader_timeout_secs = 5\nmax_connections = 100\n").unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    let tls = s.tls.unwrap();
    assert_eq!(tls.cert_file, PathBuf::from("c.pem"));
    assert_eq!(tls.client_ca_file, None);
    let limits = s.connections.limits(20_000);
    assert_eq!(limits.header_timeout, Duration::from_secs(5));
    assert_eq!(limits.max_connections, 100);
    assert_eq!(limits.body_stall_timeout, Duration::from_secs(60));
    let flagged = Settings::load(
        Some(&path),
        Overrides {
            tls_key_file: Some("other.pem".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(flagged.tls.unwrap().key_file, PathBuf::from("other.pem"));
    std::fs::write(&path, "[tls]\ncert_file = \"c.pem\"\n").unwrap();
    assert!(Settings::load(Some(&path), Overrides::default()).is_err());
    std::fs::write(&path, "[limits]\nbody_stall_timeout_secs = 0\n").unwrap();
    assert!(Settings::load(Some(&path), Overrides::default()).is_err());
    assert!(Settings::load(None, Overrides::default())
        .unwrap()
        .tls
        .is_none());
}

#[test]
fn layers_defaults_file_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:6000\"\ndata_dir = \"/srv/berth\"\n[limits]\nmax_manifest_bytes = 1024\n").unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    assert_eq!(s.listen.port(), 6000);
    assert_eq!(s.max_manifest_bytes, 1024);
    assert!(!s.sendfile);
    let s = Settings::load(
        Some(&path),
        Overrides {
            listen: Some("127.0.0.1:7000".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.listen.port(), 7000);
    assert_eq!(s.data_dir, PathBuf::from("/srv/berth"));
    let d = Settings::load(None, Overrides::default()).unwrap();
    assert_eq!(d.listen.to_string(), "127.0.0.1:5000");
    assert_eq!(d.data_dir, PathBuf::from("./berth-data"));
    assert!(s.gc.interval.is_none());
    std::fs::write(
        &path,
        "sendfile = true\n[gc]\ninterval_secs = 3600\nblob_grace_secs = 60\ndelete_untagged = true\n",
    )
    .unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    assert!(s.sendfile);
    assert_eq!(s.gc.interval, Some(Duration::from_secs(3600)));
    assert_eq!(s.gc.options.blob_grace, Duration::from_secs(60));
    assert!(s.gc.options.delete_untagged);
    assert_eq!(d.auth.settings.mode, AuthMode::Builtin);
    std::fs::write(&path, "[auth]\nmode = \"none\"\nmax_login_failures = 3\n").unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    assert_eq!(s.auth.settings.mode, AuthMode::Disabled);
    assert_eq!(s.auth.settings.max_login_failures, 3);
    let s = Settings::load(
        Some(&path),
        Overrides {
            auth_mode: Some("builtin".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.auth.settings.mode, AuthMode::Builtin);
    std::fs::write(&path, "[auth]\nmode = \"token\"\n").unwrap();
    assert!(Settings::load(Some(&path), Overrides::default()).is_err());
    std::fs::write(
        &path,
        "[meta]\npostgres_url = \"host=/run/pg\"\n[storage]\nbackend = \"s3\"\n[storage.s3]\nendpoint = \"http://127.0.0.1:3900\"\nregion = \"garage\"\nbucket = \"b\"\naccess_key_id = \"k\"\nsecret_access_key = \"s\"\nredirect = true\n",
    )
    .unwrap();
    let s = Settings::load(Some(&path), Overrides::default()).unwrap();
    assert!(matches!(s.meta, MetaConfig::Postgres { ref url, .. } if url == "host=/run/pg"));
    let BlobConfig::S3(s3) = &s.storage else {
        panic!("s3 expected");
    };
    assert!(s3.path_style, "path style by default with an endpoint");
    assert_eq!(s3.redirect, Some(Duration::from_secs(900)));
    std::fs::write(&path, "[storage]\nbackend = \"s3\"\n").unwrap();
    assert!(
        Settings::load(Some(&path), Overrides::default()).is_err(),
        "bucket required"
    );
    std::fs::write(&path, "lisen = 1\n").unwrap();
    assert!(Settings::load(Some(&path), Overrides::default()).is_err());
}
