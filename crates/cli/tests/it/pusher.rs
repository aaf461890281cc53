//! Background load for the outage tests.

/// A client pushing in the background — an attempt every 20 ms — that keeps what was
/// acknowledged and counts what was refused: the load an outage test runs under.
/// Stopped when finished or dropped.
pub(crate) struct BackgroundPusher {
    acknowledged: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundPusher {
    /// `push(n)` makes attempt `n` and returns, if it was acknowledged, what to check later.
    pub(crate) fn start(push: impl Fn(usize) -> Option<String> + Send + 'static) -> Self {
        use std::sync::atomic::Ordering;
        let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a, r, s) = (acknowledged.clone(), refused.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                match push(n) {
                    Some(done) => a.lock().unwrap().push(done),
                    None => {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        BackgroundPusher {
            acknowledged,
            refused,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self) -> (usize, usize) {
        let refused = self.refused.load(std::sync::atomic::Ordering::Relaxed);
        (self.acknowledged.lock().unwrap().len(), refused)
    }

    /// Waits (10 s at most) until `more` further pushes were acknowledged.
    pub(crate) fn wait_acknowledged(&self, more: usize) -> bool {
        let start = self.count().0;
        berth_testkit::wait_until(std::time::Duration::from_secs(10), || {
            self.count().0 >= start + more
        })
    }

    /// Waits (10 s at most) until a further push was refused.
    pub(crate) fn wait_refused(&self) -> bool {
        let start = self.count().1;
        berth_testkit::wait_until(std::time::Duration::from_secs(10), || {
            self.count().1 > start
        })
    }

    /// Stops pushing; returns what was acknowledged and how many pushes were refused.
    pub(crate) fn finish(mut self) -> (Vec<String>, usize) {
        self.halt();
        let refused = self.count().1;
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        (acknowledged, refused)
    }

    fn halt(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("pusher thread");
        }
    }
}

impl Drop for BackgroundPusher {
    fn drop(&mut self) {
        self.halt();
    }
}
