//! Layer 2–3: the `Communicator` (RAII over one `ncclComm_t`), its abort handle, and the
//! process-wide guarantees around them.
//!
//! Contract:
//! - Every NCCL call is checked; a failure is `Error::Nccl` with NCCL's string, code and last error.
//! - Non-blocking communicators (`blocking = 0`): a call that answers `ncclInProgress` is not
//!   enqueued until `ncclCommGetAsyncError` reports `ncclSuccess`; we poll that, with a deadline,
//!   before returning, so "returned Ok" always means "enqueued" in both modes.
//! - The **abort path is always reachable**: an atomic state word counts the threads inside an
//!   NCCL call and carries an abort bit. `abort` sets the bit (no new call may enter), waits a short
//!   grace for the threads inside to leave, then calls `ncclCommAbort`; if a thread is still inside
//!   NCCL after the grace (a blocking init, a hung group end), it writes the diagnosis to stderr and
//!   `_exit`s with the given code instead. Waiting for stream completion is *outside* NCCL, so a
//!   rank blocked in a wait can always be aborted.
//! - Blocking init and teardown are bounded by a `Tripwire` timer thread that hard-exits with a
//!   diagnosis if NCCL does not return (SPEC C5: teardown hangs, the exit still fires).
//! - `Drop` never panics and never leaves a live communicator: finalize + destroy under a deadline
//!   when healthy, abort when a wait or call failed. A thread inside `close` counts as inside
//!   NCCL (finalize is collective: it finishes only when every member finalizes), so an abort
//!   from another thread meanwhile waits `ABORT_GRACE` and then hard-exits rather than letting
//!   the process `exit` under a running finalize (that segfaulted: C5 on NCCL, 2026-11-26).
//!   An `atexit` hook aborts any communicator still alive when the process exits (exiting with
//!   one alive segfaulted on the GPU host).
//!
//! - One op surface: `send`, `recv`, `all_reduce_sum`, `broadcast`, `all_gather` are the same
//!   methods inside and outside an NCCL group; inside one (this thread's `group(…)`, or
//!   `begin_group` … `end_group` for the data-plane trait, counted as "inside NCCL" while open)
//!   they skip their own enqueue wait, because NCCL enqueues them at the group's end.
//! - Hot-path ops can be captured once into a CUDA graph (`capture` → `CapturedOps`) and replayed
//!   with no NCCL call.
//!
//! Tripwires: two ranks of one communicator must not share a GPU (NCCL rejects it at init with
//! "Duplicate GPU detected"). `ncclGroupStart/End` is per thread: a group must start and end on
//! the same thread, and ends even when an op inside it failed. A captured graph must never run or
//! be destroyed after its communicator is gone (`CapturedOps` enforces it).
use super::api::{self, Api, NCCL_IN_PROGRESS, NCCL_SUCCESS};
use crate::cuda::{Completion, DeviceBuf, Gpu, Ticket};
use crate::exit::ExitCode;
use crate::ids::GroupRank;
use crate::{Error, Result};
use cudarc::driver::CudaContext;
use cudarc::nccl::sys::{ncclComm, ncclComm_t, ncclUniqueId};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once, Weak};
use std::time::{Duration, Instant};

/// Bit of the state word that forbids new NCCL calls (abort or close under way).
const ABORT_BIT: u32 = 1 << 31;
/// How long `abort` waits for threads inside a (short) NCCL call before hard-exiting.
pub const ABORT_GRACE: Duration = Duration::from_millis(250);
/// Default bound for finalize + destroy when a `Communicator` is dropped.
pub const DROP_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes `msg` to stderr with one `write(2)` (no lock that another thread could hold) and ends
/// the process at once with `code`. The last resort when NCCL cannot be aborted.
pub fn hard_exit(code: ExitCode, msg: &str) -> ! {
    let line = format!(
        "lockstep: hard exit {} ({}): {msg}\n",
        code.code(),
        code.name()
    );
    // SAFETY: write(2) on fd 2 with a valid buffer; _exit never returns and runs no handlers.
    unsafe {
        libc::write(2, line.as_ptr() as *const c_void, line.len());
        libc::_exit(code.code())
    }
}

/// A timer that hard-exits with a diagnosis unless disarmed (dropped) before it fires. Bounds NCCL
/// calls that can block inside the library (blocking init, finalize, destroy).
pub struct Tripwire {
    _disarm: Option<mpsc::Sender<()>>,
}

impl Tripwire {
    pub fn arm(after: Duration, code: ExitCode, msg: String) -> Tripwire {
        let (tx, rx) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("nccl-tripwire".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(after) {
                    hard_exit(code, &msg);
                }
            });
        match spawned {
            Ok(_) => Tripwire { _disarm: Some(tx) },
            Err(e) => {
                crate::diag!("lockstep: could not start the NCCL tripwire thread ({e}); the call is unbounded");
                Tripwire { _disarm: None }
            }
        }
    }
}

/// The bootstrap id every rank of one communicator must share (created by one process, passed
/// to the others through the control plane, an env var or a file).
#[derive(Clone, Copy)]
pub struct UniqueId(ncclUniqueId);

impl UniqueId {
    /// `ncclGetUniqueId`. The calling process hosts the bootstrap root until all ranks joined,
    /// so it must outlive their init.
    pub fn new() -> Result<UniqueId> {
        let api = api::api()?;
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: writes one ncclUniqueId.
        let rc = unsafe { (api.get_unique_id)(&mut id) };
        if rc != NCCL_SUCCESS {
            return Err(api::nccl_error(
                api,
                "ncclGetUniqueId",
                rc,
                std::ptr::null_mut(),
            ));
        }
        Ok(UniqueId(id))
    }

