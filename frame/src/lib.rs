//! Checksummed, length-delimited frames: the one framing used by WAL records
//! and by node-to-node messages.
//!
//! ```text
//! u32 len    (payload bytes, 1..=max)
//! u32 crc32c (of the payload)
//! [u8; len]
//! ```
//! A zero `len` never appears in a valid frame; in a pre-zeroed WAL segment it
//! marks the end of written data.

pub mod peers;

/// Header bytes before each frame's payload.
pub const FRAME_HEADER_BYTES: usize = 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("empty frame")]
    Empty,
}

/// Appends one frame carrying `payload` to `out`.
///
/// # Panics
/// If `payload` is empty or longer than `u32::MAX`: callers build payloads
/// themselves, so this is a programming error.
pub fn encode_into(out: &mut Vec<u8>, payload: &[u8]) {
    assert!(!payload.is_empty() && payload.len() <= u32::MAX as usize);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Appends one frame whose payload `write` produces in place (no
/// intermediate buffer): the header is filled in afterwards.
///
/// # Panics
/// If `write` produces an empty payload or one over `u32::MAX` bytes.
pub fn encode_with<E>(
    out: &mut Vec<u8>,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    let at = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    if let Err(e) = write(out) {
        out.truncate(at);
        return Err(e);
    }
    let len = out.len() - at - FRAME_HEADER_BYTES;
    assert!(len > 0 && len <= u32::MAX as usize);
    let crc = crc32c::crc32c(&out[at + FRAME_HEADER_BYTES..]);
    out[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes a bincode frame body (the encoding `bincode::serialize` writes),
/// refusing to allocate more than `max` bytes for it.
pub fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8], max: usize) -> Result<T, String> {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(max as u64)
        .deserialize(body)
        .map_err(|e| format!("malformed message: {e}"))
}

/// Reads the header at the front of `buf`: `None` if fewer than
/// [`FRAME_HEADER_BYTES`] are present, else the payload length.
pub fn peek_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len))
}

/// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes are
/// needed; on success returns the payload and the total bytes consumed.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(len) = peek_len(buf, max)? else {
        return Ok(None);
    };
    let end = FRAME_HEADER_BYTES + len;
    if buf.len() < end {
        return Ok(None);
    }
    let stored = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let payload = &buf[FRAME_HEADER_BYTES..end];
    let computed = crc32c::crc32c(payload);
    if stored != computed {
        return Err(FrameError::Checksum { stored, computed });
    }
    Ok(Some((payload, end)))
}

/// A queue [`write_batched`] drains: tokio's bounded and unbounded
/// receivers.
pub trait Queue<T>: Send {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<T>> + Send;
    fn try_recv(&mut self) -> Option<T>;
}

impl<T: Send> Queue<T> for tokio::sync::mpsc::Receiver<T> {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<T>> + Send {
        tokio::sync::mpsc::Receiver::recv(self)
    }
    fn try_recv(&mut self) -> Option<T> {
        tokio::sync::mpsc::Receiver::try_recv(self).ok()
    }
}

impl<T: Send> Queue<T> for tokio::sync::mpsc::UnboundedReceiver<T> {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<T>> + Send {
        tokio::sync::mpsc::UnboundedReceiver::recv(self)
    }
    fn try_recv(&mut self) -> Option<T> {
        tokio::sync::mpsc::UnboundedReceiver::try_recv(self).ok()
    }
}

/// Bytes gathered from a queue before one write syscall.
pub const WRITE_BATCH_BYTES: usize = 1 << 20;

/// Writes every message of `queue` to `w`, encoding each as frames with
/// `encode`, and coalescing what is already queued into one write of up to
/// [`WRITE_BATCH_BYTES`]. Returns when the queue closes or a write fails.
pub async fn write_batched<W, T, Q>(mut w: W, mut queue: Q, encode: impl Fn(&T, &mut Vec<u8>))
where
    W: tokio::io::AsyncWrite + Unpin,
    Q: Queue<T>,
{
    use tokio::io::AsyncWriteExt;
    let mut buf = Vec::new();
    while let Some(m) = queue.recv().await {
        buf.clear();
        encode(&m, &mut buf);
        while buf.len() < WRITE_BATCH_BYTES {
            match queue.try_recv() {
                Some(m) => encode(&m, &mut buf),
                None => break,
            }
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
    }
}

/// Reads frames from a byte stream and hands out their (checked)
/// payloads, borrowed from its buffer: no copy per frame.
pub struct BodyReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    /// Largest payload accepted (may be raised after a handshake).
    pub max: usize,
}

/// Why [`BodyReader`] returned no frame.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl<R: tokio::io::AsyncRead + Unpin> BodyReader<R> {
    /// A reader refusing frames over `max` payload bytes.
    pub fn new(inner: R, max: usize) -> Self {
        BodyReader {
            inner,
            buf: Vec::with_capacity(64 << 10),
            start: 0,
            max,
        }
    }

    /// Applies `f` to the next frame's payload; `Err(Closed)` at a clean
    /// end of stream.
    pub async fn next_with<T>(&mut self, f: impl FnOnce(&[u8]) -> T) -> Result<T, ReadError> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some((body, used)) = decode(&self.buf[self.start..], self.max)? {
                let out = f(body);
                self.start += used;
                return Ok(out);
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let need = peek_len(&self.buf, self.max)?
                .map(|l| l + FRAME_HEADER_BYTES)
                .unwrap_or(FRAME_HEADER_BYTES);
            self.buf
                .reserve(need.saturating_sub(self.buf.len()).max(64 << 10));
            // Reads into spare capacity: no zero fill.
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_partial() {
        let mut b = Vec::new();
        encode_into(&mut b, b"hello");
        encode_into(&mut b, b"world!");
        let (p, n) = decode(&b, 100).unwrap().unwrap();
        assert_eq!(p, b"hello");
        let (p2, _) = decode(&b[n..], 100).unwrap().unwrap();
        assert_eq!(p2, b"world!");
        for cut in 0..n {
            assert_eq!(decode(&b[..cut], 100).unwrap(), None);
        }
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let mut b = Vec::new();
        encode_into(&mut b, b"some payload bytes");
        for bit in 0..b.len() * 8 {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            if let Ok(Some((p, _))) = decode(&c, 1 << 20) {
                panic!("flip of bit {bit} undetected: {p:?}");
            }
        }
    }

    #[test]
    fn encode_with_equals_encode_into() {
        let mut a = Vec::new();
        encode_into(&mut a, b"payload");
        let mut b = Vec::new();
        encode_with(&mut b, |o| {
            o.extend_from_slice(b"payload");
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn limits() {
        let mut b = Vec::new();
        encode_into(&mut b, &[0u8; 64]);
        assert_eq!(
            decode(&b, 63),
            Err(FrameError::TooLarge { len: 64, max: 63 })
        );
        assert_eq!(decode(&[0u8; 16], 63), Err(FrameError::Empty));
    }
}
