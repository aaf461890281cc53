//! How many upload sessions one caller may hold open. A session costs a record and a
//! staging file until it is finished, cancelled or purged, so without a cap one client can
//! open them by the ten thousand. Counted in this process: each node of a cluster allows
//! the cap on its own, and a restart forgets sessions opened before it (the purge of
//! abandoned sessions still finds them).

use std::collections::HashMap;
use std::sync::Mutex;

use berth_meta::Actor;

/// Open sessions per caller, and whose each session is.
#[derive(Default)]
pub(crate) struct UploadQuota {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    by_caller: HashMap<String, usize>,
    caller_of: HashMap<String, String>,
}

impl UploadQuota {
    /// Counts session `id` against `by` unless it already holds `max`; false if it does.
    pub(crate) fn take(&self, by: &Actor, id: &str, max: usize) -> bool {
        let caller = caller_key(by);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let open = state.by_caller.entry(caller.clone()).or_default();
        if *open >= max {
            return false;
        }
        *open += 1;
        state.caller_of.insert(id.to_owned(), caller);
        true
    }

    /// Sessions open on this node, over every caller.
    pub(crate) fn open(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .caller_of
            .len()
    }

    /// Gives back session `id`'s place (finished, cancelled or purged).
    pub(crate) fn release(&self, id: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(caller) = state.caller_of.remove(id) {
            if let Some(open) = state.by_caller.get_mut(&caller) {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    state.by_caller.remove(&caller);
                }
            }
        }
    }
}

/// Anonymous callers (an open registry) are told apart by address, everyone else by name.
fn caller_key(by: &Actor) -> String {
    if by.kind == "anonymous" {
        format!("anonymous@{}", by.address)
    } else {
        format!("{}:{}", by.kind, by.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(kind: &str, name: &str, address: &str) -> Actor {
        Actor {
            name: name.into(),
            kind: kind.into(),
            address: address.into(),
        }
    }

    #[test]
    fn each_caller_has_its_own_cap_and_finished_sessions_give_their_place_back() {
        let q = UploadQuota::default();
        let alice = actor("user", "alice", "10.0.0.1");
        assert!(q.take(&alice, "a1", 2));
        assert!(q.take(&alice, "a2", 2));
        assert!(!q.take(&alice, "a3", 2));
        assert!(q.take(&actor("user", "bob", "10.0.0.1"), "b1", 2));
        assert!(q.take(&actor("anonymous", "anonymous", "10.0.0.2"), "x1", 1));
        assert!(!q.take(&actor("anonymous", "anonymous", "10.0.0.2"), "x2", 1));
        assert!(q.take(&actor("anonymous", "anonymous", "10.0.0.3"), "y1", 1));
        q.release("a1");
        q.release("a1");
        assert!(q.take(&alice, "a3", 2));
        assert!(!q.take(&alice, "a4", 2));
    }
}
