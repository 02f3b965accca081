//! The GPU's own timeline of kernels and copies (CUPTI's activity records), for one number the
//! GPU-stream issue asks for: the share of a generator call during which the GPU is idle between
//! its kernels (`lockstep bench model --idle`), with graphs on and off. Tooling: no rank uses it.
//!
//! Contract:
//! - `ActivityTrace::start` loads CUPTI at run time (`libcupti.so*` on the loader path: a CUDA
//!   toolkit's `extras/CUPTI/lib64`, or the `nvidia/cu13/lib` folder of PyTorch's wheels) and
//!   enables kernel, memcpy and memset records for every context of the process. Without the
//!   library it is an error value naming what was looked for (never a panic: the loader is
//!   probed before cudarc's, which would panic), nor without a CUDA driver and GPU (CUPTI's own
//!   initialization then recurses until the stack overflows). One trace at a time per process.
//! - `now()` is CUPTI's clock, the one its records use: mark a window before and after a call
//!   (with the stream synchronized at both ends) and `finish` gives every interval that ran.
//! - `idle_share(intervals, window)` is pure: of the intervals that start inside the window,
//!   the time between the first start and the last end not covered by any of them, as a share
//!   of that span (overlapping intervals count once). Host launch latency before the first
//!   kernel is not in it; gaps between kernels (a host that launches slower than the GPU runs,
//!   a copy waited on) are.
//! - Records are read by their common prefix (`kind: u32` at 0, `start: u64` at 16, `end: u64`
//!   at 24), which kernel (v4 and later), memcpy (v1 and later) and memset records share; other
//!   kinds are skipped. Records CUPTI dropped are counted and reported.
use crate::{Error, Result};
use cudarc::cupti::sys;
use std::sync::Mutex;

/// What ran on the GPU, in CUPTI's clock (ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    pub start: u64,
    pub end: u64,
    pub kind: IntervalKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntervalKind {
    Kernel,
    Memcpy,
    Memset,
}

/// Idle time inside one window (see the module contract).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IdleShare {
    /// First start to last end of the intervals in the window, ns.
    pub span_ns: u64,
    /// Of it, covered by no interval, ns.
    pub idle_ns: u64,
    /// Intervals counted.
    pub intervals: usize,
}

impl IdleShare {
    pub fn share(&self) -> f64 {
        if self.span_ns == 0 {
            0.0
        } else {
            self.idle_ns as f64 / self.span_ns as f64
        }
    }
}

/// Idle share of `window` (`[from, to]`, CUPTI ns); `None` when no interval starts in it.
pub fn idle_share(intervals: &[Interval], window: (u64, u64)) -> Option<IdleShare> {
    let mut v: Vec<(u64, u64)> = intervals
        .iter()
        .filter(|i| i.start >= window.0 && i.start <= window.1)
        .map(|i| (i.start, i.end.max(i.start)))
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let first = v[0].0;
    let mut covered_to = first;
    let mut last_end = first;
    let mut idle = 0u64;
    for (s, e) in &v {
        if *s > covered_to {
            idle += s - covered_to;
        }
        covered_to = covered_to.max(*e);
        last_end = last_end.max(*e);
    }
    Some(IdleShare {
        span_ns: last_end - first,
        idle_ns: idle,
        intervals: v.len(),
    })
}

/// Kinds of record this trace enables (and reads).
const KINDS: [(sys::CUpti_ActivityKind, u32, IntervalKind); 3] = [
    (
        sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
        10,
        IntervalKind::Kernel,
    ),
    (
        sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_MEMCPY,
        1,
        IntervalKind::Memcpy,
    ),
    (
        sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_MEMSET,
        2,
        IntervalKind::Memset,
    ),
];

/// What the completion callback collected since the trace started.
struct Collected {
    intervals: Vec<Interval>,
    /// Records CUPTI reported as dropped or that could not be read.
    lost: u64,
}

static COLLECTED: Mutex<Option<Collected>> = Mutex::new(None);

const BUFFER_BYTES: usize = 8 << 20;
const BUFFER_ALIGN: usize = 8;

