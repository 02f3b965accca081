//! The session in the C ABI (`lockstep_session_*` in `ffi/lockstep.h`): `crate::session` behind
//! an opaque handle, status codes and the thread's last error like every other entry point.
//!
//! Contract:
//! - A handle wraps one `Session` behind a mutex: calls on one handle from several threads are
//!   serialized; `lockstep_session_free` must not race with another call on that handle.
//! - `submit` answers [`STATUS_AGAIN`] (D_in full) and `recv` [`STATUS_NO_RESULT`] (nothing
//!   within the timeout) as outcomes, not failures: the last error is cleared.
//! - A job that failed surfaces as its exit code (70..77) with the diagnosis in the last error,
//!   from that call on every later call on the handle.
//! - Results are `lockstep_chunk`s the caller owns until `lockstep_chunk_free`; the decode
//!   callback, when set, is called on the thread inside `lockstep_session_recv`, with the chunk,
//!   before the call returns it; its time is counted in `lockstep_session_stats`.
//!
//! Tripwire: `lockstep_session_config.struct_size` must equal this build's size of the struct
//! (a header from another version is bad input, never a misread).
use super::{bad_input, c_slice, c_str, dtype_from_code, guard, Failure, STATUS_OK};
use crate::pipeline::{GeneratorKind, RunArgs};
use crate::session::{ChunkOut, Conditioning, Launch, Session, SessionConfig, Submit};
use std::ffi::{c_char, c_void};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `submit`: D_in is full; receive a result first.
pub const STATUS_AGAIN: i32 = 1;
/// `recv`: no result within the timeout (or none in flight).
pub const STATUS_NO_RESULT: i32 = 2;
/// `recv`: the decode callback returned non-zero (the chunk is still handed out).
pub const STATUS_DECODER_FAILED: i32 = 84;

/// `lockstep_session_config` in `ffi/lockstep.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LockstepSessionConfig {
    pub struct_size: u32,
    /// Mesh ranks (0 = 2).
    pub tp: u32,
    /// NULL = "tiny".
    pub preset: *const c_char,
    /// `LOCKSTEP_GENERATOR_*`.
    pub generator: i32,
    /// Queue depth D (0 = 2).
    pub depth: u32,
    pub gen_cost_ms: f64,
    /// Bound on every wait of the job, seconds (0 = 10).
    pub timeout_s: f64,
    pub seed: u64,
    /// The `lockstep` executable; NULL = `LOCKSTEP_BIN`, else the one beside this library.
    pub exe: *const c_char,
    /// Join mode when `master_port != 0`: rank 0 listens here for mesh ranks started elsewhere.
    pub master_addr: *const c_char,
    pub master_port: u32,
    /// Non-zero: every chunk carries the preview decoder's RGB frames.
    pub frames: i32,
    /// Join mode: the job token the mesh ranks have as `LOCKSTEP_JOB_TOKEN`.
    pub token: *const c_char,
    /// NULL = the launcher's default.
    pub dump_dir: *const c_char,
}

/// `lockstep_ids`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LockstepIds {
    pub call_id: u64,
    pub chunk_index: u64,
    pub cache_epoch: u64,
}

/// `lockstep_chunk`: one result, owned by the caller until `lockstep_chunk_free`.
#[repr(C)]
#[derive(Debug)]
pub struct LockstepChunk {
    pub ids: LockstepIds,
    pub s1_us: u64,
    pub latent: *const f32,
    pub latent_len: u64,
    pub latent_shape: [u64; 2],
    pub frames: *const u8,
    pub n_frames: u32,
    pub frame_h: u32,
    pub frame_w: u32,
    pub reserved: u32,
}

/// The allocation behind a `lockstep_chunk*` (the C struct first, so the pointers coincide).
#[repr(C)]
struct ChunkBox {
    c: LockstepChunk,
    latent: Vec<f32>,
    frames: Vec<u8>,
}

