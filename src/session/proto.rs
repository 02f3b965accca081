//! The session's own wire between the server's process (the client, `Session`) and the rank-0
//! process that drives the stream (the host, `host::serve`): one Unix-domain socket, frames of
//! `u32` JSON length + JSON + `u64` payload length + payload (latents as little-endian f32).
//!
//! Contract: every request gets exactly one reply, in order; a frame over `MAX_JSON` /
//! `MAX_PAYLOAD` is a decode error, never an allocation of what a peer claims. EOF between
//! frames is `None` (the peer is gone); EOF inside a frame is an error.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

const MAX_JSON: u32 = 1 << 20;
/// A chunk's latent of the largest preset is a few MiB; 1 GiB bounds what a peer can claim.
const MAX_PAYLOAD: u64 = 1 << 30;

/// Client → host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Request {
    /// Send the next chunk if D_in (and D_out) has room.
    Submit,
    /// The next decoded result, waiting at most `timeout_us` (0 = poll).
    Recv { timeout_us: u64 },
    /// The prompt of the current epoch (only before its first chunk).
    Prompt { seed: u64 },
    /// Hard cut; with `seed`, the new epoch's prompt.
    Cut { seed: Option<u64> },
    /// Drain, SHUTDOWN, report.
    Close,
}

/// Host → client.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Reply {
    /// First frame after connecting: the stream's geometry.
    Hello {
        pid: u32,
        /// Latent of one chunk: `[tokens_per_chunk, in_dim]` f32.
        latent_shape: [u64; 2],
        /// Conditioning tensor the model expects: `[text_tokens, text_dim]`.
        text_shape: [u64; 2],
        d_in: usize,
        epoch: u64,
        prompt_seed: u64,
    },
    Sent {
        call_id: u64,
        chunk_index: u64,
        cache_epoch: u64,
        /// D_in (and D_out) has room for another chunk now. When false, the client answers
        /// `Again` itself until its next `Recv` or `Cut` (nothing else frees room): one round
        /// trip per chunk saved.
        room: bool,
    },
    /// D_in is full: receive a result first.
    Again {
        outstanding: usize,
    },
    /// A decoded result; the payload is its latent (f32 LE). `frames` is the number of RGB
    /// frames that follow the latent in the payload (each `frame_h × frame_w × 3` bytes).
    Result {
        call_id: u64,
        chunk_index: u64,
        cache_epoch: u64,
        s1_us: u64,
        latent_len: u64,
        frames: u32,
        frame_h: u32,
        frame_w: u32,
    },
    /// Nothing within the wait (or nothing in flight: `outstanding` says which).
    Nothing {
        outstanding: usize,
    },
    Ok,
    Cut {
        cache_epoch: u64,
    },
    /// The request was refused as bad input; the stream goes on.
    Refused {
        message: String,
    },
    Closed {
        emitted: u64,
        stale_dropped: u64,
    },
}

pub fn write_frame<M: Serialize>(w: &mut impl Write, msg: &M, payload: &[&[u8]]) -> Result<()> {
    let j = serde_json::to_vec(msg)
        .map_err(|e| Error::Invariant(format!("session frame does not serialize: {e}")))?;
    let total: usize = payload.iter().map(|p| p.len()).sum();
    let mut head = Vec::with_capacity(12 + j.len());
    head.extend_from_slice(&(j.len() as u32).to_le_bytes());
    head.extend_from_slice(&j);
    head.extend_from_slice(&(total as u64).to_le_bytes());
    let io = |e| Error::io("session socket write", e);
    w.write_all(&head).map_err(io)?;
    for p in payload {
        w.write_all(p).map_err(io)?;
    }
    w.flush().map_err(io)
}

/// Reads one frame; `Ok(None)` on a clean EOF before the frame's first byte.
pub fn read_frame<M: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<Option<(M, Vec<u8>)>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Error::PeerLost("session socket closed mid-frame".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("session socket read", e)),
        }
    }
    let n = u32::from_le_bytes(len);
    if n > MAX_JSON {
        return Err(Error::Decode(format!(
            "session frame of {n} bytes (max {MAX_JSON})"
        )));
    }
    let mut j = vec![0u8; n as usize];
    let io = |e| Error::io("session socket read", e);
    r.read_exact(&mut j).map_err(io)?;
    let mut pl = [0u8; 8];
    r.read_exact(&mut pl).map_err(io)?;
    let pn = u64::from_le_bytes(pl);
    if pn > MAX_PAYLOAD {
        return Err(Error::Decode(format!(
            "session payload of {pn} bytes (max {MAX_PAYLOAD})"
        )));
    }
    let mut payload = vec![0u8; pn as usize];
    r.read_exact(&mut payload).map_err(io)?;
    let msg =
        serde_json::from_slice(&j).map_err(|e| Error::Decode(format!("session frame: {e}")))?;
    Ok(Some((msg, payload)))
}
