//! A blob's bytes as they arrive, checked: the stream fails at its end unless the bytes
//! hash to the digest they were asked by and number the size the manifest promised (and
//! fails at once when they run past that size). Nothing is buffered beyond a chunk.

use std::pin::Pin;
use std::task::{Context, Poll};

use berth_oci::{Digest, DigestHasher};
use bytes::Bytes;
use futures_util::Stream;

type Inner = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// A verified byte stream (items are `std::io::Error` on failure, so it can feed an upload
/// or a file directly).
pub struct VerifiedStream {
    inner: Inner,
    hasher: Option<DigestHasher>,
    expected: Digest,
    size: Option<u64>,
    seen: u64,
}

impl VerifiedStream {
    pub(crate) fn new(inner: Inner, expected: Digest, size: Option<u64>) -> Self {
        VerifiedStream {
            inner,
            hasher: Some(DigestHasher::new(expected.algorithm())),
            expected,
            size,
            seen: 0,
        }
    }
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

impl Stream for VerifiedStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(hasher) = this.hasher.as_mut() else {
            return Poll::Ready(None);
        };
        match this.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                this.seen += chunk.len() as u64;
                if this.size.is_some_and(|size| this.seen > size) {
                    this.hasher = None;
                    return Poll::Ready(Some(Err(invalid(format!(
                        "blob {}: more bytes than the {} promised",
                        this.expected,
                        this.size.unwrap_or(0)
                    )))));
                }
                hasher.update(&chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.hasher = None;
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
            Poll::Ready(None) => {
                let actual = this.hasher.take().map(DigestHasher::finish);
                if let Some(size) = this.size.filter(|size| *size != this.seen) {
                    return Poll::Ready(Some(Err(invalid(format!(
                        "blob {}: {} bytes where {size} were promised",
                        this.expected, this.seen
                    )))));
                }
                match actual {
                    Some(actual) if actual != this.expected => Poll::Ready(Some(Err(invalid(
                        format!("blob {}: the bytes hash to {actual}", this.expected),
                    )))),
                    _ => Poll::Ready(None),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn stream_of(chunks: &[&'static [u8]]) -> Inner {
        let items: Vec<Result<Bytes, reqwest::Error>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect();
        Box::pin(futures_util::stream::iter(items))
    }

    async fn drain(mut s: VerifiedStream) -> Result<Vec<u8>, std::io::Error> {
        let mut all = Vec::new();
        while let Some(chunk) = s.next().await {
            all.extend_from_slice(&chunk?);
        }
        Ok(all)
    }

    #[tokio::test]
    async fn only_the_promised_bytes_pass() {
        let digest = Digest::sha256_of(b"hello world");
        let ok = VerifiedStream::new(stream_of(&[b"hello ", b"world"]), digest.clone(), Some(11));
        assert_eq!(drain(ok).await.unwrap(), b"hello world");
        let unknown_size = VerifiedStream::new(stream_of(&[b"hello world"]), digest.clone(), None);
        assert!(drain(unknown_size).await.is_ok());
        let tampered = VerifiedStream::new(stream_of(&[b"hello there"]), digest.clone(), Some(11));
        assert!(drain(tampered)
            .await
            .unwrap_err()
            .to_string()
            .contains("hash to"));
        let short = VerifiedStream::new(stream_of(&[b"hello"]), digest.clone(), Some(11));
        assert!(drain(short)
            .await
            .unwrap_err()
            .to_string()
            .contains("promised"));
        let long = VerifiedStream::new(stream_of(&[b"hello world", b"!"]), digest, Some(11));
        assert!(drain(long)
            .await
            .unwrap_err()
            .to_string()
            .contains("more bytes"));
    }
}