/// `lockstep_session_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LockstepSessionStats {
    pub submitted: u64,
    pub again: u64,
    pub received: u64,
    /// Sum of the mesh's time per received chunk (µs).
    pub mesh_us: u64,
    /// Time inside the decode callback (µs), the server's decoder's share of Stage 0.
    pub decode_us: u64,
    /// Time inside `lockstep_session_submit` (µs).
    pub submit_us: u64,
    /// Time inside `lockstep_session_recv` before the callback, waiting included (µs).
    pub recv_us: u64,
}

/// `int32_t (*)(void *user, const lockstep_chunk *chunk)`.
pub type LockstepDecodeFn = Option<unsafe extern "C" fn(*mut c_void, *const LockstepChunk) -> i32>;

struct DecodeHook {
    f: unsafe extern "C" fn(*mut c_void, *const LockstepChunk) -> i32,
    user: *mut c_void,
}
// SAFETY: the header's contract: `user` may be used from whichever thread calls
// `lockstep_session_recv` (the handle serializes calls, so never from two at once).
unsafe impl Send for DecodeHook {}

struct Inner {
    session: Session,
    hook: Option<DecodeHook>,
    stats: LockstepSessionStats,
}

/// The opaque `lockstep_session`.
pub struct LockstepSession {
    inner: Mutex<Inner>,
}

/// # Safety
/// `s` is NULL or a live handle from `lockstep_session_open`.
unsafe fn handle<'a>(s: *mut LockstepSession) -> Result<&'a LockstepSession, Failure> {
    // SAFETY: NULL or live per the contract.
    unsafe { s.as_ref() }.ok_or_else(|| bad_input("session handle is NULL"))
}

fn lock(s: &LockstepSession) -> std::sync::MutexGuard<'_, Inner> {
    s.inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// # Safety
/// `p` is NULL or NUL-terminated.
unsafe fn opt_str(p: *const c_char, what: &str) -> Result<Option<String>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded.
    Ok(Some(unsafe { c_str(p, what) }?.to_string()))
}

/// The `lockstep` executable beside this shared library (where cargo puts both).
fn exe_beside_library() -> Option<PathBuf> {
    let mut info: libc::Dl_info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    let addr = exe_beside_library as *const c_void;
    // SAFETY: dladdr reads our own code address and fills `info`; dli_fname, when non-NULL, is
    // a NUL-terminated path owned by the loader.
    let path = unsafe {
        if libc::dladdr(addr, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(info.dli_fname)
    };
    let lib = PathBuf::from(path.to_str().ok()?);
    // target/<profile>/liblockstep.so, or target/<profile>/deps/ while cargo tests run.
    let dir = lib.parent()?;
    [dir.join("lockstep"), dir.parent()?.join("lockstep")]
        .into_iter()
        .find(|c| c.is_file())
}

/// # Safety
/// `c` is a live config per the header.
unsafe fn config_from_c(c: &LockstepSessionConfig) -> Result<SessionConfig, Failure> {
    let want = std::mem::size_of::<LockstepSessionConfig>() as u32;
    if c.struct_size != want {
        return Err(bad_input(format!(
            "lockstep_session_config.struct_size is {} but this library's is {want} \
             (header and library from different versions?)",
            c.struct_size
        )));
    }
    let mut run = RunArgs {
        quiet: true,
        ..RunArgs::default()
    };
    if c.tp != 0 {
        run.tp = c.tp;
    }
    if c.depth != 0 {
        run.depth = c.depth as usize;
    }
    // SAFETY: forwarded (each pointer NULL or NUL-terminated).
    unsafe {
        if let Some(p) = opt_str(c.preset, "config.preset")? {
            run.preset = p;
        }
    }
    run.generator = match c.generator {
        0 => GeneratorKind::Dit,
        1 => GeneratorKind::Calibrated,
        2 => GeneratorKind::Gpu,
        g => {
            return Err(bad_input(format!(
                "config.generator {g} is not a lockstep_generator"
            )))
        }
    };
    if !(c.gen_cost_ms.is_finite() && c.gen_cost_ms >= 0.0) {
        return Err(bad_input(format!(
            "config.gen_cost_ms {} must be ≥ 0",
            c.gen_cost_ms
        )));
    }
    run.gen_cost_ms = c.gen_cost_ms;
    if c.timeout_s != 0.0 {
        run.timeout = c.timeout_s;
    }
    run.seed = c.seed;
    // SAFETY: forwarded.
    let (exe, addr, token, dump) = unsafe {
        (
            opt_str(c.exe, "config.exe")?,
            opt_str(c.master_addr, "config.master_addr")?,
            opt_str(c.token, "config.token")?,
            opt_str(c.dump_dir, "config.dump_dir")?,
        )
    };
    let launch = if c.master_port != 0 {
        let port = u16::try_from(c.master_port)
            .map_err(|_| bad_input(format!("config.master_port {} > 65535", c.master_port)))?;
        Launch::Join {
            master_addr: addr.unwrap_or_else(|| "127.0.0.1".into()),
            master_port: port,
            token: token.ok_or_else(|| bad_input("config.token is NULL in join mode"))?,
        }
    } else {
        Launch::Local
    };
    let exe = exe
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("LOCKSTEP_BIN").map(PathBuf::from))
        .or_else(exe_beside_library);
    Ok(SessionConfig {
        run,
        launch,
        exe,
        frames: c.frames != 0,
        dump_dir: dump.map(PathBuf::from),
    })
}