fn buffer_layout() -> std::alloc::Layout {
    // 8 MiB with alignment 8 is a valid layout (size fits isize, align a power of two).
    std::alloc::Layout::from_size_align(BUFFER_BYTES, BUFFER_ALIGN)
        .unwrap_or_else(|_| std::alloc::Layout::new::<u64>())
}

unsafe extern "C" fn buffer_requested(buffer: *mut *mut u8, size: *mut usize, max: *mut usize) {
    let layout = buffer_layout();
    // SAFETY: a non-zero-sized layout; the buffer is freed in `buffer_completed`, which CUPTI
    // calls for every buffer it was given. The out-pointers are CUPTI's, valid for writes.
    unsafe {
        let p = std::alloc::alloc(layout);
        *buffer = p;
        *size = if p.is_null() { 0 } else { layout.size() };
        *max = 0;
    }
}

/// Reads one record's kind, start and end from its common prefix (module contract).
///
/// # Safety
/// `rec` points at a CUPTI activity record of at least 32 bytes.
unsafe fn read_record(rec: *const u8) -> Option<Interval> {
    // SAFETY: the caller's; unaligned reads of plain integers.
    let (kind, start, end) = unsafe {
        (
            std::ptr::read_unaligned(rec as *const u32),
            std::ptr::read_unaligned(rec.add(16) as *const u64),
            std::ptr::read_unaligned(rec.add(24) as *const u64),
        )
    };
    KINDS
        .iter()
        .find(|(_, k, _)| *k == kind)
        .map(|(_, _, kind)| Interval {
            start,
            end,
            kind: *kind,
        })
}

unsafe extern "C" fn buffer_completed(
    _ctx: cudarc::driver::sys::CUcontext,
    _stream: u32,
    buffer: *mut u8,
    _size: usize,
    valid: usize,
) {
    if buffer.is_null() {
        return;
    }
    let mut got = Vec::new();
    let mut lost = 0u64;
    let mut rec: *mut sys::CUpti_Activity = std::ptr::null_mut();
    loop {
        // SAFETY: `buffer` holds `valid` bytes of records written by CUPTI; `rec` is CUPTI's
        // cursor into it.
        let r = unsafe { sys::cuptiActivityGetNextRecord(buffer, valid, &mut rec) };
        if r != sys::CUptiResult::CUPTI_SUCCESS {
            // MAX_LIMIT_REACHED: the end of the buffer; anything else: stop reading it.
            if r != sys::CUptiResult::CUPTI_ERROR_MAX_LIMIT_REACHED {
                lost += 1;
            }
            break;
        }
        // SAFETY: a record CUPTI returned; every kind this trace enabled is ≥ 32 bytes.
        if let Some(i) = unsafe { read_record(rec as *const u8) } {
            got.push(i);
        }
    }
    let mut dropped = 0usize;
    // SAFETY: null context and stream 0 ask for the buffer's own count; the out-pointer is ours.
    let d =
        unsafe { sys::cuptiActivityGetNumDroppedRecords(std::ptr::null_mut(), 0, &mut dropped) };
    if d == sys::CUptiResult::CUPTI_SUCCESS {
        lost += dropped as u64;
    }
    if let Ok(mut c) = COLLECTED.lock() {
        if let Some(c) = c.as_mut() {
            c.intervals.extend(got);
            c.lost += lost;
        }
    }
    // SAFETY: allocated in `buffer_requested` with this layout.
    unsafe { std::alloc::dealloc(buffer, buffer_layout()) };
}

/// The symbols this module calls; all must resolve before cudarc's loader is touched.
const SYMBOLS: [&str; 7] = [
    "cuptiActivityRegisterCallbacks",
    "cuptiActivityEnable",
    "cuptiActivityDisable",
    "cuptiActivityFlushAll",
    "cuptiActivityGetNextRecord",
    "cuptiActivityGetNumDroppedRecords",
    "cuptiGetTimestamp",
];

