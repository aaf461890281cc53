//! The registry suites of `it` again, with metadata in PostgreSQL (a throwaway cluster
//! the test process starts on a Unix socket and that stops with it). Same test sources:
//! what passes on SQLite must pass here. Suites that drive the `berth` binary or client
//! tools stay in `it`.

#[path = "../it/api.rs"]
mod api;
#[path = "../it/auth.rs"]
mod auth;
#[path = "../it/common.rs"]
mod common;
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
#[path = "../it/uploads.rs"]
mod uploads;

pub(crate) use common::*;

/// This suite's metadata backend.
pub(crate) const BACKEND: berth_testkit::MetaBackend = berth_testkit::MetaBackend::Postgres;
