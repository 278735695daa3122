//! The wire format (INTERFACES.md, "Remote runs"): each frame is a 4-byte big-endian length and
//! one JSON object of at most 16 MiB; the first frame each way is a [`Hello`] of at most 64 KiB.
//! A frame's buffer grows with the bytes that arrive, never with the length a peer announces.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 16 << 20;

/// The largest handshake a server reads (nothing larger is allocated before a token is checked).
pub const MAX_HANDSHAKE: usize = 64 << 10;

/// The handshake, the first frame each way.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's protocol version (`protocol::PROTOCOL_VERSION`).
    pub protocol: u32,
    /// The server's run id; a client may name the run it expects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Client: the token that allows commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Server: whether this client may send commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<bool>,
    /// Server: why the connection is refused (then it closes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What can go wrong reading a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A length prefix above the limit (the second number).
    #[error("a frame of {size} bytes is over the {limit} limit", size = .0, limit = limit_text(*.1))]
    TooLarge(usize, usize),
    /// Not the JSON expected.
    #[error("a malformed frame ({0})")]
    Malformed(String),
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, value: &impl Serialize) -> Result<(), FrameError> {
    let body = serde_json::to_vec(value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len(), MAX_FRAME));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len(), MAX_FRAME))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&body)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's JSON body of at most [`MAX_FRAME`] bytes.
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    read_frame_within(r, MAX_FRAME)
}

/// Reads one frame's JSON body of at most `max` bytes: the length is checked before anything is
/// allocated, and the buffer grows with the bytes that arrive (a peer that announces 16 MiB and
/// sends nothing costs nothing).
pub fn read_frame_within(r: &mut impl Read, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let n = u32::from_be_bytes(len) as usize;
    if n > max {
        return Err(FrameError::TooLarge(n, max));
    }
    let mut body = Vec::with_capacity(n.min(1 << 12));
    r.take(n as u64).read_to_end(&mut body)?;
    if body.len() < n {
        return Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the connection closed {} bytes into a frame of {n}", body.len()),
        )));
    }
    Ok(body)
}

/// Reads one frame as `T`.
pub fn read_value<T: serde::de::DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    let body = read_frame(r)?;
    serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// A reader with one deadline for everything read through it (not a timeout per read): a peer
/// that sends a byte every few seconds still runs out of time.
pub struct Deadline<'a> {
    stream: &'a std::net::TcpStream,
    until: std::time::Instant,
}

impl<'a> Deadline<'a> {
    /// Reads from `stream` until `within` from now.
    #[must_use]
    pub fn new(stream: &'a std::net::TcpStream, within: std::time::Duration) -> Self {
        Self {
            stream,
            until: std::time::Instant::now() + within,
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the handshake did not arrive in time",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        match (&mut &*self.stream).read(buf) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Err(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "the handshake did not arrive in time"),
            ),
            other => other,
        }
    }
}

/// A string from outside made safe to log, store and echo: control characters replaced by
/// U+FFFD, then at most `max` bytes (cut at a character boundary and ended with "…" where cut).
#[must_use]
pub fn tame(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for ch in text.chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }) {
        if out.len() + ch.len_utf8() > max {
            while out.len() + '…'.len_utf8() > max {
                if out.pop().is_none() {
                    break;
                }
            }
            if out.len() + '…'.len_utf8() <= max {
                out.push('…');
            }
            return out;
        }
        out.push(ch);
    }
    out
}

/// A byte limit as people write it: `16 MiB`, `64 KiB`.
fn limit_text(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// Compares two secrets in time that does not depend on where they differ.
#[must_use]
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tame_cuts_at_a_character_boundary_and_replaces_control_characters() {
        assert_eq!(tame("ok", 256), "ok");
        assert_eq!(tame("a\nb\u{1b}", 256), "a\u{fffd}b\u{fffd}");
        let long = "é".repeat(300);
        let t = tame(&long, 256);
        assert!(t.len() <= 256 && t.ends_with('…'), "{} bytes", t.len());
        assert!(t.trim_end_matches('…').chars().all(|c| c == 'é'));
        assert_eq!(tame("abcdef", 4), "a…");
    }

    #[test]
    fn a_frame_grows_with_the_bytes_that_arrive() {
        // 16 MiB announced, 3 bytes sent: an error, and nothing near 16 MiB was allocated.
        let mut bytes = (16u32 << 20).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let e = read_frame(&mut std::io::Cursor::new(bytes)).expect_err("short");
        assert!(e.to_string().contains("3 bytes into a frame of 16777216"), "{e}");
        // Over the handshake's limit: refused from the length alone.
        let bytes = ((64u32 << 10) + 1).to_be_bytes().to_vec();
        let e = read_frame_within(&mut std::io::Cursor::new(bytes), MAX_HANDSHAKE).expect_err("large");
        assert!(e.to_string().contains("over the 64 KiB limit"), "{e}");
    }
}
