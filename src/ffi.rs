//! The C ABI (`ffi/lockstep.h`): how a server that is not written in Rust builds and checks
//! envelopes with exactly the Rust preflight, and decodes headers it received.
//!
//! Contract:
//! - Every entry point is `extern "C"`, runs its body under `catch_unwind` and never unwinds
//!   into C: a panic becomes [`STATUS_PANIC`] with its message in the last error.
//! - Status-returning calls return 0 or a status code; the codes mirror [`crate::exit::ExitCode`] numbering
//!   (a preflight rejection is 74 like `Error::Preflight`, a malformed header 70 like
//!   `Error::Decode`), plus finer codes 80..=83 for the header failures a server must tell apart.
//!   Each call sets (failure) or clears (success) the calling thread's last error, read with
//!   [`lockstep_last_error`].
//! - `lockstep_envelope_prepare` is `wire::prepare_untyped` with foreign tensors: meta text and
//!   every descriptor are checked (same messages as the Rust path) **before** any tensor byte is
//!   copied, and only then is a `PreparedEnvelope` (and so a header) made. On failure `*out` is
//!   left NULL: C cannot get a header for an envelope that failed preflight (A1/A2/A3 via C).
//! - Nothing read from C is trusted beyond the documented pointer contracts: counts, ranks and
//!   byte lengths are bounded by [`Limits::default`] before anything is read or allocated.
//!
//! Tripwires: a new `ExitCode`, dtype or action must appear in `ffi/lockstep.h` (tests below read
//! the header text); a new `extern "C"` fn must be declared there (`tools/check-ffi.sh` compares
//! the cdylib's exported symbols with the header).
use crate::digest::fnv64;
use crate::error::{Error, Result};
use crate::ids::{CacheEpoch, CallId, ChunkIndex};
use crate::wire::{
    prepare_untyped, untyped_meta_from_json, Action, DType, EnvelopeIds, Header, HostTensor,
    Limits, MetaDoc, PreparedEnvelope, TensorSpec, ENVELOPE_VERSION, HEADER_LEN, MAGIC,
};
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

// session: the stream API in C (`lockstep_session_*`).
pub mod session;

/// Success.
pub const STATUS_OK: i32 = 0;
/// The header buffer is shorter than [`HEADER_LEN`].
pub const STATUS_HEADER_TRUNCATED: i32 = 80;
/// The first four bytes are not `LKST`.
pub const STATUS_HEADER_BAD_MAGIC: i32 = 81;
/// `envelope_version` is not the one this build speaks.
pub const STATUS_HEADER_BAD_VERSION: i32 = 82;
/// The header checksum does not match its bytes.
pub const STATUS_HEADER_BAD_CHECKSUM: i32 = 83;
/// A panic was caught at the FFI boundary (a bug in lockstep); 101 is what a panicking Rust
/// process exits with.
pub const STATUS_PANIC: i32 = 101;

/// The C layout of a decoded header: the wire [`Header`] itself (`#[repr(C)]`, 80 bytes, no
/// padding), with fields in host byte order.
pub type LockstepHeader = Header;

/// One foreign tensor, as `lockstep_tensor_desc` in `ffi/lockstep.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LockstepTensorDesc {
    /// NUL-terminated UTF-8 name.
    pub name: *const c_char,
    /// A `LOCKSTEP_DTYPE_*` code.
    pub dtype: i32,
    /// Number of entries in `shape`.
    pub ndim: u32,
    /// `ndim` dimensions (may be NULL when `ndim == 0`).
    pub shape: *const u64,
    /// `byte_len` bytes of host memory (may be NULL when `byte_len == 0`).
    pub data: *const u8,
    pub byte_len: u64,
}

/// The opaque `lockstep_envelope`: a prepared envelope and its encoded header, kept so that the
/// pointer handed to C stays valid until `lockstep_envelope_free`.
pub struct LockstepEnvelope {
    prepared: PreparedEnvelope,
    header_bytes: [u8; HEADER_LEN],
}

/// Wire dtype ↔ `LOCKSTEP_DTYPE_*` code. Codes are ABI: never renumber.
pub const DTYPE_CODES: [(DType, i32); 10] = [
    (DType::Bf16, 1),
    (DType::F16, 2),
    (DType::F32, 3),
    (DType::I32, 4),
    (DType::I64, 5),
    (DType::U8, 6),
    (DType::Bool, 7),
    (DType::F64, 8),
    (DType::F8E4m3, 9),
    (DType::F8E5m2, 10),
];

