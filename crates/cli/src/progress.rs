//! Showing a copy or pull as it goes: on a terminal, a line per blob redrawn in place
//! with bytes and speed (as docker does); elsewhere one line per change of state, so a
//! CI log stays readable; with `--json`, one JSON object per event for machines.
//! Everything shown comes from digests and numbers, never from a registry's own strings.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_client::{BlobOutcome, Progress, ProgressSink};
use berth_oci::Digest;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Lines redrawn in place on a terminal (stderr).
    Terminal,
    /// One line per change of state (stderr).
    Lines,
    /// One JSON object per event (stdout).
    Json,
}

impl Mode {
    /// JSON if asked; else a terminal display when stderr is one.
    pub(crate) fn choose(json: bool) -> Mode {
        if json {
            Mode::Json
        } else if std::io::stderr().is_terminal() {
            Mode::Terminal
        } else {
            Mode::Lines
        }
    }
}

/// The most often a terminal display is redrawn, and a JSON byte count repeated.
const REDRAW_EVERY: Duration = Duration::from_millis(150);

struct BlobLine {
    digest: Digest,
    size: u64,
    done: u64,
    state: &'static str,
    started: Instant,
    finished: Option<Instant>,
    last_reported: Option<Instant>,
}

struct State {
    blobs: Vec<BlobLine>,
    drawn: usize,
    last_draw: Option<Instant>,
}

/// A progress display; `sink` hands the client its callback.
pub(crate) struct Display {
    mode: Mode,
    /// "copying" or "downloading".
    verb: &'static str,
    state: Mutex<State>,
}

impl Display {
    pub(crate) fn new(mode: Mode, verb: &'static str) -> Arc<Display> {
        Arc::new(Display {
            mode,
            verb,
            state: Mutex::new(State {
                blobs: Vec::new(),
                drawn: 0,
                last_draw: None,
            }),
        })
    }

    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    pub(crate) fn sink(self: &Arc<Self>) -> ProgressSink {
        let display = Arc::clone(self);
        Arc::new(move |event: &Progress| display.on(event))
    }

    fn on(&self, event: &Progress) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let now = Instant::now();
        let mut changed = true;
        let mut line: Option<String> = None;
        match event {
            Progress::BlobStarted { digest, size } => {
                let index = state.line(digest, *size, now);
                state.blobs[index].state = self.verb;
                line = Some(format!("{}: {} {}", short(digest), self.verb, bytes(*size)));
            }
            Progress::BlobBytes { digest, done, size } => {
                let index = state.line(digest, *size, now);
                let blob = &mut state.blobs[index];
                blob.done = *done;
                changed = false;
                if self.mode == Mode::Json
                    && blob.last_reported.is_none_or(|t| now - t >= REDRAW_EVERY)
                {
                    blob.last_reported = Some(now);
                    emit_json(&serde_json::json!({
                        "event": "blob_bytes", "digest": digest.to_string(),
                        "done": done, "size": size,
                    }));
                }
            }
            Progress::BlobDone {
                digest,
                size,
                outcome,
            } => {
                let index = state.line(digest, *size, now);
                let blob = &mut state.blobs[index];
                blob.done = *size;
                blob.finished = Some(now);
                blob.state = match outcome {
                    BlobOutcome::Copied => "done",
                    BlobOutcome::Skipped => "already there",
                    BlobOutcome::Mounted => "mounted",
                };
                line = Some(match outcome {
                    BlobOutcome::Copied => format!(
                        "{}: done, {} in {}",
                        short(digest),
                        bytes(*size),
                        speed(*size, now - blob.started)
                    ),
                    _ => format!("{}: {}", short(digest), blob.state),
                });
            }
            Progress::ManifestStored { digest, .. } => {
                line = Some(format!("manifest {digest}: stored"));
                changed = false;
            }
        }
        match self.mode {
            Mode::Json => {
                if !matches!(event, Progress::BlobBytes { .. }) {
                    emit_json(&event_json(event));
                }
            }
            Mode::Lines => {
                if let Some(line) = line {
                    eprintln!("{line}");
                }
            }
            Mode::Terminal => {
                let due = state.last_draw.is_none_or(|t| now - t >= REDRAW_EVERY);
                if changed || due {
                    state.last_draw = Some(now);
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(state.render(now).as_bytes());
                    let _ = err.flush();
                }
            }
        }
    }

    /// Draws the final state (a terminal display skips redraws that come too fast).
    pub(crate) fn finish(&self) {
        if self.mode != Mode::Terminal {
            return;
        }
        if let Ok(mut state) = self.state.lock() {
            let text = state.render(Instant::now());
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(text.as_bytes());
            let _ = err.flush();
        }
    }
}

