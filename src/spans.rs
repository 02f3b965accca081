//! Spans: named, nested time ranges of one rank, recorded into the rank's trace
//! (`lockstep run --trace FILE`, Chrome/Perfetto JSON through `pipeline::report`) and emitted as
//! NVTX ranges of the same name (Nsight Systems), from one guard.
//!
//! How to use it (any thread of a rank; the guard ends the span when it drops):
//!
//! ```
//! use lockstep::spans;
//! // A collective: name `all_reduce f32 49152 B`, args {op, dtype, bytes}.
//! let _s = spans::collective("all_reduce", "f32", 49152);
//! // A generator call: name `gen denoise t=750 frames=3`, args {kind, t, frames, chunk, …}.
//! let _g = spans::generator_call(spans::GeneratorCall {
//!     kind: "denoise", t: 750, frames: 3, chunk: 5, epoch: 0, call: 1, of: 5,
//! });
//! // Anything else: the closure runs only when spans are on.
//! let _o = spans::enter(|| format!("decode {}", 5));
//! ```
//!
//! A new kind of span with structured args: add an `Args` variant (its `to_json` gives the
//! Chrome-trace `args`) and a constructor like [`collective`]. The data planes' collectives
//! (host, NCCL) call [`collective`] with the op's name as `comm::group::OpKind::name` spells it
//! (`all_reduce`, `all_gather`, `broadcast`, `send`, `recv`), the dtype's wire name and the bytes
//! this rank sends.
//!
//! Contract:
//! - Off unless asked: recording starts with [`record_trace`]`(true)` (`lockstep run --trace`
//!   turns it on in every rank); NVTX is on with `LOCKSTEP_NVTX=1`, off with `LOCKSTEP_NVTX=0`,
//!   and when unset on exactly when `NSYS_PROFILING_SESSION_ID` is set (`nsys profile` sets it in
//!   the processes it profiles). With both off a span costs one atomic load and a branch: the
//!   name closure is not called, nothing is allocated or formatted.
//! - NVTX is the v2 C ABI (`nvtxRangePushA` / `nvtxRangePop`) of `libnvToolsExt.so.1`, else
//!   `libnvToolsExt.so`, or only the file `LOCKSTEP_NVTX_LIB` names; loaded at the first span of
//!   the process, never at build time. Requested but not loadable: one line on stderr naming
//!   what was tried, then spans go on without NVTX (never a crash).
//! - Every NVTX range is a span of the trace with the same name, and the reverse (when both are
//!   on): pushed at [`enter`], popped when the guard drops, on the same thread (the guard is not
//!   `Send`).
//! - Nesting: spans of one thread nest by time on that thread's track (its *lane*, see
//!   [`set_lane`]), so a collective inside a generator call shows inside it. One lane per thread.
//! - A process keeps at most `MAX_SPANS` finished spans; later ones are counted, not kept, and
//!   [`take`] appends one zero-length span saying how many were dropped (memory stays bounded in
//!   a run of hours).
//!
//! Tripwires: a guard bound to `_` (`let _ = spans::enter(…)`) ends at once (the type is
//! `#[must_use]`); a lane shared by two threads can show false nesting.
use crate::cuda::probe::Library;
use std::borrow::Cow;
use std::cell::Cell;
use std::ffi::{c_char, c_int};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::Instant;

/// Finished spans one process keeps (about 150 B each: ~150 MiB at the cap). A wan-1.3b chunk at
/// TP=2 makes a few hundred spans, so the cap holds thousands of chunks.
pub const MAX_SPANS: usize = 1 << 20;

/// `LOCKSTEP_NVTX`: `1`/`on` or `0`/`off`; unset: on under `nsys profile`.
pub const NVTX_ENV: &str = "LOCKSTEP_NVTX";
/// `LOCKSTEP_NVTX_LIB`: the NVTX library to load instead of the default names.
pub const NVTX_LIB_ENV: &str = "LOCKSTEP_NVTX_LIB";
/// Set by Nsight Systems in the processes it profiles.
pub const NSYS_SESSION_ENV: &str = "NSYS_PROFILING_SESSION_ID";

const TRACE: u8 = 1;
const NVTX: u8 = 2;
const READY: u8 = 4;
static FLAGS: AtomicU8 = AtomicU8::new(0);