    /// The 128 raw bytes (what the rendezvous ships as the group's bootstrap blob).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal.iter().map(|b| *b as u8).collect()
    }

    pub fn from_bytes(b: &[u8]) -> Result<UniqueId> {
        if b.len() != 128 {
            return Err(Error::BadInput(format!(
                "NCCL unique id must be 128 bytes, got {}",
                b.len()
            )));
        }
        let mut id = ncclUniqueId { internal: [0; 128] };
        for (slot, byte) in id.internal.iter_mut().zip(b) {
            *slot = *byte as std::ffi::c_char;
        }
        Ok(UniqueId(id))
    }

    pub fn to_hex(&self) -> String {
        self.0
            .internal
            .iter()
            .map(|b| format!("{:02x}", *b as u8))
            .collect()
    }

    pub fn from_hex(s: &str) -> Result<UniqueId> {
        let s = s.trim();
        if s.len() != 256 || !s.is_ascii() {
            return Err(Error::BadInput(format!(
                "NCCL unique id must be 256 hex digits, got {} characters",
                s.len()
            )));
        }
        let mut id = ncclUniqueId { internal: [0; 128] };
        for (i, slot) in id.internal.iter_mut().enumerate() {
            let byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| Error::BadInput(format!("NCCL unique id: bad hex at {}", 2 * i)))?;
            *slot = byte as std::ffi::c_char;
        }
        Ok(UniqueId(id))
    }
}

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.to_hex();
        write!(f, "UniqueId({}…)", &h[..16])
    }
}

/// Element type of a reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceDtype {
    F32,
    Bf16,
    F16,
    I32,
    I64,
    U8,
}

/// An element type a device buffer can be summed in (`Communicator::all_reduce_sum_on`).
pub trait ReduceElem: cudarc::driver::DeviceRepr {
    const DTYPE: ReduceDtype;
}
impl ReduceElem for f32 {
    const DTYPE: ReduceDtype = ReduceDtype::F32;
}
impl ReduceElem for half::bf16 {
    const DTYPE: ReduceDtype = ReduceDtype::Bf16;
}
impl ReduceElem for half::f16 {
    const DTYPE: ReduceDtype = ReduceDtype::F16;
}

impl ReduceDtype {
    fn code(self) -> c_int {
        match self {
            ReduceDtype::F32 => api::NCCL_FLOAT32,
            ReduceDtype::Bf16 => api::NCCL_BFLOAT16,
            ReduceDtype::F16 => api::NCCL_FLOAT16,
            ReduceDtype::I32 => api::NCCL_INT32,
            ReduceDtype::I64 => api::NCCL_INT64,
            ReduceDtype::U8 => api::NCCL_UINT8,
        }
    }
    pub fn size(self) -> usize {
        match self {
            ReduceDtype::F32 | ReduceDtype::I32 => 4,
            ReduceDtype::Bf16 | ReduceDtype::F16 => 2,
            ReduceDtype::I64 => 8,
            ReduceDtype::U8 => 1,
        }
    }
}

/// How a communicator is created.
#[derive(Clone, Debug)]
pub struct CommOptions {
    /// Group name for diagnoses (`pp`, `mesh`, `bench`).
    pub name: String,
    /// `blocking = 1` in `ncclConfig_t` (calls return when enqueued) or 0 (`ncclInProgress`).
    pub blocking: bool,
    /// Bound on init (all ranks must join by then).
    pub init_timeout: Duration,
}

struct Shared {
    api: &'static Api,
    comm: AtomicPtr<ncclComm>,
    /// ABORT_BIT | number of threads inside an NCCL call on this communicator.
    state: AtomicU32,
    /// A call or wait failed: close by abort, never by finalize (which could wait forever).
    poisoned: AtomicBool,
    /// A thread is inside `close` (finalize + destroy): it counts as inside NCCL until done, and
    /// the communicator stays registered, so a crash meanwhile hard-exits instead of running
    /// `exit` under it (that segfaulted on the GPU host: break-it C5 on NCCL).
    closing: AtomicBool,
    blocking: bool,
    label: String,
    ctx: Arc<CudaContext>,
    reason: Mutex<Option<String>>,
}

/// Proof that this thread counted itself inside NCCL; the count drops with it.
struct InNccl<'a>(&'a Shared);

