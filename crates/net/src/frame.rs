//! Bounded frames (protocols/federation.md §2.3).
//!
//! A frame is a 4-byte big-endian length and that many bytes of a postcard
//! message. A blob (for large vectors) is an 8-byte big-endian length and
//! that many raw bytes. The reader checks the length against its limit
//! before reading anything, and then allocates only as the bytes arrive (at
//! most 64 KiB ahead of them): a peer that declares a large frame and sends
//! nothing costs the reader nothing.

use quinn::{RecvStream, SendStream};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::NetError;

/// Bytes read at a time from a blob.
const CHUNK: usize = 64 * 1024;

fn io(e: impl std::fmt::Display) -> NetError {
    NetError::Connection(e.to_string())
}

/// Writes one message as a frame; refuses one larger than `max` bytes.
pub async fn write_frame<T: Serialize>(
    send: &mut SendStream,
    msg: &T,
    max: usize,
) -> Result<usize, NetError> {
    let bytes = postcard::to_stdvec(msg).map_err(|e| NetError::Malformed(e.to_string()))?;
    if bytes.len() > max || bytes.len() > u32::MAX as usize {
        return Err(NetError::FrameTooLarge {
            len: bytes.len() as u64,
            max: max as u64,
        });
    }
    send.write_all(&(bytes.len() as u32).to_be_bytes())
        .await
        .map_err(io)?;
    send.write_all(&bytes).await.map_err(io)?;
    Ok(bytes.len() + 4)
}

/// Reads exactly `buf.len()` bytes; `Closed` if the stream ends first.
async fn read_exact(recv: &mut RecvStream, buf: &mut [u8]) -> Result<(), NetError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => NetError::Closed,
        quinn::ReadExactError::ReadError(e) => io(e),
    })
}

/// Reads one frame of at most `max` bytes and decodes it.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    max: usize,
) -> Result<T, NetError> {
    Ok(read_frame_counted(recv, max).await?.0)
}

/// Like [`read_frame`], also returning the bytes read (length prefix included).
pub async fn read_frame_counted<T: DeserializeOwned>(
    recv: &mut RecvStream,
    max: usize,
) -> Result<(T, usize), NetError> {
    let mut len = [0u8; 4];
    read_exact(recv, &mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(NetError::FrameTooLarge {
            len: len as u64,
            max: max as u64,
        });
    }
    let bytes = read_growing(recv, len).await?;
    let (msg, rest) =
        postcard::take_from_bytes(&bytes).map_err(|e| NetError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(NetError::Malformed(format!(
            "{} trailing bytes in a frame",
            rest.len()
        )));
    }
    Ok((msg, len + 4))
}

/// Writes a blob; refuses one larger than `max` bytes.
pub async fn write_blob(send: &mut SendStream, bytes: &[u8], max: usize) -> Result<(), NetError> {
    if bytes.len() > max {
        return Err(NetError::FrameTooLarge {
            len: bytes.len() as u64,
            max: max as u64,
        });
    }
    send.write_all(&(bytes.len() as u64).to_be_bytes())
        .await
        .map_err(io)?;
    for chunk in bytes.chunks(CHUNK) {
        send.write_all(chunk).await.map_err(io)?;
    }
    Ok(())
}

/// Reads a blob of at most `max` bytes, in pieces.
pub async fn read_blob(recv: &mut RecvStream, max: usize) -> Result<Vec<u8>, NetError> {
    let mut len = [0u8; 8];
    read_exact(recv, &mut len).await?;
    let len = u64::from_be_bytes(len);
    if len > max as u64 {
        return Err(NetError::FrameTooLarge {
            len,
            max: max as u64,
        });
    }
    read_growing(recv, len as usize).await
}

/// Reads exactly `len` bytes into a vector that grows as they arrive, one
/// piece of at most [`CHUNK`] bytes at a time.
async fn read_growing(recv: &mut RecvStream, len: usize) -> Result<Vec<u8>, NetError> {
    let mut out = Vec::with_capacity(len.min(CHUNK));
    while out.len() < len {
        let start = out.len();
        let n = (len - start).min(CHUNK);
        out.resize(start + n, 0);
        read_exact(recv, &mut out[start..]).await?;
    }
    Ok(out)
}
