//! Library presence and device inventory without panics.
//!
//! cudarc's dynamic loader panics when a library is absent, so presence is checked here first
//! with `dlopen`, and the handful of calls `doctor` needs are made through `dlsym` directly.
//! NCCL is looked up as `$LOCKSTEP_NCCL_PATH`, then the official soname `libnccl.so.2`, then
//! `libnccl.so` (the PyPI wheel ships only `.so.2`; some system installs only `.so`).
use crate::{Error, Result};
use serde::Serialize;
use std::ffi::{c_char, c_int, c_void, CStr, CString};

/// A `dlopen`ed library kept open for the life of the process (never closed: CUDA and NCCL do
/// not support being unloaded while in use).
#[derive(Debug)]
pub struct Library {
    handle: *mut c_void,
    pub path: String,
}

// SAFETY: the dlopen handle is only passed to dlsym, which is thread-safe; it is never freed
// while shared.
unsafe impl Send for Library {}
// SAFETY: as for Send: shared use is dlsym only.
unsafe impl Sync for Library {}

impl Library {
    /// Opens the first candidate that loads; the error lists every candidate and dlerror().
    pub fn open_first(what: &str, candidates: &[String]) -> Result<Library> {
        let mut tried = Vec::new();
        for c in candidates {
            let Ok(cs) = CString::new(c.as_str()) else {
                continue;
            };
            // SAFETY: cs is a valid C string; RTLD_NOW|RTLD_GLOBAL is a valid flag set.
            let h = unsafe { libc::dlopen(cs.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !h.is_null() {
                return Ok(Library {
                    handle: h,
                    path: c.clone(),
                });
            }
            // SAFETY: dlerror returns null or a valid C string owned by libc.
            let e = unsafe { libc::dlerror() };
            let msg = if e.is_null() {
                "unknown".to_owned()
            } else {
                // SAFETY: non-null dlerror result is a NUL-terminated string.
                unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
            };
            tried.push(format!("{c}: {msg}"));
        }
        Err(Error::LibraryMissing(format!(
            "{what}: tried {}",
            tried.join("; ")
        )))
    }

    /// Looks up a symbol.
    ///
    /// # Safety
    /// `T` must be the exact function-pointer type of the symbol `name`.
    pub unsafe fn sym<T: Copy>(&self, name: &str) -> Result<T> {
        assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
        let cs = CString::new(name).map_err(|_| Error::BadInput(format!("symbol {name}")))?;
        // SAFETY: handle came from a successful dlopen; cs is a valid C string.
        let p = unsafe { libc::dlsym(self.handle, cs.as_ptr()) };
        if p.is_null() {
            return Err(Error::LibraryMissing(format!(
                "{} lacks symbol {name}",
                self.path
            )));
        }
        // SAFETY: caller guarantees T is the symbol's function-pointer type; sizes match.
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
    }
}

/// The NCCL candidates, in lookup order.
pub fn nccl_candidates() -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("LOCKSTEP_NCCL_PATH") {
        if !p.is_empty() {
            v.push(p);
        }
    }
    v.push("libnccl.so.2".to_owned());
    v.push("libnccl.so".to_owned());
    v
}

pub fn cuda_candidates() -> Vec<String> {
    vec!["libcuda.so.1".to_owned(), "libcuda.so".to_owned()]
}

#[derive(Clone, Debug, Serialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DriverInfo {
    pub library: String,
    /// e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
    pub gpus: Vec<GpuInfo>,
}

type CuInit = unsafe extern "C" fn(u32) -> c_int;
type CuDriverGetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;

const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;

fn cu_check(what: &str, rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Cuda(format!("{what} returned CUresult {rc}")))
    }
}