impl Drop for InNccl<'_> {
    fn drop(&mut self) {
        self.0.state.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    fn closed_error(&self) -> Error {
        let why = match self.reason.lock() {
            Ok(g) => g.clone().unwrap_or_else(|| "closed".into()),
            Err(_) => "closed".into(),
        };
        Error::Nccl(format!(
            "{}: communicator aborted or closed ({why})",
            self.label
        ))
    }

    fn enter(&self) -> Result<(InNccl<'_>, ncclComm_t)> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if s & ABORT_BIT != 0 {
                return Err(self.closed_error());
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        let guard = InNccl(self);
        // Non-null: it is only nulled after ABORT_BIT is set and the count reached zero.
        let comm = self.comm.load(Ordering::Acquire);
        if comm.is_null() {
            return Err(self.closed_error());
        }
        Ok((guard, comm))
    }

    fn fail(&self, what: &str, rc: c_int, comm: ncclComm_t) -> Error {
        self.poisoned.store(true, Ordering::Release);
        api::nccl_error(self.api, &format!("{what} on {}", self.label), rc, comm)
    }

    /// One `ncclCommGetAsyncError`: Ok(true) = idle/success, Ok(false) = still in progress.
    fn async_state(&self, what: &str) -> Result<bool> {
        let (_g, comm) = self.enter()?;
        let mut st: c_int = NCCL_SUCCESS;
        // SAFETY: comm is live (guard held); st receives one ncclResult_t.
        let rc = unsafe { (self.api.comm_get_async_error)(comm, &mut st) };
        if rc != NCCL_SUCCESS {
            return Err(self.fail(&format!("ncclCommGetAsyncError after {what}"), rc, comm));
        }
        match st {
            NCCL_SUCCESS => Ok(true),
            NCCL_IN_PROGRESS => Ok(false),
            other => Err(self.fail(&format!("{what} (async error)"), other, comm)),
        }
    }

    /// Polls until a non-blocking call is enqueued. The guard is not held between polls, so an
    /// abort from another thread gets through at once.
    fn wait_enqueued(&self, what: &str, deadline: Instant) -> Result<()> {
        loop {
            if self.async_state(what)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.poisoned.store(true, Ordering::Release);
                return Err(Error::Timeout(format!(
                    "{what} on {} still ncclInProgress at its deadline",
                    self.label
                )));
            }
            std::hint::spin_loop();
        }
    }

    /// `call` with a deadline; with `None` (inside an open group) the call is only checked.
    fn op(
        &self,
        what: &str,
        when: Option<Instant>,
        f: impl FnOnce(ncclComm_t) -> c_int,
    ) -> Result<()> {
        match when {
            Some(deadline) => self.call(what, deadline, f),
            None => {
                let (_g, comm) = self.enter()?;
                let rc = f(comm);
                if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
                    return Err(self.fail(what, rc, comm));
                }
                Ok(())
            }
        }
    }

    /// `enter` without the RAII guard (an open group spans calls); pair with `leave_raw`.
    fn enter_raw(&self) -> Result<ncclComm_t> {
        let (g, comm) = self.enter()?;
        std::mem::forget(g);
        Ok(comm)
    }

    fn leave_raw(&self) {
        self.state.fetch_sub(1, Ordering::AcqRel);
    }

    /// Runs one NCCL call under the guard and, for a non-blocking communicator, waits until NCCL
    /// has really enqueued it.
    fn call(
        &self,
        what: &str,
        deadline: Instant,
        f: impl FnOnce(ncclComm_t) -> c_int,
    ) -> Result<()> {
        let rc = {
            let (_g, comm) = self.enter()?;
            let rc = f(comm);
            if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
                return Err(self.fail(what, rc, comm));
            }
            rc
        };
        if rc == NCCL_IN_PROGRESS || !self.blocking {
            self.wait_enqueued(what, deadline)?;
        }
        Ok(())
    }

    /// See the module contract. Returns how long `ncclCommAbort` took.
    fn abort(&self, reason: &str, grace: Duration, code: ExitCode) -> Result<Duration> {
        let t0 = Instant::now();
        let prev = self.state.fetch_or(ABORT_BIT, Ordering::AcqRel);
        if prev & ABORT_BIT != 0 {
            // Another thread is closing: finalize is collective (it completes only when every
            // member finalizes), so it may never return. Give it the grace, then hard-exit:
            // returning would let the caller `exit` while that thread is inside NCCL.
            if self.closing.load(Ordering::Acquire) {
                while !self.comm.load(Ordering::Acquire).is_null() {
                    if t0.elapsed() > grace {
                        hard_exit(
                            code,
                            &format!(
                                "cannot abort {}: another thread is still closing it \
                                 (finalize/destroy in progress) after {} ms; reason for abort: {reason}",
                                self.label,
                                grace.as_millis()
                            ),
                        );
                    }
                    std::thread::yield_now();
                }
                return Ok(Duration::ZERO);
            }
            // Another thread is aborting: give it the same bound, then report.
            while !self.comm.load(Ordering::Acquire).is_null() {
                if t0.elapsed() > grace + Duration::from_secs(5) {
                    return Err(Error::Timeout(format!(
                        "{}: another thread's abort/close has not finished",
                        self.label
                    )));
                }
                std::thread::yield_now();
            }
            return Ok(Duration::ZERO);
        }
        if let Ok(mut g) = self.reason.lock() {
            *g = Some(reason.to_owned());
        }
        self.poisoned.store(true, Ordering::Release);
        loop {
            let inside = self.state.load(Ordering::Acquire) & !ABORT_BIT;
            if inside == 0 {
                break;
            }
            if t0.elapsed() > grace {
                hard_exit(
                    code,
                    &format!(
                        "cannot abort {}: {inside} thread(s) still inside an NCCL call after {} ms; \
                         reason for abort: {reason}",
                        self.label,
                        grace.as_millis()
                    ),
                );
            }
            std::thread::yield_now();
        }
        let comm = self.comm.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if comm.is_null() {
            return Ok(Duration::ZERO);
        }
        // NCCL tears down on the communicator's device; make it current on this thread (the
        // watchdog's thread may never have touched CUDA). Abort proceeds even if this fails.
        self.ctx.record_err(self.ctx.bind_to_thread());
        let t_abort = Instant::now();
        // SAFETY: comm was live, no thread is inside NCCL on it, and it is not used again.
        let rc = unsafe { (self.api.comm_abort)(comm) };
        let took = t_abort.elapsed();
        unregister(self);
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            return Err(api::nccl_error(
                self.api,
                &format!("ncclCommAbort on {}", self.label),
                rc,
                std::ptr::null_mut(),
            ));
        }
        Ok(took)
    }

    /// Finalize + destroy within `deadline`, or abort. Returns the time taken.
    fn close(&self, deadline: Instant) -> Result<Duration> {
        let t0 = Instant::now();
        if self.poisoned.load(Ordering::Acquire) {
            return self
                .abort(
                    "closing after a failed call or wait",
                    ABORT_GRACE,
                    ExitCode::DeviceError,
                )
                .map(|_| t0.elapsed());
        }
        // `closing` before the abort bit: an abort that sees the bit must know a close owns it.
        self.closing.store(true, Ordering::Release);
        let prev = self.state.fetch_or(ABORT_BIT, Ordering::AcqRel);
        if prev & ABORT_BIT != 0 {
            // An abort got there first and owns the teardown.
            self.closing.store(false, Ordering::Release);
            return Ok(Duration::ZERO);
        }
        if let Ok(mut g) = self.reason.lock() {
            *g = Some("closed".into());
        }
        while self.state.load(Ordering::Acquire) & !ABORT_BIT != 0 {
            if t0.elapsed() > ABORT_GRACE {
                hard_exit(
                    ExitCode::DeviceError,
                    &format!(
                        "closing {}: a thread is still inside an NCCL call",
                        self.label
                    ),
                );
            }
            std::thread::yield_now();
        }
        // This thread is inside NCCL until the communicator is gone; the pointer stays published
        // (and registered) until then, so an abort from another thread waits or hard-exits.
        self.state.fetch_add(1, Ordering::AcqRel);
        let _inside = InNccl(self);
        let comm = self.comm.load(Ordering::Acquire);
        if comm.is_null() {
            return Ok(Duration::ZERO);
        }
        self.ctx.record_err(self.ctx.bind_to_thread());
        let budget = deadline.saturating_duration_since(Instant::now());
        let _trip = Tripwire::arm(
            budget + Duration::from_secs(1),
            ExitCode::WatchdogTimeout,
            format!(
                "NCCL teardown of {} (finalize + destroy) exceeded its {:.1} s deadline",
                self.label,
                budget.as_secs_f64()
            ),
        );
        // SAFETY: comm is live and owned by us alone now.
        let rc = unsafe { (self.api.comm_finalize)(comm) };
        let mut result = Ok(());
        if rc == NCCL_IN_PROGRESS {
            loop {
                let mut st: c_int = NCCL_SUCCESS;
                // SAFETY: comm is live until destroy/abort below.
                let rc2 = unsafe { (self.api.comm_get_async_error)(comm, &mut st) };
                if rc2 != NCCL_SUCCESS || (st != NCCL_SUCCESS && st != NCCL_IN_PROGRESS) {
                    result = Err(api::nccl_error(
                        self.api,
                        &format!("ncclCommFinalize on {}", self.label),
                        if rc2 != NCCL_SUCCESS { rc2 } else { st },
                        comm,
                    ));
                    break;
                }
                if st == NCCL_SUCCESS {
                    break;
                }
                if Instant::now() >= deadline {
                    result = Err(Error::Timeout(format!(
                        "ncclCommFinalize on {} did not finish by its deadline; aborted",
                        self.label
                    )));
                    break;
                }
                std::thread::yield_now();
            }
        } else if rc != NCCL_SUCCESS {
            result = Err(api::nccl_error(
                self.api,
                &format!("ncclCommFinalize on {}", self.label),
                rc,
                comm,
            ));
        }
        if let Err(e) = result {
            // SAFETY: comm is live; abort frees it.
            let rc = unsafe { (self.api.comm_abort)(comm) };
            self.comm.store(std::ptr::null_mut(), Ordering::Release);
            unregister(self);
            return Err(with_abort_rc(self.api, e, rc, &self.label));
        }
        // SAFETY: comm finalized; destroy frees it and it is not used again.
        let rc = unsafe { (self.api.comm_destroy)(comm) };
        self.comm.store(std::ptr::null_mut(), Ordering::Release);
        unregister(self);
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            return Err(api::nccl_error(
                self.api,
                &format!("ncclCommDestroy on {}", self.label),
                rc,
                std::ptr::null_mut(),
            ));
        }
        Ok(t0.elapsed())
    }
}

