//! Device memory, completion and gates on one `Gpu`'s streams: what the NCCL data plane and the
//! model share (one GPU layer: a buffer NCCL receives into is a buffer the kernels read).
//!
//! Contract: nothing here touches cudarc before `probe` has seen a driver (cudarc panics when
//! libcuda is absent). No device-wide synchronize anywhere: completion is observed per stream,
//! either through a CUDA event (`cuEventQuery` spin) or through a **host flag** — a word of pinned,
//! device-mapped host memory that the stream itself writes (`cuStreamWriteValue32`) after the
//! awaited work, which the host reads with a plain load (no driver call on the spin path).
//!
//! Tripwires: a process whose GPU carries a data plane runs with cudarc's per-slice event
//! tracking off (`Gpu::stream_ordered`): every op of the plane runs on the `Gpu`'s one stream and
//! the model's buffers live on the model's stream, so stream order (and the explicit events
//! between the two) already orders them. A flag value is a sequence number that only grows;
//! waits compare with wrap-around arithmetic.
use super::context::Gpu;
use crate::{Error, Result};
use cudarc::driver::sys;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub(crate) fn cuda(what: &str, e: cudarc::driver::DriverError) -> Error {
    Error::Cuda(format!("{what}: {e}"))
}

fn cu_check(what: &str, rc: sys::CUresult) -> Result<()> {
    if rc == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("{what} returned {rc:?}")))
    }
}

/// cudarc panics on a missing driver symbol, so the one newer entry point we use is looked up
/// with `dlsym` first.
fn stream_write_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| stream_memop_symbol("cuStreamWriteValue32_v2"))
}

fn stream_wait_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| stream_memop_symbol("cuStreamWaitValue32_v2"))
}

fn stream_memop_symbol(name: &str) -> bool {
    use crate::cuda::probe::{cuda_candidates, Library};
    type F = unsafe extern "C" fn(sys::CUstream, sys::CUdeviceptr, u32, u32) -> sys::CUresult;
    Library::open_first("CUDA driver", &cuda_candidates())
        // SAFETY: F is the cuda.h signature of both stream memory operations.
        .and_then(|lib| unsafe { lib.sym::<F>(name) })
        .is_ok()
}

/// One word of pinned host memory that the device can read and write (DEVICEMAP).
struct MappedWord {
    host: *mut u32,
    dev: sys::CUdeviceptr,
}

impl MappedWord {
    fn new(gpu: &Gpu) -> Result<MappedWord> {
        gpu.bind()?;
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: allocates 4 bytes of pinned memory; initialised below before any read.
        let host = unsafe { cudarc::driver::result::malloc_host(4, flags) }
            .map_err(|e| cuda("cuMemHostAlloc(DEVICEMAP)", e))? as *mut u32;
        // SAFETY: host points to 4 writable, aligned bytes just allocated.
        unsafe { host.write_volatile(0) };
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: host is a DEVICEMAP allocation of this context; dev receives its alias.
        let rc = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host as *mut c_void, 0) };
        if let Err(e) = cu_check("cuMemHostGetDevicePointer", rc) {
            // SAFETY: host came from cuMemHostAlloc above and is not used after this.
            let freed = unsafe { cudarc::driver::result::free_host(host as *mut c_void) };
            return Err(match freed {
                Ok(()) => e,
                Err(f) => e.with_note(&format!("; cuMemFreeHost failed too: {f}")),
            });
        }
        Ok(MappedWord { host, dev })
    }

    fn atomic(&self) -> &AtomicU32 {
        // SAFETY: host is a live, 4-byte aligned pinned word owned by self; device and host
        // both access it, so every host access is atomic.
        unsafe { &*(self.host as *const AtomicU32) }
    }
}