/// The on-bits, resolving the NVTX request on the first call of the process.
#[inline]
fn flags() -> u8 {
    let f = FLAGS.load(Ordering::Acquire);
    if f & READY != 0 {
        f
    } else {
        init()
    }
}

#[cold]
fn init() -> u8 {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let nvtx = if nvtx::get().is_some() { NVTX } else { 0 };
        FLAGS.fetch_or(READY | nvtx, Ordering::AcqRel);
    });
    FLAGS.load(Ordering::Acquire)
}

/// Starts (or stops) recording finished spans for [`take`].
pub fn record_trace(on: bool) {
    if on {
        FLAGS.fetch_or(TRACE, Ordering::AcqRel);
    } else {
        FLAGS.fetch_and(!TRACE, Ordering::AcqRel);
    }
}

/// Whether a span opened now would be recorded or sent to NVTX.
pub fn is_on() -> bool {
    flags() & (TRACE | NVTX) != 0
}

/// Whether NVTX ranges are emitted in this process.
pub fn nvtx_on() -> bool {
    flags() & NVTX != 0
}

thread_local! {
    static LANE: Cell<Option<&'static str>> = const { Cell::new(None) };
}

/// Names this thread's track in the trace (e.g. `stage0`, `stage1`); unset, a span takes the
/// thread's name, else `thread`.
pub fn set_lane(lane: &'static str) {
    LANE.with(|l| l.set(Some(lane)));
}

fn lane() -> Cow<'static, str> {
    match LANE.with(Cell::get) {
        Some(l) => Cow::Borrowed(l),
        None => Cow::Owned(std::thread::current().name().unwrap_or("thread").to_owned()),
    }
}

/// One generator call on a mesh rank, as the plan executor issues it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeneratorCall {
    /// `denoise`, `clean` or `recompute`.
    pub kind: &'static str,
    /// Timestep (0 for clean and recompute).
    pub t: u32,
    /// Latent frames the call processes.
    pub frames: u32,
    pub chunk: u64,
    pub epoch: u64,
    /// Its number within the chunk (1-based: the count checked against the plan).
    pub call: u32,
    /// The plan's `expected_generator_calls`.
    pub of: u32,
}

/// A span's structured arguments (the Chrome trace's `args`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Args {
    None,
    GeneratorCall(GeneratorCall),
    Collective {
        op: &'static str,
        dtype: &'static str,
        bytes: u64,
    },
    /// A chunk-level step (Stage 0 send/decode, the mesh's generate); `call_id` once known.
    Chunk {
        call_id: Option<u64>,
        chunk: u64,
        epoch: u64,
    },
}

impl Args {
    pub fn to_json(&self) -> Option<serde_json::Value> {
        Some(match *self {
            Args::None => return None,
            Args::GeneratorCall(c) => serde_json::json!({
                "kind": c.kind, "t": c.t, "frames": c.frames, "chunk": c.chunk,
                "epoch": c.epoch, "call": c.call, "of": c.of,
            }),
            Args::Collective { op, dtype, bytes } => {
                serde_json::json!({"op": op, "dtype": dtype, "bytes": bytes})
            }
            Args::Chunk {
                call_id: Some(call_id),
                chunk,
                epoch,
            } => serde_json::json!({"call_id": call_id, "chunk": chunk, "epoch": epoch}),
            Args::Chunk {
                call_id: None,
                chunk,
                epoch,
            } => serde_json::json!({"chunk": chunk, "epoch": epoch}),
        })
    }
}

/// A finished span, as [`take`] hands it over.
#[derive(Clone, Debug)]
pub struct Finished {
    pub lane: Cow<'static, str>,
    pub name: String,
    pub args: Args,
    pub start: Instant,
    pub end: Instant,
}

struct Sink {
    spans: Vec<Finished>,
    dropped: u64,
}

static SINK: Mutex<Sink> = Mutex::new(Sink {
    spans: Vec::new(),
    dropped: 0,
});

