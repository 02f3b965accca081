//! The session host: rank 0, always. It takes one command at a time from a `Session` — a
//! server's, in another process, or `lockstep run`'s fixed schedule on a thread of this one
//! (`super::schedule`) — and answers it with the `Driver` steps (`pipeline::driver`): there is
//! one Stage 0 and one way to drive it.
//!
//! Contract: a request is answered once, in order. `Submit` answers `Again` when D_in (or, with
//! backpressure, D_out) is full — never a wait. `Recv` waits at most its own timeout. Any error
//! of the stream (a RESULT that never came within `--timeout`, a digest mismatch, a lost peer)
//! ends this rank through the protocol's crash path, so the client learns it as the job's exit
//! code and diagnosis. The client vanishing (EOF without `Close`) is a lost peer: the job ends,
//! no rank is left running.
use super::proto::{Conn, PromptMsg, Reply, Request};
use crate::pipeline::conditioning::PromptTensor;
use crate::pipeline::decode::{preview_frames, Decoder};
use crate::pipeline::driver::{Driver, DriverConfig, DriverReport, Emitted, Prompt, Received};
use crate::pipeline::DriverLink;
use crate::{Error, Result};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Set by `Session::open` for rank 0 of its job: the socket the client listens on.
pub const SOCKET_ENV: &str = "LOCKSTEP_SESSION_SOCKET";

/// This rank serves a session (its client's socket), or runs `lockstep run`'s schedule.
pub fn socket_from_env() -> Option<PathBuf> {
    std::env::var_os(SOCKET_ENV).map(PathBuf::from)
}

/// Set (to `1`) when the client wants the preview decoder's RGB frames with every result.
pub const FRAMES_ENV: &str = "LOCKSTEP_SESSION_FRAMES";

/// The longest `Recv` wait rank 0 honours.
const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// While results are due and the client is away, how often rank 0 polls the lane for them.
const PREFETCH_EVERY: Duration = Duration::from_micros(200);

/// Waits up to `wait` for a request (or EOF) to be readable on the client's socket.
fn request_waiting(fd: std::os::fd::RawFd, wait: Duration) -> Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(wait.subsec_nanos() as i32),
    };
    // SAFETY: one valid pollfd and timespec for the duration of the call; no signal mask.
    let n = unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(Error::io("session: polling the client socket", e));
    }
    Ok(n > 0)
}

/// Serves the session on `socket` until `Close` (drain, SHUTDOWN) or an error.
pub fn serve(
    socket: &std::path::Path,
    link: &mut dyn DriverLink,
    decoder: &mut dyn Decoder,
    dc: &DriverConfig,
) -> Result<DriverReport> {
    let s = UnixStream::connect(socket).map_err(|e| {
        Error::io(
            format!("session: connecting to the client at {}", socket.display()),
            e,
        )
    })?;
    serve_on(s, link, decoder, dc)
}

