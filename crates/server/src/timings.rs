//! How long the backends take: every metadata read and write and every blob store action,
//! reported by the stores (`berth_meta::Database::observe`, `berth_storage::TimedBlobStore`)
//! and kept here as histograms with error counts, and as child spans of the request's
//! trace when it is recorded. Labels are the backend's name and the
//! operation, both from fixed lists.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_storage::timed::ACTIONS;

use crate::metrics::{family, shard_index, Histogram, SHARDS};

/// The metadata store's operations.
const META_OPS: [&str; 2] = ["read", "write"];

/// One operation's durations and failures.
#[derive(Default)]
struct Timed {
    durations: Histogram,
    errors: AtomicU64,
}

impl Timed {
    fn add(&self, other: &Timed) {
        self.durations.add(&other.durations);
        self.errors
            .fetch_add(other.errors.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn observe(&self, took: Duration, ok: bool) {
        self.durations.observe(took);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The backends' timings on this node.
pub struct BackendTimings {
    meta_backend: &'static str,
    storage_driver: &'static str,
    /// One set per worker thread, as the HTTP counters: every request reads the metadata
    /// store, and two cores incrementing one histogram would bounce its cache lines.
    shards: Vec<Shard>,
}

/// One thread's timings, aligned so that neighbours do not share a cache line.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    meta: [Timed; META_OPS.len()],
    storage: [Timed; ACTIONS.len()],
}

impl BackendTimings {
    /// Timings for a node on `meta_backend` (`sqlite`, `postgres`) and `storage_driver`
    /// (`filesystem`, `s3`).
    pub fn new(meta_backend: &'static str, storage_driver: &'static str) -> Arc<Self> {
        Arc::new(BackendTimings {
            meta_backend,
            storage_driver,
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        })
    }

    /// What the metadata store reports to.
    pub fn meta_observer(self: &Arc<Self>) -> berth_meta::Observer {
        let timings = self.clone();
        Arc::new(move |op, took, ok| {
            if let Some(i) = META_OPS.iter().position(|o| *o == op) {
                timings.shards[shard_index()].meta[i].observe(took, ok);
            }
            berth_telemetry::record_child("metadata", op, timings.meta_backend, took, ok);
        })
    }

    /// What the blob store reports to.
    pub fn storage_observer(self: &Arc<Self>) -> berth_storage::timed::Observer {
        let timings = self.clone();
        Arc::new(move |action, took, ok| {
            if let Some(i) = ACTIONS.iter().position(|a| *a == action) {
                timings.shards[shard_index()].storage[i].observe(took, ok);
            }
            berth_telemetry::record_child("storage", action, timings.storage_driver, took, ok);
        })
    }

    /// The families, and with `distribution` Docker Distribution's storage family too.
    pub(crate) fn render(&self, out: &mut String, distribution: bool) {
        let merged = Shard::default();
        for shard in &self.shards {
            for (total, part) in merged.meta.iter().zip(&shard.meta) {
                total.add(part);
            }
            for (total, part) in merged.storage.iter().zip(&shard.storage) {
                total.add(part);
            }
        }
        family(
            out,
            "berth_metadata_operation_duration_seconds",
            "histogram",
            "Metadata store reads and writes (a write: one transaction, group commit included).",
        );
        for (op, timed) in META_OPS.iter().zip(&merged.meta) {
            let labels = format!("backend=\"{}\",op=\"{op}\"", self.meta_backend);
            timed
                .durations
                .render(out, "berth_metadata_operation_duration_seconds", &labels);
        }
        family(
            out,
            "berth_metadata_errors_total",
            "counter",
            "Metadata operations the store failed (unreachable, full, broken).",
        );
        for (op, timed) in META_OPS.iter().zip(&merged.meta) {
            let _ = writeln!(
                out,
                "berth_metadata_errors_total{{backend=\"{}\",op=\"{op}\"}} {}",
                self.meta_backend,
                timed.errors.load(Ordering::Relaxed)
            );
        }
        let mut names = vec![(
            "berth_storage_action_duration_seconds",
            "Blob store actions (a read: opening the blob, not streaming it).",
        )];
        if distribution {
            names.push((
                "registry_storage_action_seconds",
                "Blob store actions, under Docker Distribution's name.",
            ));
        }
        for (name, help) in names {
            family(out, name, "histogram", help);
            for (action, timed) in ACTIONS.iter().zip(&merged.storage) {
                let labels = format!("driver=\"{}\",action=\"{action}\"", self.storage_driver);
                timed.durations.render(out, name, &labels);
            }
        }
        family(
            out,
            "berth_storage_errors_total",
            "counter",
            "Blob store actions the backend failed (I/O errors, unreachable, full).",
        );
        for (action, timed) in ACTIONS.iter().zip(&merged.storage) {
            let errors = timed.errors.load(Ordering::Relaxed);
            if errors > 0 {
                let _ = writeln!(
                    out,
                    "berth_storage_errors_total{{driver=\"{}\",action=\"{action}\"}} {errors}",
                    self.storage_driver
                );
            }
        }
    }
}
