//! Layer 1: the NCCL function table, loaded with `dlopen` through `probe::Library`.
//!
//! Contract: loading never panics (cudarc's own loader panics when the library is absent and does
//! not try `libnccl.so.2`); a missing library or symbol is `Error::LibraryMissing`. Every call's
//! `ncclResult_t` is read as a plain `c_int`, never as a Rust enum, so a code this binding does not
//! know (a newer NCCL's `ncclTimeout`, say) is reported, not undefined behaviour. Errors carry
//! NCCL's own string (`ncclGetErrorString`), the numeric code, and `ncclGetLastError` where a
//! communicator exists.
//!
//! Tripwire: the `ncclConfig_t` layout is cudarc's for NCCL 2.28 (size 80). A library older than
//! 2.28 is refused at load, before any config is passed.
use crate::cuda::probe::{nccl_candidates, Library};
use crate::{Error, Result};
use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

pub const NCCL_SUCCESS: c_int = 0;
pub const NCCL_IN_PROGRESS: c_int = 7;

/// Datatype codes of `ncclDataType_t` (stable since NCCL 2.0; bf16 = 9 since 2.10).
pub const NCCL_UINT8: c_int = 1;
pub const NCCL_INT32: c_int = 2;
pub const NCCL_INT64: c_int = 4;
pub const NCCL_FLOAT16: c_int = 6;
pub const NCCL_FLOAT32: c_int = 7;
pub const NCCL_BFLOAT16: c_int = 9;
/// `ncclSum`.
pub const NCCL_SUM: c_int = 0;

/// `NCCL_CONFIG_UNDEF_INT`: every config field left to NCCL's default.
pub const CONFIG_UNDEF_INT: c_int = c_int::MIN;
/// `NCCL_CONFIG_MAGIC` from nccl.h.
pub const CONFIG_MAGIC: u32 = 0xcafe_beef;

type FnGetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type FnGetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
type FnInitRankConfig =
    unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut ncclConfig_t) -> c_int;
type FnGetAsyncError = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;
type FnComm = unsafe extern "C" fn(ncclComm_t) -> c_int;
type FnErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type FnLastError = unsafe extern "C" fn(ncclComm_t) -> *const c_char;
type FnSend =
    unsafe extern "C" fn(*const c_void, usize, c_int, c_int, ncclComm_t, *mut c_void) -> c_int;
type FnRecv =
    unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, ncclComm_t, *mut c_void) -> c_int;
type FnAllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    ncclComm_t,
    *mut c_void,
) -> c_int;
type FnBroadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    ncclComm_t,
    *mut c_void,
) -> c_int;
type FnAllGather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    ncclComm_t,
    *mut c_void,
) -> c_int;
type FnGroup = unsafe extern "C" fn() -> c_int;

/// The resolved entry points. Plain function pointers: `Copy`, callable from any thread.
#[derive(Clone, Copy)]
pub struct Api {
    pub get_version: FnGetVersion,
    pub get_unique_id: FnGetUniqueId,
    pub comm_init_rank_config: FnInitRankConfig,
    pub comm_get_async_error: FnGetAsyncError,
    pub comm_abort: FnComm,
    pub comm_finalize: FnComm,
    pub comm_destroy: FnComm,
    pub get_error_string: FnErrorString,
    pub get_last_error: FnLastError,
    pub send: FnSend,
    pub recv: FnRecv,
    pub all_reduce: FnAllReduce,
    pub broadcast: FnBroadcast,
    pub all_gather: FnAllGather,
    pub group_start: FnGroup,
    pub group_end: FnGroup,
    /// `ncclGetVersion`, e.g. 22803 for 2.28.3.
    pub version: c_int,
}

struct Loaded {
    api: Api,
    path: String,
}

static API: OnceLock<std::result::Result<Loaded, String>> = OnceLock::new();

