//! The exporter: a bounded queue of finished spans and one task that posts them in
//! batches to `<endpoint>/v1/traces` as OTLP/JSON. A collector that is down or slow costs
//! dropped spans (counted), never memory or request latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value as Json};
use tokio::sync::mpsc;

use crate::{hex, SpanRecord, TracingSettings, Value};

/// Spans waiting for export at most; more are dropped.
const QUEUE: usize = 8192;
/// Spans per request to the collector at most.
const BATCH: usize = 512;
/// How long spans wait for a batch to fill.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// What the exporter did.
#[derive(Debug, Default)]
pub struct ExportCounters {
    exported: AtomicU64,
    dropped: AtomicU64,
    failed_batches: AtomicU64,
}

impl ExportCounters {
    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }
    /// Spans dropped: the queue was full or the collector refused their batch.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    /// Batches the collector did not accept.
    pub fn failed_batches(&self) -> u64 {
        self.failed_batches.load(Ordering::Relaxed)
    }
}

/// The queue's sending end.
#[derive(Clone)]
pub(crate) struct Exporter {
    queue: mpsc::Sender<Vec<SpanRecord>>,
    counters: Arc<ExportCounters>,
}

impl Exporter {
    pub(crate) fn spawn(settings: &TracingSettings) -> Exporter {
        let (queue, receiver) = mpsc::channel(QUEUE / 4);
        let counters = Arc::new(ExportCounters::default());
        let url = format!("{}/v1/traces", settings.otlp_endpoint.trim_end_matches('/'));
        tokio::spawn(run(receiver, url, resource(settings), counters.clone()));
        Exporter { queue, counters }
    }

    pub(crate) fn counters(&self) -> &ExportCounters {
        &self.counters
    }

    pub(crate) fn queue(&self, spans: Vec<SpanRecord>) {
        let n = spans.len() as u64;
        if self.queue.try_send(spans).is_err() {
            self.counters.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}

fn resource(settings: &TracingSettings) -> Json {
    json!({
        "attributes": [
            attribute("service.name", &Value::Text(settings.service_name.clone())),
            attribute("service.instance.id", &Value::Text(settings.node.clone())),
            attribute("service.version", &Value::Text(env!("CARGO_PKG_VERSION").to_owned())),
        ]
    })
}

async fn run(
    mut receiver: mpsc::Receiver<Vec<SpanRecord>>,
    url: String,
    resource: Json,
    counters: Arc<ExportCounters>,
) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "tracing: no HTTP client; spans are dropped");
            return;
        }
    };
    let mut batch: Vec<SpanRecord> = Vec::new();
    let mut last_error_logged: Option<std::time::Instant> = None;
    loop {
        let more = tokio::time::timeout(FLUSH_EVERY, receiver.recv()).await;
        match more {
            Ok(Some(spans)) => {
                batch.extend(spans);
                if batch.len() < BATCH {
                    continue;
                }
            }
            Ok(None) if batch.is_empty() => return,
            Ok(None) | Err(_) => {
                if batch.is_empty() {
                    continue;
                }
            }
        }
        let spans = std::mem::take(&mut batch);
        let n = spans.len() as u64;
        let body = json!({
            "resourceSpans": [{
                "resource": resource,
                "scopeSpans": [{
                    "scope": { "name": "berth" },
                    "spans": spans.iter().map(span_json).collect::<Vec<_>>(),
                }],
            }],
        });
        let sent = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                counters.exported.fetch_add(n, Ordering::Relaxed);
            }
            other => {
                counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                counters.dropped.fetch_add(n, Ordering::Relaxed);
                // Said once a minute at most: a collector that is down must not flood the log.
                if last_error_logged.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                    let why = match other {
                        Ok(r) => format!("the collector answered {}", r.status()),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(%url, error = %why, "tracing: spans not exported");
                    last_error_logged = Some(std::time::Instant::now());
                }
            }
        }
    }
}

fn attribute(key: &str, value: &Value) -> Json {
    let value = match value {
        Value::Text(t) => json!({ "stringValue": t }),
        Value::Int(i) => json!({ "intValue": i.to_string() }),
    };
    json!({ "key": key, "value": value })
}

/// One span in OTLP/JSON (ids in hex, times as decimal strings).
fn span_json(span: &SpanRecord) -> Json {
    let mut value = json!({
        "traceId": hex(&span.trace_id),
        "spanId": hex(&span.span_id),
        "name": span.name,
        // SPAN_KIND_SERVER, SPAN_KIND_INTERNAL.
        "kind": if span.server { 2 } else { 1 },
        "startTimeUnixNano": span.start_ns.to_string(),
        "endTimeUnixNano": span.end_ns.to_string(),
        "attributes": span.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
        // STATUS_CODE_ERROR, STATUS_CODE_UNSET.
        "status": { "code": if span.error { 2 } else { 0 } },
    });
    if let Some(parent) = span.parent {
        value["parentSpanId"] = hex(&parent).into();
    }
    value
}