/// A host-released barrier in a stream: `enqueue` puts a wait for value `seq` into the stream
/// (`cuStreamWaitValue32`, GEQ), `release(seq)` lets the stream pass with one host store. Lets a
/// rank enqueue its next send ahead (paying NCCL's enqueue cost off the critical path) and still
/// decide on the host when it may start.
///
/// Tripwire: a gate that is never released blocks its stream forever — every enqueued wait must be
/// released, or the communicator aborted, before the stream is waited on or freed.
pub struct Gate {
    word: MappedWord,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

// SAFETY: the word is only accessed atomically; CUDA handles are usable from any thread.
unsafe impl Send for Gate {}

impl Gate {
    pub fn new(gpu: &Gpu) -> Result<Gate> {
        if !stream_wait_available() {
            return Err(Error::Cuda(
                "driver lacks cuStreamWaitValue32_v2 (stream memory operations)".into(),
            ));
        }
        Ok(Gate {
            word: MappedWord::new(gpu)?,
            stream: gpu.stream().clone(),
            ctx: gpu.context().clone(),
        })
    }

    /// The stream waits here until `release(seq)` (or a later value) is stored.
    pub fn enqueue(&self, seq: u32) -> Result<()> {
        // SAFETY: dev is the device alias of our live pinned word; the stream is live.
        let rc = unsafe {
            sys::cuStreamWaitValue32_v2(
                self.stream.cu_stream(),
                self.word.dev,
                seq,
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
            )
        };
        cu_check("cuStreamWaitValue32", rc)
    }

    /// Lets every wait for a value ≤ `seq` pass.
    pub fn release(&self, seq: u32) {
        self.word.atomic().store(seq, Ordering::Release);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        // Open the gate for good so no stream stays parked on it, then let the stream drain
        // before the word is freed (errors ignored: drop never panics).
        self.release(u32::MAX / 2);
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: the stream is live (we hold an Arc); it can pass every wait now.
        let rc = unsafe { sys::cuStreamQuery(self.stream.cu_stream()) };
        if rc == sys::CUresult::CUDA_SUCCESS {
            // SAFETY: the word came from cuMemHostAlloc, nothing pending reads it, freed once.
            let freed = unsafe { cudarc::driver::result::free_host(self.word.host as *mut c_void) };
            // Recorded in the context (surfaces at its next checked call): drop never panics.
            self.ctx.record_err(freed);
        }
        // Otherwise leak 4 bytes rather than free memory a queued wait may still read.
    }
}

/// Number of GPUs the driver shows, without panicking when there is no driver.
pub fn gpu_count() -> Result<usize> {
    Ok(crate::cuda::probe::driver_info()?.gpus.len())
}

/// Device memory, capture and completion on the `Gpu`'s own stream (the data plane's).
impl Gpu {
    /// `bytes` of device memory, zeroed.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuf> {
        let slice = self
            .stream()
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| cuda(&format!("cuMemAlloc({bytes} B)"), e))?;
        Ok(DeviceBuf { slice, len: bytes })
    }

    /// `bytes` of device memory left unset (stream-ordered allocation): only for a buffer the
    /// next op on this stream overwrites whole (a receive target sized from the manifest).
    pub fn alloc_for_overwrite(&self, bytes: usize) -> Result<DeviceBuf> {
        // SAFETY: the contents are unset, not uninitialized Rust values: `u8` has no invalid bit
        // patterns, and callers only read the buffer after a receive on this stream filled it.
        let slice = unsafe { self.stream().alloc::<u8>(bytes.max(1)) }
            .map_err(|e| cuda(&format!("cuMemAllocAsync({bytes} B)"), e))?;
        Ok(DeviceBuf { slice, len: bytes })
    }

    /// Copies `data` into a new device buffer (stream-ordered; `data` is pageable, so the copy
    /// is complete when this returns — setup path only).
    pub fn upload(&self, data: &[u8]) -> Result<DeviceBuf> {
        let mut b = self.alloc(data.len())?;
        if !data.is_empty() {
            self.stream()
                .memcpy_htod(data, &mut b.slice)
                .map_err(|e| cuda("cuMemcpyHtoDAsync", e))?;
        }
        Ok(b)
    }

    /// Fills `buf` with `data` on the stream (setup path: pageable source).
    pub fn write(&self, buf: &mut DeviceBuf, data: &[u8]) -> Result<()> {
        if data.len() > buf.len {
            return Err(Error::BadInput(format!(
                "write of {} B into a {} B device buffer",
                data.len(),
                buf.len
            )));
        }
        let mut view = buf.slice.slice_mut(0..data.len());
        self.stream()
            .memcpy_htod(data, &mut view)
            .map_err(|e| cuda("cuMemcpyHtoDAsync", e))
    }

    /// Copies `buf` back to the host after everything queued before it on the stream (waits for
    /// this stream only: verification path, not the hot path).
    pub fn download(&self, buf: &DeviceBuf) -> Result<Vec<u8>> {
        let mut out = vec![0u8; buf.len];
        if buf.len > 0 {
            let view = buf.slice.slice(0..buf.len);
            self.stream()
                .memcpy_dtoh(&view, out.as_mut_slice())
                .map_err(|e| cuda("cuMemcpyDtoHAsync", e))?;
            self.stream()
                .synchronize()
                .map_err(|e| cuda("cuStreamSynchronize", e))?;
        }
        Ok(out)
    }

    /// Captures the work `ops` enqueues on this GPU's stream into a CUDA graph (relaxed capture
    /// mode, so NCCL's own bookkeeping calls are allowed). The capture always ends, also when
    /// `ops` fails. Replaying the graph replaces per-op enqueue cost with one `cuGraphLaunch`.
    pub fn capture(&self, ops: impl FnOnce() -> Result<()>) -> Result<cudarc::driver::CudaGraph> {
        self.bind()?;
        self.stream()
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| cuda("cuStreamBeginCapture", e))?;
        let r = ops();
        let g = self
            .stream()
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e| cuda("cuStreamEndCapture/cuGraphInstantiate", e));
        r?;
        let g = g?.ok_or_else(|| Error::Cuda("stream capture produced no graph".into()))?;
        g.upload().map_err(|e| cuda("cuGraphUpload", e))?;
        Ok(g)
    }

    /// A completion signal of the given kind for this GPU's stream. `HostFlag` falls back to
    /// `Event` (with a note on stderr) when the driver lacks stream memory operations; check
    /// `Completion::kind` for what you got.
    pub fn completion(&self, kind: CompletionKind) -> Result<Completion> {
        if kind == CompletionKind::HostFlag && !stream_write_available() {
            crate::diag!(
                "lockstep: driver lacks cuStreamWriteValue32_v2; using event completion instead"
            );
            return Completion::new(self, self.stream(), CompletionKind::Event);
        }
        Completion::new(self, self.stream(), kind)
    }
}

