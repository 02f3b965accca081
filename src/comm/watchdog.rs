//! The abort path and the watchdog (docs/spec.md §8: crash > hang).
//!
//! Contract:
//! - [`crash`] is the one way a bootstrapped rank dies on error, from any thread: print the
//!   diagnosis (`lockstep[global-rank R]: exit N (name): …`), dump the flight recorder, tell the
//!   peers (a rank tells rank 0; rank 0 relays to everyone), abort the data plane, exit with the
//!   error's code. Only the first caller proceeds; a hard-exit timer (`HARD_EXIT`) guarantees the
//!   process ends even if dumping or notifying blocks.
//! - The watchdog thread fires when the recorder saw no progress (completed op, consumed
//!   header, explicit progress) for `timeout`, naming the oldest op still in flight. It stays
//!   armed through teardown, so a hanging teardown still ends in a hard exit (C5).
//! - SIGTERM/SIGINT are taken by a dedicated thread (`sigwait`): dump, exit `Signal`. SIGUSR1
//!   dumps on request and continues. A launcher (torchrun) SIGTERMs the survivors within ~0.1 s
//!   of a rank's death, often before this rank's own peer-lost diagnosis is out: the signal's
//!   diagnosis carries what this rank knew by then ([`note_peer_event`]: peers lost, failure
//!   notices), so it still names the lost peer.
//! - Under torchrun every ending rank writes `TORCHELASTIC_ERROR_FILE` with its diagnosis
//!   (`crate::torchrun::write_error_file`).
use super::control::{write_frame, FailedNotice, FrameKind};
use super::plane::AbortHandle;
use super::recorder::{now_us, Recorder};
use crate::error::Error;
use crate::exit::ExitCode;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How long a lost data connection waits for the peer's failure notice.
const NOTICE_GRACE: Duration = Duration::from_millis(300);

/// One diagnosis line: the base module's `crate::diag::line`, under the name the pipeline's rank
/// adapters import.
pub use crate::diag::line as diag;

/// How long a SIGTERM/SIGINT waits for this rank's own detection of a peer's end to speak first.
const SIGNAL_SETTLE: Duration = Duration::from_millis(50);

/// Upper bound on the whole abort path.
const HARD_EXIT: Duration = Duration::from_secs(3);

struct FailCtx {
    rank: u32,
    recorder: Arc<Recorder>,
    /// Control connections to notify: (global rank, write half).
    notify: Mutex<Vec<(u32, TcpStream)>>,
    abort: Mutex<Vec<AbortHandle>>,
}

static CTX: OnceLock<FailCtx> = OnceLock::new();
static CRASHING: AtomicBool = AtomicBool::new(false);
/// What this rank learnt of its peers' ends before it ended itself (see [`note_peer_event`]).
static PEER_EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records a peer's end as this rank learnt it (a lost connection, a failure notice), with the
/// time, the moment it is known: a SIGTERM that overtakes this rank's own diagnosis still
/// names it.
pub fn note_peer_event(what: &str) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut ev = PEER_EVENTS.lock().unwrap_or_else(|p| p.into_inner());
    if ev.len() < 16 && !ev.iter().any(|e| e.ends_with(what)) {
        ev.push(format!("at unix {t:.3}: {what}"));
    }
}

/// The first peer's end [`note_peer_event`] recorded, without its time.
pub fn first_peer_event() -> Option<String> {
    let ev = PEER_EVENTS.lock().unwrap_or_else(|p| p.into_inner());
    ev.first()
        .map(|e| e.split_once(": ").map_or(e.clone(), |(_, w)| w.to_string()))
}

/// What [`note_peer_event`] recorded, as one clause (empty when nothing).
pub fn peer_events() -> String {
    let ev = PEER_EVENTS.lock().unwrap_or_else(|p| p.into_inner());
    if ev.is_empty() {
        String::new()
    } else {
        format!("; what this rank knew by then: {}", ev.join("; "))
    }
}

/// Installs the abort path for this process (once, at bootstrap).
pub fn install(rank: u32, recorder: Arc<Recorder>) {
    let _ = CTX.set(FailCtx {
        rank,
        recorder,
        notify: Mutex::new(Vec::new()),
        abort: Mutex::new(Vec::new()),
    });
}

pub fn add_notify(rank: u32, stream: &TcpStream) {
    if let (Some(ctx), Ok(s)) = (CTX.get(), stream.try_clone()) {
        let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
        ctx.notify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((rank, s));
    }
}

pub fn add_abort(h: AbortHandle) {
    if let Some(ctx) = CTX.get() {
        ctx.abort.lock().unwrap_or_else(|p| p.into_inner()).push(h);
    }
}

pub fn is_crashing() -> bool {
    CRASHING.load(Ordering::SeqCst)
}

/// Ends this rank: diagnose, dump, notify peers (unless the failure came from them), abort the
/// data plane, exit. Never returns.
pub fn crash(err: &Error, notify_peers: bool) -> ! {
    crash_with_origin(err, notify_peers, None)
}