// ---- process-wide registry of live communicators (for abort-all and the atexit hook) ----

static LIVE: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());
static ATEXIT: Once = Once::new();

fn register(s: &Arc<Shared>) {
    if let Ok(mut v) = LIVE.lock() {
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(s));
    }
    // Registered after the first successful init, i.e. after the CUDA runtime registered its own
    // exit handlers, so ours runs first (atexit runs in reverse order).
    ATEXIT.call_once(|| {
        // SAFETY: registers a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(abort_live_at_exit) };
    });
}

fn unregister(s: &Shared) {
    if let Ok(mut v) = LIVE.lock() {
        v.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), s));
    }
}

fn live() -> Vec<Arc<Shared>> {
    match LIVE.try_lock() {
        Ok(v) => v.iter().filter_map(Weak::upgrade).collect(),
        Err(_) => Vec::new(),
    }
}

/// Bound on the whole concurrent abort of a process's communicators: `ABORT_GRACE` plus one
/// `ncclCommAbort` (≈ 0.5 s measured) with margin, and below the crash path's 3 s hard exit.
pub const ABORT_ALL_BOUND: Duration = Duration::from_secs(2);

/// Outcome of [`abort_concurrently`]: how many items `f` reported done, and the labels of those
/// still running at the bound (their threads are left behind: the caller must hard-exit).
#[derive(Debug, PartialEq, Eq)]
pub struct ConcurrentAbort {
    pub done: usize,
    pub unfinished: Vec<String>,
}

/// Runs `f` on every item at once, one thread each (a single item runs on the caller's thread:
/// nothing to overlap, and the atexit hook then spawns nothing), and waits at most `bound` for
/// all of them. `f` returns whether it counts as done. An item whose thread cannot be spawned
/// runs inline, after the others started.
pub fn abort_concurrently<T: Send + 'static>(
    items: Vec<(String, T)>,
    bound: Duration,
    f: impl Fn(T) -> bool + Send + Sync + 'static,
) -> ConcurrentAbort {
    let deadline = Instant::now() + bound;
    let f = Arc::new(f);
    if items.len() <= 1 {
        let done = items.into_iter().map(|(_, t)| f(t)).filter(|d| *d).count();
        return ConcurrentAbort {
            done,
            unfinished: Vec::new(),
        };
    }
    let (tx, rx) = mpsc::channel::<(usize, bool)>();
    let mut labels: Vec<Option<String>> = Vec::with_capacity(items.len());
    let mut inline = Vec::new();
    for (i, (label, item)) in items.into_iter().enumerate() {
        labels.push(Some(label));
        let (tx, f) = (tx.clone(), f.clone());
        let slot = Arc::new(Mutex::new(Some(item)));
        let in_thread = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("nccl-abort".into())
            .spawn(move || {
                let item = in_thread.lock().ok().and_then(|mut g| g.take());
                if let Some(item) = item {
                    let _ = tx.send((i, f(item)));
                }
            });
        if spawned.is_err() {
            if let Some(item) = slot.lock().ok().and_then(|mut g| g.take()) {
                inline.push((i, item));
            }
        }
    }
    for (i, item) in inline {
        let _ = tx.send((i, f(item)));
    }
    drop(tx);
    let mut done = 0;
    while labels.iter().any(Option::is_some) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, ok)) => {
                if let Some(l) = labels.get_mut(i) {
                    *l = None;
                }
                done += usize::from(ok);
            }
            Err(_) => break,
        }
    }
    ConcurrentAbort {
        done,
        unfinished: labels.into_iter().flatten().collect(),
    }
}

