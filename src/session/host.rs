//! The session host: rank 0 of a session's job. Instead of `run_driver`'s fixed schedule it
//! takes one command at a time from the server's process (`super::Session`) and answers it with
//! the same `Driver` steps (`pipeline::driver`): there is one Stage 0, driven two ways.
//!
//! Contract: a request is answered once, in order. `Submit` answers `Again` when D_in (or, with
//! backpressure, D_out) is full — never a wait. `Recv` waits at most its own timeout. Any error
//! of the stream (a RESULT that never came within `--timeout`, a digest mismatch, a lost peer)
//! ends this rank through the protocol's crash path, so the client learns it as the job's exit
//! code and diagnosis. The client vanishing (EOF without `Close`) is a lost peer: the job ends,
//! no rank is left running.
use super::proto::{read_frame, write_frame, Reply, Request};
use crate::pipeline::decode::{preview_frames, Decoder};
use crate::pipeline::driver::{Driver, DriverConfig, DriverReport, Received};
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
fn request_waiting(s: &UnixStream, wait: Duration) -> Result<bool> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
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
    let frames = std::env::var_os(FRAMES_ENV).is_some_and(|v| v == "1");
    let mut s = UnixStream::connect(socket).map_err(|e| {
        Error::io(
            format!("session: connecting to the client at {}", socket.display()),
            e,
        )
    })?;
    let mut d = Driver::new(dc)?;
    let cfg = &dc.cfg;
    write_frame(
        &mut s,
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
        while d.outstanding() > 0 && d.can_receive() && !request_waiting(&s, PREFETCH_EVERY)? {
            d.receive(link, Duration::ZERO)?;
        }
        let Some((req, _)) = read_frame::<Request>(&mut s)? else {
            return Err(Error::PeerLost(
                "session: the client closed its connection without closing the session".into(),
            ));
        };
        match req {
            Request::Submit => {
                let reply = if d.can_send() {
                    let ids = d.send_chunk(link)?;
                    Reply::Sent {
                        call_id: ids.call_id.get(),
                        chunk_index: ids.chunk_index.get(),
                        cache_epoch: ids.cache_epoch.get(),
                        room: d.can_send(),
                    }
                } else {
                    Reply::Again {
                        outstanding: d.outstanding(),
                    }
                };
                write_frame(&mut s, &reply, &[])?;
            }
            Request::Recv { timeout_us } => {
                // A client may ask for "forever"; a week bounds it (and the arithmetic).
                let wait = Duration::from_micros(timeout_us).min(MAX_WAIT);
                let deadline = Instant::now() + wait;
                let out = loop {
                    if let Some(e) = d.decode_next(decoder)? {
                        break Some(e);
                    }
                    if d.outstanding() == 0 || !d.can_receive() {
                        break None;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    match d.receive(link, left)? {
                        Received::Nothing => break None,
                        Received::Accepted | Received::DroppedStale => {}
                    }
                };
                match out {
                    None => write_frame(
                        &mut s,
                        &Reply::Nothing {
                            outstanding: d.outstanding(),
                        },
                        &[],
                    )?,
                    Some(e) => {
                        let bytes: &[u8] = bytemuck::cast_slice(&e.latent);
                        let (fh, fw, rgb) = if frames {
                            preview_frames(cfg, &e.latent)?
                        } else {
                            (0, 0, Vec::new())
                        };
                        let mut payload: Vec<&[u8]> = vec![bytes];
                        payload.extend(rgb.iter().map(Vec::as_slice));
                        write_frame(
                            &mut s,
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
                            &payload,
                        )?;
                    }
                }
            }
            Request::Prompt { seed } => {
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
                    d.set_prompt_seed(seed);
                    Reply::Ok
                };
                write_frame(&mut s, &reply, &[])?;
            }
            Request::Cut { seed } => {
                let e = d.hard_cut();
                if let Some(seed) = seed {
                    d.set_prompt_seed(seed);
                }
                write_frame(
                    &mut s,
                    &Reply::Cut {
                        cache_epoch: e.get(),
                    },
                    &[],
                )?;
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
                write_frame(
                    &mut s,
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
