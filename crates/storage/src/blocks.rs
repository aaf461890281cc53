//! Reused blocks for a large body on its way to the writing and hashing threads.
//!
//! The request's chunks were handed on as they came: slices of hyper's read buffer, up to
//! ~400 KiB each, kept alive by the hash lagging behind and freed later on other threads.
//! hyper could never reuse its buffer, and glibc's allocator, seeing those frees arrive in
//! bursts at the top of the reading thread's heap, gave the memory back to the kernel
//! (`madvise(MADV_DONTNEED)`) only to fault it in again for the next read: about 300 MiB
//! of page faults per GiB pushed (PERFORMANCE.md, "The allocator"). The body is now copied
//! into blocks taken from a small pool and put back once written and hashed; hyper's
//! buffer is free again as soon as a chunk is copied.

use bytes::Bytes;

use crate::pool::BufferPool;

/// Bytes per block: large enough that the hand-over costs nothing next to the copy.
pub(crate) const BLOCK: usize = 512 * 1024;
/// Blocks kept for the next body, 8 MiB idle at most.
static SPARE: BufferPool = BufferPool::new(16);

/// A block's memory while a [`Bytes`] made from it is alive; back to the pool after.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut block = std::mem::take(&mut self.0);
        if block.capacity() != BLOCK {
            return;
        }
        block.clear();
        SPARE.give(block);
    }
}

/// Gathers a body's chunks into blocks of [`BLOCK`] bytes.
pub(crate) struct Blocks {
    filling: Vec<u8>,
}

impl Blocks {
    /// No bytes yet.
    pub(crate) fn new() -> Self {
        Blocks { filling: take() }
    }

    /// Copies `chunk` in; returns the blocks it filled, in order.
    pub(crate) fn push(&mut self, mut chunk: &[u8]) -> Vec<Bytes> {
        let mut full = Vec::new();
        while !chunk.is_empty() {
            let room = BLOCK - self.filling.len();
            let (now, rest) = chunk.split_at(room.min(chunk.len()));
            self.filling.extend_from_slice(now);
            chunk = rest;
            if self.filling.len() == BLOCK {
                full.push(Bytes::from_owner(Pooled(std::mem::replace(
                    &mut self.filling,
                    take(),
                ))));
            }
        }
        full
    }

    /// The last, partly filled block, if it holds anything.
    pub(crate) fn finish(mut self) -> Option<Bytes> {
        let last = Pooled(std::mem::take(&mut self.filling));
        (!last.0.is_empty()).then(|| Bytes::from_owner(last))
    }
}

impl Drop for Blocks {
    /// A body abandoned half-way (its writer failed) gives its block back too.
    fn drop(&mut self) {
        drop(Pooled(std::mem::take(&mut self.filling)));
    }
}

/// An empty block, from the pool if one is spare.
fn take() -> Vec<u8> {
    SPARE
        .take(|_| true)
        .unwrap_or_else(|| Vec::with_capacity(BLOCK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_come_out_as_full_blocks_in_order_then_the_rest() {
        let body: Vec<u8> = (0..(2 * BLOCK + 1000)).map(|i| (i % 251) as u8).collect();
        let mut blocks = Blocks::new();
        let mut out = Vec::new();
        // Uneven chunks, one of them spanning two blocks.
        for chunk in [&body[..1], &body[1..BLOCK + 7], &body[BLOCK + 7..]] {
            out.extend(blocks.push(chunk));
        }
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|b| b.len() == BLOCK));
        out.extend(blocks.finish());
        assert_eq!(out.last().map(Bytes::len), Some(1000));
        assert_eq!(out.concat(), body);
    }

    #[test]
    fn an_empty_body_makes_no_block_and_a_reused_block_holds_only_new_bytes() {
        assert!(Blocks::new().finish().is_none());
        let mut blocks = Blocks::new();
        drop(blocks.push(&vec![7u8; BLOCK]));
        // The full block went back to the pool: the next body may be given it.
        let mut again = Blocks::new();
        assert!(again.push(b"tail").is_empty());
        assert_eq!(again.finish().as_deref(), Some(&b"tail"[..]));
    }
}