fn dtype_from_code(code: i32) -> Option<DType> {
    DTYPE_CODES
        .iter()
        .find(|(_, c)| *c == code)
        .map(|(d, _)| *d)
}

/// A failure at the boundary: status code + message.
struct Failure {
    status: i32,
    message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure {
            status: e.exit_code().code(),
            message: e.to_string(),
        }
    }
}

fn bad_input(message: impl Into<String>) -> Failure {
    Error::BadInput(message.into()).into()
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_last_error(message: &str) {
    // A message with an interior NUL is cut there rather than lost.
    let cut = message.split('\0').next().unwrap_or("");
    let c = CString::new(cut).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = Some(c));
}

fn clear_last_error() {
    LAST_ERROR.with(|slot| *slot.borrow_mut() = None);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs one status-returning entry point: catches panics, maps failures to codes, sets or clears
/// the thread's last error.
fn guard(body: impl FnOnce() -> std::result::Result<(), Failure>) -> i32 {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            clear_last_error();
            STATUS_OK
        }
        Ok(Err(f)) => {
            set_last_error(&f.message);
            f.status
        }
        Err(payload) => {
            set_last_error(&format!(
                "internal panic caught at the C ABI boundary (a lockstep bug): {}",
                panic_message(payload.as_ref())
            ));
            STATUS_PANIC
        }
    }
}

/// Like [`guard`] for entry points that return a pointer: NULL on failure.
fn guard_ptr<T>(body: impl FnOnce() -> std::result::Result<*mut T, Failure>) -> *mut T {
    let mut out = std::ptr::null_mut();
    let status = guard(|| {
        out = body()?;
        Ok(())
    });
    if status == STATUS_OK {
        out
    } else {
        std::ptr::null_mut()
    }
}

/// A borrowed C array as a slice; `len == 0` accepts NULL.
///
/// # Safety
/// When `len > 0`, `ptr` must point to `len` initialized, aligned `T`s that stay valid and
/// unmodified for `'a`.
unsafe fn c_slice<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(bad_input(format!("{what} is NULL but its length is {len}")));
    }
    // SAFETY: non-null, and the caller guarantees `len` valid elements.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// # Safety
/// `ptr` is NULL or a NUL-terminated string valid for `'a`.
unsafe fn c_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if ptr.is_null() {
        return Err(bad_input(format!("{what} is NULL")));
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map_err(|e| bad_input(format!("{what} is not UTF-8: {e}")))
}

fn static_cstr(cell: &'static std::sync::OnceLock<CString>, text: &str) -> *const c_char {
    cell.get_or_init(|| CString::new(text.split('\0').next().unwrap_or("")).unwrap_or_default())
        .as_ptr()
}

/// The crate version (`"0.1.0"`), a static string: never free it.
#[no_mangle]
pub extern "C" fn lockstep_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The embedded kernels' build id (`"none"` when built without kernels), a static string.
#[no_mangle]
pub extern "C" fn lockstep_kernel_build_id() -> *const c_char {
    static CELL: std::sync::OnceLock<CString> = std::sync::OnceLock::new();
    match catch_unwind(AssertUnwindSafe(|| {
        static_cstr(&CELL, crate::cuda::embedded::KERNEL_BUILD_ID)
    })) {
        Ok(p) => p,
        Err(_) => c"unknown".as_ptr(),
    }
}

/// `lockstep doctor --json` as a heap string (free with [`lockstep_string_free`]); NULL on
/// failure, with the reason in the last error.
#[no_mangle]
pub extern "C" fn lockstep_doctor_json() -> *mut c_char {
    guard_ptr(|| {
        let json = serde_json::to_string_pretty(&crate::doctor::report())
            .map_err(|e| bad_input(format!("doctor report is not serializable: {e}")))?;
        let c = CString::new(json)
            .map_err(|_| bad_input("doctor report contains a NUL byte".to_owned()))?;
        Ok(c.into_raw())
    })
}

/// Frees a string returned by [`lockstep_doctor_json`]. NULL is a no-op.
///
/// # Safety
/// `s` is NULL or a pointer returned by a lockstep function documented as "free with
/// `lockstep_string_free`", not freed before.
#[no_mangle]
pub unsafe extern "C" fn lockstep_string_free(s: *mut c_char) {
    if s.is_null() {
        return;
    }
    // SAFETY: per the contract, `s` came from `CString::into_raw` and is freed once.
    let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { CString::from_raw(s) })));
}