/// Device memory owned by one `Gpu` (freed by cudarc on drop; its drop records errors, never
/// panics).
pub struct DeviceBuf {
    slice: CudaSlice<u8>,
    len: usize,
}

impl crate::wire::TensorBytes for DeviceBuf {
    fn byte_len(&self) -> u64 {
        self.len as u64
    }
}

impl DeviceBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether this buffer lives in `gpu`'s context (a kernel or copy there may read it).
    pub fn is_on(&self, gpu: &Gpu) -> bool {
        Arc::ptr_eq(self.slice.context(), gpu.context())
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw device address for NCCL (valid while `self` lives).
    pub fn ptr(&self, gpu: &Gpu) -> *const c_void {
        let (p, _sync) = self.slice.device_ptr(gpu.stream());
        p as usize as *const c_void
    }

    /// Raw device address for NCCL to write into.
    pub fn ptr_mut(&mut self, gpu: &Gpu) -> *mut c_void {
        let (p, _sync) = self.slice.device_ptr_mut(gpu.stream());
        p as usize as *mut c_void
    }

    /// The buffer's first `len` elements as `T` — e.g. an envelope's bf16 latents, received by
    /// NCCL into this buffer, read by the kernels in place (no copy, no second device type).
    /// Errors when `len` elements do not fit or the address is not aligned for `T`.
    pub fn view_as<T: cudarc::driver::DeviceRepr>(&self, len: usize) -> Result<CudaView<'_, T>> {
        self.check_typed::<T>(len)?;
        // SAFETY: the view covers `len · size_of::<T>() ≤ self.len` bytes of this live
        // allocation at an address aligned for `T` (both checked above), and every `T` used here
        // (bf16, f16, f32, integers) is valid for any bit pattern.
        unsafe { self.slice.transmute::<T>(len) }
            .ok_or_else(|| Error::Invariant(format!("view of {len} elements out of range")))
    }

    /// Mutable counterpart of [`DeviceBuf::view_as`] (a kernel or NCCL writes the result here).
    pub fn view_as_mut<T: cudarc::driver::DeviceRepr>(
        &mut self,
        len: usize,
    ) -> Result<CudaViewMut<'_, T>> {
        self.check_typed::<T>(len)?;
        // SAFETY: as in `view_as`; the exclusive borrow of self makes the view unique.
        unsafe { self.slice.transmute_mut::<T>(len) }
            .ok_or_else(|| Error::Invariant(format!("view of {len} elements out of range")))
    }

    fn check_typed<T>(&self, len: usize) -> Result<()> {
        let size = std::mem::size_of::<T>();
        let bytes = len
            .checked_mul(size)
            .ok_or_else(|| Error::BadInput("typed view size overflows".into()))?;
        if bytes > self.len {
            return Err(Error::BadInput(format!(
                "a view of {len} × {size} B does not fit a {} B device buffer",
                self.len
            )));
        }
        let (base, _sync) = self.slice.device_ptr(self.slice.stream());
        if base as usize % std::mem::align_of::<T>().max(1) != 0 {
            return Err(Error::BadInput(format!(
                "device buffer at {base:#x} is not aligned for {size}-byte elements"
            )));
        }
        Ok(())
    }
}