fn sink() -> std::sync::MutexGuard<'static, Sink> {
    // A thread that panicked while pushing left a Vec that is still valid.
    SINK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every span this process finished since the last call (the cap's drop count as a last,
/// zero-length span on the calling thread's lane).
pub fn take() -> Vec<Finished> {
    let mut s = sink();
    let mut out = std::mem::take(&mut s.spans);
    let dropped = std::mem::take(&mut s.dropped);
    drop(s);
    if dropped > 0 {
        let now = Instant::now();
        out.push(Finished {
            lane: lane(),
            name: format!("trace full: {dropped} later spans dropped (cap {MAX_SPANS})"),
            args: Args::None,
            start: now,
            end: now,
        });
    }
    out
}

struct Open {
    name: String,
    args: Args,
    start: Instant,
    trace: bool,
    nvtx: Option<&'static nvtx::Nvtx>,
}

/// An open span; it ends when dropped (on the thread that opened it).
#[must_use = "a span lasts as long as its guard: bind it (`let _s = …`), not `let _ = …`"]
pub struct Guard {
    open: Option<Open>,
    /// NVTX ranges are per thread: push and pop must happen on the same one.
    _not_send: PhantomData<*const ()>,
}

impl Guard {
    /// A guard that records nothing.
    pub const fn off() -> Guard {
        Guard {
            open: None,
            _not_send: PhantomData,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(o) = self.open.take() else { return };
        let end = Instant::now();
        if let Some(n) = o.nvtx {
            n.pop();
        }
        if o.trace {
            let f = Finished {
                lane: lane(),
                name: o.name,
                args: o.args,
                start: o.start,
                end,
            };
            let mut s = sink();
            if s.spans.len() < MAX_SPANS {
                s.spans.push(f);
            } else {
                s.dropped += 1;
            }
        }
    }
}

/// Opens a span named `name()` with `args`; `name` runs only when spans are on.
#[inline]
pub fn enter_with(args: Args, name: impl FnOnce() -> String) -> Guard {
    let f = flags();
    if f & (TRACE | NVTX) == 0 {
        return Guard::off();
    }
    open(f, args, name())
}

/// Opens a span named `name()` (no args); `name` runs only when spans are on.
#[inline]
pub fn enter(name: impl FnOnce() -> String) -> Guard {
    enter_with(Args::None, name)
}

/// A generator call: `gen <kind> t=<t> frames=<frames>` (ids in the args, so equal calls share
/// a name and aggregate in Perfetto's and Nsight's summaries).
#[inline]
pub fn generator_call(c: GeneratorCall) -> Guard {
    enter_with(Args::GeneratorCall(c), || {
        format!("gen {} t={} frames={}", c.kind, c.t, c.frames)
    })
}

/// A collective: `<op> <dtype> <bytes> B` (`bytes`: what this rank sends).
#[inline]
pub fn collective(op: &'static str, dtype: &'static str, bytes: u64) -> Guard {
    enter_with(Args::Collective { op, dtype, bytes }, || {
        format!("{op} {dtype} {bytes} B")
    })
}

#[cold]
fn open(f: u8, args: Args, mut name: String) -> Guard {
    let nvtx = if f & NVTX != 0 { nvtx::get() } else { None };
    if let Some(n) = nvtx {
        name.push('\0');
        n.push(&name);
        name.pop();
    }
    Guard {
        open: Some(Open {
            name,
            args,
            start: Instant::now(),
            trace: f & TRACE != 0,
            nvtx,
        }),
        _not_send: PhantomData,
    }
}

mod nvtx {
    use super::*;

    type PushA = unsafe extern "C" fn(*const c_char) -> c_int;
    type Pop = unsafe extern "C" fn() -> c_int;

    pub struct Nvtx {
        push: PushA,
        pop: Pop,
        /// Kept open for the life of the process (the function pointers live in it).
        _lib: Library,
    }

    impl Nvtx {
        /// `name` ends in NUL.
        pub fn push(&self, name: &str) {
            debug_assert!(name.ends_with('\0'));
            // SAFETY: `push` is nvtxRangePushA of the NVTX v2 C ABI (a NUL-terminated message
            // it reads during the call only); `name` is NUL-terminated and outlives the call.
            unsafe { (self.push)(name.as_ptr().cast::<c_char>()) };
        }
        pub fn pop(&self) {
            // SAFETY: `pop` is nvtxRangePop of the NVTX v2 C ABI (no arguments); a pop without
            // a push is an error NVTX reports by its return value, not undefined behaviour.
            unsafe { (self.pop)() };
        }
    }

    /// Why NVTX is requested, or `None` when it is not.
    fn requested() -> Option<String> {
        match std::env::var(NVTX_ENV) {
            Ok(v) => match v.as_str() {
                "1" | "on" => Some(format!("{NVTX_ENV}={v}")),
                "0" | "off" | "" => None,
                _ => {
                    crate::diag::line(&format!(
                        "lockstep: {NVTX_ENV}={v:?} is neither 1/on nor 0/off; NVTX ranges off"
                    ));
                    None
                }
            },
            Err(_) => std::env::var_os(NSYS_SESSION_ENV)
                .map(|_| format!("{NSYS_SESSION_ENV} is set (running under nsys)")),
        }
    }

    fn candidates() -> Vec<String> {
        match std::env::var(NVTX_LIB_ENV) {
            Ok(p) if !p.is_empty() => vec![p],
            _ => vec!["libnvToolsExt.so.1".into(), "libnvToolsExt.so".into()],
        }
    }

    fn load() -> crate::Result<Nvtx> {
        let lib = Library::open_first("NVTX", &candidates())?;
        // SAFETY: the NVTX v2 C ABI declares `int nvtxRangePushA(const char*)` and
        // `int nvtxRangePop(void)`, the exact types of `PushA` and `Pop`.
        let (push, pop) = unsafe {
            (
                lib.sym::<PushA>("nvtxRangePushA")?,
                lib.sym::<Pop>("nvtxRangePop")?,
            )
        };
        Ok(Nvtx {
            push,
            pop,
            _lib: lib,
        })
    }

    /// The loaded NVTX functions when NVTX is requested and loads (resolved once per process).
    pub fn get() -> Option<&'static Nvtx> {
        static NVTX_LIB: OnceLock<Option<Nvtx>> = OnceLock::new();
        NVTX_LIB
            .get_or_init(|| {
                let why = requested()?;
                match load() {
                    Ok(n) => Some(n),
                    Err(e) => {
                        crate::diag::line(&format!(
                            "lockstep: NVTX requested ({why}) but not loaded, ranges off ({e}); \
                             set {NVTX_LIB_ENV} to libnvToolsExt.so.1's path"
                        ));
                        None
                    }
                }
            })
            .as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test touches the process-wide switch, so tests of this binary that run in parallel
    /// cannot see each other's spans here (no other unit test turns recording on).
    #[test]
    fn spans_nest_per_lane_carry_args_and_cost_nothing_when_off() {
        // Off: the name closure never runs and nothing is kept.
        record_trace(false);
        let ran = Cell::new(false);
        {
            let _s = enter(|| {
                ran.set(true);
                "x".into()
            });
        }
        assert!(!ran.get(), "the name was built while spans were off");
        if !nvtx_on() {
            assert!(take().is_empty());
        }

        record_trace(true);
        set_lane("unit");
        {
            let _g = generator_call(GeneratorCall {
                kind: "denoise",
                t: 750,
                frames: 3,
                chunk: 5,
                epoch: 1,
                call: 2,
                of: 5,
            });
            let _c = collective("all_reduce", "f32", 49152);
        }
        // Another thread's spans land on its own lane.
        std::thread::Builder::new()
            .name("helper".into())
            .spawn(|| drop(enter(|| "on a helper".into())))
            .expect("spawn")
            .join()
            .expect("join");
        record_trace(false);
        let got = take();
        let by_name = |n: &str| got.iter().find(|f| f.name == n);
        let g = by_name("gen denoise t=750 frames=3").expect("generator span");
        let c = by_name("all_reduce f32 49152 B").expect("collective span");
        assert_eq!((g.lane.as_ref(), c.lane.as_ref()), ("unit", "unit"));
        assert!(g.start <= c.start && c.end <= g.end, "not nested");
        assert_eq!(
            c.args.to_json(),
            Some(serde_json::json!({"op": "all_reduce", "dtype": "f32", "bytes": 49152}))
        );
        let gj = g.args.to_json().expect("args");
        assert_eq!(
            (gj["kind"].as_str(), gj["t"].as_u64()),
            (Some("denoise"), Some(750))
        );
        assert_eq!(
            (gj["chunk"].as_u64(), gj["call"].as_u64()),
            (Some(5), Some(2))
        );
        assert_eq!(
            by_name("on a helper").map(|f| f.lane.as_ref()),
            Some("helper")
        );
    }
}
