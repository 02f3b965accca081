//! One GPU as the kernels see it: a CUDA context, the embedded cubins loaded as modules, and the
//! checked launch every typed wrapper goes through.
//!
//! Contract:
//! - `Gpu::open` checks, in order, that kernels are embedded (`Error::NoKernels`), that a driver
//!   and the GPU exist (`probe`, `Error::LibraryMissing`/`Error::BadInput`) and only then lets
//!   cudarc touch libcuda (cudarc panics when the library is absent).
//! - Every embedded cubin is loaded at open (`cuModuleLoadData`); a cubin the driver rejects fails
//!   the open with the file name, so a bad build is caught before the first launch.
//! - A launch is enqueued on the stream the caller passes; nothing here synchronizes. `Ok` means
//!   enqueued (launch configuration accepted), not finished: a fault inside the kernel surfaces at
//!   the next synchronizing call on that stream (see docs/manual/cuda-async-execution.md).
//! - Every launch error names the kernel, its grid/block/smem and the caller's file:line.
//!
//! Tripwires: the params struct passed to `launch` must be the exact `#[repr(C)]` mirror of the
//! kernel's (each family asserts the size on both sides); kernel handles live as long as the
//! `Gpu` (the module is unloaded on drop; unload errors are recorded, never panicked).
use crate::cuda::{embedded, probe};
use crate::{Error, Result};
use cudarc::driver::sys;
use cudarc::driver::{result, CudaContext, CudaEvent, CudaStream, DevicePtr, DevicePtrMut};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::panic::Location;
use std::sync::{Arc, Mutex};

/// Maps a cudarc driver error to ours, keeping the driver's own string and code.
pub fn cuda_err(what: impl std::fmt::Display, e: result::DriverError) -> Error {
    Error::Cuda(format!("{what}: {e}"))
}

/// A loaded cubin; unloaded when the last handle goes.
struct Module {
    raw: sys::CUmodule,
    name: &'static str,
    ctx: Arc<CudaContext>,
}

// SAFETY: a CUmodule handle may be used from any thread once its context is bound.
unsafe impl Send for Module {}
// SAFETY: as for Send: the handle is immutable and the driver serializes its use.
unsafe impl Sync for Module {}

impl Drop for Module {
    fn drop(&mut self) {
        // Never panics: errors are recorded in the context and surface at its next checked call.
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: raw came from cuModuleLoadData in this context and is unloaded once.
        self.ctx
            .record_err(unsafe { result::module::unload(self.raw) });
    }
}

/// A kernel entry point of an embedded cubin.
#[derive(Clone)]
pub struct Kernel {
    func: sys::CUfunction,
    pub name: &'static str,
    _module: Arc<Module>,
}

// SAFETY: CUfunction handles are usable from any thread with the context bound.
unsafe impl Send for Kernel {}
// SAFETY: as for Send: the handle is immutable and the driver serializes its use.
unsafe impl Sync for Kernel {}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem_bytes: u32,
}

/// One GPU: its primary context, this value's stream (where a data plane's NCCL ops and its
/// buffers' copies run), and the embedded kernels. The one device type of the crate: the model,
/// the kernels and the NCCL layer all take it (`cuda::device` has its buffers and completions).
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    modules: Vec<Arc<Module>>,
    kernels: Mutex<HashMap<&'static str, Kernel>>,
    name: String,
    /// Why no kernels were loaded (`open_plain` on a build or GPU without them).
    no_kernels: Option<String>,
}