/// How the host learns that stream work finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionKind {
    /// `cuEventRecord` after the work, spin on `cuEventQuery`.
    Event,
    /// `cuStreamWriteValue32` of a sequence number into pinned mapped host memory after the work;
    /// spin on a plain load of that word.
    HostFlag,
}

impl CompletionKind {
    pub fn name(self) -> &'static str {
        match self {
            CompletionKind::Event => "event",
            CompletionKind::HostFlag => "host-flag",
        }
    }
}

/// A reusable "stream reached this point" signal. `mark` enqueues the signal and returns a
/// ticket; `is_done(ticket)` tells whether the stream got there. One `Completion` per stream.
pub struct Completion {
    inner: CompletionInner,
    // Held (not just its handle) so the stream outlives every pending signal.
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    // Callers serialize `mark` with their enqueues (one stream, one order); atomic so that
    // `mark` needs only `&self` and waiters can share the Completion.
    seq: AtomicU32,
}

enum CompletionInner {
    Event(CudaEvent),
    HostFlag {
        host: *mut u32,
        dev: sys::CUdeviceptr,
    },
}

// SAFETY: the host flag is pinned memory owned by this value; it is only read through an atomic
// view, and the CUDA handles are usable from any thread once the context is bound.
unsafe impl Send for Completion {}
// SAFETY: as above; `mark` and `is_done` only use atomics and thread-safe driver calls.
unsafe impl Sync for Completion {}

/// The position of one `mark` in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket(u32);