/// Loads libcuda, initialises the driver and lists the GPUs.
pub fn driver_info() -> Result<DriverInfo> {
    let lib = Library::open_first("CUDA driver", &cuda_candidates())?;
    // SAFETY: the types below are the documented signatures of these driver entry points.
    unsafe {
        let init: CuInit = lib.sym("cuInit")?;
        let ver: CuDriverGetVersion = lib.sym("cuDriverGetVersion")?;
        let count: CuDeviceGetCount = lib.sym("cuDeviceGetCount")?;
        let get: CuDeviceGet = lib.sym("cuDeviceGet")?;
        let name: CuDeviceGetName = lib.sym("cuDeviceGetName")?;
        let attr: CuDeviceGetAttribute = lib.sym("cuDeviceGetAttribute")?;
        let mem: CuDeviceTotalMem = lib.sym("cuDeviceTotalMem_v2")?;
        cu_check("cuInit", init(0))?;
        let mut v = 0;
        cu_check("cuDriverGetVersion", ver(&mut v))?;
        let mut n = 0;
        cu_check("cuDeviceGetCount", count(&mut n))?;
        let mut gpus = Vec::new();
        for i in 0..n {
            let mut dev = 0;
            cu_check("cuDeviceGet", get(&mut dev, i))?;
            let mut buf = [0 as c_char; 256];
            cu_check("cuDeviceGetName", name(buf.as_mut_ptr(), 256, dev))?;
            let nm = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
            let (mut ma, mut mi) = (0, 0);
            cu_check(
                "cuDeviceGetAttribute",
                attr(&mut ma, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
            )?;
            cu_check(
                "cuDeviceGetAttribute",
                attr(&mut mi, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
            )?;
            let mut bytes = 0usize;
            cu_check("cuDeviceTotalMem", mem(&mut bytes, dev))?;
            gpus.push(GpuInfo {
                index: i as u32,
                name: nm,
                compute_capability: (ma, mi),
                memory_bytes: bytes as u64,
            });
        }
        Ok(DriverInfo {
            library: lib.path.clone(),
            driver_version: v,
            gpus,
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct NcclInfo {
    pub library: String,
    /// e.g. 22803 for 2.28.3.
    pub version: i32,
}

type NcclGetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;

/// Loads NCCL (see module docs for the lookup order) and reads its version.
pub fn nccl_info() -> Result<NcclInfo> {
    let lib = Library::open_first("NCCL", &nccl_candidates())?;
    // SAFETY: ncclGetVersion(int*) -> ncclResult_t.
    unsafe {
        let f: NcclGetVersion = lib.sym("ncclGetVersion")?;
        let mut v = 0;
        let rc = f(&mut v);
        if rc != 0 {
            return Err(Error::Nccl(format!("ncclGetVersion returned {rc}")));
        }
        Ok(NcclInfo {
            library: lib.path.clone(),
            version: v,
        })
    }
}

/// True if a CUDA driver loads and reports at least one GPU.
pub fn gpu_available() -> bool {
    driver_info().is_ok_and(|d| !d.gpus.is_empty())
}

/// The GPU a rank uses: `LOCKSTEP_GPU` if set, else `local_rank mod #GPUs` (the NCCL plane and
/// the GPU generator use the same rule, so a rank's kernels and its communicators share a GPU).
pub fn rank_gpu_ordinal(local_rank: u32) -> crate::Result<usize> {
    let n = driver_info()?.gpus.len();
    if n == 0 {
        return Err(crate::Error::BadInput("no GPU visible to this rank".into()));
    }
    match std::env::var("LOCKSTEP_GPU") {
        Ok(v) => v
            .parse::<usize>()
            .map_err(|_| crate::Error::BadInput(format!("LOCKSTEP_GPU={v:?} is not a number"))),
        Err(_) => Ok(local_rank as usize % n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_an_error_value_not_a_panic() {
        let r = Library::open_first("nothing", &["liblockstep-does-not-exist.so.9".to_owned()]);
        match r {
            Err(Error::LibraryMissing(m)) => {
                assert!(m.contains("liblockstep-does-not-exist.so.9"), "{m}")
            }
            other => panic!("expected LibraryMissing, got {other:?}"),
        }
    }

    #[test]
    fn nccl_lookup_honours_explicit_path_then_official_soname() {
        // Only inspects the candidate list (env is process-global; this test sets nothing).
        let c = nccl_candidates();
        let i2 = c.iter().position(|s| s == "libnccl.so.2");
        let i0 = c.iter().position(|s| s == "libnccl.so");
        assert!(i2.is_some() && i0.is_some() && i2 < i0, "{c:?}");
    }
}
