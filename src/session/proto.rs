//! The session's own wire between the server's process (the client, `Session`) and the rank-0
//! process that drives the stream (the host, `host::serve`): one Unix-domain socket, frames of
//! `u32` JSON length + JSON + `u64` payload length + payload (latents as little-endian f32, a
//! conditioning tensor's bytes).
//!
//! Contract: every request gets exactly one reply, in order, except `SubmitRecv`, which gets two
//! (the submit's `Sent`/`Again`, then the receive's `Result`/`Nothing`) in one write. A frame
//! over `MAX_JSON` / `MAX_PAYLOAD` is a decode error, never an allocation of what a peer claims.
//! EOF between frames is `None` (the peer is gone); EOF inside a frame is an error.
//!
//! Cost (the session's overhead per chunk is mostly this wire): a burst of frames goes out in
//! one `sendmsg` (heads from one reused buffer, payloads as further iovecs, never copied; with
//! `MSG_NOSIGNAL`, so a peer that died is an error here, not a SIGPIPE in a C server); frames are
//! read through a buffer (one `read` for a small frame) and a payload straight into the caller's
//! memory (a latent into its `Vec<f32>`); the receive timeout is set only when it changes.
use crate::wire::DType;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const MAX_JSON: u32 = 1 << 20;
/// A chunk's latent of the largest preset is a few MiB, a conditioning tensor 8 MiB (Wan's
/// 512 × 4096 f32); 1 GiB bounds what a peer can claim.
const MAX_PAYLOAD: u64 = 1 << 30;
/// Read buffer: a request, or a reply with a small latent, arrives in one `read`.
const READ_BUF: usize = 64 << 10;

/// A prompt as it crosses the socket; a tensor's bytes are the frame's payload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum PromptMsg {
    /// Text features from this seed (`model::dit::prompt_features`).
    Seed(u64),
    /// A caller's conditioning tensor (its bytes follow as the payload).
    Tensor { dtype: DType, shape: Vec<u64> },
}

/// Client → host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Request {
    /// Send the next chunk if D_in (and D_out) has room.
    Submit,
    /// The next decoded result, waiting at most `timeout_us` (0 = poll). `strict`: nothing
    /// within the wait while results are due is the stream's failure (rank 0 ends with the
    /// protocol's RESULT timeout, exit 71), as `lockstep run`'s fixed schedule wants.
    Recv { timeout_us: u64, strict: bool },
    /// `Submit`, then `Recv` in the same turn: waiting up to `timeout_us` only when D_in has no
    /// room left after the submit, else a poll (`strict` as for `Recv`, when it waits). Two
    /// reply frames.
    SubmitRecv { timeout_us: u64, strict: bool },
    /// The prompt of the current epoch (only before its first chunk).
    Prompt { prompt: PromptMsg },
    /// Hard cut; with `prompt`, the new epoch's prompt.
    Cut { prompt: Option<PromptMsg> },
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

/// One end of the session socket: buffered reads, batched writes, no allocation per frame once
/// warm.
pub struct Conn {
    rd: BufReader<UnixStream>,
    /// Heads (length, JSON, payload length) of the frames queued since the last flush.
    out: Vec<u8>,
    /// The JSON of the frame being read.
    json: Vec<u8>,
    /// The receive timeout last set on the socket (`None`: never set).
    rcv_timeout: Option<Option<Duration>>,
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

impl Conn {
    pub fn new(s: UnixStream) -> Self {
        Self {
            rd: BufReader::with_capacity(READ_BUF, s),
            out: Vec::with_capacity(512),
            json: Vec::with_capacity(512),
            rcv_timeout: None,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.rd.get_ref().as_raw_fd()
    }

    /// Bytes of the next frame are already in the read buffer (no need to wait on the socket).
    pub fn has_buffered(&self) -> bool {
        !self.rd.buffer().is_empty()
    }

    /// Bounds every read (`None`: no bound); a system call only when the bound changes.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> Result<()> {
        if self.rcv_timeout != Some(t) {
            self.rd
                .get_ref()
                .set_read_timeout(t)
                .map_err(io("session socket timeout"))?;
            self.rcv_timeout = Some(t);
        }
        Ok(())
    }