/// The calling thread's last error message, or `""` after a success. Never NULL; valid until the
/// next lockstep call on this thread.
#[no_mangle]
pub extern "C" fn lockstep_last_error() -> *const c_char {
    catch_unwind(|| {
        LAST_ERROR.with(|slot| match slot.borrow().as_ref() {
            Some(c) => c.as_ptr(),
            None => c"".as_ptr(),
        })
    })
    .unwrap_or(c"".as_ptr())
}

/// Reads one descriptor into a spec without touching its data.
///
/// # Safety
/// `d.name` and `d.shape` follow the `lockstep_tensor_desc` contract.
unsafe fn read_desc(
    i: usize,
    d: &LockstepTensorDesc,
    limits: &Limits,
) -> Result<TensorSpec, Failure> {
    // SAFETY: forwarded contract.
    let name = unsafe { c_str(d.name, &format!("tensors[{i}].name")) }?;
    let dtype = dtype_from_code(d.dtype).ok_or_else(|| {
        bad_input(format!(
            "tensors[{i}] (`{name}`): unknown dtype code {} (see LOCKSTEP_DTYPE_* in lockstep.h)",
            d.dtype
        ))
    })?;
    let ndim = d.ndim as usize;
    if ndim > limits.max_ndim {
        // Checked before `shape` is read, so a garbage ndim never walks off an array.
        return Err(Error::Preflight(format!(
            "tensor `{name}` has {ndim} dims (limit {})",
            limits.max_ndim
        ))
        .into());
    }
    // SAFETY: forwarded contract (`shape` holds `ndim` u64s).
    let shape = unsafe { c_slice(d.shape, ndim, &format!("tensors[{i}].shape")) }?;
    Ok(TensorSpec {
        name: name.to_owned(),
        dtype,
        shape: shape.to_vec(),
        byte_len: d.byte_len,
    })
}

/// # Safety
/// See `lockstep_envelope_prepare`.
unsafe fn prepare_from_c(
    action: i32,
    ids: EnvelopeIds,
    meta_json: *const c_char,
    tensors: *const LockstepTensorDesc,
    n_tensors: usize,
    out: *mut *mut LockstepEnvelope,
) -> Result<(), Failure> {
    if out.is_null() {
        return Err(bad_input("out is NULL"));
    }
    // SAFETY: `out` is non-null and writable per the contract; NULL until preflight passes.
    unsafe { out.write(std::ptr::null_mut()) };
    let limits = Limits::default();
    let action = u16::try_from(action)
        .ok()
        .and_then(Action::from_u16)
        .ok_or_else(|| bad_input(format!("unknown action {action} (see LOCKSTEP_ACTION_*)")))?;
    let prepared = if action.has_payload() {
        let meta = if meta_json.is_null() {
            "{}"
        } else {
            // SAFETY: forwarded contract.
            unsafe { c_str(meta_json, "meta_json") }?
        };
        // Meta first, like the Rust path, so A1/A3 report the same thing from C and from Rust.
        untyped_meta_from_json(meta, &limits)?;
        if n_tensors > limits.max_tensors as usize {
            return Err(Error::Preflight(format!(
                "{n_tensors} tensors exceed the limit of {}",
                limits.max_tensors
            ))
            .into());
        }
        // SAFETY: forwarded contract (`tensors` holds `n_tensors` descriptors).
        let descs = unsafe { c_slice(tensors, n_tensors, "tensors") }?;
        let mut specs = Vec::with_capacity(descs.len());
        for (i, d) in descs.iter().enumerate() {
            // SAFETY: forwarded contract.
            specs.push(unsafe { read_desc(i, d, &limits) }?);
        }
        // The manifest check of the Rust preflight (same messages): allowlist, names, byte_len
        // vs shape, duplicates, total bytes. Only then are bytes copied, bounded by that total.
        let manifest = MetaDoc {
            tensor_specs: specs,
            body: serde_json::Value::Null,
        };
        manifest.validate_specs(&limits).map_err(Error::Preflight)?;
        let mut host = Vec::with_capacity(descs.len());
        for (i, (spec, d)) in manifest.tensor_specs.into_iter().zip(descs).enumerate() {
            let len = usize::try_from(spec.byte_len)
                .map_err(|_| bad_input(format!("tensors[{i}] is too large for this host")))?;
            // SAFETY: forwarded contract (`data` holds `byte_len` bytes).
            let data = unsafe { c_slice(d.data, len, &format!("tensors[{i}].data")) }?;
            host.push(HostTensor::new(
                spec.name,
                spec.dtype,
                spec.shape,
                data.to_vec(),
            ));
        }
        prepare_untyped(action, ids, meta, host, &limits)?
    } else {
        // NOOP and SHUTDOWN carry nothing; accepting stray meta or tensors would hide a bug.
        if !meta_json.is_null() || n_tensors != 0 {
            return Err(Error::Preflight(format!(
                "{} carries no payload: pass meta_json = NULL and n_tensors = 0",
                action.name()
            ))
            .into());
        }
        if action == Action::Noop {
            PreparedEnvelope::noop(ids)
        } else {
            PreparedEnvelope::shutdown(ids)
        }
    };
    let env = Box::new(LockstepEnvelope {
        header_bytes: prepared.header_bytes(),
        prepared,
    });
    // SAFETY: `out` checked above.
    unsafe { out.write(Box::into_raw(env)) };
    Ok(())
}