/// As [`crash`], relaying a peer's notice (rank 0 forwards the original origin).
pub fn crash_with_origin(err: &Error, notify_peers: bool, relay: Option<&FailedNotice>) -> ! {
    let code = err.exit_code();
    if let Error::PeerLost(m) | Error::PeerFailed(m) = err {
        note_peer_event(m);
    }
    if matches!(err, Error::PeerLost(m) if !m.contains("control connection")) && !is_crashing() {
        // A data connection or the envelope lane usually drops because its peer is dying; give
        // that peer's failure notice (sent on the control connection before it exited) a
        // bounded moment to arrive so the diagnosis names the root cause.
        std::thread::sleep(NOTICE_GRACE);
    }
    if CRASHING.swap(true, Ordering::SeqCst) {
        // Someone else is already ending the process; the hard-exit timer bounds it.
        loop {
            std::thread::park();
        }
    }
    let _ = std::thread::Builder::new()
        .name("lockstep-hard-exit".into())
        .spawn(move || {
            std::thread::sleep(HARD_EXIT);
            crate::diag!("lockstep: abort path took longer than {HARD_EXIT:?}; hard exit");
            // SAFETY: _exit ends the process immediately; it is async-signal-safe and takes no locks.
            unsafe { libc::_exit(code.code()) }
        });
    let rank = CTX.get().map_or(u32::MAX, |c| c.rank);
    // A signal that overtook this rank's own diagnosis of a peer's end carries that end.
    let known = if matches!(err, Error::Signal(_)) {
        peer_events()
    } else {
        String::new()
    };
    let line = format!(
        "lockstep[global-rank {rank}]: exit {} ({}): {err}{known}",
        code.code(),
        code.name()
    );
    diag(&line);
    let mut dumped = String::new();
    if let Some(ctx) = CTX.get() {
        match ctx.recorder.dump(&format!("{err}{known}"), Some(code)) {
            Ok(p) => {
                dumped = format!("flight recorder dumped to {}", p.display());
                crate::diag!("lockstep[global-rank {rank}]: {dumped}");
            }
            Err(e) => {
                crate::diag!("lockstep[global-rank {rank}]: flight recorder dump failed: {e}")
            }
        }
    }
    crate::torchrun::write_error_file(
        &format!(
            "lockstep global-rank {rank}: exit {} ({}): {}",
            code.code(),
            code.name(),
            err.to_string().lines().next().unwrap_or("")
        ),
        &format!("{line}\n{dumped}"),
        code,
    );
    if let Some(ctx) = CTX.get() {
        if notify_peers {
            let notice = relay.cloned().unwrap_or(FailedNotice {
                origin: rank,
                code: code.code(),
                name: code.name().into(),
                message: err.to_string(),
            });
            if let Ok(body) = serde_json::to_vec(&notice) {
                let mut conns = ctx.notify.lock().unwrap_or_else(|p| p.into_inner());
                for (peer, s) in conns.iter_mut() {
                    if *peer != notice.origin {
                        let _ = write_frame(s, FrameKind::Failed, &[&body]);
                    }
                }
            }
        }
        for h in ctx.abort.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            h.abort();
        }
    }
    std::process::exit(code.code())
}

/// Watchdog: fires when no progress was recorded for `timeout`.
pub fn spawn_watchdog(
    recorder: Arc<Recorder>,
    timeout: Duration,
    rank: u32,
) -> std::io::Result<()> {
    let tick = (timeout / 8).clamp(Duration::from_millis(5), Duration::from_millis(100));
    std::thread::Builder::new()
        .name("lockstep-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(tick);
            let idle_us = now_us().saturating_sub(recorder.last_progress_us());
            if idle_us > timeout.as_micros() as u64 {
                let stuck = match recorder.oldest_in_flight() {
                    Some(op) => {
                        let since = op.t_started_us.unwrap_or(op.t_enqueued_us);
                        format!(
                            "stuck in: {} (state {:?} for {} ms; call_id {}, chunk_index {}, cache_epoch {}, action {}, phase {})",
                            op.describe(),
                            op.state,
                            now_us().saturating_sub(since) / 1000,
                            op.ctx.call_id.0,
                            op.ctx.chunk_index.0,
                            op.ctx.cache_epoch.0,
                            if op.ctx.action.is_empty() { "-" } else { &op.ctx.action },
                            if op.ctx.phase.is_empty() { "-" } else { &op.ctx.phase },
                        )
                    }
                    None => "idle: no op in flight and no header (heartbeats off or the driver is gone?)".into(),
                };
                crash(
                    &Error::Timeout(format!(
                        "watchdog: no progress on global-rank {rank} for {} ms (timeout {} ms); {stuck}",
                        idle_us / 1000,
                        timeout.as_millis()
                    )),
                    true,
                );
            }
        })
        .map(|_| ())
}

/// Blocks SIGTERM, SIGINT and SIGUSR1 in this thread (call before spawning any other thread, so
/// every thread inherits the mask) and starts the thread that takes them.
pub fn install_signal_thread(recorder: Arc<Recorder>) -> std::io::Result<()> {
    // SAFETY: plain libc calls on a zero-initialized sigset_t owned by this frame.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::Builder::new()
        .name("lockstep-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid, initialized sigset_t; `sig` is a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            if sig == libc::SIGUSR1 {
                match recorder.dump("dump requested (SIGUSR1)", None) {
                    Ok(p) => crate::diag!(
                        "lockstep: flight recorder dumped to {} (on request)",
                        p.display()
                    ),
                    Err(e) => crate::diag!("lockstep: dump on request failed: {e}"),
                }
                continue;
            }
            let name = if sig == libc::SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            // A launcher SIGTERMs the survivors right after a rank died; this rank's own readers
            // see that death within a millisecond or two. Give them a bounded moment to speak
            // first (their diagnosis names the dead peer), and carry what they noted if not.
            let until = std::time::Instant::now() + SIGNAL_SETTLE;
            while std::time::Instant::now() < until && !is_crashing() {
                std::thread::sleep(Duration::from_millis(2));
            }
            crash(
                &Error::Signal(format!("{name} received; dumped and exiting")),
                true,
            );
        })
        .map(|_| ())
}

/// Exit code of an error at the top of a rank (for callers that end without `crash`).
pub fn exit_code_of(err: &Error) -> ExitCode {
    err.exit_code()
}