/// Serves the session on an open connection (the client's socket, or the end of a socket pair
/// whose other end is `lockstep run`'s schedule).
pub fn serve_on(
    s: UnixStream,
    link: &mut dyn DriverLink,
    decoder: &mut dyn Decoder,
    dc: &DriverConfig,
) -> Result<DriverReport> {
    let frames = std::env::var_os(FRAMES_ENV).is_some_and(|v| v == "1");
    let mut c = Conn::new(s);
    let mut d = Driver::new(dc)?;
    let cfg = &dc.cfg;
    c.send(
        &Reply::Hello {
            pid: std::process::id(),
            latent_shape: [cfg.tokens_per_chunk() as u64, cfg.in_dim() as u64],
            text_shape: [cfg.text_tokens as u64, cfg.text_dim as u64],
            d_in: dc.queues.d_in,
            epoch: d.epoch().get(),
            prompt_seed: d.prompt_seed(),
        },
        &[],
    )?;
    loop {
        // While the client is away, take the mesh's results as they come (bounded by D_out):
        // the leader sends a RESULT's payload only once rank 0 clears it from its receive path,
        // so a rank 0 that received only on request would idle the mesh for every turn of the
        // client. Decoding still waits for the client's `Recv`.
        // Rank 0 sleeps on the socket (a request wakes it at once) and looks at the lane every
        // `PREFETCH_EVERY` while results are due.
        while d.outstanding() > 0
            && d.can_receive()
            && !c.has_buffered()
            && !request_waiting(c.fd(), PREFETCH_EVERY)?
        {
            d.receive(link, Duration::ZERO)?;
        }
        let Some((req, payload_len)) = c.read_head::<Request>()? else {
            return Err(Error::PeerLost(
                "session: the client closed its connection without closing the session".into(),
            ));
        };
        let payload = c.read_payload(payload_len)?;
        match req {
            Request::Submit => {
                let reply = submit(&mut d, link, dc)?;
                c.send(&reply, &[])?;
            }
            Request::Recv { timeout_us, strict } => {
                let wait = Duration::from_micros(timeout_us);
                let out = recv(&mut d, link, decoder, wait)?;
                if strict && out.is_none() && d.outstanding() > 0 {
                    return Err(d.result_timeout());
                }
                send_result(&mut c, &d, cfg, frames, out)?;
            }
            Request::SubmitRecv { timeout_us, strict } => {
                let reply = submit(&mut d, link, dc)?;
                c.queue(&reply, 0)?;
                // Wait only when the pipeline is full; with room left the caller's next turn
                // submits again (a poll still hands out a result that is ready).
                let waits = !d.can_send();
                let wait = if waits {
                    Duration::from_micros(timeout_us)
                } else {
                    Duration::ZERO
                };
                let out = recv(&mut d, link, decoder, wait)?;
                if strict && waits && out.is_none() && d.outstanding() > 0 {
                    return Err(d.result_timeout());
                }
                send_result(&mut c, &d, cfg, frames, out)?;
            }
            Request::Prompt { prompt } => {
                let reply = if d.sent_in_epoch() > 0 {
                    Reply::Refused {
                        message: format!(
                            "the conditioning of {} is fixed once its first chunk is sent \
                             ({} sent); change it with a hard cut",
                            d.epoch(),
                            d.sent_in_epoch()
                        ),
                    }
                } else {
                    match prompt_of(cfg, prompt, payload) {
                        Ok(p) => {
                            d.set_prompt(p);
                            Reply::Ok
                        }
                        Err(e) => Reply::Refused {
                            message: e.to_string(),
                        },
                    }
                };
                c.send(&reply, &[])?;
            }
            Request::Cut { prompt } => {
                // A prompt that does not fit is refused before anything changes.
                let reply = match prompt.map(|p| prompt_of(cfg, p, payload)).transpose() {
                    Err(e) => Reply::Refused {
                        message: e.to_string(),
                    },
                    Ok(p) => {
                        let e = d.hard_cut();
                        if let Some(p) = p {
                            d.set_prompt(p);
                        }
                        Reply::Cut {
                            cache_epoch: e.get(),
                        }
                    }
                };
                c.send(&reply, &[])?;
            }
            Request::Close => {
                // Drain: every chunk in flight comes back (and is decoded, so the decoder's
                // output is whole) before SHUTDOWN; results nobody asked for are dropped here.
                loop {
                    if d.decode_next(decoder)?.is_some() {
                        continue;
                    }
                    if d.outstanding() == 0 {
                        break;
                    }
                    if d.receive(link, dc.timeout)? == Received::Nothing {
                        return Err(d.result_timeout());
                    }
                }
                let rep = d.finish(link)?;
                c.send(
                    &Reply::Closed {
                        emitted: rep.emitted.len() as u64,
                        stale_dropped: rep.stats.stale_dropped,
                    },
                    &[],
                )?;
                return Ok(rep);
            }
        }
    }
}