impl Gpu {
    /// Opens GPU `ordinal` for kernel launches: fails with `Error::NoKernels` when the build
    /// embeds none, `BadInput` when the GPU is not the cubins' architecture.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !embedded::has_kernels() {
            return Err(Error::NoKernels("opening a GPU for kernel launches".into()));
        }
        let gpu = Self::open_plain(ordinal)?;
        match &gpu.no_kernels {
            None => Ok(gpu),
            Some(why) => Err(Error::BadInput(why.clone())),
        }
    }

    /// Opens GPU `ordinal` whatever the build embeds (a data plane needs no kernels); the
    /// embedded cubins are loaded when they match the GPU, and `kernel` says why not otherwise.
    pub fn open_plain(ordinal: usize) -> Result<Gpu> {
        let info = probe::driver_info()?;
        let Some(g) = info.gpus.get(ordinal) else {
            return Err(Error::BadInput(format!(
                "GPU ordinal {ordinal} requested, the driver reports {} GPU(s)",
                info.gpus.len()
            )));
        };
        let no_kernels = if !embedded::has_kernels() {
            Some("this build embeds no kernels".to_string())
        } else if g.compute_capability != (9, 0) {
            Some(format!(
                "GPU {ordinal} ({}) has compute capability {}.{}; the embedded cubins are {}",
                g.name,
                g.compute_capability.0,
                g.compute_capability.1,
                embedded::KERNEL_ARCH
            ))
        } else {
            None
        };
        let name = g.name.clone();
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("cuCtx (primary) retain", e))?;
        ctx.bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("cuStreamCreate", e))?;
        let mut modules = Vec::new();
        let cubins: &[(&'static str, &'static [u8])] = if no_kernels.is_none() {
            embedded::CUBINS
        } else {
            &[]
        };
        for (file, bytes) in cubins {
            // cuModuleLoadData reads the image header for its size; copy it into an aligned,
            // owned buffer so the driver never reads an unaligned static.
            let image: Vec<u64> = bytes
                .chunks(8)
                .map(|c| {
                    let mut w = [0u8; 8];
                    w[..c.len()].copy_from_slice(c);
                    u64::from_le_bytes(w)
                })
                .collect();
            // SAFETY: image is a complete cubin produced by build.rs, alive for the call.
            let raw = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
                .map_err(|e| cuda_err(format!("cuModuleLoadData({file}.cubin)"), e))?;
            modules.push(Arc::new(Module {
                raw,
                name: file,
                ctx: ctx.clone(),
            }));
        }
        Ok(Gpu {
            ctx,
            stream,
            ordinal,
            modules,
            kernels: Mutex::new(HashMap::new()),
            name,
            no_kernels,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// This value's stream: a data plane's NCCL ops, its copies and its completions run here.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The raw stream handle NCCL takes (`cudaStream_t` and `CUstream` are the same pointer).
    pub fn raw_stream(&self) -> *mut c_void {
        self.stream.cu_stream() as *mut c_void
    }

    /// Makes this GPU's context current on the calling thread (NCCL reads the current device).
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("cuCtxSetCurrent", e))
    }

    /// Opens GPU `ordinal` for a data plane (`open_plain`, then cudarc's per-slice event
    /// tracking off for the context): every buffer the plane makes is used on this value's one
    /// stream, and the model on the same GPU allocates untracked and hands buffers across
    /// streams behind explicit events, so stream order is the synchronization (and the tracking
    /// would cost a `cuEventRecord` per buffer use, and cannot be waited on inside a capture).
    pub fn open_for_plane(ordinal: usize) -> Result<Gpu> {
        let gpu = Self::open_plain(ordinal)?;
        // SAFETY: see above: this crate's users of the context order buffers by stream.
        unsafe { gpu.stream_ordered() };
        Ok(gpu)
    }

    /// Turns cudarc's per-slice event tracking off for this context (the process's primary
    /// context of this GPU).
    ///
    /// # Safety
    /// Every buffer of the process on this GPU must then be ordered by its streams alone: used
    /// on one stream, or handed between streams behind an explicit event (the data plane's ops
    /// run on `stream()`, the model's on its own stream with its own events).
    pub unsafe fn stream_ordered(&self) {
        // SAFETY: the caller's contract above.
        unsafe { self.ctx.disable_event_tracking() };
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// File stems of the loaded cubins (one per `kernels/*.cu`).
    pub fn module_names(&self) -> Vec<&'static str> {
        self.modules.iter().map(|m| m.name).collect()
    }

    /// A new non-default stream (work on it does not serialize with the legacy default stream).
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx
            .new_stream()
            .map_err(|e| cuda_err("cuStreamCreate", e))
    }

    /// Kernel `func` from `kernels/<file>.cu`, looked up once and cached.
    pub fn kernel(&self, file: &'static str, func: &'static str) -> Result<Kernel> {
        if let Some(why) = &self.no_kernels {
            return Err(Error::NoKernels(format!("kernel {file}.cu: {func}: {why}")));
        }
        let mut map = self
            .kernels
            .lock()
            .map_err(|_| Error::Invariant("kernel table lock poisoned".into()))?;
        if let Some(k) = map.get(func) {
            return Ok(k.clone());
        }
        let module = self
            .modules
            .iter()
            .find(|m| m.name == file)
            .ok_or_else(|| Error::NoKernels(format!("kernel file {file}.cu is not embedded")))?;
        let cname = CString::new(func).map_err(|_| Error::BadInput(format!("kernel {func}")))?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        // SAFETY: module.raw is a live module of this context; cname is a valid C string.
        let f = unsafe { result::module::get_function(module.raw, cname) }
            .map_err(|e| cuda_err(format!("cuModuleGetFunction({file}.cu: {func})"), e))?;
        let k = Kernel {
            func: f,
            name: func,
            _module: module.clone(),
        };
        map.insert(func, k.clone());
        Ok(k)
    }

    /// Raises a kernel's dynamic shared-memory limit (needed above 48 KB).
    pub fn set_max_dynamic_smem(&self, k: &Kernel, bytes: u32) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        // SAFETY: k.func is a live function handle of this context.
        unsafe {
            result::function::set_function_attribute(
                k.func,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(|e| {
            cuda_err(
                format!("cuFuncSetAttribute({}, max dyn smem {bytes})", k.name),
                e,
            )
        })
    }

    /// Enqueues `k` on `stream` with `params` as its single by-value argument.
    ///
    /// # Safety
    /// `P` must be the exact `#[repr(C)]` mirror of the kernel's parameter struct, and every
    /// device pointer in it must stay valid, with the sizes the kernel assumes, until the work
    /// completes on `stream` (the typed wrappers check shapes and keep the cudarc guards alive
    /// across the launch so cross-stream ordering is kept).
    #[track_caller]
    pub unsafe fn launch<P: Copy>(
        &self,
        k: &Kernel,
        cfg: LaunchCfg,
        stream: &CudaStream,
        params: &P,
    ) -> Result<()> {
        let at = Location::caller();
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let mut args = [params as *const P as *mut c_void];
        // SAFETY: caller guarantees params mirrors the kernel signature; args outlives the call
        // (the driver copies parameters at enqueue).
        let r = unsafe {
            result::launch_kernel(
                k.func,
                cfg.grid,
                cfg.block,
                cfg.smem_bytes,
                stream.cu_stream(),
                &mut args,
            )
        };
        r.map_err(|e| {
            Error::Cuda(format!(
                "launch {} grid {:?} block {:?} smem {} at {}:{}: {e}",
                k.name,
                cfg.grid,
                cfg.block,
                cfg.smem_bytes,
                at.file(),
                at.line()
            ))
        })
    }
}