/// Opens a session; see `ffi/lockstep.h`.
///
/// # Safety
/// `cfg` is NULL or a live config; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_open(
    cfg: *const LockstepSessionConfig,
    out: *mut *mut LockstepSession,
) -> i32 {
    guard(|| {
        if out.is_null() {
            return Err(bad_input("lockstep_session_open: out is NULL"));
        }
        // SAFETY: non-null and writable.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: NULL or live.
        let c = unsafe { cfg.as_ref() }.ok_or_else(|| bad_input("session config is NULL"))?;
        // SAFETY: forwarded.
        let sc = unsafe { config_from_c(c) }?;
        let session = Session::open(&sc)?;
        let h = Box::new(LockstepSession {
            inner: Mutex::new(Inner {
                session,
                hook: None,
                stats: LockstepSessionStats::default(),
            }),
        });
        // SAFETY: checked non-null above.
        unsafe { out.write(Box::into_raw(h)) };
        Ok(())
    })
}

/// The current epoch's conditioning from a tensor (before its first chunk).
///
/// # Safety
/// `s` NULL or live; `shape` points to `ndim` values; `data` to `byte_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_set_conditioning(
    s: *mut LockstepSession,
    dtype: i32,
    shape: *const u64,
    ndim: u32,
    data: *const c_void,
    byte_len: u64,
) -> i32 {
    guard(|| {
        // SAFETY: forwarded.
        let h = unsafe { handle(s) }?;
        let dt = dtype_from_code(dtype)
            .ok_or_else(|| bad_input(format!("unknown dtype code {dtype}")))?;
        if ndim > 8 {
            return Err(bad_input(format!("conditioning ndim {ndim} > 8")));
        }
        let len = usize::try_from(byte_len)
            .map_err(|_| bad_input(format!("byte_len {byte_len} does not fit")))?;
        // SAFETY: forwarded pointer contracts.
        let (shape, bytes) = unsafe {
            (
                c_slice(shape, ndim as usize, "shape")?,
                c_slice(data.cast::<u8>(), len, "data")?,
            )
        };
        let mut g = lock(h);
        let c = Conditioning::from_tensor(g.session.model(), dt, shape, bytes)?;
        g.session.set_conditioning(&c)?;
        Ok(())
    })
}

/// The current epoch's conditioning from a safetensors file (tensor `name`, or its only one).
///
/// # Safety
/// `s` NULL or live; `path` NUL-terminated; `name` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_set_conditioning_file(
    s: *mut LockstepSession,
    path: *const c_char,
    name: *const c_char,
) -> i32 {
    guard(|| {
        // SAFETY: forwarded.
        let (h, path, name) = unsafe { (handle(s)?, c_str(path, "path")?, opt_str(name, "name")?) };
        let mut g = lock(h);
        let c = Conditioning::from_safetensors(
            g.session.model(),
            std::path::Path::new(path),
            name.as_deref(),
        )?;
        g.session.set_conditioning(&c)?;
        Ok(())
    })
}

