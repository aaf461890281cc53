//! Large buffers kept for the next request instead of going back to the allocator: for
//! a push, allocating, zeroing and faulting in megabytes per request showed in profiles
//! (the direct-write buffers of `staging.rs`, the body blocks of `blocks.rs`).

use std::sync::Mutex;

/// At most `keep` spare buffers, shared by every thread.
pub(crate) struct BufferPool {
    spare: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufferPool {
    /// An empty pool that keeps at most `keep` buffers.
    pub(crate) const fn new(keep: usize) -> Self {
        BufferPool {
            spare: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A kept buffer that `fits`, if there is one; its bytes are whatever its last user
    /// left there.
    pub(crate) fn take(&self, fits: impl Fn(&Vec<u8>) -> bool) -> Option<Vec<u8>> {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        let found = spare.iter().position(fits)?;
        Some(spare.swap_remove(found))
    }

    /// Keeps `buffer` for a later [`BufferPool::take`], unless the pool is full.
    pub(crate) fn give(&self, buffer: Vec<u8>) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < self.keep {
            spare.push(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_only_if_it_fits_and_the_pool_stays_bounded() {
        let pool = BufferPool::new(2);
        assert!(pool.take(|_| true).is_none());
        for len in [10, 20, 30] {
            pool.give(vec![0; len]);
        }
        assert!(
            pool.take(|b| b.len() == 30).is_none(),
            "past the bound: dropped"
        );
        assert_eq!(pool.take(|b| b.len() == 20).map(|b| b.len()), Some(20));
        assert_eq!(pool.take(|_| true).map(|b| b.len()), Some(10));
        assert!(pool.take(|_| true).is_none());
    }
}
