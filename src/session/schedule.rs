//! `lockstep run`'s Stage 0 is a session: rank 0 serves the session protocol (`host::serve_on`)
//! on its main thread, and the run's fixed schedule is a [`Session`] client on a second thread,
//! over a socket pair. The requests, the host and the `Driver` steps are the ones a server's
//! `Session` uses: `lockstep run` has no driver loop of its own.
//!
//! Contract (what `lockstep run` did before it went through the session, kept):
//! - The schedule: `chunks` chunks; a hard cut right after the send that completes an epoch of
//!   `hard_cut_every` chunks (before any further receive, so the results still in flight are the
//!   ones dropped as stale); results taken as they come; then the drain and SHUTDOWN (`close`).
//! - Every receive that waits is strict: no RESULT within `--timeout` ends rank 0 with the
//!   protocol's RESULT timeout (exit 71, "stage 0 waited … for a RESULT") and its diagnosis.
//! - With backpressure off (E1) the schedule submits every chunk before it receives (the host's
//!   submit takes a result, undecoded, whenever D_in is full: `host::submit`), so results are
//!   taken as soon as the mesh has them and decoded after, as an unbounded consumer would.
//! - Errors end the rank through its crash path with their own code: the host's (it returns
//!   it), or the schedule's, which the host sees only as a closed connection and which is
//!   returned instead of that.
//!
//! Cost: one socket round trip between two threads of one process per chunk (`submit_and_recv`;
//! a turn that completes an epoch takes `submit`, `cut` and a receive).
use super::host::serve_on;
use super::{Session, Submit};
use crate::pipeline::decode::Decoder;
use crate::pipeline::driver::{DriverConfig, DriverReport};
use crate::pipeline::DriverLink;
use crate::{Error, Result};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runs `dc.chunks` chunks through the session host on this thread, the schedule on another.
///
/// This is `lockstep run`'s only Stage 0: the loop it had of its own over the `Driver` steps is
/// gone, so nothing but the session host drives them.
///
/// ```compile_fail,E0432
/// use lockstep::pipeline::driver::run_driver;
/// ```
pub fn run(
    link: &mut dyn DriverLink,
    decoder: &mut dyn Decoder,
    dc: &DriverConfig,
) -> Result<DriverReport> {
    let (host_end, client_end) =
        UnixStream::pair().map_err(|e| Error::io("schedule: session socket pair", e))?;
    let failed: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
    let slot = failed.clone();
    let (model, chunks, every, timeout) =
        (dc.cfg.clone(), dc.chunks, dc.hard_cut_every, dc.timeout);
    let backpressure = dc.queues.backpressure;
    let thread = std::thread::Builder::new()
        .name("lockstep-schedule".into())
        .spawn(move || {
            let r = Session::attach(client_end, &model, timeout)
                .and_then(|mut s| drive(&mut s, chunks, every, timeout, backpressure));
            if let Err(e) = r {
                // Recorded before the connection closes (the session was dropped above), so
                // the host's "client closed" is never reported in place of this.
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        })
        .map_err(|e| Error::io("schedule: starting its thread", e))?;
    match serve_on(host_end, link, decoder, dc) {
        Ok(rep) => {
            // The schedule got `Closed`; its thread is ending.
            let _ = thread.join();
            match failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(e) => Err(e),
                None => Ok(rep),
            }
        }
        Err(host) => {
            // Not joined: the thread ends on the closed connection (or with this process).
            let own = failed.lock().unwrap_or_else(|p| p.into_inner()).take();
            Err(match (own, host) {
                (Some(e), Error::PeerLost(_)) => e,
                (_, host) => host,
            })
        }
    }
}

/// The fixed schedule, as session calls.
fn drive(
    s: &mut Session,
    chunks: u64,
    hard_cut_every: u64,
    timeout: Duration,
    backpressure: bool,
) -> Result<()> {
    let (mut sent, mut in_epoch) = (0u64, 0u64);
    loop {
        if sent < chunks {
            let cut_due = hard_cut_every > 0 && in_epoch + 1 == hard_cut_every && sent + 1 < chunks;
            if backpressure && !cut_due {
                // One round trip: this chunk out, the next result in (waiting when D_in is full).
                if let (Submit::Sent(_), _) = s.submit_and_recv_strict(timeout)? {
                    sent += 1;
                    in_epoch += 1;
                }
                continue;
            }
            match s.submit()? {
                Submit::Sent(_) => {
                    sent += 1;
                    in_epoch += 1;
                    if cut_due {
                        // The chunk that completes the epoch: the cut follows its send at once.
                        s.cut(None)?;
                        in_epoch = 0;
                    }
                }
                Submit::Again => {
                    s.recv_strict(timeout)?;
                }
            }
            continue;
        }
        if s.in_flight() == 0 {
            break;
        }
        s.recv_strict(timeout)?;
    }
    // The drain (stale results of cut epochs included), SHUTDOWN.
    s.close().map(drop)
}