/// The current epoch's prompt by seed (what `lockstep run --seed` derives).
///
/// # Safety
/// `s` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_set_prompt_seed(
    s: *mut LockstepSession,
    seed: u64,
) -> i32 {
    guard(|| {
        // SAFETY: forwarded.
        let h = unsafe { handle(s) }?;
        lock(h)
            .session
            .set_conditioning(&Conditioning::from_seed(seed))?;
        Ok(())
    })
}

/// Sends the next chunk: `LOCKSTEP_OK` with its ids, or `LOCKSTEP_AGAIN` when D_in is full.
///
/// # Safety
/// `s` NULL or live; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_submit(
    s: *mut LockstepSession,
    out: *mut LockstepIds,
) -> i32 {
    let mut status = STATUS_OK;
    let st = guard(|| {
        // SAFETY: forwarded.
        let h = unsafe { handle(s) }?;
        let mut g = lock(h);
        let t = Instant::now();
        let r = g.session.submit();
        g.stats.submit_us += t.elapsed().as_micros() as u64;
        match r? {
            Submit::Sent(ids) => {
                g.stats.submitted += 1;
                if !out.is_null() {
                    // SAFETY: non-null and writable.
                    unsafe {
                        out.write(LockstepIds {
                            call_id: ids.call_id.get(),
                            chunk_index: ids.chunk_index.get(),
                            cache_epoch: ids.cache_epoch.get(),
                        })
                    };
                }
            }
            Submit::Again => {
                g.stats.again += 1;
                status = STATUS_AGAIN;
            }
        }
        Ok(())
    });
    if st == STATUS_OK {
        status
    } else {
        st
    }
}

fn chunk_box(c: ChunkOut, shape: [u64; 2]) -> Box<ChunkBox> {
    let frames: Vec<u8> = c.frames.concat();
    let mut b = Box::new(ChunkBox {
        c: LockstepChunk {
            ids: LockstepIds {
                call_id: c.ids.call_id.get(),
                chunk_index: c.ids.chunk_index.get(),
                cache_epoch: c.ids.cache_epoch.get(),
            },
            s1_us: c.s1_us,
            latent: std::ptr::null(),
            latent_len: c.latent.len() as u64,
            latent_shape: shape,
            frames: std::ptr::null(),
            n_frames: c.frames.len() as u32,
            frame_h: c.frame_h,
            frame_w: c.frame_w,
            reserved: 0,
        },
        latent: c.latent,
        frames,
    });
    b.c.latent = b.latent.as_ptr();
    if !b.frames.is_empty() {
        b.c.frames = b.frames.as_ptr();
    }
    b
}

/// Hands a received chunk to the caller: counted, through the decode callback (if set), into
/// `*out`. Returns the callback's failure message, if it failed.
///
/// # Safety
/// `out` is non-NULL and writable.
unsafe fn hand_out(
    g: &mut Inner,
    c: ChunkOut,
    t: Instant,
    out: *mut *mut LockstepChunk,
) -> Option<String> {
    let mesh_us = c.s1_us;
    let b = chunk_box(c, g.session.latent_shape());
    g.stats.received += 1;
    g.stats.mesh_us += mesh_us;
    g.stats.recv_us += t.elapsed().as_micros() as u64;
    let ptr = Box::into_raw(b);
    let mut hook_fail = None;
    if let Some(hook) = &g.hook {
        let t = Instant::now();
        // SAFETY: the callback's contract (header): called with a live chunk, on this
        // thread; `ptr` stays owned by us until written to `out`.
        let rc = unsafe { (hook.f)(hook.user, ptr.cast::<LockstepChunk>()) };
        g.stats.decode_us += t.elapsed().as_micros() as u64;
        if rc != 0 {
            // SAFETY: ptr came from Box::into_raw just above.
            let ids = unsafe { &(*ptr).c.ids };
            hook_fail = Some(format!(
                "decode callback returned {rc} for chunk_index {} cache_epoch {} call_id {} \
                 (the chunk is still handed out)",
                ids.chunk_index, ids.cache_epoch, ids.call_id
            ));
        }
    }
    // SAFETY: non-null and writable per this function's contract.
    unsafe { out.write(ptr.cast::<LockstepChunk>()) };
    hook_fail
}