/// `Submit`: the next chunk if D_in (and D_out) has room, else `Again` at once.
///
/// With backpressure off (the E1 experiment, `--no-backpressure`) rank 0 is a consumer with an
/// unbounded receive buffer: a full D_in waits (up to `--timeout`) for the next result, which
/// it takes undecoded, and sends into the slot it freed — so a decoder slower than the mesh
/// lets the decode queue grow with the run. (Taking only what has already arrived is not
/// enough: the leader holds a RESULT's payload until rank 0 clears it, so that would pace the
/// mesh to the decoder.)
fn submit(d: &mut Driver<'_>, link: &mut dyn DriverLink, dc: &DriverConfig) -> Result<Reply> {
    if !dc.queues.backpressure && !d.can_send() && d.outstanding() > 0 {
        d.receive(link, dc.timeout)?;
    }
    Ok(if d.can_send() {
        let ids = d.send_chunk(link)?;
        Reply::Sent {
            call_id: ids.call_id.get(),
            chunk_index: ids.chunk_index.get(),
            cache_epoch: ids.cache_epoch.get(),
            // Without backpressure a full D_in is not "no room": the next submit waits for a
            // result and sends.
            room: d.can_send() || !dc.queues.backpressure,
        }
    } else {
        Reply::Again {
            outstanding: d.outstanding(),
        }
    })
}

/// `Recv`: the next decoded result, waiting at most `wait` for one to arrive.
fn recv(
    d: &mut Driver<'_>,
    link: &mut dyn DriverLink,
    decoder: &mut dyn Decoder,
    wait: Duration,
) -> Result<Option<Emitted>> {
    // A client may ask for "forever"; a week bounds it (and the arithmetic).
    let deadline = Instant::now() + wait.min(MAX_WAIT);
    loop {
        if let Some(e) = d.decode_next(decoder)? {
            return Ok(Some(e));
        }
        if d.outstanding() == 0 || !d.can_receive() {
            return Ok(None);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match d.receive(link, left)? {
            Received::Nothing => return Ok(None),
            Received::Accepted | Received::DroppedStale => {}
        }
    }
}

/// The reply to a receive (queued heads go out with it, in one write).
fn send_result(
    c: &mut Conn,
    d: &Driver<'_>,
    cfg: &crate::model::DitConfig,
    frames: bool,
    out: Option<Emitted>,
) -> Result<()> {
    let Some(e) = out else {
        return c.send(
            &Reply::Nothing {
                outstanding: d.outstanding(),
            },
            &[],
        );
    };
    let bytes: &[u8] = bytemuck::cast_slice(&e.latent);
    let (fh, fw, rgb) = if frames {
        preview_frames(cfg, &e.latent)?
    } else {
        (0, 0, Vec::new())
    };
    let total = bytes.len() + rgb.iter().map(Vec::len).sum::<usize>();
    c.queue(
        &Reply::Result {
            call_id: e.ids.call_id.get(),
            chunk_index: e.ids.chunk_index.get(),
            cache_epoch: e.ids.cache_epoch.get(),
            s1_us: e.s1_us,
            latent_len: e.latent.len() as u64,
            frames: rgb.len() as u32,
            frame_h: fh,
            frame_w: fw,
        },
        total as u64,
    )?;
    if rgb.is_empty() {
        return c.flush(&[bytes]);
    }
    let mut payload: Vec<&[u8]> = Vec::with_capacity(1 + rgb.len());
    payload.push(bytes);
    payload.extend(rgb.iter().map(Vec::as_slice));
    c.flush(&payload)
}

/// The prompt a client's message names (a tensor's bytes are the frame's payload), checked
/// against the model as `Conditioning::from_tensor` checks it.
fn prompt_of(cfg: &crate::model::DitConfig, p: PromptMsg, payload: Vec<u8>) -> Result<Prompt> {
    match p {
        PromptMsg::Seed(seed) => Ok(Prompt::Seed(seed)),
        PromptMsg::Tensor { dtype, shape } => Ok(Prompt::Tensor(std::sync::Arc::new(
            PromptTensor::new(cfg, dtype, &shape, payload)?,
        ))),
    }
}