/// Aborts every communicator of this process that is still alive (the watchdog's and the crash
/// path's call), all at once: `ncclCommAbort` costs ≈ 0.5 s per communicator here, and the
/// leader has two (C1 on NCCL measured 1025 ms sequentially). Returns how many were aborted.
/// Hard-exits with `code` if one cannot be aborted (a thread stuck inside NCCL past
/// `ABORT_GRACE`) or if the aborts do not all return within `ABORT_ALL_BOUND` (returning then
/// would let the process exit while a thread is inside `ncclCommAbort`).
pub fn abort_all_live(reason: &str, code: ExitCode) -> usize {
    let items: Vec<(String, Arc<Shared>)> = live()
        .into_iter()
        .filter(|s| !s.comm.load(Ordering::Acquire).is_null())
        .map(|s| (s.label.clone(), s))
        .collect();
    let why = reason.to_owned();
    let out = abort_concurrently(items, ABORT_ALL_BOUND, move |s: Arc<Shared>| {
        s.abort(&why, ABORT_GRACE, code).is_ok()
    });
    if !out.unfinished.is_empty() {
        hard_exit(
            code,
            &format!(
                "ncclCommAbort did not return within {} ms on: {}; reason for abort: {reason}",
                ABORT_ALL_BOUND.as_millis(),
                out.unfinished.join(", ")
            ),
        );
    }
    out.done
}

extern "C" fn abort_live_at_exit() {
    // Never unwind out of an atexit handler.
    let _ = std::panic::catch_unwind(|| {
        let n = abort_all_live(
            "process exiting with a live communicator",
            ExitCode::DeviceError,
        );
        if n > 0 {
            let msg = format!("lockstep: aborted {n} live NCCL communicator(s) at exit\n");
            // SAFETY: write(2) to stderr with a valid buffer.
            unsafe { libc::write(2, msg.as_ptr() as *const c_void, msg.len()) };
        }
    });
}

// ---- the public RAII types ----

/// A thread-safe handle that can abort its communicator from any thread (the watchdog), while
/// another thread waits on it.
#[derive(Clone)]
pub struct AbortHandle {
    shared: Arc<Shared>,
}

impl AbortHandle {
    /// Aborts (or hard-exits with `code` if a thread stays inside NCCL past `ABORT_GRACE`).
    /// Returns the time `ncclCommAbort` took. Idempotent.
    pub fn abort(&self, reason: &str, code: ExitCode) -> Result<Duration> {
        self.shared.abort(reason, ABORT_GRACE, code)
    }

    pub fn is_closed(&self) -> bool {
        self.shared.comm.load(Ordering::Acquire).is_null()
    }

    /// One `ncclCommGetAsyncError` poll (Ok while healthy or still progressing).
    pub fn health(&self) -> Result<()> {
        self.shared.async_state("health check").map(|_| ())
    }

    /// Records that a wait on this communicator failed: it will be aborted, not finalized.
    pub fn mark_failed(&self) {
        self.shared.poisoned.store(true, Ordering::Release);
    }

    pub fn label(&self) -> &str {
        &self.shared.label
    }
}

/// One NCCL communicator. Ops are enqueued on the caller's `Gpu` stream; completion is observed
/// with a `Completion` through `wait`.
pub struct Communicator {
    shared: Arc<Shared>,
    nranks: u32,
    rank: GroupRank,
}

