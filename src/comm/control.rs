//! Control-plane framing and messages (rendezvous, envelopes, failure notices, goodbyes).
//!
//! Contract: a frame is `[kind u32 LE][len u32 LE][body]`; `read_frame` refuses unknown kinds and
//! lengths above the caller's bound **before allocating**, and reads under the socket's deadline,
//! so garbage or truncated bytes end in a typed error, never a crash or a stall.
use super::parity::Fingerprint;
use super::spec::{GroupSpec, PeerTable};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Protocol version of the control plane (part of the parity fingerprint).
pub const PROTOCOL_VERSION: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum FrameKind {
    Hello = 1,
    Welcome = 2,
    Envelope = 3,
    Failed = 4,
    Dump = 5,
    Bye = 6,
    /// Rank 0 → mesh leader on the envelope lane: "post your RESULT payload for call_id N now,
    /// my receives are going up" (body: the call_id, u64 LE). See `Rank::await_clear_to_send`.
    ClearToSend = 7,
    /// Bootstrap, on the envelope lane: rank 0 offers a shared-memory ring (body: its path, or
    /// empty for TCP); the leader answers (body: 1 mapped, 0 declined). See `comm::lane`.
    LaneOffer = 8,
}

impl FrameKind {
    fn from_u32(v: u32) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::Welcome,
            3 => FrameKind::Envelope,
            4 => FrameKind::Failed,
            5 => FrameKind::Dump,
            6 => FrameKind::Bye,
            7 => FrameKind::ClearToSend,
            8 => FrameKind::LaneOffer,
            _ => return None,
        })
    }
}

/// A rank's registration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub token: String,
    pub rank: u32,
    pub world_size: u32,
    pub local_rank: u32,
    pub data_addr: String,
    pub pid: u32,
    pub fingerprint: Fingerprint,
    /// True on the mesh leader's second connection: the envelope lane, read directly by the
    /// receiving thread (no hand-off: latency), while the first connection keeps carrying
    /// notices and goodbyes on a reader thread (peer loss detected at once).
    #[serde(default)]
    pub lane: bool,
}

/// Rank 0's answer once every rank registered: the parity verdict and the group table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Welcome {
    pub parity_ok: bool,
    pub parity_diff: String,
    pub groups: Vec<GroupSpec>,
    pub peers: PeerTable,
    /// One opaque bootstrap blob per group, in creation order (NCCL unique ids).
    pub blobs: Vec<Vec<u8>>,
}

/// "A rank failed: dump and exit." `origin` is the rank that failed first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailedNotice {
    pub origin: u32,
    pub code: i32,
    pub name: String,
    pub message: String,
}

/// Writes one frame with a single `write_all` (one syscall for small frames: latency).
pub fn write_frame(w: &mut impl Write, kind: FrameKind, parts: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len32 = u32::try_from(len).map_err(|_| std::io::Error::other("control frame too large"))?;
    let mut buf = Vec::with_capacity(8 + len);
    buf.extend_from_slice(&(kind as u32).to_le_bytes());
    buf.extend_from_slice(&len32.to_le_bytes());
    for p in parts {
        buf.extend_from_slice(p);
    }
    w.write_all(&buf)
}

/// Reads one frame; `Ok(None)` on a clean EOF before the first byte.
pub fn read_frame(
    r: &mut impl Read,
    max_len: u32,
    from: &str,
) -> Result<Option<(FrameKind, Vec<u8>)>> {
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(Error::PeerLost(format!(
                    "{from}: connection closed mid-frame"
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(from, e)),
        }
    }
    let kind = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let kind = FrameKind::from_u32(kind)
        .ok_or_else(|| Error::Decode(format!("{from}: unknown control frame kind {kind:#x}")))?;
    if len > max_len {
        return Err(Error::Decode(format!(
            "{from}: control frame of {len} bytes exceeds the limit of {max_len}"
        )));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::PeerLost(format!(
                "{from}: connection closed mid-frame ({len}-byte {kind:?} frame)"
            ))
        } else {
            read_err(from, e)
        }
    })?;
    Ok(Some((kind, body)))
}

fn read_err(from: &str, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            Error::Timeout(format!("{from}: read deadline passed"))
        }
        _ => Error::PeerLost(format!("{from}: {e}")),
    }
}

pub fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v)
        .map_err(|e| Error::Invariant(format!("control message not serializable: {e}")))
}

pub fn from_json<T: serde::de::DeserializeOwned>(b: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::Decode(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = read_frame(&mut bytes.as_slice(), 1024, "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceeds the limit of 1024"), "{err}");
    }

    #[test]
    fn truncated_frame_is_peer_lost_not_panic() {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, FrameKind::Hello, &[b"hello world"]).unwrap();
        bytes.truncate(12);
        let err = read_frame(&mut bytes.as_slice(), 1024, "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("closed mid-frame"), "{err}");
    }

    #[test]
    fn garbage_kind_is_a_decode_error() {
        let bytes = [0xffu8; 8];
        let err = read_frame(&mut bytes.as_slice(), 1024, "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown control frame kind"), "{err}");
    }
}
