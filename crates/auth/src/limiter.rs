//! Brute-force protection without a lockout anyone can trigger. Failed logins are counted
//! in a fixed window per (name, address) pair, per address, and per name:
//!
//! - an address that fails one name `max_failures` times may not try that name again
//!   until the window ends;
//! - an address that fails `ADDRESS_FACTOR` times as often, over any names, may not try
//!   any (it is spraying);
//! - a name failed `max_failures` times from anywhere stays open to addresses that have
//!   not failed it, so an attacker cannot lock a user out, and the right password from
//!   the user's own machine still works; only addresses that already failed it wait.
//!
//! Robot names are never locked as names (their secrets are random; guessing them is
//! hopeless, locking them would stop CI): only the address limit applies to them.
//! Counts live in this process: each node of a cluster keeps its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::ROBOT_PREFIX;

/// Failures seen for one key within the current window.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// How many failures, over any names, lock an address: a user mistyping a password a few
/// times never gets there; a sprayer does quickly.
const ADDRESS_FACTOR: u32 = 5;
/// Entries per map before expired ones are pruned, and the most ever kept (past it the
/// map starts over: memory stays bounded whatever an attacker sends).
const PRUNE_AT: usize = 10_000;
const MAX_ENTRIES: usize = 100_000;

/// Counts failed logins by (name, address), by address and by name.
#[derive(Debug)]
pub struct LoginLimiter {
    max_failures: u32,
    window: Duration,
    by_pair: HashMap<(String, String), Window>,
    by_address: HashMap<String, Window>,
    by_name: HashMap<String, Window>,
    /// Refusals per address not yet written to the audit log, and when one last was.
    refusals: HashMap<String, Refusals>,
}

/// Refused attempts from one address, audited as a count rather than a row each.
#[derive(Debug, Clone, Copy)]
struct Refusals {
    last_recorded: Instant,
    unrecorded: u32,
}

/// How often, at most, refusals from one address are written to the audit log.
const REFUSAL_REPORT_EVERY: Duration = Duration::from_secs(60);

impl LoginLimiter {
    /// Allows `max_failures` failures per (name, address) within `window`.
    pub fn new(max_failures: u32, window: Duration) -> Self {
        LoginLimiter {
            max_failures,
            window,
            by_pair: HashMap::new(),
            by_address: HashMap::new(),
            by_name: HashMap::new(),
            refusals: HashMap::new(),
        }
    }

    /// Counts a refused (locked-out) attempt from `address`; returns how many refusals to
    /// write to the audit log now, if it is time: the first at once, then at most one
    /// line a minute per address with the count since the last. A flood of refusals
    /// therefore costs the log a line a minute, not a row per attempt.
    pub fn count_refusal(&mut self, address: &str, now: Instant) -> Option<u32> {
        let key = address_key(address);
        if self.refusals.len() >= PRUNE_AT {
            self.refusals
                .retain(|_, r| now < r.last_recorded + REFUSAL_REPORT_EVERY);
            if self.refusals.len() >= MAX_ENTRIES {
                self.refusals.clear();
            }
        }
        match self.refusals.get_mut(&key) {
            Some(r) if now < r.last_recorded + REFUSAL_REPORT_EVERY => {
                r.unrecorded = r.unrecorded.saturating_add(1);
                None
            }
            Some(r) => {
                let count = r.unrecorded.saturating_add(1);
                *r = Refusals {
                    last_recorded: now,
                    unrecorded: 0,
                };
                Some(count)
            }
            None => {
                self.refusals.insert(
                    key,
                    Refusals {
                        last_recorded: now,
                        unrecorded: 0,
                    },
                );
                Some(1)
            }
        }
    }