    /// Queues one frame's head; its `payload_len` bytes go with the next `flush`.
    pub fn queue<M: Serialize>(&mut self, msg: &M, payload_len: u64) -> Result<()> {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut self.out, msg)
            .map_err(|e| Error::Invariant(format!("session frame does not serialize: {e}")))?;
        let n = (self.out.len() - start - 4) as u32;
        self.out[start..start + 4].copy_from_slice(&n.to_le_bytes());
        self.out.extend_from_slice(&payload_len.to_le_bytes());
        Ok(())
    }

    /// Writes the queued heads, then `payload` (the last queued frame's payload, in pieces), in
    /// one `sendmsg` when the socket takes it all.
    pub fn flush(&mut self, payload: &[&[u8]]) -> Result<()> {
        // On the stack for the usual frame (heads + a latent + a few preview frames).
        const STACK: usize = 8;
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let (mut stack, mut heap) = ([empty; STACK], Vec::new());
        let mut n = 0;
        for p in std::iter::once(self.out.as_slice()).chain(payload.iter().copied()) {
            if p.is_empty() {
                continue;
            }
            let v = libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            };
            if n < STACK {
                stack[n] = v;
            } else {
                if heap.is_empty() {
                    heap.extend_from_slice(&stack);
                }
                heap.push(v);
            }
            n += 1;
        }
        let iov: &mut [libc::iovec] = if n <= STACK {
            &mut stack[..n]
        } else {
            &mut heap
        };
        let fd = self.fd();
        let mut first = 0;
        while first < iov.len() {
            let mut msg: libc::msghdr = unsafe_zeroed_msghdr();
            msg.msg_iov = iov[first..].as_mut_ptr();
            msg.msg_iovlen = (iov.len() - first) as _;
            // SAFETY: `msg` points at `iov[first..]`, whose entries point into `self.out` and
            // the caller's `payload` slices, all alive and unmodified for the call; no control
            // data. MSG_NOSIGNAL: a closed peer is EPIPE, not a signal.
            let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.out.clear();
                return Err(Error::io("session socket write", e));
            }
            let mut n = n as usize;
            while first < iov.len() && n >= iov[first].iov_len {
                n -= iov[first].iov_len;
                first += 1;
            }
            if n > 0 {
                let v = &mut iov[first];
                // SAFETY: `n < iov_len`, so the advanced pointer stays inside the same slice.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
            }
        }
        self.out.clear();
        Ok(())
    }

    /// One frame, written at once.
    pub fn send<M: Serialize>(&mut self, msg: &M, payload: &[&[u8]]) -> Result<()> {
        let total: usize = payload.iter().map(|p| p.len()).sum();
        self.queue(msg, total as u64)?;
        self.flush(payload)
    }

    /// The next frame's message and payload length; `Ok(None)` on a clean EOF before its first
    /// byte. The payload must be read (`read_payload*`) before the next head.
    pub fn read_head<M: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<(M, u64)>> {
        loop {
            match self.rd.fill_buf() {
                Ok([]) => return Ok(None),
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("session socket read", e)),
            }
        }
        let mut len = [0u8; 4];
        self.read_exact(&mut len)?;
        let n = u32::from_le_bytes(len);
        if n > MAX_JSON {
            return Err(Error::Decode(format!(
                "session frame of {n} bytes (max {MAX_JSON})"
            )));
        }
        let mut json = std::mem::take(&mut self.json);
        json.resize(n as usize, 0);
        let got = self.read_exact(&mut json);
        let msg = got.and_then(|()| {
            serde_json::from_slice(&json).map_err(|e| Error::Decode(format!("session frame: {e}")))
        });
        self.json = json;
        let msg = msg?;
        let mut pl = [0u8; 8];
        self.read_exact(&mut pl)?;
        let pn = u64::from_le_bytes(pl);
        if pn > MAX_PAYLOAD {
            return Err(Error::Decode(format!(
                "session payload of {pn} bytes (max {MAX_PAYLOAD})"
            )));
        }
        Ok(Some((msg, pn)))
    }

    /// Reads exactly `buf.len()` payload bytes (EOF inside a frame is an error).
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.rd.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::PeerLost("session socket closed mid-frame".into())
            } else {
                Error::io("session socket read", e)
            }
        })
    }

    /// A payload of `n` bytes (bounded by `MAX_PAYLOAD` in `read_head`) as a new vector.
    pub fn read_payload(&mut self, n: u64) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n as usize];
        self.read_exact(&mut v)?;
        Ok(v)
    }

    /// `n` payload bytes as little-endian f32 values, read straight into the vector.
    pub fn read_f32s(&mut self, values: usize) -> Result<Vec<f32>> {
        let mut v = vec![0f32; values];
        self.read_exact(bytemuck::cast_slice_mut(&mut v))?;
        if cfg!(target_endian = "big") {
            for x in &mut v {
                *x = f32::from_bits(u32::from_le(x.to_bits()));
            }
        }
        Ok(v)
    }

    /// One whole frame.
    pub fn recv<M: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<(M, Vec<u8>)>> {
        match self.read_head()? {
            None => Ok(None),
            Some((m, n)) => Ok(Some((m, self.read_payload(n)?))),
        }
    }
}