/// The next result, waiting at most `timeout_ms` (0 = poll): `LOCKSTEP_OK` with `*out`, or
/// `LOCKSTEP_NO_RESULT`.
///
/// # Safety
/// `s` NULL or live; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_recv(
    s: *mut LockstepSession,
    timeout_ms: u32,
    out: *mut *mut LockstepChunk,
) -> i32 {
    let mut status = STATUS_OK;
    let mut hook_fail: Option<String> = None;
    let st = guard(|| {
        if out.is_null() {
            return Err(bad_input("lockstep_session_recv: out is NULL"));
        }
        // SAFETY: non-null and writable.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: forwarded.
        let h = unsafe { handle(s) }?;
        let mut g = lock(h);
        let t = Instant::now();
        let r = g.session.recv(Duration::from_millis(u64::from(timeout_ms)));
        let Some(c) = r? else {
            status = STATUS_NO_RESULT;
            return Ok(());
        };
        // SAFETY: `out` checked non-null above.
        hook_fail = unsafe { hand_out(&mut g, c, t, out) };
        Ok(())
    });
    received_status(st, hook_fail, status)
}

/// `lockstep_session_submit` then `lockstep_session_recv` in one round trip to rank 0: see
/// `ffi/lockstep.h` and `Session::submit_and_recv`.
///
/// # Safety
/// `s` NULL or live; `submitted` and `ids` NULL or writable; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_submit_and_recv(
    s: *mut LockstepSession,
    timeout_ms: u32,
    submitted: *mut i32,
    ids: *mut LockstepIds,
    out: *mut *mut LockstepChunk,
) -> i32 {
    let mut status = STATUS_OK;
    let mut hook_fail: Option<String> = None;
    let st = guard(|| {
        if out.is_null() {
            return Err(bad_input("lockstep_session_submit_and_recv: out is NULL"));
        }
        // SAFETY: non-null and writable.
        unsafe { out.write(std::ptr::null_mut()) };
        if !submitted.is_null() {
            // Nothing is known to be sent until the call says so.
            // SAFETY: non-null and writable per the contract.
            unsafe { submitted.write(STATUS_AGAIN) };
        }
        // SAFETY: forwarded.
        let h = unsafe { handle(s) }?;
        let mut g = lock(h);
        let t = Instant::now();
        let (sub, r) = g
            .session
            .submit_and_recv(Duration::from_millis(u64::from(timeout_ms)))?;
        let sub_status = match sub {
            Submit::Sent(x) => {
                g.stats.submitted += 1;
                if !ids.is_null() {
                    // SAFETY: non-null and writable per the contract.
                    unsafe {
                        ids.write(LockstepIds {
                            call_id: x.call_id.get(),
                            chunk_index: x.chunk_index.get(),
                            cache_epoch: x.cache_epoch.get(),
                        })
                    };
                }
                STATUS_OK
            }
            Submit::Again => {
                g.stats.again += 1;
                STATUS_AGAIN
            }
        };
        if !submitted.is_null() {
            // SAFETY: non-null and writable per the contract.
            unsafe { submitted.write(sub_status) };
        }
        let Some(c) = r else {
            g.stats.recv_us += t.elapsed().as_micros() as u64;
            status = STATUS_NO_RESULT;
            return Ok(());
        };
        // SAFETY: `out` checked non-null above.
        hook_fail = unsafe { hand_out(&mut g, c, t, out) };
        Ok(())
    });
    received_status(st, hook_fail, status)
}

/// The status of a call that may hand out a chunk: the guard's failure first, then a failed
/// decoder hook (its message in `lockstep_last_error`), else the call's own status.
fn received_status(st: i32, hook_fail: Option<String>, status: i32) -> i32 {
    if st != STATUS_OK {
        return st;
    }
    if let Some(m) = hook_fail {
        super::set_last_error(&m);
        return STATUS_DECODER_FAILED;
    }
    status
}

