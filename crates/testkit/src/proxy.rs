//! A loopback TCP relay that a test can cut and restore: a network outage between the
//! registry and one of its backends, without touching the backend itself (which other
//! tests share). While cut, open connections are shut down and new ones are closed at once.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The relay; it stops accepting when dropped.
pub struct CuttableProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stopped: Arc<AtomicBool>,
}

impl CuttableProxy {
    /// Relays `127.0.0.1:<new port>` to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address");
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stopped = Arc::new(AtomicBool::new(false));
        let (c, o, s) = (cut.clone(), open.clone(), stopped.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                if c.load(Ordering::Relaxed) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(upstream) = TcpStream::connect(target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                if let (Ok(a), Ok(b)) = (client.try_clone(), upstream.try_clone()) {
                    if let Ok(mut list) = o.lock() {
                        list.push(a);
                        list.push(b);
                    }
                }
                relay(client.try_clone(), upstream.try_clone());
                relay(upstream.try_clone(), client.try_clone());
            }
        });
        CuttableProxy {
            addr,
            cut,
            open,
            stopped,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the link: open connections die, new ones are refused.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        if let Ok(mut list) = self.open.lock() {
            for stream in list.drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// Restores the link.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.cut();
    }
}

/// Copies one direction until either side closes.
fn relay(from: std::io::Result<TcpStream>, to: std::io::Result<TcpStream>) {
    let (Ok(mut from), Ok(mut to)) = (from, to) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