/// Preflight from C; see `lockstep_envelope_prepare` in `ffi/lockstep.h` for the full contract.
///
/// # Safety
/// `out` is a writable pointer; `meta_json` is NULL or NUL-terminated; `tensors` points to
/// `n_tensors` descriptors (NULL allowed when 0) whose `name`, `shape` and `data` follow the
/// `lockstep_tensor_desc` contract for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn lockstep_envelope_prepare(
    action: i32,
    call_id: u64,
    chunk_index: u64,
    cache_epoch: u64,
    meta_json: *const c_char,
    tensors: *const LockstepTensorDesc,
    n_tensors: usize,
    out: *mut *mut LockstepEnvelope,
) -> i32 {
    let ids = EnvelopeIds {
        call_id: CallId(call_id),
        chunk_index: ChunkIndex(chunk_index),
        cache_epoch: CacheEpoch(cache_epoch),
    };
    // SAFETY: forwarded contract.
    guard(|| unsafe { prepare_from_c(action, ids, meta_json, tensors, n_tensors, out) })
}

/// # Safety
/// `env` is NULL or a live envelope; `len` is NULL or writable.
unsafe fn bytes_out(
    env: *const LockstepEnvelope,
    len: *mut usize,
    pick: impl FnOnce(&LockstepEnvelope) -> &[u8],
) -> *const u8 {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: NULL or live per the contract.
        let Some(env) = (unsafe { env.as_ref() }) else {
            return (std::ptr::null(), 0);
        };
        let b = pick(env);
        (b.as_ptr(), b.len())
    }));
    let (p, n) = r.unwrap_or((std::ptr::null(), 0));
    if !len.is_null() {
        // SAFETY: non-null and writable per the contract.
        unsafe { len.write(n) };
    }
    p
}

/// The encoded header (80 bytes) that would be sent; valid until the envelope is freed.
///
/// # Safety
/// `env` is NULL or a live envelope from `lockstep_envelope_prepare`; `len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn lockstep_envelope_header_bytes(
    env: *const LockstepEnvelope,
    len: *mut usize,
) -> *const u8 {
    // SAFETY: forwarded contract.
    unsafe { bytes_out(env, len, |e| &e.header_bytes) }
}

/// The canonical meta bytes that would be sent (empty for NOOP/SHUTDOWN); valid until the
/// envelope is freed.
///
/// # Safety
/// As [`lockstep_envelope_header_bytes`].
#[no_mangle]
pub unsafe extern "C" fn lockstep_envelope_meta_bytes(
    env: *const LockstepEnvelope,
    len: *mut usize,
) -> *const u8 {
    // SAFETY: forwarded contract.
    unsafe { bytes_out(env, len, |e| e.prepared.meta_bytes()) }
}

/// Frees an envelope. NULL is a no-op.
///
/// # Safety
/// `env` is NULL or an envelope from `lockstep_envelope_prepare`, not freed before, and no other
/// thread is reading it.
#[no_mangle]
pub unsafe extern "C" fn lockstep_envelope_free(env: *mut LockstepEnvelope) {
    if env.is_null() {
        return;
    }
    // SAFETY: came from `Box::into_raw` in prepare and is freed once per the contract.
    let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(env) })));
}