/// Frees a chunk from `lockstep_session_recv` (NULL is a no-op).
///
/// # Safety
/// `c` is NULL or a chunk from `lockstep_session_recv` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn lockstep_chunk_free(c: *mut LockstepChunk) {
    if !c.is_null() {
        // SAFETY: made by Box::into_raw of a ChunkBox whose first field is the chunk.
        drop(unsafe { Box::from_raw(c.cast::<ChunkBox>()) });
    }
}

/// Copies a chunk's latent into the caller's device memory: `dst` (a `CUdeviceptr` of the CUDA
/// context current on the calling thread, `capacity` bytes) on `stream` (a `CUstream`, or NULL
/// for the context's default stream), asynchronously: when this returns the driver has read the
/// chunk's bytes (so the chunk may be freed) and the copy into `dst` is ordered on `stream`.
/// See `ffi/lockstep.h`.
///
/// # Safety
/// `c` NULL or a live chunk; `dst` device memory of at least `capacity` bytes in the calling
/// thread's current context; `stream` NULL or a live stream of that context.
#[no_mangle]
pub unsafe extern "C" fn lockstep_chunk_copy_latent_to_device(
    c: *const LockstepChunk,
    dst: u64,
    capacity: u64,
    stream: *mut c_void,
) -> i32 {
    guard(|| {
        if c.is_null() {
            return Err(bad_input(
                "lockstep_chunk_copy_latent_to_device: chunk is NULL",
            ));
        }
        // SAFETY: non-null and live per the contract.
        let chunk = unsafe { &*c };
        let bytes = chunk.latent_len * std::mem::size_of::<f32>() as u64;
        if dst == 0 {
            return Err(bad_input("lockstep_chunk_copy_latent_to_device: dst is 0"));
        }
        if capacity < bytes {
            return Err(bad_input(format!(
                "lockstep_chunk_copy_latent_to_device: dst holds {capacity} bytes, the latent \
                 is {bytes} ({} f32)",
                chunk.latent_len
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        if chunk.latent.is_null() {
            return Err(bad_input(
                "lockstep_chunk_copy_latent_to_device: the chunk has no latent",
            ));
        }
        // cudarc's loader panics without a driver: look first (once per process).
        static DRIVER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if !*DRIVER.get_or_init(|| crate::cuda::probe::driver_info().is_ok()) {
            return Err(crate::Error::LibraryMissing(
                "lockstep_chunk_copy_latent_to_device: no CUDA driver in this process".into(),
            )
            .into());
        }
        // SAFETY: the chunk owns `latent_len` f32 at `latent` (made by `hand_out`).
        let src = unsafe { std::slice::from_raw_parts(chunk.latent, chunk.latent_len as usize) };
        // SAFETY: `dst`/`stream` are the caller's per the contract; from pageable memory the
        // driver stages `src` before returning, so it is not read after this call.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                dst,
                src,
                stream as cudarc::driver::sys::CUstream,
            )
        }
        .map_err(|e| {
            crate::Error::Cuda(format!(
                "lockstep_chunk_copy_latent_to_device: cuMemcpyHtoDAsync of {bytes} bytes: {e}"
            ))
            .into()
        })
    })
}

/// Hard cut: a new epoch; `*epoch` (if non-NULL) gets its number.
///
/// # Safety
/// `s` NULL or live; `epoch` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_cut(s: *mut LockstepSession, epoch: *mut u64) -> i32 {
    guard(|| {
        // SAFETY: forwarded.
        let h = unsafe { handle(s) }?;
        let e = lock(h).session.cut(None)?;
        if !epoch.is_null() {
            // SAFETY: non-null and writable.
            unsafe { epoch.write(e.get()) };
        }
        Ok(())
    })
}

/// Drain, SHUTDOWN, every rank exits 0. A second close is `LOCKSTEP_ERR_BAD_INPUT`.
///
/// # Safety
/// `s` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_close(s: *mut LockstepSession) -> i32 {
    guard(|| {
        // SAFETY: forwarded.
        let h = unsafe { handle(s) }?;
        lock(h).session.close()?;
        Ok(())
    })
}

/// Frees the handle; a session not closed is stopped (its ranks ended). NULL is a no-op.
///
/// # Safety
/// `s` NULL or live, and no other call on it runs or follows.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_free(s: *mut LockstepSession) {
    if !s.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: made by Box::into_raw in lockstep_session_open.
            drop(unsafe { Box::from_raw(s) });
        }));
    }
}