fn load() -> std::result::Result<Loaded, String> {
    let lib = Library::open_first("NCCL", &nccl_candidates()).map_err(|e| e.to_string())?;
    // SAFETY: each type alias above is the nccl.h signature of the symbol it is looked up as
    // (ncclResult_t and the enum parameters are C ints).
    let api = unsafe {
        Api {
            get_version: lib.sym("ncclGetVersion").map_err(|e| e.to_string())?,
            get_unique_id: lib.sym("ncclGetUniqueId").map_err(|e| e.to_string())?,
            comm_init_rank_config: lib
                .sym("ncclCommInitRankConfig")
                .map_err(|e| e.to_string())?,
            comm_get_async_error: lib
                .sym("ncclCommGetAsyncError")
                .map_err(|e| e.to_string())?,
            comm_abort: lib.sym("ncclCommAbort").map_err(|e| e.to_string())?,
            comm_finalize: lib.sym("ncclCommFinalize").map_err(|e| e.to_string())?,
            comm_destroy: lib.sym("ncclCommDestroy").map_err(|e| e.to_string())?,
            get_error_string: lib.sym("ncclGetErrorString").map_err(|e| e.to_string())?,
            get_last_error: lib.sym("ncclGetLastError").map_err(|e| e.to_string())?,
            send: lib.sym("ncclSend").map_err(|e| e.to_string())?,
            recv: lib.sym("ncclRecv").map_err(|e| e.to_string())?,
            all_reduce: lib.sym("ncclAllReduce").map_err(|e| e.to_string())?,
            broadcast: lib.sym("ncclBroadcast").map_err(|e| e.to_string())?,
            all_gather: lib.sym("ncclAllGather").map_err(|e| e.to_string())?,
            group_start: lib.sym("ncclGroupStart").map_err(|e| e.to_string())?,
            group_end: lib.sym("ncclGroupEnd").map_err(|e| e.to_string())?,
            version: 0,
        }
    };
    let mut api = api;
    let mut v: c_int = 0;
    // SAFETY: ncclGetVersion writes one int.
    let rc = unsafe { (api.get_version)(&mut v) };
    if rc != NCCL_SUCCESS {
        return Err(format!("{}: ncclGetVersion returned {rc}", lib.path));
    }
    // 2.19+ encodes major*10000 + minor*100 + patch. A newer NCCL reads our config by its
    // `version` field; an older one would not know the 2.28 fields.
    if v < 22800 {
        return Err(format!(
            "{}: NCCL version {v} is older than 2.28, which this build's ncclConfig_t needs \
             (set LOCKSTEP_NCCL_PATH to a 2.28+ libnccl.so.2)",
            lib.path
        ));
    }
    api.version = v;
    // The library stays loaded for the life of the process (Library never dlcloses).
    Ok(Loaded {
        api,
        path: lib.path.clone(),
    })
}

/// The NCCL API, loaded once per process. `Err(LibraryMissing)` when absent or the wrong version.
pub fn api() -> Result<&'static Api> {
    match API.get_or_init(load) {
        Ok(l) => Ok(&l.api),
        Err(e) => Err(Error::LibraryMissing(e.clone())),
    }
}

/// Path of the loaded NCCL library (for diagnoses and benchmark records).
pub fn library_path() -> Option<&'static str> {
    match API.get() {
        Some(Ok(l)) => Some(l.path.as_str()),
        _ => None,
    }
}

/// NCCL's name for a result code, e.g. `"unhandled system error"`.
pub fn error_string(api: &Api, code: c_int) -> String {
    // SAFETY: ncclGetErrorString accepts any int and returns a static C string (or null).
    let p = unsafe { (api.get_error_string)(code) };
    if p.is_null() {
        return format!("unknown NCCL result {code}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// NCCL's last error message for `comm` (may be empty).
pub(super) fn last_error(api: &Api, comm: ncclComm_t) -> String {
    // SAFETY: ncclGetLastError accepts null or a live communicator; returns a C string or null.
    let p = unsafe { (api.get_last_error)(comm) };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated; copied before any other NCCL call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Builds the `Error::Nccl` for a failed call: what, where, NCCL's string, code, last error.
pub(super) fn nccl_error(api: &Api, what: &str, code: c_int, comm: ncclComm_t) -> Error {
    let last = last_error(api, comm);
    let last = if last.is_empty() {
        String::new()
    } else {
        format!(" — {last}")
    };
    Error::Nccl(format!(
        "{what} failed: {} (ncclResult_t {code}){last}",
        error_string(api, code)
    ))
}

/// A 2.28 config with every field NCCL's default (`INT_MIN`/null) except `blocking`.
pub fn config(blocking: bool) -> ncclConfig_t {
    ncclConfig_t {
        size: std::mem::size_of::<ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        // NCCL_VERSION(2,28,3): the header version this layout was generated from.
        version: 22803,
        blocking: c_int::from(blocking),
        cgaClusterSize: CONFIG_UNDEF_INT,
        minCTAs: CONFIG_UNDEF_INT,
        maxCTAs: CONFIG_UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: CONFIG_UNDEF_INT,
        trafficClass: CONFIG_UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: CONFIG_UNDEF_INT,
        CTAPolicy: CONFIG_UNDEF_INT,
        shrinkShare: CONFIG_UNDEF_INT,
        nvlsCTAs: CONFIG_UNDEF_INT,
        nChannelsPerNetPeer: CONFIG_UNDEF_INT,
        nvlinkCentricSched: CONFIG_UNDEF_INT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_matches_nccl_2_28_header() {
        // nccl.h 2.28: size_t + 2 uint + 4 int + ptr + 2 int + ptr + 6 int = 80 bytes.
        assert_eq!(std::mem::size_of::<ncclConfig_t>(), 80);
        let c = config(false);
        assert_eq!(c.size, 80);
        assert_eq!(c.magic, 0xcafe_beef);
        assert_eq!(c.blocking, 0);
        assert_eq!(c.minCTAs, i32::MIN);
        assert_eq!(config(true).blocking, 1);
    }
}
