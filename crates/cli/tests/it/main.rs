//! Integration tests: the real server on an ephemeral loopback port, real HTTP, and real
//! client tools where they are installed. One binary, so it links once. Metadata in
//! SQLite; `it_scaleout` runs the registry suites again on S3 and PostgreSQL.

mod api;
mod auth;
mod browser;
mod cli_accounts;
mod clients;
mod clients_auth;
mod common;
mod connections;
mod copy;
mod crash;
mod downloads;
mod errors;
mod events;
mod gc;
mod gc_stress;
mod hostile;
mod manifests;
mod memory;
mod metrics;
mod openapi;
mod proxy;
mod replication;
mod repositories;
mod tls;
mod traces;
mod ui;
mod unpack;
mod uploads;
mod webhooks;

pub(crate) use common::*;

/// This suite's metadata backend.
pub(crate) const BACKEND: berth_testkit::MetaBackend = berth_testkit::MetaBackend::Sqlite;
/// This suite's blob backend.
pub(crate) const BLOBS: berth_testkit::BlobBackend = berth_testkit::BlobBackend::Filesystem;
