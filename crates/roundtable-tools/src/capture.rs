//! Reading a stream while keeping at most a cap of it: the rest is read and dropped, so
//! a program printing a gigabyte costs a buffer, not a gigabyte.

use tokio::io::{AsyncRead, AsyncReadExt};

const CHUNK: usize = 64 * 1024;

/// What was kept of a stream.
#[derive(Debug, Default)]
pub(crate) struct Captured {
    pub(crate) bytes: Vec<u8>,
    /// More was read than kept.
    pub(crate) truncated: bool,
}

/// Reads `reader` to its end (or its first error), keeping at most `cap` bytes.
pub(crate) async fn read_capped<R: AsyncRead + Unpin>(mut reader: R, cap: u64) -> Captured {
    let cap = usize::try_from(cap).unwrap_or(usize::MAX);
    let mut out = Captured::default();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(out.bytes.len());
                if n > room {
                    out.truncated = true;
                }
                out.bytes.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    out
}

/// Bytes as text for a model: invalid UTF-8 replaced, and a character cut at the cap
/// dropped rather than shown as a replacement.
pub(crate) fn text(bytes: &[u8], truncated: bool) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(e) if truncated && e.error_len().is_none() => {
            String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned()
        }
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}