impl Communicator {
    /// `ncclCommInitRankConfig` for `rank` of `nranks` on `gpu`, bounded by `opts.init_timeout`
    /// (non-blocking: polled, aborted at the deadline; blocking: a tripwire hard-exits).
    pub fn init(
        gpu: &Gpu,
        id: &UniqueId,
        nranks: u32,
        rank: GroupRank,
        opts: &CommOptions,
    ) -> Result<Communicator> {
        let api = api::api()?;
        if rank.get() >= nranks {
            return Err(Error::BadInput(format!(
                "{}: {rank} out of range for {nranks} ranks",
                opts.name
            )));
        }
        gpu.bind()?;
        let label = format!(
            "communicator {} ({rank} of {nranks}, GPU {}, {})",
            opts.name,
            gpu.ordinal(),
            if opts.blocking {
                "blocking"
            } else {
                "non-blocking"
            }
        );
        let deadline = Instant::now() + opts.init_timeout;
        let mut config = Box::new(api::config(opts.blocking));
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let rc = {
            let _trip = opts.blocking.then(|| {
                Tripwire::arm(
                    opts.init_timeout,
                    ExitCode::WatchdogTimeout,
                    format!(
                        "{label}: ncclCommInitRankConfig did not return within {:.1} s \
                         (a rank never joined?)",
                        opts.init_timeout.as_secs_f64()
                    ),
                )
            });
            // SAFETY: comm receives the handle; id is passed by value; config outlives the call
            // (and the non-blocking init below, which may still read it).
            unsafe {
                (api.comm_init_rank_config)(
                    &mut comm,
                    nranks as c_int,
                    id.0,
                    rank.get() as c_int,
                    &mut *config,
                )
            }
        };
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            let err = api::nccl_error(
                api,
                &format!("ncclCommInitRankConfig for {label}"),
                rc,
                std::ptr::null_mut(),
            );
            if comm.is_null() {
                return Err(err);
            }
            // SAFETY: a partially created communicator is freed by abort.
            let rc_abort = unsafe { (api.comm_abort)(comm) };
            return Err(with_abort_rc(api, err, rc_abort, &label));
        }
        if comm.is_null() {
            return Err(Error::Nccl(format!(
                "ncclCommInitRankConfig for {label} returned no communicator"
            )));
        }
        let shared = Arc::new(Shared {
            api,
            comm: AtomicPtr::new(comm),
            state: AtomicU32::new(0),
            poisoned: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            blocking: opts.blocking,
            label,
            ctx: gpu.context().clone(),
            reason: Mutex::new(None),
        });
        let me = Communicator {
            shared,
            nranks,
            rank,
        };
        if !opts.blocking {
            if let Err(e) = me.shared.wait_enqueued("ncclCommInitRankConfig", deadline) {
                let aborted = me.shared.abort(
                    "init failed or timed out",
                    ABORT_GRACE,
                    ExitCode::DeviceError,
                );
                drop(config);
                return Err(match aborted {
                    Ok(_) => e,
                    Err(a) => e.with_note(&format!("; cleaning up: {a}")),
                });
            }
        }
        drop(config);
        register(&me.shared);
        Ok(me)
    }

    pub fn rank(&self) -> GroupRank {
        self.rank
    }

    pub fn nranks(&self) -> u32 {
        self.nranks
    }

    pub fn is_blocking(&self) -> bool {
        self.shared.blocking
    }

    pub fn label(&self) -> &str {
        &self.shared.label
    }

    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            shared: self.shared.clone(),
        }
    }

    fn check_peer(&self, peer: GroupRank) -> Result<c_int> {
        if peer.get() >= self.nranks || peer == self.rank {
            return Err(Error::BadInput(format!(
                "{}: peer {peer} invalid (self {}, {} ranks)",
                self.shared.label, self.rank, self.nranks
            )));
        }
        Ok(peer.get() as c_int)
    }

    fn check_len(&self, what: &str, bytes: usize, buf_len: usize) -> Result<()> {
        if bytes > buf_len {
            return Err(Error::BadInput(format!(
                "{}: {what} of {bytes} B from a {buf_len} B buffer",
                self.shared.label
            )));
        }
        Ok(())
    }

    /// `ncclSend` of the first `bytes` of `buf` to `peer` on `gpu`'s stream; returns once enqueued.
    pub fn send(
        &self,
        gpu: &Gpu,
        buf: &DeviceBuf,
        bytes: usize,
        peer: GroupRank,
        deadline: Instant,
    ) -> Result<()> {
        self.send_op(gpu, buf, bytes, peer, op_deadline(deadline))
    }

    /// `ncclRecv` of `bytes` into `buf` from `peer`; returns once enqueued.
    pub fn recv(
        &self,
        gpu: &Gpu,
        buf: &mut DeviceBuf,
        bytes: usize,
        peer: GroupRank,
        deadline: Instant,
    ) -> Result<()> {
        self.recv_op(gpu, buf, bytes, peer, op_deadline(deadline))
    }

    /// In-place sum all-reduce of `count` elements of `buf`; returns once enqueued.
    pub fn all_reduce_sum(
        &self,
        gpu: &Gpu,
        buf: &mut DeviceBuf,
        count: usize,
        dtype: ReduceDtype,
        deadline: Instant,
    ) -> Result<()> {
        self.all_reduce_sum_op(gpu, buf, count, dtype, op_deadline(deadline))
    }

    /// In-place broadcast of `bytes` of `buf` from group rank `root`; returns once enqueued.
    pub fn broadcast(
        &self,
        gpu: &Gpu,
        buf: &mut DeviceBuf,
        bytes: usize,
        root: GroupRank,
        deadline: Instant,
    ) -> Result<()> {
        self.broadcast_op(gpu, buf, bytes, root, op_deadline(deadline))
    }

    /// All-gather: `recv` receives every rank's first `bytes` of `send`, in group-rank order
    /// (`recv` must hold `nranks × bytes`); returns once enqueued.
    pub fn all_gather(
        &self,
        gpu: &Gpu,
        send: &DeviceBuf,
        bytes: usize,
        recv: &mut DeviceBuf,
        deadline: Instant,
    ) -> Result<()> {
        self.all_gather_op(gpu, send, bytes, recv, op_deadline(deadline))
    }

    fn all_gather_op(
        &self,
        gpu: &Gpu,
        send: &DeviceBuf,
        bytes: usize,
        recv: &mut DeviceBuf,
        when: Option<Instant>,
    ) -> Result<()> {
        self.check_len("all-gather send", bytes, send.len())?;
        let total = bytes
            .checked_mul(self.nranks as usize)
            .ok_or_else(|| Error::BadInput("all-gather size overflows".into()))?;
        self.check_len("all-gather recv", total, recv.len())?;
        let (sp, rp, stream) = (send.ptr(gpu), recv.ptr_mut(gpu), gpu.raw_stream());
        let api = self.shared.api;
        // SAFETY: live device buffers of at least `bytes` and `nranks × bytes`.
        self.shared.op("ncclAllGather", when, |c| unsafe {
            (api.all_gather)(sp, rp, bytes, api::NCCL_UINT8, c, stream)
        })
    }

    /// In-place sum all-reduce of a typed device buffer on `stream` — the model's own stream:
    /// its partial sums are summed where its kernels wrote them (no copy, no second device
    /// type), ordered after them and before their readers by the stream alone. Returns once
    /// enqueued (bounded by `deadline`); inside a CUDA-graph capture it is captured.
    pub fn all_reduce_sum_on<T: ReduceElem>(
        &self,
        gpu: &Gpu,
        stream: &cudarc::driver::CudaStream,
        buf: &mut cudarc::driver::CudaViewMut<'_, T>,
        deadline: Instant,
    ) -> Result<()> {
        use cudarc::driver::DevicePtrMut;
        let count = buf.len();
        if count == 0 {
            return Ok(());
        }
        gpu.bind()?;
        let (p, _sync) = buf.device_ptr_mut(stream);
        let ptr = p as usize as *mut c_void;
        let raw = stream.cu_stream() as *mut c_void;
        let api = self.shared.api;
        let dtype = T::DTYPE.code();
        // SAFETY: in-place all-reduce over `count` elements of a live device buffer of this
        // communicator's GPU, enqueued on a live stream of the same context.
        self.shared
            .op("ncclAllReduce", op_deadline(deadline), |c| unsafe {
                (api.all_reduce)(ptr, ptr, count, dtype, api::NCCL_SUM, c, raw)
            })
    }

    /// Opens an NCCL group that stays open across calls (for `DataPlane::group_start`) until
    /// `end_group` on this thread; the ops issued meanwhile (the same methods as outside a group)
    /// are deferred by NCCL to the group's end. The communicator counts as "in NCCL" meanwhile,
    /// so an abort waits for (or hard-exits past) the open group.
    pub fn begin_group(&self) -> Result<()> {
        let comm = self.shared.enter_raw()?;
        // SAFETY: paired with ncclGroupEnd in end_group on this thread.
        let rc = unsafe { (self.shared.api.group_start)() };
        if rc != NCCL_SUCCESS {
            self.shared.leave_raw();
            return Err(self.shared.fail("ncclGroupStart", rc, comm));
        }
        OPEN_GROUPS.with(|d| d.set(d.get() + 1));
        Ok(())
    }

    /// Closes the group opened by `begin_group`; returns once its ops are enqueued.
    pub fn end_group(&self, deadline: Instant) -> Result<()> {
        // SAFETY: ends the group begun on this thread.
        let rc = unsafe { (self.shared.api.group_end)() };
        OPEN_GROUPS.with(|d| d.set(d.get().saturating_sub(1)));
        self.shared.leave_raw();
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            return Err(self.shared.fail(
                "ncclGroupEnd",
                rc,
                self.shared.comm.load(Ordering::Acquire),
            ));
        }
        if rc == NCCL_IN_PROGRESS || !self.shared.blocking {
            self.shared.wait_enqueued("ncclGroupEnd", deadline)?;
        }
        Ok(())
    }

    /// `ncclSend` of the first `bytes` of `buf` to `peer` on `gpu`'s stream.
    fn send_op(
        &self,
        gpu: &Gpu,
        buf: &DeviceBuf,
        bytes: usize,
        peer: GroupRank,
        when: Option<Instant>,
    ) -> Result<()> {
        self.check_len("send", bytes, buf.len())?;
        let p = self.check_peer(peer)?;
        let (ptr, stream) = (buf.ptr(gpu), gpu.raw_stream());
        let api = self.shared.api;
        // SAFETY: ptr is a live device buffer of at least `bytes` on the communicator's device.
        self.shared.op("ncclSend", when, |c| unsafe {
            (api.send)(ptr, bytes, api::NCCL_UINT8, p, c, stream)
        })
    }

    /// `ncclRecv` of `bytes` into `buf` from `peer`.
    fn recv_op(
        &self,
        gpu: &Gpu,
        buf: &mut DeviceBuf,
        bytes: usize,
        peer: GroupRank,
        when: Option<Instant>,
    ) -> Result<()> {
        self.check_len("recv", bytes, buf.len())?;
        let p = self.check_peer(peer)?;
        let (ptr, stream) = (buf.ptr_mut(gpu), gpu.raw_stream());
        let api = self.shared.api;
        // SAFETY: ptr is a live device buffer of at least `bytes`.
        self.shared.op("ncclRecv", when, |c| unsafe {
            (api.recv)(ptr, bytes, api::NCCL_UINT8, p, c, stream)
        })
    }

    /// In-place sum all-reduce of `count` elements of `buf`.
    fn all_reduce_sum_op(
        &self,
        gpu: &Gpu,
        buf: &mut DeviceBuf,
        count: usize,
        dtype: ReduceDtype,
        when: Option<Instant>,
    ) -> Result<()> {
        let bytes = count
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::BadInput("all-reduce element count overflows".into()))?;
        self.check_len("all-reduce", bytes, buf.len())?;
        let (ptr, stream) = (buf.ptr_mut(gpu), gpu.raw_stream());
        let api = self.shared.api;
        // SAFETY: in-place all-reduce over `count` elements of a live device buffer.
        self.shared.op("ncclAllReduce", when, |c| unsafe {
            (api.all_reduce)(ptr, ptr, count, dtype.code(), api::NCCL_SUM, c, stream)
        })
    }

    /// In-place broadcast of `bytes` of `buf` from group rank `root`.
    fn broadcast_op(
        &self,
        gpu: &Gpu,
        buf: &mut DeviceBuf,
        bytes: usize,
        root: GroupRank,
        when: Option<Instant>,
    ) -> Result<()> {
        self.check_len("broadcast", bytes, buf.len())?;
        if root.get() >= self.nranks {
            return Err(Error::BadInput(format!(
                "{}: broadcast root {root} out of range",
                self.shared.label
            )));
        }
        let (ptr, stream) = (buf.ptr_mut(gpu), gpu.raw_stream());
        let api = self.shared.api;
        // SAFETY: in-place broadcast over a live device buffer.
        self.shared.op("ncclBroadcast", when, |c| unsafe {
            (api.broadcast)(
                ptr,
                ptr,
                bytes,
                api::NCCL_UINT8,
                root.get() as c_int,
                c,
                stream,
            )
        })
    }

    /// Runs `ops` between `ncclGroupStart` and `ncclGroupEnd` so that the point-to-point ops in
    /// it (this communicator's ordinary methods) progress together: one launch, no deadlock
    /// between a send and a recv posted in either order. The group always ends, even when an op
    /// inside failed; a failed op poisons the communicator (it will be aborted, not finalized).
    pub fn group(&self, deadline: Instant, ops: impl FnOnce() -> Result<()>) -> Result<()> {
        self.begin_group()?;
        let r = ops();
        let end = self.end_group(deadline);
        if let Err(e) = r {
            self.shared.poisoned.store(true, Ordering::Release);
            return Err(match end {
                Ok(()) => e,
                Err(end) => e.with_note(&format!("; then {end}")),
            });
        }
        end
    }

    /// Spins until `ticket` of `completion` is reached, polling NCCL's async error and the abort
    /// bit about every millisecond. Deadline → `Error::Timeout` and the communicator is poisoned
    /// (it will be aborted, not finalized).
    pub fn wait(
        &self,
        completion: &Completion,
        ticket: Ticket,
        deadline: Instant,
        what: &str,
    ) -> Result<()> {
        let label = &self.shared.label;
        let shared = &self.shared;
        let r = completion.wait(
            ticket,
            deadline,
            &|| format!("{what} on {label}"),
            &mut || shared.async_state(what).map(|_| ()),
        );
        if r.is_err() {
            self.shared.poisoned.store(true, Ordering::Release);
        }
        r
    }

    /// Captures the NCCL ops that `ops` enqueues on `gpu`'s stream into a CUDA graph, so that the
    /// hot path replays them with one `cuGraphLaunch` and no NCCL call (measured: this removes
    /// NCCL's per-call enqueue cost, and with it the non-blocking communicators' latency penalty).
    /// The buffers used inside are baked into the graph: keep them alive and at the same address.
    pub fn capture(&self, gpu: &Gpu, ops: impl FnOnce() -> Result<()>) -> Result<CapturedOps> {
        let graph = gpu.capture(ops)?;
        Ok(CapturedOps {
            graph: Some(graph),
            shared: self.shared.clone(),
        })
    }

    /// Polls `ncclCommGetAsyncError` once (the watchdog's health check).
    pub fn async_error(&self) -> Result<()> {
        self.shared.async_state("health check").map(|_| ())
    }

    /// Aborts now (see `AbortHandle::abort`).
    pub fn abort(&self, reason: &str, code: ExitCode) -> Result<Duration> {
        self.shared.abort(reason, ABORT_GRACE, code)
    }

    /// Finalize + destroy within `timeout` (abort if that fails or the communicator is
    /// poisoned). Returns the time taken.
    pub fn close(self, timeout: Duration) -> Result<Duration> {
        self.shared.close(Instant::now() + timeout)
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if self.shared.comm.load(Ordering::Acquire).is_null() {
            return;
        }
        if let Err(e) = self.shared.close(Instant::now() + DROP_CLOSE_TIMEOUT) {
            crate::diag!("lockstep: closing {} on drop: {e}", self.shared.label);
        }
    }
}