/// Sets (or, with NULL, clears) the decode callback.
///
/// # Safety
/// `s` NULL or live; `f` NULL or a function that may be called with `user` from the thread of
/// any later `lockstep_session_recv` on this handle.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_set_decoder(
    s: *mut LockstepSession,
    f: LockstepDecodeFn,
    user: *mut c_void,
) -> i32 {
    guard(|| {
        // SAFETY: forwarded.
        let h = unsafe { handle(s) }?;
        lock(h).hook = f.map(|f| DecodeHook { f, user });
        Ok(())
    })
}

/// Counters of this handle.
///
/// # Safety
/// `s` NULL or live; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_get_stats(
    s: *mut LockstepSession,
    out: *mut LockstepSessionStats,
) -> i32 {
    guard(|| {
        // SAFETY: forwarded.
        let h = unsafe { handle(s) }?;
        if out.is_null() {
            return Err(bad_input("lockstep_session_get_stats: out is NULL"));
        }
        let st = lock(h).stats;
        // SAFETY: non-null and writable.
        unsafe { out.write(st) };
        Ok(())
    })
}

/// The pid of global rank `rank` when this session started it.
///
/// # Safety
/// `s` NULL or live; `pid` writable.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_rank_pid(
    s: *mut LockstepSession,
    rank: u32,
    pid: *mut u32,
) -> i32 {
    guard(|| {
        // SAFETY: forwarded.
        let h = unsafe { handle(s) }?;
        if pid.is_null() {
            return Err(bad_input("lockstep_session_rank_pid: pid is NULL"));
        }
        let p = lock(h).session.rank_pid(rank).ok_or_else(|| {
            bad_input(format!(
                "global-rank {rank} is not a process this session started"
            ))
        })?;
        // SAFETY: non-null and writable.
        unsafe { pid.write(p) };
        Ok(())
    })
}

