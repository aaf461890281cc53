//! The registry suites of `it` again on the scale-out backends: blobs in S3 (a throwaway
//! Garage server) and metadata in PostgreSQL (a throwaway cluster on a Unix socket), both
//! started by the test process and stopped with it. Same test sources: what passes on the
//! file system and SQLite must pass here. Suites that drive the `berth` binary or client
//! tools stay in `it`; the multi-node and outage suites are only here.

#[path = "../it/api.rs"]
mod api;
#[path = "../it/auth.rs"]
mod auth;
#[path = "../it/common.rs"]
mod common;
#[path = "../it/downloads.rs"]
mod downloads;
#[path = "../it/errors.rs"]
mod errors;
#[path = "../it/gc.rs"]
mod gc;
#[path = "../it/gc_stress.rs"]
mod gc_stress;
#[path = "../it/manifests.rs"]
mod manifests;
#[path = "../it/multinode.rs"]
mod multinode;
#[path = "../it/openapi.rs"]
mod openapi;
#[path = "../it/outage.rs"]
mod outage;
#[path = "../it/pusher.rs"]
mod pusher;
#[path = "../it/repositories.rs"]
mod repositories;
#[path = "../it/s3.rs"]
mod s3;
#[path = "../it/uploads.rs"]
mod uploads;

pub(crate) use common::*;

/// This suite's metadata backend.
pub(crate) const BACKEND: berth_testkit::MetaBackend = berth_testkit::MetaBackend::Postgres;
/// This suite's blob backend.
pub(crate) const BLOBS: berth_testkit::BlobBackend = berth_testkit::BlobBackend::S3;
