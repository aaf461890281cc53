//! Traces, OpenTelemetry style, exported over OTLP/HTTP as JSON. Off unless an endpoint is
//! configured. The SDK is not used: what berth needs — a span per request named by its
//! route template, children for the metadata and blob store operations it made, the W3C
//! `traceparent` honoured, a sampling ratio, batches posted in the background — is a few
//! hundred lines, and the SDK's dependency tree is not.
//!
//! A request's span is opened by the HTTP edge ([`Tracer::start`]), which then runs the
//! request inside [`Tracer::in_span`]; the stores report their operations to whatever
//! span is current in the task ([`record_child`]), so they need not know about tracing.

mod export;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use export::ExportCounters;

/// How tracing is configured.
#[derive(Debug, Clone)]
pub struct TracingSettings {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans are posted to
    /// `<endpoint>/v1/traces`.
    pub otlp_endpoint: String,
    /// The share of new traces recorded (0.0 to 1.0); a request carrying a `traceparent`
    /// follows its sampled flag instead.
    pub sample_ratio: f64,
    /// `service.name` of every span.
    pub service_name: String,
    /// `service.instance.id`: which node (the host name unless configured).
    pub node: String,
}

/// A W3C trace context: the trace and the parent span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The span the next span is a child of.
    pub span_id: [u8; 8],
    /// Whether the trace is recorded.
    pub sampled: bool,
}

impl TraceContext {
    /// Parses a `traceparent` header (version 00, or a later version's first four fields);
    /// `None` if malformed, as the specification asks.
    pub fn parse(header: &str) -> Option<TraceContext> {
        let mut parts = header.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || version == "ff" || !is_hex(version) {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = hex_bytes(trace)?;
        let span_id: [u8; 8] = hex_bytes(span)?;
        let flags: [u8; 1] = hex_bytes(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            sampled: flags[0] & 1 == 1,
        })
    }

    /// The `traceparent` header value.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

fn is_hex(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 || !is_hex(text) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text.
    Text(String),
    /// An integer.
    Int(i64),
}

/// One finished span, as exported.
#[derive(Debug, Clone)]
pub(crate) struct SpanRecord {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    pub(crate) parent: Option<[u8; 8]>,
    pub(crate) name: String,
    pub(crate) server: bool,
    pub(crate) start_ns: u64,
    pub(crate) end_ns: u64,
    pub(crate) attributes: Vec<(&'static str, Value)>,
    pub(crate) error: bool,
}

/// A request's span while it runs.
#[derive(Debug)]
pub struct Span {
    record: SpanRecord,
    children: Arc<Mutex<Vec<SpanRecord>>>,
}

impl Span {
    /// The context a child (or an outgoing request) carries.
    pub fn context(&self) -> TraceContext {
        TraceContext {
            trace_id: self.record.trace_id,
            span_id: self.record.span_id,
            sampled: true,
        }
    }

    /// Renames it (the route template is known once the request is parsed).
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.record.name = name.into();
    }

    /// Adds an attribute.
    pub fn set(&mut self, key: &'static str, value: Value) {
        self.record.attributes.push((key, value));
    }

    /// Marks it failed.
    pub fn set_error(&mut self) {
        self.record.error = true;
    }
}

/// The most children one span keeps: a request that makes thousands of store calls
/// (a garbage collection) must not hold them all.
const MAX_CHILDREN: usize = 256;

tokio::task_local! {
    static CURRENT: Arc<Mutex<Vec<SpanRecord>>>;
    static PARENT: ([u8; 16], [u8; 8]);
}

/// Records a finished operation of `took` as a child of the task's current span, if any:
/// what the stores call for every read, write and blob action (`kind` is `metadata` or
/// `storage`, `backend` its engine or driver).
pub fn record_child(
    kind: &'static str,
    op: &'static str,
    backend: &'static str,
    took: Duration,
    ok: bool,
) {
    let Ok((trace_id, parent)) = PARENT.try_with(|p| *p) else {
        return;
    };
    let end_ns = now_ns();
    let record = SpanRecord {
        trace_id,
        span_id: new_span_id(),
        parent: Some(parent),
        name: format!("{kind} {op}"),
        server: false,
        start_ns: end_ns.saturating_sub(took.as_nanos() as u64),
        end_ns,
        attributes: vec![("berth.backend", Value::Text(backend.to_owned()))],
        error: !ok,
    };
    let _ = CURRENT.try_with(|children| {
        if let Ok(mut children) = children.lock() {
            if children.len() < MAX_CHILDREN {
                children.push(record);
            }
        }
    });
}

/// The `traceparent` for a request made on behalf of the task's current span (to the
/// object store), if a recorded span is current.
pub fn current_traceparent() -> Option<String> {
    PARENT
        .try_with(|(trace_id, span_id)| {
            TraceContext {
                trace_id: *trace_id,
                span_id: *span_id,
                sampled: true,
            }
            .header()
        })
        .ok()
}

/// Starts spans, decides which traces are recorded, and hands finished spans to the
/// exporter.
#[derive(Clone)]
pub struct Tracer {
    settings: Arc<TracingSettings>,
    exporter: export::Exporter,
}

impl Tracer {
    /// A tracer exporting to the configured collector. Must run inside the runtime.
    pub fn start_exporting(settings: TracingSettings) -> Tracer {
        let exporter = export::Exporter::spawn(&settings);
        Tracer {
            settings: Arc::new(settings),
            exporter,
        }
    }