/// NCCL ops captured in a CUDA graph (`Communicator::capture`).
///
/// Tripwire: a graph holding NCCL kernels must not run or be destroyed after its communicator was
/// aborted or closed (its destructor hands NCCL's persistent plan back to the freed communicator).
/// So `launch` and `Drop` take the communicator's in-NCCL guard; once the communicator is closed
/// the graph is refused on launch and deliberately leaked on drop.
pub struct CapturedOps {
    graph: Option<cudarc::driver::CudaGraph>,
    shared: Arc<Shared>,
}

impl CapturedOps {
    /// Replays the captured ops on the stream they were captured from.
    pub fn launch(&self) -> Result<()> {
        let (_g, _comm) = self.shared.enter()?;
        match &self.graph {
            Some(g) => g
                .launch()
                .map_err(|e| Error::Cuda(format!("cuGraphLaunch on {}: {e}", self.shared.label))),
            None => Err(self.shared.closed_error()),
        }
    }
}

impl Drop for CapturedOps {
    fn drop(&mut self) {
        let Some(g) = self.graph.take() else { return };
        match self.shared.enter() {
            Ok(_guard) => drop(g),
            // Communicator gone: leaking the graph is the safe choice (see the type's tripwire).
            Err(_) => std::mem::forget(g),
        }
    }
}

