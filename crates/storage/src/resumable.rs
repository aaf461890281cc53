//! SHA-256 whose running state can be saved and restored: an upload session kept in an
//! object store continues on whichever node receives the next chunk, without re-reading
//! what earlier chunks stored. The compression function is `sha2`'s (hardware accelerated
//! where the CPU can); only the buffering and padding are here, as FIPS 180-4 defines them.

use berth_oci::Digest;
use sha2::digest::generic_array::GenericArray;

const BLOCK: usize = 64;
const INITIAL: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// A SHA-256 computation in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumableSha256 {
    state: [u32; 8],
    pending: Vec<u8>,
    len: u64,
}

impl Default for ResumableSha256 {
    fn default() -> Self {
        ResumableSha256 {
            state: INITIAL,
            pending: Vec::with_capacity(BLOCK),
            len: 0,
        }
    }
}

impl ResumableSha256 {
    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was hashed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn compress(&mut self, block: &[u8]) {
        sha2::compress256(
            &mut self.state,
            std::slice::from_ref(GenericArray::from_slice(block)),
        );
    }

    /// Feeds bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if !self.pending.is_empty() {
            let take = (BLOCK - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() < BLOCK {
                return;
            }
            let block = std::mem::take(&mut self.pending);
            self.compress(&block);
            self.pending = block;
            self.pending.clear();
        }
        let mut blocks = bytes.chunks_exact(BLOCK);
        for block in &mut blocks {
            self.compress(block);
        }
        self.pending.extend_from_slice(blocks.remainder());
    }

    /// The digest of everything fed.
    pub fn finish(mut self) -> Digest {
        let bits = self.len.wrapping_mul(8);
        let mut tail = std::mem::take(&mut self.pending);
        tail.push(0x80);
        while tail.len() % BLOCK != BLOCK - 8 {
            tail.push(0);
        }
        tail.extend_from_slice(&bits.to_be_bytes());
        for block in tail.chunks_exact(BLOCK) {
            self.compress(block);
        }
        let hex: String = self.state.iter().map(|w| format!("{w:08x}")).collect();
        Digest::parse(&format!("sha256:{hex}")).expect("64 hex digits form a digest")
    }

    /// The state as bytes: eight state words, the length, then the pending bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + self.pending.len());
        for w in self.state {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&self.pending);
        out
    }

    /// Reads what [`Self::to_bytes`] wrote; `None` if it is not such a state.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < 40 || bytes.len() >= 40 + BLOCK {
            return None;
        }
        let mut state = [0u32; 8];
        for (i, w) in state.iter_mut().enumerate() {
            *w = u32::from_be_bytes(bytes[i * 4..i * 4 + 4].try_into().ok()?);
        }
        let len = u64::from_be_bytes(bytes[32..40].try_into().ok()?);
        let pending = bytes[40..].to_vec();
        if len % BLOCK as u64 != pending.len() as u64 {
            return None;
        }
        Some(ResumableSha256 {
            state,
            pending,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_sha256_whatever_the_chunking_and_across_saves() {
        let data: Vec<u8> = (0..10_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for split in [0, 1, 63, 64, 65, 127, 128, 1000, 9_999, 10_000] {
            let mut h = ResumableSha256::default();
            h.update(&data[..split]);
            let saved = h.to_bytes();
            let mut h = ResumableSha256::from_bytes(&saved).unwrap();
            for chunk in data[split..].chunks(37) {
                h.update(chunk);
            }
            assert_eq!(h.len(), data.len() as u64);
            assert_eq!(h.finish(), Digest::sha256_of(&data), "split at {split}");
        }
        assert_eq!(ResumableSha256::default().finish(), Digest::sha256_of(b""));
        assert!(ResumableSha256::from_bytes(b"short").is_none());
    }
}