/// Classifies a header that `Header::decode` refused, in the order `decode` checks, so the code
/// and the message name the same fault.
fn classify_header(bytes: &[u8], e: Error) -> Failure {
    let message = e.to_string();
    // `bytes` is exactly HEADER_LEN long (checked by the caller).
    let le_u64 = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    let status = if magic != MAGIC {
        STATUS_HEADER_BAD_MAGIC
    } else if version != ENVELOPE_VERSION {
        STATUS_HEADER_BAD_VERSION
    } else if le_u64(HEADER_LEN - 8) != fnv64(&bytes[..HEADER_LEN - 8]) {
        STATUS_HEADER_BAD_CHECKSUM
    } else {
        e.exit_code().code()
    };
    Failure { status, message }
}

/// Decodes and validates the first 80 bytes of `bytes` into `*out` (host byte order).
///
/// # Safety
/// `bytes` points to `len` readable bytes (NULL allowed when `len == 0`); `out` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn lockstep_header_decode(
    bytes: *const u8,
    len: usize,
    out: *mut LockstepHeader,
) -> i32 {
    guard(|| {
        if out.is_null() {
            return Err(bad_input("out is NULL"));
        }
        // SAFETY: forwarded contract.
        let b = unsafe { c_slice(bytes, len, "bytes") }?;
        if b.len() < HEADER_LEN {
            return Err(Failure {
                status: STATUS_HEADER_TRUNCATED,
                message: format!(
                    "wire decode: header truncated: {} bytes, need {HEADER_LEN}",
                    b.len()
                ),
            });
        }
        let head = &b[..HEADER_LEN];
        let h = Header::decode(head).map_err(|e| classify_header(head, e))?;
        // SAFETY: non-null and writable per the contract; `LockstepHeader` is `Header`.
        unsafe { out.write_unaligned(h) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitCode;
    use bytemuck::Zeroable;
    use proptest::prelude::*;

    const HEADER_H: &str = include_str!("../ffi/lockstep.h");

    fn last_error() -> String {
        // SAFETY: never NULL, NUL-terminated, read before the next call on this thread.
        unsafe { CStr::from_ptr(lockstep_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    struct Desc {
        name: CString,
        shape: Vec<u64>,
        data: Vec<u8>,
        dtype: i32,
    }

    impl Desc {
        fn new(name: &str, dtype: i32, shape: &[u64], data: Vec<u8>) -> Self {
            Desc {
                name: CString::new(name).unwrap(),
                shape: shape.to_vec(),
                data,
                dtype,
            }
        }
        fn raw(&self) -> LockstepTensorDesc {
            LockstepTensorDesc {
                name: self.name.as_ptr(),
                dtype: self.dtype,
                ndim: self.shape.len() as u32,
                shape: self.shape.as_ptr(),
                data: self.data.as_ptr(),
                byte_len: self.data.len() as u64,
            }
        }
    }

    fn code(d: DType) -> i32 {
        DTYPE_CODES.iter().find(|(x, _)| *x == d).unwrap().1
    }

    /// Prepares through the C entry point; returns (status, envelope or NULL).
    fn prepare(action: i32, meta: Option<&str>, descs: &[Desc]) -> (i32, *mut LockstepEnvelope) {
        let meta = meta.map(|m| CString::new(m).unwrap());
        let raw: Vec<LockstepTensorDesc> = descs.iter().map(Desc::raw).collect();
        // Not NULL on entry: proves a failure resets it to NULL.
        let mut out: *mut LockstepEnvelope = std::ptr::NonNull::dangling().as_ptr();
        // SAFETY: all pointers are live for the call.
        let st = unsafe {
            lockstep_envelope_prepare(
                action,
                7,
                3,
                1,
                meta.as_ref().map_or(std::ptr::null(), |m| m.as_ptr()),
                raw.as_ptr(),
                raw.len(),
                &mut out,
            )
        };
        (st, out)
    }

    fn header_of(env: *const LockstepEnvelope) -> Header {
        let mut len = 0usize;
        // SAFETY: env is live; the bytes are read before it is freed.
        let p = unsafe { lockstep_envelope_header_bytes(env, &mut len) };
        // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
        let bytes = unsafe { std::slice::from_raw_parts(p, len) };
        let mut h = Header::zeroed();
        // SAFETY: bytes/len from the accessor; h is writable.
        assert_eq!(
            // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
            unsafe { lockstep_header_decode(bytes.as_ptr(), bytes.len(), &mut h) },
            STATUS_OK
        );
        h
    }

    fn latents() -> Desc {
        let v: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0];
        Desc::new(
            "latents",
            code(DType::F32),
            &[2, 2],
            bytemuck::cast_slice(&v).to_vec(),
        )
    }

    #[test]
    fn ffi_valid_envelope_matches_the_rust_preflight_byte_for_byte() {
        let (st, env) = prepare(1, Some(r#"{"steps":4,"guidance":5.0}"#), &[latents()]);
        assert_eq!(st, STATUS_OK, "{}", last_error());
        assert!(!env.is_null());
        assert_eq!(last_error(), "");
        let h = header_of(env);
        assert_eq!((h.call_id, h.chunk_index, h.cache_epoch), (7, 3, 1));
        assert_eq!((h.n_tensors, h.payload_bytes), (1, 16));
        let rust = prepare_untyped(
            Action::Infer,
            EnvelopeIds {
                call_id: CallId(7),
                chunk_index: ChunkIndex(3),
                cache_epoch: CacheEpoch(1),
            },
            r#"{"steps":4,"guidance":5.0}"#,
            vec![HostTensor::from_f32(
                "latents",
                vec![2, 2],
                &[1.0, 2.0, 3.0, 4.0],
            )],
            &Limits::default(),
        )
        .unwrap();
        let mut mlen = 0usize;
        // SAFETY: env is live until freed below.
        let mp = unsafe { lockstep_envelope_meta_bytes(env, &mut mlen) };
        // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
        let meta = unsafe { std::slice::from_raw_parts(mp, mlen) }.to_vec();
        assert_eq!(meta, rust.meta_bytes());
        assert_eq!(h, *rust.header());
        // SAFETY: env from prepare, freed once.
        unsafe { lockstep_envelope_free(env) };
    }

    #[test]
    fn a1_c_abi_nan_in_meta_is_rejected_before_header() {
        for meta in [
            r#"{"guidance":NaN}"#,
            r#"{"guidance":nan}"#,
            r#"{"x":1e999}"#,
        ] {
            let (st, env) = prepare(1, Some(meta), &[latents()]);
            assert_eq!(st, ExitCode::BadInput.code(), "{meta}");
            assert!(env.is_null(), "no envelope (no header) after a rejection");
            let err = last_error();
            assert!(
                err.contains("preflight rejected envelope (nothing was sent)")
                    && err.contains("meta is not serializable JSON"),
                "{meta}: {err}"
            );
        }
    }

    #[test]
    fn a2_c_abi_bool_and_fp8_tensors_are_rejected_before_header() {
        for (d, name) in [
            (DType::Bool, "bool"),
            (DType::F8E4m3, "f8e4m3"),
            (DType::F8E5m2, "f8e5m2"),
        ] {
            let (st, env) = prepare(
                1,
                Some("{}"),
                &[
                    latents(),
                    Desc::new("mask", code(d), &[4], vec![1, 0, 1, 0]),
                ],
            );
            assert_eq!(st, ExitCode::BadInput.code());
            assert!(env.is_null());
            let err = last_error();
            assert!(
                err.contains(&format!(
                    "tensor `mask`: dtype {name} is not in the wire allowlist"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn a3_c_abi_tensor_hidden_in_meta_is_rejected() {
        let (st, env) = prepare(
            1,
            Some(r#"{"extra":{"mask":{"dtype":"f32","shape":[2],"data_ptr":140737488355328}}}"#),
            &[latents()],
        );
        assert_eq!(st, ExitCode::BadInput.code());
        assert!(env.is_null());
        let err = last_error();
        assert!(
            err.contains("`meta.extra.mask` looks like a tensor"),
            "{err}"
        );
    }

    #[test]
    fn ffi_descriptor_errors_are_bad_input_not_crashes() {
        // Unknown dtype code.
        let (st, _) = prepare(1, None, &[Desc::new("x", 42, &[1], vec![0])]);
        assert_eq!(st, ExitCode::BadInput.code());
        assert!(
            last_error().contains("unknown dtype code 42"),
            "{}",
            last_error()
        );
        // byte_len disagreeing with shape (checked before any byte is copied).
        let (st, _) = prepare(
            1,
            None,
            &[Desc::new("x", code(DType::F32), &[3], vec![0; 11])],
        );
        assert_eq!(st, ExitCode::BadInput.code());
        assert!(last_error().contains("byte_len 11"), "{}", last_error());
        // Duplicate names are refused by the manifest check, before any byte is copied.
        let (st, _) = prepare(1, None, &[latents(), latents()]);
        assert_eq!(st, ExitCode::BadInput.code());
        assert!(last_error().contains("appears twice"), "{}", last_error());
        // A garbage ndim is refused before `shape` is read.
        let d = latents();
        let mut raw = d.raw();
        raw.ndim = u32::MAX;
        raw.shape = std::ptr::null();
        let mut out = std::ptr::null_mut();
        // SAFETY: shape is never read (ndim is refused first).
        let st =
            unsafe { lockstep_envelope_prepare(1, 0, 0, 0, std::ptr::null(), &raw, 1, &mut out) };
        assert_eq!(st, ExitCode::BadInput.code());
        assert!(last_error().contains("dims (limit 8)"), "{}", last_error());
        // NULL data with a non-zero length, NULL out, unknown action.
        raw = d.raw();
        raw.data = std::ptr::null();
        let st =
            // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
            unsafe { lockstep_envelope_prepare(1, 0, 0, 0, std::ptr::null(), &raw, 1, &mut out) };
        assert_eq!(st, ExitCode::BadInput.code());
        assert!(
            last_error().contains("tensors[0].data is NULL"),
            "{}",
            last_error()
        );
        // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
        let st = unsafe {
            lockstep_envelope_prepare(
                1,
                0,
                0,
                0,
                std::ptr::null(),
                std::ptr::null(),
                0,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(st, ExitCode::BadInput.code());
        let (st, env) = prepare(9, None, &[]);
        assert_eq!(st, ExitCode::BadInput.code());
        assert!(env.is_null());
        assert!(
            last_error().contains("unknown action 9"),
            "{}",
            last_error()
        );
    }

    #[test]
    fn ffi_noop_and_shutdown_carry_no_payload() {
        let (st, env) = prepare(2, None, &[]);
        assert_eq!(st, STATUS_OK, "{}", last_error());
        let h = header_of(env);
        assert_eq!((h.action, h.meta_len, h.n_tensors), (2, 0, 0));
        let mut len = 1usize;
        // SAFETY: env live.
        let _ = unsafe { lockstep_envelope_meta_bytes(env, &mut len) };
        assert_eq!(len, 0);
        // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
        unsafe { lockstep_envelope_free(env) };
        let (st, env) = prepare(3, Some("{}"), &[]);
        assert_eq!(st, ExitCode::BadInput.code());
        assert!(env.is_null());
        assert!(
            last_error().contains("SHUTDOWN carries no payload"),
            "{}",
            last_error()
        );
    }

    #[test]
    fn ffi_header_decode_gives_typed_codes_for_garbage() {
        let (_, env) = prepare(1, Some("{}"), &[latents()]);
        let mut len = 0usize;
        // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
        let good = unsafe {
            std::slice::from_raw_parts(lockstep_envelope_header_bytes(env, &mut len), len)
        }
        .to_vec();
        // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
        unsafe { lockstep_envelope_free(env) };
        let decode = |b: &[u8]| {
            let mut h = Header::zeroed();
            // SAFETY: b and h live for the call.
            unsafe { lockstep_header_decode(b.as_ptr(), b.len(), &mut h) }
        };
        assert_eq!(decode(&good), STATUS_OK);
        assert_eq!(decode(&good[..40]), STATUS_HEADER_TRUNCATED);
        assert!(
            last_error().contains("truncated: 40 bytes"),
            "{}",
            last_error()
        );
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(decode(&b), STATUS_HEADER_BAD_MAGIC);
        assert!(last_error().contains("bad magic"), "{}", last_error());
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(decode(&b), STATUS_HEADER_BAD_VERSION);
        assert!(
            last_error().contains("unknown envelope_version 2"),
            "{}",
            last_error()
        );
        let mut b = good.clone();
        b[20] ^= 1;
        assert_eq!(decode(&b), STATUS_HEADER_BAD_CHECKSUM);
        assert!(
            last_error().contains("checksum mismatch"),
            "{}",
            last_error()
        );
        // Longer buffers (header + meta) decode their first 80 bytes.
        let mut b = good.clone();
        b.extend_from_slice(b"{\"body\":{}}");
        assert_eq!(decode(&b), STATUS_OK);
        // NULL pointers.
        assert_eq!(
            // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
            unsafe { lockstep_header_decode(std::ptr::null(), 0, &mut Header::zeroed()) },
            STATUS_HEADER_TRUNCATED
        );
        assert_eq!(
            // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
            unsafe { lockstep_header_decode(good.as_ptr(), good.len(), std::ptr::null_mut()) },
            ExitCode::BadInput.code()
        );
    }

    #[test]
    fn ffi_panic_is_caught_at_the_boundary() {
        let st = guard(|| panic!("boom"));
        assert_eq!(st, STATUS_PANIC);
        assert!(last_error().contains("internal panic") && last_error().contains("boom"));
        assert!(guard_ptr::<u8>(|| panic!("boom")).is_null());
    }

    #[test]
    fn ffi_static_strings_and_doctor_json() {
        // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
        let v = unsafe { CStr::from_ptr(lockstep_version()) }
            .to_str()
            .unwrap();
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
        let id = unsafe { CStr::from_ptr(lockstep_kernel_build_id()) }
            .to_str()
            .unwrap();
        assert_eq!(id, crate::cuda::embedded::KERNEL_BUILD_ID);
        let p = lockstep_doctor_json();
        assert!(!p.is_null(), "{}", last_error());
        // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
        let text = unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned();
        // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
        unsafe { lockstep_string_free(p) };
        // SAFETY: test call of the C ABI with live pointers (an envelope not yet freed, locals, or the NULLs under test), valid for the call.
        unsafe { lockstep_string_free(std::ptr::null_mut()) };
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(j["lockstep_version"], env!("CARGO_PKG_VERSION"));
    }

    /// The hand-written header must state every status, dtype and action code this file uses.
    #[test]
    fn ffi_header_codes_mirror_exit_codes_dtypes_and_actions() {
        let has = |name: &str, v: i64| {
            let (dec, hex) = (format!("{name} = {v},"), format!("{name} = {v:#x},"));
            assert!(
                HEADER_H.contains(&dec) || HEADER_H.contains(&hex),
                "ffi/lockstep.h lacks `{dec}`"
            );
        };
        for c in ExitCode::ALL {
            let name = match c {
                ExitCode::Clean => "LOCKSTEP_OK".to_owned(),
                c => format!(
                    "LOCKSTEP_ERR_{}",
                    c.name().to_ascii_uppercase().replace('-', "_")
                ),
            };
            has(&name, c.code().into());
        }
        has(
            "LOCKSTEP_ERR_HEADER_TRUNCATED",
            STATUS_HEADER_TRUNCATED.into(),
        );
        has(
            "LOCKSTEP_ERR_HEADER_BAD_MAGIC",
            STATUS_HEADER_BAD_MAGIC.into(),
        );
        has(
            "LOCKSTEP_ERR_HEADER_BAD_VERSION",
            STATUS_HEADER_BAD_VERSION.into(),
        );
        has(
            "LOCKSTEP_ERR_HEADER_BAD_CHECKSUM",
            STATUS_HEADER_BAD_CHECKSUM.into(),
        );
        has("LOCKSTEP_ERR_PANIC", STATUS_PANIC.into());
        for (d, c) in DTYPE_CODES {
            has(
                &format!("LOCKSTEP_DTYPE_{}", d.name().to_ascii_uppercase()),
                c.into(),
            );
        }
        for a in [
            Action::Infer,
            Action::Noop,
            Action::Shutdown,
            Action::Result,
        ] {
            has(&format!("LOCKSTEP_ACTION_{}", a.name()), (a as u16).into());
        }
        has("LOCKSTEP_HEADER_LEN", HEADER_LEN as i64);
        has("LOCKSTEP_ENVELOPE_VERSION", ENVELOPE_VERSION.into());
        has("LOCKSTEP_MAGIC", MAGIC.into());
    }

    proptest! {
        #[test]
        fn ffi_header_decode_of_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut h = Header::zeroed();
            // SAFETY: bytes and h live for the call.
            let st = unsafe { lockstep_header_decode(bytes.as_ptr(), bytes.len(), &mut h) };
            prop_assert_ne!(st, STATUS_PANIC);
            prop_assert!(st == STATUS_OK || !last_error().is_empty());
        }
    }
}
