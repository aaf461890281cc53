//! A webhook receiver for tests: a small HTTP/1.1 server on `127.0.0.1:0` that records
//! every request (headers, body, arrival time) and answers as the test tells it to:
//! accept, fail with 500, answer slowly, or be down (its port closed, then open again).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverMode {
    /// 204 at once.
    Healthy,
    /// 500 at once.
    Failing,
    /// 204 after this long.
    Slow(Duration),
    /// The port is closed: connections are refused.
    Down,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    /// The request path.
    pub path: String,
    /// Headers, names lower-cased.
    pub headers: HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
    /// When it arrived whole.
    pub at: Instant,
    /// Whether the receiver accepted it (answered 2xx).
    pub accepted: bool,
}

struct Shared {
    mode: Mutex<ReceiverMode>,
    requests: Mutex<Vec<ReceivedRequest>>,
    stop: AtomicBool,
}

/// A running receiver; stopped on drop.
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listener: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The largest body the receiver reads.
const MAX_BODY: usize = 1 << 20;

impl WebhookReceiver {
    /// Starts a healthy receiver.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let shared = Arc::new(Shared {
            mode: Mutex::new(ReceiverMode::Healthy),
            requests: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let thread = spawn_accept(listener, shared.clone());
        WebhookReceiver {
            addr,
            shared,
            listener: Mutex::new(Some(thread)),
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Changes how it answers; `Down` closes the port, leaving `Down` opens it again.
    pub fn set_mode(&self, mode: ReceiverMode) {
        let old = std::mem::replace(&mut *self.shared.mode.lock().unwrap(), mode);
        match (old == ReceiverMode::Down, mode == ReceiverMode::Down) {
            (false, true) => self.close(),
            (true, false) => {
                // The same port again (std sets SO_REUSEADDR); retried while the old
                // socket lingers.
                let mut listener = None;
                for _ in 0..100 {
                    match TcpListener::bind(self.addr) {
                        Ok(l) => {
                            listener = Some(l);
                            break;
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                let listener = listener.expect("rebinding the receiver's port");
                self.shared.stop.store(false, Ordering::SeqCst);
                *self.listener.lock().unwrap() = Some(spawn_accept(listener, self.shared.clone()));
            }
            _ => {}
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// How many requests were accepted.
    pub fn accepted(&self) -> usize {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.accepted)
            .count()
    }

    fn close(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag and drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(thread) = self.listener.lock().unwrap().take() {
            let _ = thread.join();
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.close();
    }
}

fn spawn_accept(listener: TcpListener, shared: Arc<Shared>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(stream) = stream else { continue };
            let shared = shared.clone();
            std::thread::spawn(move || serve_connection(stream, &shared));
        }
    })
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        let mut headers = HashMap::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
            .min(MAX_BODY);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let mode = *shared.mode.lock().unwrap();
        if shared.stop.load(Ordering::SeqCst) || mode == ReceiverMode::Down {
            return;
        }
        if let ReceiverMode::Slow(pause) = mode {
            std::thread::sleep(pause);
        }
        let accepted = mode != ReceiverMode::Failing;
        let answer: &[u8] = if accepted {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        } else {
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nnope"
        };
        let arrived = ReceivedRequest {
            path,
            headers,
            body,
            at: Instant::now(),
            accepted,
        };
        // Recorded before answering: what the sender sees as delivered is here.
        shared.requests.lock().unwrap().push(arrived);
        if writer.write_all(answer).is_err() {
            return;
        }
    }
}