/// The latent shape of one chunk (`[tokens, channels]`, f32) and the conditioning tensor's
/// (`[text_tokens, text_dim]`).
///
/// # Safety
/// `s` NULL or live; `latent` and `text` NULL or writable arrays of 2.
#[no_mangle]
pub unsafe extern "C" fn lockstep_session_shapes(
    s: *mut LockstepSession,
    latent: *mut u64,
    text: *mut u64,
) -> i32 {
    guard(|| {
        // SAFETY: forwarded.
        let h = unsafe { handle(s) }?;
        let g = lock(h);
        for (p, v) in [
            (latent, g.session.latent_shape()),
            (text, g.session.text_shape()),
        ] {
            if !p.is_null() {
                // SAFETY: non-null and writable for two values per the contract.
                unsafe {
                    p.write(v[0]);
                    p.add(1).write(v[1]);
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER_H: &str = include_str!("../../ffi/lockstep.h");

    #[test]
    fn ffi_session_codes_and_structs_mirror_the_header() {
        for (name, v) in [
            ("LOCKSTEP_AGAIN", STATUS_AGAIN),
            ("LOCKSTEP_NO_RESULT", STATUS_NO_RESULT),
            ("LOCKSTEP_ERR_DECODER_FAILED", STATUS_DECODER_FAILED),
            ("LOCKSTEP_GENERATOR_DIT", 0),
            ("LOCKSTEP_GENERATOR_CALIBRATED", 1),
            ("LOCKSTEP_GENERATOR_GPU", 2),
        ] {
            assert!(HEADER_H.contains(&format!("{name} = {v},")), "{name}");
        }
        // 64-bit layouts the header's structs have (checked again by the C example's asserts).
        assert_eq!(std::mem::size_of::<LockstepSessionConfig>(), 88);
        assert_eq!(std::mem::size_of::<LockstepChunk>(), 88);
        assert_eq!(std::mem::size_of::<LockstepSessionStats>(), 56);
    }

    #[test]
    fn copying_a_latent_to_the_device_checks_its_arguments_and_needs_a_driver() {
        let latent = [1.5f32; 6];
        let chunk = LockstepChunk {
            ids: LockstepIds {
                call_id: 1,
                chunk_index: 0,
                cache_epoch: 0,
            },
            s1_us: 0,
            latent: latent.as_ptr(),
            latent_len: 6,
            latent_shape: [3, 2],
            frames: std::ptr::null(),
            n_frames: 0,
            frame_h: 0,
            frame_w: 0,
            reserved: 0,
        };
        let err = || {
            // SAFETY: lockstep_last_error returns a valid C string or "" (never NULL).
            unsafe { std::ffi::CStr::from_ptr(crate::ffi::lockstep_last_error()) }
                .to_string_lossy()
                .into_owned()
        };
        // SAFETY: NULL and bad arguments are refused before anything is read or written.
        unsafe {
            let null = std::ptr::null_mut();
            assert_eq!(
                lockstep_chunk_copy_latent_to_device(std::ptr::null(), 8, 24, null),
                74
            );
            assert!(err().contains("NULL"), "{}", err());
            assert_eq!(
                lockstep_chunk_copy_latent_to_device(&chunk, 0, 24, null),
                74
            );
            assert_eq!(
                lockstep_chunk_copy_latent_to_device(&chunk, 8, 23, null),
                74
            );
            assert!(
                err().contains("holds 23 bytes, the latent is 24"),
                "{}",
                err()
            );
            if crate::cuda::probe::driver_info().is_err() {
                // No driver: a device error naming it, never a panic.
                assert_eq!(
                    lockstep_chunk_copy_latent_to_device(&chunk, 8, 24, null),
                    76
                );
                assert!(err().contains("no CUDA driver"), "{}", err());
            }
        }
    }

    #[test]
    fn ffi_session_null_handles_and_bad_config_are_bad_input_not_crashes() {
        // SAFETY: NULL handles and outs are part of the contract (refused, never read).
        unsafe {
            let mut out: *mut LockstepSession = std::ptr::null_mut();
            assert_eq!(lockstep_session_open(std::ptr::null(), &mut out), 74);
            assert!(out.is_null());
            assert_eq!(
                lockstep_session_submit(std::ptr::null_mut(), std::ptr::null_mut()),
                74
            );
            let mut c: *mut LockstepChunk = std::ptr::null_mut();
            assert_eq!(lockstep_session_recv(std::ptr::null_mut(), 0, &mut c), 74);
            let mut sub = 0i32;
            assert_eq!(
                lockstep_session_submit_and_recv(
                    std::ptr::null_mut(),
                    0,
                    &mut sub,
                    std::ptr::null_mut(),
                    &mut c
                ),
                74
            );
            assert!(c.is_null());
            assert_eq!(sub, STATUS_AGAIN, "nothing was sent");
            assert_eq!(lockstep_session_close(std::ptr::null_mut()), 74);
            assert_eq!(
                lockstep_session_cut(std::ptr::null_mut(), std::ptr::null_mut()),
                74
            );
            lockstep_session_free(std::ptr::null_mut());
            lockstep_chunk_free(std::ptr::null_mut());
            let mut cfg = LockstepSessionConfig {
                struct_size: 12,
                tp: 0,
                preset: std::ptr::null(),
                generator: 1,
                depth: 0,
                gen_cost_ms: 1.0,
                timeout_s: 0.0,
                seed: 0,
                exe: std::ptr::null(),
                master_addr: std::ptr::null(),
                master_port: 0,
                frames: 0,
                token: std::ptr::null(),
                dump_dir: std::ptr::null(),
            };
            assert_eq!(lockstep_session_open(&cfg, &mut out), 74);
            let msg = std::ffi::CStr::from_ptr(super::super::lockstep_last_error())
                .to_string_lossy()
                .into_owned();
            assert!(msg.contains("struct_size"), "{msg}");
            cfg.struct_size = std::mem::size_of::<LockstepSessionConfig>() as u32;
            cfg.generator = 9;
            assert_eq!(lockstep_session_open(&cfg, &mut out), 74);
            cfg.generator = 1;
            cfg.gen_cost_ms = f64::NAN;
            assert_eq!(lockstep_session_open(&cfg, &mut out), 74);
            assert!(out.is_null());
        }
    }
}
