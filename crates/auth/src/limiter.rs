//! Brute-force protection: failed logins are counted per account name and per client
//! address in a fixed window; once either count reaches the limit, logins for that name
//! (or from that address) are refused, even with the right password, until the window
//! ends. A success clears the name's count, not the address's, so an attacker cannot
//! reset its own address by logging in to an account it controls.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Failures seen for one key within the current window.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// Counts failed logins by name and by address.
#[derive(Debug)]
pub struct LoginLimiter {
    max_failures: u32,
    window: Duration,
    by_name: HashMap<String, Window>,
    by_address: HashMap<String, Window>,
}

/// Entries kept at most per map before expired ones are pruned.
const PRUNE_AT: usize = 10_000;

impl LoginLimiter {
    /// Allows `max_failures` failures per name and per address within `window`.
    pub fn new(max_failures: u32, window: Duration) -> Self {
        LoginLimiter {
            max_failures,
            window,
            by_name: HashMap::new(),
            by_address: HashMap::new(),
        }
    }

    /// `Err(retry_after)` while the name or the address is locked out.
    pub fn check(&mut self, name: &str, address: &str, now: Instant) -> Result<(), Duration> {
        let locked = |map: &HashMap<String, Window>, key: &str| {
            map.get(key).and_then(|w| {
                let ends = w.started + self.window;
                (w.failures >= self.max_failures && now < ends).then(|| ends - now)
            })
        };
        match locked(&self.by_name, name).max(locked(&self.by_address, address)) {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    /// Counts one failure against the name and the address.
    pub fn record_failure(&mut self, name: &str, address: &str, now: Instant) {
        for (map, key) in [(&mut self.by_name, name), (&mut self.by_address, address)] {
            if map.len() >= PRUNE_AT {
                let window = self.window;
                map.retain(|_, w| now < w.started + window);
            }
            let w = map.entry(key.to_owned()).or_insert(Window {
                started: now,
                failures: 0,
            });
            if now >= w.started + self.window {
                *w = Window {
                    started: now,
                    failures: 0,
                };
            }
            w.failures += 1;
        }
    }

    /// A successful login clears the name's failures.
    pub fn record_success(&mut self, name: &str) {
        self.by_name.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_by_name_and_by_address_until_the_window_ends() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(l.check("alice", "10.0.0.1", t0).is_ok());
            l.record_failure("alice", "10.0.0.1", t0);
        }
        assert!(l.check("alice", "10.0.0.2", t0).is_err(), "name locked");
        assert!(l.check("bob", "10.0.0.1", t0).is_err(), "address locked");
        assert!(l.check("bob", "10.0.0.2", t0).is_ok());
        let later = t0 + Duration::from_secs(61);
        assert!(l.check("alice", "10.0.0.1", later).is_ok());
        l.record_failure("carol", "10.0.0.3", later);
        l.record_success("carol");
        l.record_failure("carol", "10.0.0.4", later);
        l.record_failure("carol", "10.0.0.5", later);
        assert!(l.check("carol", "10.0.0.6", later).is_ok(), "success reset");
    }
}