thread_local! {
    /// How many NCCL groups this thread has open (`begin_group` … `end_group`, `group`). NCCL's
    /// groups are per thread: an op issued inside one is deferred to the group's end, so it must
    /// not wait to be enqueued on its own.
    static OPEN_GROUPS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The enqueue deadline of an op issued now: none inside an open group (NCCL enqueues it at
/// the group's end), `deadline` otherwise.
fn op_deadline(deadline: Instant) -> Option<Instant> {
    (OPEN_GROUPS.with(|d| d.get()) == 0).then_some(deadline)
}

/// `err` (the failure that made this code abort a communicator), with the abort's own failure
/// added when `ncclCommAbort` failed too: no NCCL return code is dropped.
fn with_abort_rc(api: &Api, err: Error, rc: c_int, label: &str) -> Error {
    if rc == NCCL_SUCCESS || rc == NCCL_IN_PROGRESS {
        return err;
    }
    err.with_note(&format!(
        "; cleaning up, ncclCommAbort on {label} failed too: {} (ncclResult_t {rc})",
        api::error_string(api, rc)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_inside_an_open_group_skip_their_own_enqueue_wait() {
        let d = Instant::now() + Duration::from_secs(1);
        assert_eq!(
            op_deadline(d),
            Some(d),
            "outside a group an op waits to be enqueued"
        );
        OPEN_GROUPS.with(|g| g.set(g.get() + 1));
        let inside = op_deadline(d);
        OPEN_GROUPS.with(|g| g.set(g.get() - 1));
        assert_eq!(
            inside, None,
            "NCCL enqueues a grouped op at the group's end"
        );
        assert_eq!(op_deadline(d), Some(d));
    }

    #[test]
    fn abort_concurrently_runs_every_abort_at_the_same_time() {
        // Each fake abort counts itself in and waits (bounded) until all have: run one after
        // another, the first would never see the others and report not done.
        use std::sync::atomic::AtomicUsize;
        let n = 3;
        let started = Arc::new(AtomicUsize::new(0));
        let items = (0..n)
            .map(|i| (format!("comm {i}"), started.clone()))
            .collect();
        let out = abort_concurrently(items, Duration::from_secs(5), move |c: Arc<AtomicUsize>| {
            c.fetch_add(1, Ordering::SeqCst);
            let t0 = Instant::now();
            while c.load(Ordering::SeqCst) < n {
                if t0.elapsed() > Duration::from_secs(2) {
                    return false;
                }
                std::thread::yield_now();
            }
            true
        });
        assert_eq!(
            out,
            ConcurrentAbort {
                done: n,
                unfinished: vec![]
            }
        );
    }

    #[test]
    fn abort_concurrently_names_the_aborts_still_running_at_the_bound() {
        // One abort never returns on its own (it waits for a message sent only after the check).
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let items = vec![
            ("communicator pp".to_string(), false),
            ("communicator mesh".to_string(), true),
        ];
        let t0 = Instant::now();
        let out = abort_concurrently(items, Duration::from_millis(300), move |stuck: bool| {
            if stuck {
                if let Ok(g) = gate.lock() {
                    let _ = g.recv_timeout(Duration::from_secs(10));
                }
            }
            true
        });
        let took = t0.elapsed();
        let _ = release.send(());
        assert_eq!(out.done, 1);
        assert_eq!(out.unfinished, vec!["communicator mesh".to_string()]);
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn abort_concurrently_counts_only_aborts_that_succeeded() {
        let items = vec![("a".to_string(), true), ("b".to_string(), false)];
        assert_eq!(
            abort_concurrently(items, Duration::from_secs(5), |ok| ok).done,
            1
        );
        let one = vec![("only".to_string(), true)];
        assert_eq!(
            abort_concurrently(one, Duration::from_secs(5), |ok| ok).done,
            1
        );
    }

    #[test]
    fn unique_id_hex_round_trips_and_rejects_garbage() {
        let mut raw = ncclUniqueId { internal: [0; 128] };
        for (i, b) in raw.internal.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) as std::ffi::c_char;
        }
        let id = UniqueId(raw);
        let back = UniqueId::from_hex(&id.to_hex()).expect("round trip");
        assert_eq!(back.0.internal, raw.internal);
        assert!(matches!(UniqueId::from_hex("abc"), Err(Error::BadInput(_))));
        let bad = "zz".repeat(128);
        assert!(matches!(UniqueId::from_hex(&bad), Err(Error::BadInput(_))));
    }
}