fn unsafe_zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid value (null
    // pointers, zero lengths, no flags).
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_batched_with_payloads_and_clean_eof_is_none() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Conn::new(a), Conn::new(b));
        let latent: Vec<f32> = (0..5000).map(|i| i as f32 * 0.25).collect();
        a.queue(&Reply::Again { outstanding: 2 }, 0).unwrap();
        let bytes: &[u8] = bytemuck::cast_slice(&latent);
        a.queue(&Reply::Ok, (bytes.len() + 3) as u64).unwrap();
        a.flush(&[bytes, &[1, 2, 3]]).unwrap();
        let (m, n) = b.read_head::<Reply>().unwrap().unwrap();
        assert_eq!((m, n), (Reply::Again { outstanding: 2 }, 0));
        let (m, n) = b.read_head::<Reply>().unwrap().unwrap();
        assert_eq!(m, Reply::Ok);
        assert_eq!(n as usize, latent.len() * 4 + 3);
        assert_eq!(b.read_f32s(latent.len()).unwrap(), latent);
        assert_eq!(b.read_payload(3).unwrap(), vec![1, 2, 3]);
        // More pieces than the stack's iovecs (a frame with many preview frames).
        let pieces: Vec<Vec<u8>> = (0..12u8).map(|i| vec![i; 100 + i as usize]).collect();
        let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        a.send(&Reply::Ok, &refs).unwrap();
        let (m, got) = b.recv::<Reply>().unwrap().unwrap();
        assert_eq!((m, got), (Reply::Ok, pieces.concat()));
        a.send(&Request::Close, &[]).unwrap();
        assert_eq!(b.recv::<Request>().unwrap().unwrap().0, Request::Close);
        drop(a);
        assert!(b.recv::<Request>().unwrap().is_none());
    }

    #[test]
    fn oversized_claims_are_decode_errors_and_a_dead_peer_is_an_error_not_a_signal() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut b = Conn::new(b);
        a.write_all(&(MAX_JSON + 1).to_le_bytes()).unwrap();
        let e = b.read_head::<Reply>().unwrap_err();
        assert!(e.to_string().contains("max"), "{e}");
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut a = Conn::new(a);
        // Without MSG_NOSIGNAL this would raise SIGPIPE (fatal to a C server by default).
        assert!(a.send(&Request::Submit, &[&[0u8; 1 << 16]]).is_err());
    }
}