impl State {
    /// The index of `digest`'s line, added if new.
    fn line(&mut self, digest: &Digest, size: u64, now: Instant) -> usize {
        if let Some(i) = self.blobs.iter().position(|b| &b.digest == digest) {
            return i;
        }
        self.blobs.push(BlobLine {
            digest: digest.clone(),
            size,
            done: 0,
            state: "waiting",
            started: now,
            finished: None,
            last_reported: None,
        });
        self.blobs.len() - 1
    }

    /// The escape sequences that move back over the lines drawn last and draw them anew.
    fn render(&mut self, now: Instant) -> String {
        let mut text = String::new();
        if self.drawn > 0 {
            text.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for blob in &self.blobs {
            let elapsed = blob.finished.unwrap_or(now) - blob.started;
            text.push_str("\r\x1b[2K");
            text.push_str(&format!(
                "{}: {:<13} {}",
                short(&blob.digest),
                blob.state,
                bar(blob.done, blob.size)
            ));
            if blob.done > 0 && blob.state != "already there" && blob.state != "mounted" {
                text.push_str(&format!(
                    " {}/{} {}",
                    bytes(blob.done),
                    bytes(blob.size),
                    speed(blob.done, elapsed)
                ));
            }
            text.push('\n');
        }
        self.drawn = self.blobs.len();
        text
    }
}

/// An event as the JSON object `--json` prints.
fn event_json(event: &Progress) -> serde_json::Value {
    match event {
        Progress::BlobStarted { digest, size } => serde_json::json!({
            "event": "blob_started", "digest": digest.to_string(), "size": size,
        }),
        Progress::BlobBytes { digest, done, size } => serde_json::json!({
            "event": "blob_bytes", "digest": digest.to_string(), "done": done, "size": size,
        }),
        Progress::BlobDone {
            digest,
            size,
            outcome,
        } => serde_json::json!({
            "event": "blob_done", "digest": digest.to_string(), "size": size,
            "outcome": match outcome {
                BlobOutcome::Copied => "copied",
                BlobOutcome::Skipped => "skipped",
                BlobOutcome::Mounted => "mounted",
            },
        }),
        Progress::ManifestStored { digest, media_type } => serde_json::json!({
            "event": "manifest_stored", "digest": digest.to_string(), "mediaType": media_type,
        }),
    }
}

/// Prints one JSON line on stdout.
pub(crate) fn emit_json(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// The first 12 hex digits, as docker shows layers.
fn short(digest: &Digest) -> &str {
    &digest.hex()[..12.min(digest.hex().len())]
}

/// A 20-cell bar.
fn bar(done: u64, size: u64) -> String {
    let filled = if size == 0 {
        20
    } else {
        ((done.min(size) as u128 * 20) / size as u128) as usize
    };
    format!("[{}{}]", "=".repeat(filled), " ".repeat(20 - filled))
}

/// A byte count as docker shows one: decimal units, one decimal place.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn speed(n: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    format!("{}/s", bytes((n as f64 / secs) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    #[test]
    fn sizes_read_as_docker_shows_them() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_500), "1.5 kB");
        assert_eq!(bytes(52_400_000), "52.4 MB");
        assert_eq!(bytes(1_073_741_824), "1.1 GB");
    }

    #[test]
    fn a_terminal_display_redraws_its_lines_in_place() {
        let mut state = State {
            blobs: Vec::new(),
            drawn: 0,
            last_draw: None,
        };
        let now = Instant::now();
        let a = state.line(&digest(1), 1000, now);
        state.blobs[a].state = "downloading";
        state.blobs[a].done = 500;
        let b = state.line(&digest(2), 10, now);
        state.blobs[b].state = "already there";
        let first = state.render(now + Duration::from_secs(1));
        assert!(!first.contains("\x1b[2A"), "nothing to move back over yet");
        assert_eq!(first.matches('\n').count(), 2);
        assert!(
            first.contains("[==========          ] 500 B/1.0 kB 500 B/s"),
            "{first:?}"
        );
        let second = state.render(now + Duration::from_secs(2));
        assert!(second.starts_with("\x1b[2A"), "{second:?}");
        assert_eq!(state.line(&digest(1), 1000, now), a, "one line per blob");
    }

    #[test]
    fn json_events_name_the_blob_and_outcome() {
        let event = Progress::BlobDone {
            digest: digest(3),
            size: 7,
            outcome: BlobOutcome::Skipped,
        };
        let value = event_json(&event);
        assert_eq!(value["event"], "blob_done");
        assert_eq!(value["outcome"], "skipped");
        assert_eq!(value["digest"], digest(3).to_string());
    }
}