impl Completion {
    /// A completion signal for `stream` (of `gpu`'s context): the stream a data plane's ops run
    /// on, or a model's own stream.
    pub(crate) fn new(
        gpu: &Gpu,
        stream: &Arc<CudaStream>,
        kind: CompletionKind,
    ) -> Result<Completion> {
        gpu.bind()?;
        let inner = match kind {
            CompletionKind::Event => CompletionInner::Event(
                gpu.context()
                    .new_event(None)
                    .map_err(|e| cuda("cuEventCreate", e))?,
            ),
            CompletionKind::HostFlag => {
                let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
                // SAFETY: allocates 4 bytes of pinned memory; initialised below before any read.
                let host = unsafe { cudarc::driver::result::malloc_host(4, flags) }
                    .map_err(|e| cuda("cuMemHostAlloc(DEVICEMAP)", e))?
                    as *mut u32;
                // SAFETY: host points to 4 writable, aligned bytes just allocated.
                unsafe { host.write_volatile(0) };
                let mut dev: sys::CUdeviceptr = 0;
                // SAFETY: host is a DEVICEMAP allocation of this context; dev receives its alias.
                let rc =
                    unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host as *mut c_void, 0) };
                if let Err(e) = cu_check("cuMemHostGetDevicePointer", rc) {
                    // SAFETY: host came from cuMemHostAlloc above and is not used after this.
                    let freed = unsafe { cudarc::driver::result::free_host(host as *mut c_void) };
                    return Err(match freed {
                        Ok(()) => e,
                        Err(f) => e.with_note(&format!("; cuMemFreeHost failed too: {f}")),
                    });
                }
                CompletionInner::HostFlag { host, dev }
            }
        };
        Ok(Completion {
            inner,
            stream: stream.clone(),
            ctx: gpu.context().clone(),
            seq: AtomicU32::new(0),
        })
    }

    pub fn kind(&self) -> CompletionKind {
        match self.inner {
            CompletionInner::Event(_) => CompletionKind::Event,
            CompletionInner::HostFlag { .. } => CompletionKind::HostFlag,
        }
    }

    /// Enqueues the signal after everything already on the stream.
    pub fn mark(&self) -> Result<Ticket> {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
        match &self.inner {
            CompletionInner::Event(ev) => {
                // SAFETY: event and stream belong to self.ctx, which is current on this thread
                // (every caller bound the Gpu before enqueuing the awaited work).
                let rc = unsafe { sys::cuEventRecord(ev.cu_event(), self.stream.cu_stream()) };
                cu_check("cuEventRecord", rc)?;
            }
            CompletionInner::HostFlag { dev, .. } => {
                // SAFETY: dev is the device alias of our pinned word; the stream is live.
                let rc = unsafe {
                    sys::cuStreamWriteValue32_v2(
                        self.stream.cu_stream(),
                        *dev,
                        seq,
                        sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
                    )
                };
                cu_check("cuStreamWriteValue32", rc)?;
            }
        }
        Ok(Ticket(seq))
    }

    /// True once the stream has passed `ticket`. A CUDA error is returned, not hidden.
    pub fn is_done(&self, ticket: Ticket) -> Result<bool> {
        match &self.inner {
            CompletionInner::Event(ev) => {
                // An event reflects only its latest record; tickets are awaited in order.
                // SAFETY: event is live.
                let rc = unsafe { sys::cuEventQuery(ev.cu_event()) };
                match rc {
                    sys::CUresult::CUDA_SUCCESS => Ok(true),
                    sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
                    other => Err(Error::Cuda(format!("cuEventQuery returned {other:?}"))),
                }
            }
            CompletionInner::HostFlag { host, .. } => {
                // SAFETY: host is our live, 4-byte aligned pinned word; the GPU writes it, so it is
                // read atomically.
                let now = unsafe { &*(*host as *const AtomicU32) }.load(Ordering::Acquire);
                Ok((now.wrapping_sub(ticket.0) as i32) >= 0)
            }
        }
    }

    /// Spins until `ticket` is done, calling `poll` about every millisecond (async-error and abort
    /// checks) and failing with `Error::Timeout` at `deadline`.
    pub fn wait(
        &self,
        ticket: Ticket,
        deadline: Instant,
        what: &dyn Fn() -> String,
        poll: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let start = Instant::now();
        let mut last_poll = start;
        let mut spins: u32 = 0;
        loop {
            if self.is_done(ticket)? {
                return Ok(());
            }
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 {
                let now = Instant::now();
                if now.duration_since(last_poll).as_micros() >= 1000 {
                    last_poll = now;
                    poll()?;
                    if now >= deadline {
                        return Err(Error::Timeout(format!(
                            "{} did not complete within {:.3} s",
                            what(),
                            now.duration_since(start).as_secs_f64()
                        )));
                    }
                    // Past 2 ms the wait is no longer latency-critical: stop hogging a core.
                    if now.duration_since(start).as_millis() > 2 {
                        std::thread::yield_now();
                    }
                }
            }
            std::hint::spin_loop();
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let CompletionInner::HostFlag { host, .. } = self.inner {
            // Free only when the last signal has landed. Otherwise (an aborted or hung stream)
            // leak the 4-byte word: waiting here could hang, and freeing memory the device may
            // still write is worse.
            let last = Ticket(self.seq.load(Ordering::Acquire));
            if matches!(self.is_done(last), Ok(true)) {
                self.ctx.record_err(self.ctx.bind_to_thread());
                // SAFETY: host came from cuMemHostAlloc in new(), no write is pending, freed once.
                let freed = unsafe { cudarc::driver::result::free_host(host as *mut c_void) };
                // Recorded in the context (surfaces at its next checked call): drop never panics.
                self.ctx.record_err(freed);
            }
        }
    }
}
