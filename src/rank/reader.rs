//! The control-connection reader thread (one per peer connection): peer loss without a
//! goodbye is `PeerLost` at once, naming how far an interrupted payload got; a peer's failure
//! notice ends this rank with `PeerFailed`; a dump request dumps.
use crate::comm::control::{from_json, read_frame, FailedNotice, FrameKind};
use crate::comm::lane::LanePeek;
use crate::comm::recorder::Recorder;
use crate::comm::watchdog;
use crate::error::Error;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub(super) struct RecvProgress {
    pub(super) action: &'static str,
    pub(super) call_id: u64,
    pub(super) done: usize,
    pub(super) of: usize,
}

pub(super) struct ReaderCtx {
    pub(super) from: u32,
    pub(super) me: u32,
    /// A clone of the envelope lane when this connection's peer is the envelope peer.
    pub(super) lane: Option<LanePeek>,
    pub(super) recorder: Arc<Recorder>,
    pub(super) recv_progress: Arc<Mutex<Option<RecvProgress>>>,
    pub(super) frame_busy: Arc<AtomicBool>,
}

pub(super) fn reader_loop(mut s: TcpStream, ctx: ReaderCtx) {
    let from = format!("control connection to global-rank {}", ctx.from);
    let max = 1u32 << 20;
    let mut bye = false;
    let lost = |what: String| -> ! {
        // Known now, before the bounded wait below: a SIGTERM arriving meanwhile names it.
        watchdog::note_peer_event(&format!("global-rank {} {what}", ctx.from));
        if let Some(lane) = ctx.lane.as_ref() {
            // The envelope lane may still hold a header this rank has not read, or the receiving
            // thread may be between reading one and posting its payload's receives: give it a
            // bounded moment, so the diagnosis says how far the payload got ("mid-payload").
            let until = Instant::now() + Duration::from_millis(100);
            let progressed = || ctx.recv_progress.lock().is_ok_and(|p| p.is_some());
            while (lane.has_unread() || ctx.frame_busy.load(Ordering::SeqCst))
                && !progressed()
                && Instant::now() < until
                && !watchdog::is_crashing()
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let during = ctx
            .recv_progress
            .lock()
            .ok()
            .and_then(|p| *p)
            .map_or(String::new(), |p| {
                format!(
                    " (receiving the payload of {} call_id {}: {} of {} tensors complete)",
                    p.action, p.call_id, p.done, p.of
                )
            });
        let who = if ctx.from == 0 { " (driver)" } else { "" };
        watchdog::crash(
            &Error::PeerLost(format!("global-rank {}{who} {what}{during}", ctx.from)),
            ctx.me == 0,
        )
    };
    loop {
        match read_frame(&mut s, max, &from) {
            Ok(None) if bye => {
                return;
            }
            Ok(None) => lost("closed its control connection without a goodbye".into()),
            Err(Error::PeerLost(m)) if !bye => lost(format!("was lost: {m}")),
            Err(_) if bye => return,
            Err(e) => watchdog::crash(&e, true),
            Ok(Some((FrameKind::Envelope, _))) => watchdog::crash(
                &Error::Invariant(format!(
                    "envelope on the notice connection from global-rank {} (envelopes travel on the lane)",
                    ctx.from
                )),
                true,
            ),
            Ok(Some((FrameKind::Failed, body))) => {
                let n: FailedNotice = match from_json(&body, "failure notice") {
                    Ok(n) => n,
                    Err(e) => watchdog::crash(&e, true),
                };
                let signalled = n.code == crate::exit::ExitCode::Signal.code();
                if let (true, Some(first)) = (signalled, watchdog::first_peer_event()) {
                    // A launcher SIGTERMs every survivor right after a rank died: a peer that
                    // ended on that signal is not the cause when this rank already saw a peer
                    // die. The death is the diagnosis (and the notice relayed is ours).
                    watchdog::crash(
                        &Error::PeerLost(format!(
                            "{first} (then global-rank {} ended on a signal)",
                            n.origin
                        )),
                        ctx.me == 0,
                    );
                }
                let err = Error::PeerFailed(format!(
                    "global-rank {} failed with exit {} ({}): {}",
                    n.origin, n.code, n.name, n.message
                ));
                watchdog::crash_with_origin(&err, ctx.me == 0, Some(&n));
            }
            Ok(Some((FrameKind::Dump, _))) => {
                let _ = ctx.recorder.dump("dump requested by a peer", None);
            }
            Ok(Some((FrameKind::Bye, _))) => {
                bye = true;
            }
            Ok(Some((k, _))) => watchdog::crash(
                &Error::Decode(format!("{from}: unexpected {k:?} frame after rendezvous")),
                true,
            ),
        }
    }
}