    /// `Err(retry_after)` while this address may not try this name.
    pub fn check(&mut self, name: &str, address: &str, now: Instant) -> Result<(), Duration> {
        let address = address_key(address);
        let window = self.window;
        let live = |w: &Window| now < w.started + window;
        let wait = |w: &Window| (w.started + window).saturating_duration_since(now);
        let mut locked: Option<Duration> = None;
        let mut lock = |w: &Window| locked = Some(locked.unwrap_or_default().max(wait(w)));
        if let Some(w) = self.by_address.get(&address) {
            if live(w) && w.failures >= self.max_failures.saturating_mul(ADDRESS_FACTOR) {
                lock(w);
            }
        }
        if !name.starts_with(ROBOT_PREFIX) {
            let pair = self.by_pair.get(&(name.to_owned(), address.clone()));
            if let Some(p) = pair.filter(|p| live(p)) {
                if p.failures >= self.max_failures {
                    lock(p);
                }
                if let Some(n) = self.by_name.get(name) {
                    if live(n) && n.failures >= self.max_failures {
                        lock(n);
                    }
                }
            }
        }
        match locked {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    /// Counts one failure against the pair, the address and the name.
    pub fn record_failure(&mut self, name: &str, address: &str, now: Instant) {
        let address = address_key(address);
        let window = self.window;
        count(&mut self.by_address, address.clone(), now, window);
        if !name.starts_with(ROBOT_PREFIX) {
            count(&mut self.by_pair, (name.to_owned(), address), now, window);
            count(&mut self.by_name, name.to_owned(), now, window);
        }
    }

    /// A successful login clears the name's failures and this address's failures of it,
    /// not the address's total, so an attacker cannot reset its own address by logging in
    /// to an account it controls.
    pub fn record_success(&mut self, name: &str, address: &str) {
        self.by_name.remove(name);
        self.by_pair
            .remove(&(name.to_owned(), address_key(address)));
    }
}

fn count<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Window>,
    key: K,
    now: Instant,
    window: Duration,
) {
    if map.len() >= PRUNE_AT {
        map.retain(|_, w| now < w.started + window);
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
    }
    let w = map.entry(key).or_insert(Window {
        started: now,
        failures: 0,
    });
    if now >= w.started + window {
        *w = Window {
            started: now,
            failures: 0,
        };
    }
    w.failures = w.failures.saturating_add(1);
}

/// The unit an address is counted in: an IPv4 address, or an IPv6 /64 (one host gets a
/// whole /64 and could otherwise rotate through it).
fn address_key(address: &str) -> String {
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Ok(IpAddr::V6(v6)) => v6
            .to_ipv4_mapped()
            .map(|v4| v4.to_string())
            .unwrap_or_default(),
        _ => address.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(l: &mut LoginLimiter, name: &str, address: &str, now: Instant, times: u32) {
        for _ in 0..times {
            l.record_failure(name, address, now);
        }
    }

    #[test]
    fn failures_from_elsewhere_never_lock_a_user_out_of_a_clean_address() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(3, Duration::from_secs(60));
        // Attackers on many addresses fail "admin" again and again.
        for i in 0..50 {
            fail(&mut l, "admin", &format!("10.0.1.{i}"), t0, 1);
        }
        fail(&mut l, "admin", "10.0.0.66", t0, 3);
        assert!(
            l.check("admin", "10.0.0.66", t0).is_err(),
            "the failing pair is locked"
        );
        assert!(
            l.check("admin", "10.0.1.7", t0).is_err(),
            "an address that failed it waits"
        );
        assert!(
            l.check("admin", "192.168.1.5", t0).is_ok(),
            "the admin's own machine is not"
        );
        assert!(
            l.check("bob", "10.0.0.66", t0).is_ok(),
            "other names from that address are"
        );
        let later = t0 + Duration::from_secs(61);
        assert!(
            l.check("admin", "10.0.0.66", later).is_ok(),
            "the window ends"
        );
    }

    #[test]
    fn an_address_spraying_names_is_locked_for_all_of_them() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(3, Duration::from_secs(60));
        for i in 0..15 {
            fail(&mut l, &format!("user{i}"), "10.0.0.9", t0, 1);
        }
        assert!(l.check("someone-else", "10.0.0.9", t0).is_err());
        // IPv6 neighbours in one /64 count as one address.
        for i in 0..15 {
            fail(
                &mut l,
                &format!("user{i}"),
                &format!("2001:db8:1:2::{i:x}"),
                t0,
                1,
            );
        }
        assert!(l.check("x", "2001:db8:1:2:ffff::1", t0).is_err());
        assert!(l.check("x", "2001:db8:1:3::1", t0).is_ok());
    }

    #[test]
    fn refusals_are_reported_as_a_count_a_minute() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(3, Duration::from_secs(60));
        assert_eq!(l.count_refusal("10.0.0.1", t0), Some(1));
        for _ in 0..999 {
            assert_eq!(
                l.count_refusal("10.0.0.1", t0 + Duration::from_secs(1)),
                None
            );
        }
        assert_eq!(l.count_refusal("10.0.0.2", t0), Some(1), "per address");
        assert_eq!(
            l.count_refusal("10.0.0.1", t0 + Duration::from_secs(61)),
            Some(1000)
        );
    }

    #[test]
    fn robots_are_never_locked_by_name_and_success_resets_the_pair() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(3, Duration::from_secs(60));
        let robot = format!("{ROBOT_PREFIX}proj+ci");
        fail(&mut l, &robot, "10.0.0.1", t0, 10);
        assert!(l.check(&robot, "10.0.0.2", t0).is_ok());
        fail(&mut l, "carol", "10.0.0.3", t0, 2);
        l.record_success("carol", "10.0.0.3");
        fail(&mut l, "carol", "10.0.0.3", t0, 2);
        assert!(
            l.check("carol", "10.0.0.3", t0).is_ok(),
            "success reset the pair"
        );
    }
}