/// A device buffer's address for a launch, with cudarc's ordering guard (kept alive until the
/// launch is enqueued so multi-stream users keep their read-after-write ordering).
pub fn dptr<'a, T>(
    buf: &'a impl DevicePtr<T>,
    stream: &'a CudaStream,
) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
    let (p, g) = buf.device_ptr(stream);
    (p, g)
}

/// Mutable counterpart of [`dptr`].
pub fn dptr_mut<'a, T>(
    buf: &'a mut impl DevicePtrMut<T>,
    stream: &'a CudaStream,
) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
    let (p, g) = buf.device_ptr_mut(stream);
    (p, g)
}

/// Rejects a device address that is not 16-byte aligned (the kernels use 16-byte vectors).
pub fn check_aligned16(what: &str, ptr: u64) -> Result<()> {
    if ptr % 16 == 0 {
        Ok(())
    } else {
        Err(Error::BadInput(format!(
            "{what}: device address {ptr:#x} is not 16-byte aligned"
        )))
    }
}

/// Rejects a buffer whose length differs from the shape's element count.
pub fn check_len(what: &str, got: usize, want: usize, shape: &str) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::BadInput(format!(
            "{what}: buffer holds {got} elements, shape {shape} needs {want}"
        )))
    }
}

/// Times work on one stream with a pair of events: `Ok(ms)` is the device time between the two
/// records, read after the end event completes (the only timing this crate trusts for GPU work).
pub struct EventTimer {
    start: CudaEvent,
    end: CudaEvent,
}

