//! The first bytes of an upload body, read before choosing how to store it: a body that
//! ends within them is stored in one call (one write, one object), a longer one streamed.
//! Both backends decide this way, each with its own limit.

use std::io;

use bytes::Bytes;
use futures_util::StreamExt;

use crate::ByteStream;

/// What [`gather`] read.
pub(crate) struct BodyHead {
    /// The non-empty chunks read, in order.
    pub(crate) chunks: Vec<Bytes>,
    /// Their total length.
    pub(crate) len: usize,
    /// The body ended (or broke) within the head: `chunks` is all of it.
    pub(crate) ended: bool,
    /// How it broke, if it did; the chunks before the break are kept.
    pub(crate) error: Option<io::Error>,
}

/// Reads `body` until `limit` bytes or more were read or it ended, passing each chunk to
/// `on_chunk` as it comes.
pub(crate) async fn gather(
    body: &mut ByteStream,
    limit: usize,
    mut on_chunk: impl FnMut(&[u8]),
) -> BodyHead {
    let mut head = BodyHead {
        chunks: Vec::new(),
        len: 0,
        ended: false,
        error: None,
    };
    while head.len < limit {
        match body.next().await {
            None => {
                head.ended = true;
                break;
            }
            Some(Ok(chunk)) if chunk.is_empty() => {}
            Some(Ok(chunk)) => {
                on_chunk(&chunk);
                head.len += chunk.len();
                head.chunks.push(chunk);
            }
            Some(Err(e)) => {
                head.error = Some(e);
                head.ended = true;
                break;
            }
        }
    }
    head
}