    /// What the exporter did, for the metrics.
    pub fn counters(&self) -> &ExportCounters {
        self.exporter.counters()
    }

    /// A span for a request that came with `traceparent` (if any), or `None` when the
    /// trace is not recorded.
    pub fn start(&self, traceparent: Option<&str>, name: &str) -> Option<Span> {
        let parent = traceparent.and_then(TraceContext::parse);
        let (trace_id, parent_span, sampled) = match parent {
            Some(p) => (p.trace_id, Some(p.span_id), p.sampled),
            None => {
                let trace_id: [u8; 16] = random_bytes();
                let sampled = ratio_admits(self.settings.sample_ratio, &trace_id);
                (trace_id, None, sampled)
            }
        };
        if !sampled {
            return None;
        }
        Some(Span {
            record: SpanRecord {
                trace_id,
                span_id: new_span_id(),
                parent: parent_span,
                name: name.to_owned(),
                server: true,
                start_ns: now_ns(),
                end_ns: 0,
                attributes: vec![("berth.node", Value::Text(self.settings.node.clone()))],
                error: false,
            },
            children: Arc::default(),
        })
    }

    /// Runs `work` with `span` current, so the stores' operations become its children.
    pub async fn in_span<F: std::future::Future>(&self, span: &Span, work: F) -> F::Output {
        let ids = (span.record.trace_id, span.record.span_id);
        CURRENT
            .scope(span.children.clone(), PARENT.scope(ids, work))
            .await
    }

    /// Ends `span` and queues it with its children for export.
    pub fn finish(&self, mut span: Span) {
        span.record.end_ns = now_ns();
        let mut records = vec![span.record];
        if let Ok(mut children) = span.children.lock() {
            records.append(&mut children);
        }
        self.exporter.queue(records);
    }
}

/// Whether a new trace is recorded: its id's last 8 bytes below `ratio` of their range, so
/// every node decides the same for the same trace.
fn ratio_admits(ratio: f64, trace_id: &[u8; 16]) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 || ratio.is_nan() {
        return false;
    }
    let tail = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"));
    (tail as f64) < ratio * (u64::MAX as f64)
}

fn new_span_id() -> [u8; 8] {
    random_bytes()
}

/// `N` random bytes: a version 4 UUID's, without the bits its version and variant fix.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let mut filled = 0;
    while filled < N {
        let uuid = uuid::Uuid::new_v4();
        for (i, byte) in uuid.as_bytes().iter().enumerate() {
            if i != 6 && i != 8 && filled < N {
                out[filled] = *byte;
                filled += 1;
            }
        }
    }
    out
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_what_the_spec_rejects() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(header).unwrap();
        assert!(context.sampled);
        assert_eq!(context.header(), header);
        let unsampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?}");
        }
        // A later version may add fields.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn the_ratio_admits_about_its_share() {
        let admitted = (0..10_000)
            .filter(|_| ratio_admits(0.25, &random_bytes()))
            .count();
        assert!((2_000..3_000).contains(&admitted), "{admitted}");
        assert!(!ratio_admits(0.0, &[0xff; 16]));
        assert!(ratio_admits(1.0, &[0xff; 16]));
    }
}