impl EventTimer {
    pub fn new(gpu: &Gpu) -> Result<EventTimer> {
        let mk = || {
            gpu.ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda_err("cuEventCreate", e))
        };
        Ok(EventTimer {
            start: mk()?,
            end: mk()?,
        })
    }

    pub fn start(&self, stream: &CudaStream) -> Result<()> {
        self.start
            .record(stream)
            .map_err(|e| cuda_err("cuEventRecord(start)", e))
    }

    /// Records the end event, waits for it, returns the elapsed device milliseconds.
    pub fn stop_ms(&self, stream: &CudaStream) -> Result<f32> {
        self.end
            .record(stream)
            .map_err(|e| cuda_err("cuEventRecord(end)", e))?;
        self.end
            .synchronize()
            .map_err(|e| cuda_err("cuEventSynchronize (a kernel on this stream failed?)", e))?;
        self.start
            .elapsed_ms(&self.end)
            .map_err(|e| cuda_err("cuEventElapsedTime", e))
    }
}

/// Mirror of `SmokeParams` in kernels/smoke.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SmokeParams {
    pub out: u64,
    pub a: f32,
    pub b: f32,
    pub n: u32,
    pub _pad: u32,
}
const _: () = assert!(std::mem::size_of::<SmokeParams>() == 24);

/// Enqueues `out[i] = a * i + b` (kernels/smoke.cu) on `stream`.
#[track_caller]
pub fn smoke_affine_f32(
    gpu: &Gpu,
    stream: &CudaStream,
    out: &mut impl DevicePtrMut<f32>,
    a: f32,
    b: f32,
) -> Result<()> {
    let n = u32::try_from(out.len())
        .map_err(|_| Error::BadInput("smoke: more than 2^32 elements".into()))?;
    if n == 0 {
        return Ok(());
    }
    let k = gpu.kernel("smoke", "smoke_affine_f32")?;
    let (p, _g) = dptr_mut(out, stream);
    let params = SmokeParams {
        out: p,
        a,
        b,
        n,
        _pad: 0,
    };
    let cfg = LaunchCfg {
        grid: (n.div_ceil(256), 1, 1),
        block: (256, 1, 1),
        smem_bytes: 0,
    };
    // SAFETY: SmokeParams mirrors kernels/smoke.cu; out holds n f32 and outlives the enqueue
    // (its guard `_g` orders later users of `out` after this launch).
    unsafe { gpu.launch(&k, cfg, stream, &params) }
}

/// Mirror of `FillParams` in kernels/smoke.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct FillParams {
    out: u64,
    n: u64,
    seed: u64,
    amp: f32,
    mode: u32,
    bits: u32,
    _pad: u32,
}
const _: () = assert!(std::mem::size_of::<FillParams>() == 40);

/// What `fill_bf16` writes.
#[derive(Clone, Copy, Debug)]
pub enum Fill {
    /// Every element gets this bit pattern (`0x7FC0` = NaN: poison before a launch).
    Bits(u16),
    /// Uniform in `[-amp, amp)` from a hash of (seed, index): reproducible random data.
    Uniform { seed: u64, amp: f32 },
}

/// bf16 NaN, the poison written into outputs before a kernel under test runs.
pub const BF16_NAN_BITS: u16 = 0x7FC0;

/// Enqueues a device-side fill of a bf16 (or any 16-bit) buffer.
#[track_caller]
pub fn fill_bf16<T>(
    gpu: &Gpu,
    stream: &CudaStream,
    buf: &mut impl DevicePtrMut<T>,
    what: Fill,
) -> Result<()> {
    if std::mem::size_of::<T>() != 2 {
        return Err(Error::BadInput(
            "fill_bf16: element type is not 16-bit".into(),
        ));
    }
    let n = buf.len();
    if n == 0 {
        return Ok(());
    }
    let k = gpu.kernel("smoke", "fill_bf16")?;
    let (p, _g) = dptr_mut(buf, stream);
    let (mode, bits, seed, amp) = match what {
        Fill::Bits(b) => (0, u32::from(b), 0, 0.0),
        Fill::Uniform { seed, amp } => (1, 0, seed, amp),
    };
    let params = FillParams {
        out: p,
        n: n as u64,
        seed,
        amp,
        mode,
        bits,
        _pad: 0,
    };
    let cfg = LaunchCfg {
        grid: (n.div_ceil(256).min(132 * 32) as u32, 1, 1),
        block: (256, 1, 1),
        smem_bytes: 0,
    };
    // SAFETY: FillParams mirrors the kernel; n 16-bit elements checked; guard kept past enqueue.
    unsafe { gpu.launch(&k, cfg, stream, &params) }
}