/// Probes for the CUPTI library cudarc would load (its candidate names, in its order) and the
/// symbols this module uses. `Err` names what was tried.
pub fn probe() -> Result<String> {
    let names = cudarc::get_lib_name_candidates("cupti");
    let lib = crate::cuda::probe::Library::open_first(
        "CUPTI (add a CUDA toolkit's extras/CUPTI/lib64 or PyTorch's nvidia/cu13/lib to \
         LD_LIBRARY_PATH)",
        &names,
    )?;
    for s in SYMBOLS {
        // SAFETY: looked up for presence only, never called through this pointer type.
        unsafe { lib.sym::<unsafe extern "C" fn()>(s) }?;
    }
    Ok(lib.path)
}

fn cupti_err(what: &str, r: sys::CUptiResult) -> Error {
    Error::Cuda(format!("{what}: {r:?}"))
}

/// An activity trace in progress (one per process at a time).
pub struct ActivityTrace {
    lib: String,
}

impl ActivityTrace {
    pub fn start() -> Result<Self> {
        // CUPTI without a loadable driver recurses in its own initialization until the stack
        // overflows (seen with CUDA 13's libcupti on a machine without libcuda): never call it
        // there.
        if !crate::cuda::probe::gpu_available() {
            return Err(Error::LibraryMissing(
                "no CUDA driver or GPU here: an activity trace needs one".into(),
            ));
        }
        let lib = probe()?;
        {
            let mut c = COLLECTED
                .lock()
                .map_err(|_| Error::Invariant("activity trace state poisoned".into()))?;
            if c.is_some() {
                return Err(Error::Invariant(
                    "an activity trace is already running".into(),
                ));
            }
            *c = Some(Collected {
                intervals: Vec::new(),
                lost: 0,
            });
        }
        let r = Self::enable();
        if r.is_err() {
            if let Ok(mut c) = COLLECTED.lock() {
                *c = None;
            }
        }
        r.map(|()| Self { lib })
    }

    fn enable() -> Result<()> {
        // The buffer callbacks are registered once per process (a trace after the first reuses
        // them: they read the slot `COLLECTED`, whoever holds it).
        static REGISTERED: std::sync::atomic::AtomicBool =
            std::sync::atomic::AtomicBool::new(false);
        if !REGISTERED.load(std::sync::atomic::Ordering::Acquire) {
            // SAFETY: probed above: the library and these symbols exist; the callbacks are
            // `extern "C"`, never unwind, and own the buffers they are given.
            let r = unsafe {
                sys::cuptiActivityRegisterCallbacks(Some(buffer_requested), Some(buffer_completed))
            };
            if r != sys::CUptiResult::CUPTI_SUCCESS {
                return Err(cupti_err("cuptiActivityRegisterCallbacks", r));
            }
            REGISTERED.store(true, std::sync::atomic::Ordering::Release);
        }
        for (k, _, _) in KINDS {
            // SAFETY: as above.
            let r = unsafe { sys::cuptiActivityEnable(k) };
            if r != sys::CUptiResult::CUPTI_SUCCESS {
                return Err(cupti_err(&format!("cuptiActivityEnable({k:?})"), r));
            }
        }
        Ok(())
    }

    /// The library in use.
    pub fn library(&self) -> &str {
        &self.lib
    }

    /// CUPTI's clock (ns), the one its records carry.
    pub fn now(&self) -> Result<u64> {
        let mut t = 0u64;
        // SAFETY: the library is loaded (`start`); the out-pointer is ours.
        let r = unsafe { sys::cuptiGetTimestamp(&mut t) };
        if r == sys::CUptiResult::CUPTI_SUCCESS {
            Ok(t)
        } else {
            Err(cupti_err("cuptiGetTimestamp", r))
        }
    }

    /// Flushes every buffer and stops the trace (on drop); returns the intervals (sorted by
    /// start) and how many records were lost.
    pub fn finish(self) -> Result<(Vec<Interval>, u64)> {
        // SAFETY: the library is loaded; FLUSH_FORCED (1) completes partly filled buffers.
        let r = unsafe { sys::cuptiActivityFlushAll(1) };
        let c = COLLECTED
            .lock()
            .map_err(|_| Error::Invariant("activity trace state poisoned".into()))?
            .take();
        if r != sys::CUptiResult::CUPTI_SUCCESS {
            return Err(cupti_err("cuptiActivityFlushAll", r));
        }
        let mut c = c.ok_or_else(|| Error::Invariant("activity trace finished twice".into()))?;
        c.intervals.sort_unstable_by_key(|i| (i.start, i.end));
        Ok((c.intervals, c.lost))
    }
}

impl Drop for ActivityTrace {
    /// A trace dropped unfinished (an error mid-measurement) stops recording and frees the
    /// slot; its records are discarded.
    fn drop(&mut self) {
        for (k, _, _) in KINDS {
            // SAFETY: the library is loaded (`start`); disabling a disabled kind is harmless.
            unsafe { sys::cuptiActivityDisable(k) };
        }
        if let Ok(mut c) = COLLECTED.lock() {
            *c = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(start: u64, end: u64) -> Interval {
        Interval {
            start,
            end,
            kind: IntervalKind::Kernel,
        }
    }

    #[test]
    fn idle_share_counts_gaps_between_intervals_once_and_only_inside_the_window() {
        // 100..200, 150..260 (overlap), gap 260..300, 300..400; 1000.. is outside the window.
        let v = [k(300, 400), k(100, 200), k(150, 260), k(1000, 1100)];
        let s = idle_share(&v, (50, 900)).unwrap();
        assert_eq!((s.span_ns, s.idle_ns, s.intervals), (300, 40, 3));
        assert!((s.share() - 40.0 / 300.0).abs() < 1e-12);
        // A nested interval adds no busy time and no gap.
        let s = idle_share(&[k(0, 100), k(10, 20), k(120, 130)], (0, 200)).unwrap();
        assert_eq!((s.span_ns, s.idle_ns), (130, 20));
        // Back to back: no idle time.
        let s = idle_share(&[k(0, 10), k(10, 20)], (0, 30)).unwrap();
        assert_eq!(s.share(), 0.0);
        assert!(idle_share(&v, (2000, 3000)).is_none());
    }

    #[test]
    fn records_are_read_by_their_common_prefix_and_other_kinds_are_skipped() {
        let mut rec = [0u8; 32];
        rec[..4].copy_from_slice(&10u32.to_le_bytes());
        rec[16..24].copy_from_slice(&5u64.to_le_bytes());
        rec[24..32].copy_from_slice(&9u64.to_le_bytes());
        // SAFETY: a 32-byte record.
        assert_eq!(unsafe { read_record(rec.as_ptr()) }, Some(k(5, 9)));
        rec[..4].copy_from_slice(&5u32.to_le_bytes()); // a driver API record
                                                       // SAFETY: as above.
        assert_eq!(unsafe { read_record(rec.as_ptr()) }, None);
    }

    #[test]
    fn the_record_prefix_matches_the_bound_structs() {
        use std::mem::offset_of;
        assert_eq!(offset_of!(sys::CUpti_ActivityKernel9, start), 16);
        assert_eq!(offset_of!(sys::CUpti_ActivityKernel9, end), 24);
        assert_eq!(offset_of!(sys::CUpti_ActivityMemcpy6, start), 16);
        assert_eq!(offset_of!(sys::CUpti_ActivityMemcpy6, end), 24);
        assert_eq!(offset_of!(sys::CUpti_ActivityMemset4, start), 16);
        assert_eq!(offset_of!(sys::CUpti_ActivityMemset4, end), 24);
    }

    #[test]
    fn without_cupti_the_trace_is_an_error_value_naming_what_was_tried() {
        match probe() {
            Ok(lib) => {
                // Present (a GPU host, or PyTorch's wheels on the loader path): a trace with no
                // GPU work starts and finishes with nothing in it, or fails as a value.
                println!("CUPTI present here: {lib}");
                match ActivityTrace::start() {
                    Ok(t) => {
                        let now = t.now();
                        let r = t.finish();
                        println!("empty trace: now {now:?}, finish {r:?}");
                        if let Ok((v, _)) = r {
                            assert!(v.is_empty(), "{v:?}");
                        }
                    }
                    Err(e) => println!("trace refused as a value: {e}"),
                }
                // One at a time, and a finished trace frees the slot.
                assert!(COLLECTED.lock().map(|c| c.is_none()).unwrap_or(false));
            }
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains("libcupti"), "{m}");
                assert!(ActivityTrace::start().is_err());
            }
        }
    }
}
