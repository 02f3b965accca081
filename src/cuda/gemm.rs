//! The model's GEMMs through cuBLASLt: `y[rows, d_out] = x[rows, d_in] · Wᵀ (+ b) (+ y_old)`,
//! optionally through GELU, everything bf16 in memory with fp32 accumulation.
//!
//! Contract:
//! - `x [rows, d_in]`, `W [d_out, d_in]` (PyTorch `Linear` layout), `b [d_out]`,
//!   `y [rows, d_out]`: bf16, row-major, contiguous, 16-byte aligned, lengths exactly the shape's
//!   (checked before any cuBLASLt call; a violation is `Error::BadInput`).
//! - Compute type `CUBLAS_COMPUTE_32F`, scale type fp32 (alpha = 1; beta = 0, or 1 with
//!   `accumulate`), one bf16 rounding per output element, after the epilogue.
//! - Epilogues (cuBLASLt fuses them into the GEMM's store):
//!   no bias, no GELU → `CUBLASLT_EPILOGUE_DEFAULT`; bias → `CUBLASLT_EPILOGUE_BIAS`;
//!   GELU → `CUBLASLT_EPILOGUE_GELU`; bias + GELU → `CUBLASLT_EPILOGUE_GELU_BIAS`
//!   (`gelu(x·Wᵀ + b)`). cuBLASLt documents its GELU as the tanh approximation, i.e.
//!   `ops::gelu_tanh`; tests/gpu_gemm.rs checks that numerically (and prints how far the exact
//!   erf GELU is).
//! - `accumulate` (beta = 1, C = D = y, in place): `y = x·Wᵀ + b + y_old` (bias and accumulate
//!   combine: cuBLASLt adds the bias in the epilogue to `alpha·A·B + beta·C`). Without
//!   `accumulate`, beta = 0 and cuBLASLt does not read `y` (the tests poison it with NaN).
//!   GELU with `accumulate` is refused (`BadInput`): cuBLASLt's epilogue acts on the whole
//!   `alpha·A·B + beta·C` sum, i.e. `gelu(x·Wᵀ + b + y_old)`, which is no residual add; the
//!   model never needs it.
//! - Row-major on our side, column-major in cuBLASLt, no data transposed. A row-major `[r, c]`
//!   buffer is, byte for byte, the column-major `c × r` matrix with leading dimension `c`:
//!   `x` is `xᵀ` (`d_in × rows`, ld `d_in`), `W` is `Wᵀ` (`d_in × d_out`, ld `d_in`), `y` is
//!   `yᵀ` (`d_out × rows`, ld `d_out`). `y = x·Wᵀ` ⇔ `yᵀ = W·xᵀ`, so cuBLASLt computes
//!   `D = op(A)·op(B)` with `m = d_out, n = rows, k = d_in`; `A` = the W buffer, layout
//!   `d_in × d_out` (ld `d_in`), `op(A) = T`; `B` = the x buffer, layout `d_in × rows`
//!   (ld `d_in`), `op(B) = N`; `C = D` = the y buffer, layout `d_out × rows` (ld `d_out`). That is
//!   the "TN" GEMM, both operands K-major (the form Hopper's tensor-core kernels read natively).
//!   cuBLASLt's bias has one entry per row of D (`m = d_out`), broadcast over its columns
//!   (`n = rows`): exactly `b[d_out]` broadcast over tokens.
//! - One `Gemm` owns one cuBLASLt handle and one 32 MiB workspace and is bound to one stream:
//!   every call enqueues on that stream. The matmul descriptor, the four layouts and the
//!   algorithm are cached per (shape, bias?, epilogue, accumulate): the first call of a key runs
//!   the heuristic (host only; counted by `heuristic_queries`), every later call of that key is
//!   one `cublasLtMatmul` and nothing else (no heuristic, no allocation, no synchronization), so
//!   the calls are CUDA-graph capturable once each key has been seen (`prepare` does that
//!   without running a GEMM). `Ok` means enqueued, not finished
//!   (docs/manual/cuda-async-execution.md).
//! - Every cuBLASLt status is an `Error::Cuda` naming the function, the call (shape, epilogue)
//!   and cuBLASLt's own status name and string. A missing libcublasLt is
//!   `Error::LibraryMissing` at `Gemm::new` (cudarc's loader would panic; it is never reached).
//!
//! Tripwires:
//! - The heuristic is asked for algorithms that work with 16-byte-aligned A, B, C, D
//!   (`CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES = 16`; cuBLASLt's default assumes 256), so a
//!   cached algorithm stays valid for any buffer `linear` accepts, views at an offset included.
//! - The workspace is shared by every call of one `Gemm`: the calls are ordered because they all
//!   go to its one stream. Two replays of graphs captured from one `Gemm` must not run
//!   concurrently; give each concurrent stream its own `Gemm`.
//! - The bias pointer lives in the cached descriptor and is set on every call (a host-side
//!   attribute write, captured by value at enqueue), so a cached plan never keeps a stale bias.
//! - Bitwise reproducibility of repeated calls is what cuBLASLt gives for one algorithm on one
//!   GPU model; tests/gpu_gemm.rs checks it on the model's shapes.
use crate::cuda::context::{check_aligned16, check_len, cuda_err, dptr, dptr_mut, EventTimer, Gpu};
use crate::cuda::context::{fill_bf16, Fill};
use crate::cuda::probe::Library;
use crate::{Error, Result};
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::fmt;
use std::sync::Arc;

/// cuBLASLt's workspace on Hopper (NVIDIA's recommendation for sm_90: 32 MiB).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// Alignment (bytes) the cached algorithms are chosen for; `linear` rejects less.
const MIN_ALIGNMENT: u32 = 16;

/// `cublasOperation_t` values (the cuBLASLt bindings do not carry the enum).
const OP_N: i32 = 0;
const OP_T: i32 = 1;

/// Rows (tokens), input and output features of one `y = x·Wᵀ + b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub rows: usize,
    pub d_in: usize,
    pub d_out: usize,
}

impl GemmShape {
    /// Floating-point operations of the product (2·rows·d_in·d_out; the epilogue not counted).
    pub fn flops(&self) -> f64 {
        2.0 * self.rows as f64 * self.d_in as f64 * self.d_out as f64
    }

    fn check(&self) -> Result<()> {
        let ok = self.rows > 0
            && self.d_in > 0
            && self.d_out > 0
            && self.rows.checked_mul(self.d_in).is_some()
            && self.rows.checked_mul(self.d_out).is_some()
            && self.d_in.checked_mul(self.d_out).is_some()
            && i64::try_from(self.d_in.max(self.d_out)).is_ok();
        if ok {
            Ok(())
        } else {
            Err(Error::BadInput(format!(
                "gemm: shape {self} (every dimension >= 1, element counts within usize)"
            )))
        }
    }
}

impl fmt::Display for GemmShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} x {} -> {}]", self.rows, self.d_in, self.d_out)
    }
}

/// What the GEMM's epilogue applies after the bias (if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    None,
    /// GELU, tanh approximation (`ops::gelu_tanh`).
    Gelu,
}

/// One cached plan's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    shape: GemmShape,
    bias: bool,
    epilogue: Epilogue,
    accumulate: bool,
}

impl fmt::Display for PlanKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gemm {}", self.shape)?;
        if self.bias {
            f.write_str(" +bias")?;
        }
        if self.epilogue == Epilogue::Gelu {
            f.write_str(" gelu")?;
        }
        if self.accumulate {
            f.write_str(" +=y")?;
        }
        Ok(())
    }
}

impl PlanKey {
    fn lt_epilogue(&self) -> sys::cublasLtEpilogue_t {
        use sys::cublasLtEpilogue_t as E;
        match (self.bias, self.epilogue) {
            (false, Epilogue::None) => E::CUBLASLT_EPILOGUE_DEFAULT,
            (true, Epilogue::None) => E::CUBLASLT_EPILOGUE_BIAS,
            (false, Epilogue::Gelu) => E::CUBLASLT_EPILOGUE_GELU,
            (true, Epilogue::Gelu) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
        }
    }
}

/// cuBLASLt's own name and description of a status.
pub fn status_text(st: sys::cublasStatus_t) -> String {
    // SAFETY: only reached after a cuBLASLt call returned `st`, so the library is loaded; both
    // functions return null or a pointer to a static NUL-terminated string.
    let (name, text) = unsafe {
        (
            sys::cublasLtGetStatusName(st),
            sys::cublasLtGetStatusString(st),
        )
    };
    let read = |p: *const std::ffi::c_char| {
        if p.is_null() {
            None
        } else {
            // SAFETY: non-null, static, NUL-terminated (see above).
            Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        }
    };
    match (read(name), read(text)) {
        (Some(n), Some(t)) => format!("{n} ({t})"),
        (Some(n), None) => n,
        _ => format!("{st:?}"),
    }
}

/// Maps a cuBLASLt status to ours, keeping the library's status name and string.
pub fn lt_err(what: impl fmt::Display, e: CublasError) -> Error {
    Error::Cuda(format!("{what}: {}", status_text(e.0)))
}

/// A matrix layout, destroyed on drop.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    /// Column-major bf16 `rows × cols` with leading dimension `ld`.
    fn bf16(what: &PlanKey, rows: usize, cols: usize, ld: usize) -> Result<Layout> {
        let raw = lt::create_matrix_layout(
            sys::cudaDataType_t::CUDA_R_16BF,
            rows as u64,
            cols as u64,
            ld as i64,
        )
        .map_err(|e| {
            lt_err(
                format!("{what}: cublasLtMatrixLayoutCreate({rows}x{cols}, ld {ld})"),
                e,
            )
        })?;
        Ok(Layout(raw))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: self.0 came from cublasLtMatrixLayoutCreate and is destroyed once.
        if let Err(e) = unsafe { lt::destroy_matrix_layout(self.0) } {
            crate::diag!("gemm: cublasLtMatrixLayoutDestroy: {}", status_text(e.0));
        }
    }
}

/// A matmul descriptor, destroyed on drop.
struct Desc(sys::cublasLtMatmulDesc_t);

impl Desc {
    /// Sets one attribute from a plain value.
    ///
    /// # Safety
    /// `T` must be the type cuBLASLt documents for `attr` (int32 for enums and transposes,
    /// uint32 for the epilogue, a device pointer for pointers).
    unsafe fn set<T: Copy>(
        &self,
        what: &dyn fmt::Display,
        attr: sys::cublasLtMatmulDescAttributes_t,
        value: T,
    ) -> Result<()> {
        // SAFETY: self.0 is live; value outlives the call and has the documented type (caller).
        unsafe {
            lt::set_matmul_desc_attribute(
                self.0,
                attr,
                &value as *const T as *const c_void,
                std::mem::size_of::<T>(),
            )
        }
        .map_err(|e| {
            lt_err(
                format!("{what}: cublasLtMatmulDescSetAttribute({attr:?})"),
                e,
            )
        })
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: self.0 came from cublasLtMatmulDescCreate and is destroyed once.
        if let Err(e) = unsafe { lt::destroy_matmul_desc(self.0) } {
            crate::diag!("gemm: cublasLtMatmulDescDestroy: {}", status_text(e.0));
        }
    }
}

/// A heuristic preference, destroyed on drop.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Pref {
    /// # Safety
    /// `T` must be the type cuBLASLt documents for `attr` (uint64 for the workspace size,
    /// uint32 for the alignments).
    unsafe fn set<T: Copy>(
        &self,
        what: &dyn fmt::Display,
        attr: sys::cublasLtMatmulPreferenceAttributes_t,
        value: T,
    ) -> Result<()> {
        // SAFETY: self.0 is live; value outlives the call and has the documented type (caller).
        unsafe {
            lt::set_matmul_pref_attribute(
                self.0,
                attr,
                &value as *const T as *const c_void,
                std::mem::size_of::<T>(),
            )
        }
        .map_err(|e| {
            lt_err(
                format!("{what}: cublasLtMatmulPreferenceSetAttribute({attr:?})"),
                e,
            )
        })
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: self.0 came from cublasLtMatmulPreferenceCreate and is destroyed once.
        if let Err(e) = unsafe { lt::destroy_matmul_pref(self.0) } {
            crate::diag!(
                "gemm: cublasLtMatmulPreferenceDestroy: {}",
                status_text(e.0)
            );
        }
    }
}

/// Everything one `cublasLtMatmul` of a key needs besides the pointers.
struct Plan {
    desc: Desc,
    a: Layout,
    b: Layout,
    cd: Layout,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// cuBLASLt handle + workspace + plan cache, bound to one stream (see the module contract).
pub struct Gemm {
    // Field order is drop order: plans (descriptors, layouts) before the handle they were made
    // with, the workspace last.
    plans: HashMap<PlanKey, Plan>,
    handle: LtHandle,
    /// Owned for its address only (freed, stream-ordered, after every call enqueued before).
    _workspace: CudaSlice<u8>,
    /// Device address of the workspace, taken once: only this Gemm's stream ever uses it.
    workspace_ptr: u64,
    stream: Arc<CudaStream>,
    heuristic_queries: u64,
    version: usize,
    library: String,
}

/// The cuBLASLt handle, destroyed on drop (after every plan made with it).
struct LtHandle(sys::cublasLtHandle_t);

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: self.0 came from cublasLtCreate and is destroyed once.
        if let Err(e) = unsafe { lt::destroy_handle(self.0) } {
            crate::diag!("gemm: cublasLtDestroy: {}", status_text(e.0));
        }
    }
}

// SAFETY: cuBLASLt handles, descriptors and layouts may be used from any thread as long as calls
// do not overlap, which `&mut self` on every call guarantees; the context is bound to the calling
// thread before each cuBLASLt call. Not Sync: nothing is gained by sharing one.
unsafe impl Send for Gemm {}

impl Gemm {
    /// Loads cuBLASLt (a missing library is `LibraryMissing`, never cudarc's panic), creates the
    /// handle and the 32 MiB workspace on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Result<Gemm> {
        let lib = Library::open_first("cuBLASLt", &cudarc::get_lib_name_candidates("cublasLt"))?;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let raw = lt::create_handle().map_err(|e| lt_err("cublasLtCreate", e))?;
        let handle = LtHandle(raw);
        // SAFETY: the library is loaded (above); cublasLtGetVersion has no preconditions.
        let version = unsafe { sys::cublasLtGetVersion() };
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).map_err(|e| {
            cuda_err(
                format!("cuMemAlloc(cuBLASLt workspace, {WORKSPACE_BYTES} B)"),
                e,
            )
        })?;
        let (workspace_ptr, guard) = dptr(&workspace, &stream);
        drop(guard);
        Ok(Gemm {
            plans: HashMap::new(),
            handle,
            _workspace: workspace,
            workspace_ptr,
            stream,
            heuristic_queries: 0,
            version,
            library: lib.path,
        })
    }

    /// The stream every call enqueues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// cuBLASLt's version (`cublasLtGetVersion`, e.g. 130100 for 13.1.0) and the library name
    /// that loaded.
    pub fn library(&self) -> (usize, &str) {
        (self.version, &self.library)
    }

    /// How many heuristic queries ran (one per new plan key; a repeated key runs none).
    pub fn heuristic_queries(&self) -> u64 {
        self.heuristic_queries
    }

    /// How many plans are cached.
    pub fn cached_plans(&self) -> usize {
        self.plans.len()
    }

    /// Builds (or finds) the plan of a key without running a GEMM: call it for every shape
    /// before capturing a CUDA graph.
    pub fn prepare(
        &mut self,
        shape: GemmShape,
        bias: bool,
        epilogue: Epilogue,
        accumulate: bool,
    ) -> Result<()> {
        let key = PlanKey {
            shape,
            bias,
            epilogue,
            accumulate,
        };
        Self::check_key(&key)?;
        self.plan(key).map(|_| ())
    }

    fn check_key(key: &PlanKey) -> Result<()> {
        key.shape.check()?;
        if key.accumulate && key.epilogue == Epilogue::Gelu {
            return Err(Error::BadInput(format!(
                "{key}: GELU with accumulate would compute gelu(x·Wᵀ + b + y_old) (cuBLASLt \
                 applies the epilogue after adding y); not supported"
            )));
        }
        Ok(())
    }

    /// The cached plan of `key`, made (one heuristic query) on first use.
    fn plan(&mut self, key: PlanKey) -> Result<&mut Plan> {
        if !self.plans.contains_key(&key) {
            let p = self.make_plan(&key)?;
            self.plans.insert(key, p);
        }
        self.plans
            .get_mut(&key)
            .ok_or_else(|| Error::Invariant(format!("{key}: plan missing right after insert")))
    }

    fn make_plan(&mut self, key: &PlanKey) -> Result<Plan> {
        let GemmShape { rows, d_in, d_out } = key.shape;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(|e| lt_err(format!("{key}: cublasLtMatmulDescCreate"), e))?,
        );
        use sys::cublasLtMatmulDescAttributes_t as D;
        // SAFETY: each value has the type cuBLASLt documents for its attribute: TRANSA/TRANSB
        // int32 (cublasOperation_t), EPILOGUE uint32 (cublasLtEpilogue_t), BIAS_DATA_TYPE int32
        // (cudaDataType).
        unsafe {
            desc.set(key, D::CUBLASLT_MATMUL_DESC_TRANSA, OP_T)?;
            desc.set(key, D::CUBLASLT_MATMUL_DESC_TRANSB, OP_N)?;
            desc.set(
                key,
                D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                key.lt_epilogue() as u32,
            )?;
            if key.bias {
                desc.set(
                    key,
                    D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    sys::cudaDataType_t::CUDA_R_16BF as i32,
                )?;
            }
        }
        // See the module contract for the mapping: A = W (k × m, op T), B = x (k × n, op N),
        // C = D = y (m × n), m = d_out, n = rows, k = d_in.
        let a = Layout::bf16(key, d_in, d_out, d_in)?;
        let b = Layout::bf16(key, d_in, rows, d_in)?;
        let cd = Layout::bf16(key, d_out, rows, d_out)?;

        let pref = Pref(
            lt::create_matmul_pref()
                .map_err(|e| lt_err(format!("{key}: cublasLtMatmulPreferenceCreate"), e))?,
        );
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        // SAFETY: MAX_WORKSPACE_BYTES is uint64, the MIN_ALIGNMENT_* attributes uint32.
        unsafe {
            pref.set(
                key,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                WORKSPACE_BYTES as u64,
            )?;
            for attr in [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                pref.set(key, attr, MIN_ALIGNMENT)?;
            }
        }

        let mut results =
            [std::mem::MaybeUninit::<sys::cublasLtMatmulHeuristicResult_t>::uninit(); 4];
        let mut count: i32 = 0;
        self.heuristic_queries += 1;
        // SAFETY: handle, desc, layouts and pref are live; results has room for 4 entries and
        // count receives how many were written.
        let st = unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle.0,
                desc.0,
                a.0,
                b.0,
                cd.0,
                cd.0,
                pref.0,
                results.len() as i32,
                results.as_mut_ptr() as *mut sys::cublasLtMatmulHeuristicResult_t,
                &mut count,
            )
        };
        st.result()
            .map_err(|e| lt_err(format!("{key}: cublasLtMatmulAlgoGetHeuristic"), e))?;
        let n = usize::try_from(count).unwrap_or(0).min(results.len());
        // SAFETY: cuBLASLt wrote the first `count` entries.
        let found: Vec<sys::cublasLtMatmulHeuristicResult_t> = results[..n]
            .iter()
            .map(|r| unsafe { r.assume_init() })
            .collect();
        let Some(best) = found.iter().find(|r| {
            r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && r.workspaceSize <= WORKSPACE_BYTES
        }) else {
            let states: Vec<String> = found.iter().map(|r| status_text(r.state)).collect();
            return Err(Error::Cuda(format!(
                "{key}: cublasLtMatmulAlgoGetHeuristic found no algorithm (bf16, compute 32F, \
                 epilogue {:?}, {MIN_ALIGNMENT}-byte alignment, {WORKSPACE_BYTES} B workspace; \
                 {n} candidate(s) {states:?}): CUBLAS_STATUS_NOT_SUPPORTED",
                key.lt_epilogue()
            )));
        };
        Ok(Plan {
            desc,
            a,
            b,
            cd,
            algo: best.algo,
        })
    }

    /// Enqueues `y = x·Wᵀ (+ b) (+ y)` (through GELU with `Epilogue::Gelu`) on this Gemm's
    /// stream. `x [rows, d_in]`, `w [d_out, d_in]`, `bias [d_out]`, `y [rows, d_out]`, bf16
    /// row-major contiguous, 16-byte aligned. See the module contract.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &mut self,
        shape: GemmShape,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        bias: Option<&dyn DevicePtr<bf16>>,
        y: &mut impl DevicePtrMut<bf16>,
        epilogue: Epilogue,
        accumulate: bool,
    ) -> Result<()> {
        let key = PlanKey {
            shape,
            bias: bias.is_some(),
            epilogue,
            accumulate,
        };
        Self::check_key(&key)?;
        let GemmShape { rows, d_in, d_out } = shape;
        let desc = key.to_string();
        let dims = |r: usize, c: usize| format!("[{r}, {c}]");
        check_len(
            &format!("{desc}: x"),
            x.len(),
            rows * d_in,
            &dims(rows, d_in),
        )?;
        check_len(
            &format!("{desc}: w"),
            w.len(),
            d_out * d_in,
            &dims(d_out, d_in),
        )?;
        if let Some(b) = bias {
            check_len(
                &format!("{desc}: bias"),
                b.len(),
                d_out,
                &format!("[{d_out}]"),
            )?;
        }
        check_len(
            &format!("{desc}: y"),
            y.len(),
            rows * d_out,
            &dims(rows, d_out),
        )?;

        let stream = self.stream.clone();
        let (xp, _gx) = dptr(x, &stream);
        let (wp, _gw) = dptr(w, &stream);
        let bias_ptr = bias.map(|b| b.device_ptr(&stream));
        let (yp, _gy) = dptr_mut(y, &stream);
        check_aligned16(&format!("{desc}: x"), xp)?;
        check_aligned16(&format!("{desc}: w"), wp)?;
        if let Some((bp, _)) = &bias_ptr {
            check_aligned16(&format!("{desc}: bias"), *bp)?;
        }
        check_aligned16(&format!("{desc}: y"), yp)?;

        let handle = self.handle.0;
        let (ws, ws_len) = (self.workspace_ptr, WORKSPACE_BYTES);
        let plan = self.plan(key)?;
        if let Some((bp, _)) = &bias_ptr {
            // SAFETY: BIAS_POINTER is a device pointer (void*); bp holds d_out bf16 (checked).
            unsafe {
                plan.desc.set(
                    &desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    *bp,
                )?;
            }
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind context", e))?;
        let alpha: f32 = 1.0;
        let beta: f32 = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: handle, descriptor, layouts and algorithm are live and were made for exactly
        // this key; x, w, bias and y hold the element counts the layouts describe (checked
        // above), are 16-byte aligned as the algorithm was chosen for, and their cudarc guards
        // stay alive until after the enqueue; C = D = y with one layout (in place, read only
        // when beta = 1); alpha/beta are host fp32 (the default pointer mode, scale type 32F),
        // read at enqueue; the workspace is WORKSPACE_BYTES on this stream.
        let r = unsafe {
            lt::matmul(
                handle,
                plan.desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                wp as *const c_void,
                plan.a.0,
                xp as *const c_void,
                plan.b.0,
                yp as *const c_void,
                plan.cd.0,
                yp as *mut c_void,
                plan.cd.0,
                &plan.algo,
                ws as *mut c_void,
                ws_len,
                stream.cu_stream() as sys::cudaStream_t,
            )
        };
        drop(bias_ptr);
        r.map_err(|e| lt_err(format!("{desc}: cublasLtMatmul"), e))
    }
}

/// One benchmarked case: a shape, whether it carries a bias, and its epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmCase {
    pub shape: GemmShape,
    pub bias: bool,
    pub epilogue: Epilogue,
}

/// Bytes the buffers of all rotated sets together should exceed, so that no set is still in L2
/// (50 MB on H100, 60 MB on H200) when it comes round again.
const ROTATE_BYTES: usize = 256 << 20;
const MAX_SETS: usize = 64;

/// Times each case on a fresh stream and `Gemm`: per case, enough input/output sets (random
/// bf16, never zeros) that together they exceed 256 MiB (at most 64 sets), a warm-up pass over
/// all sets (plans made, clocks up), then `iters` samples, each one CUDA-event-timed pass over
/// all sets back to back. Returns (case, median ms per call, TFLOP/s at that median), in order.
/// Each call's time includes its epilogue; queueing is back to back, so the figure is the
/// per-call floor of a stream that is kept full (no host launch gap).
pub fn bench_shapes(
    gpu: &Gpu,
    cases: &[GemmCase],
    iters: usize,
) -> Result<Vec<(GemmCase, f64, f64)>> {
    if iters == 0 {
        return Err(Error::BadInput("gemm bench: iters must be >= 1".into()));
    }
    let stream = gpu.new_stream()?;
    let mut gemm = Gemm::new(stream.clone())?;
    let timer = EventTimer::new(gpu)?;
    let mut out = Vec::with_capacity(cases.len());
    for (ci, case) in cases.iter().enumerate() {
        let GemmShape { rows, d_in, d_out } = case.shape;
        case.shape.check()?;
        let set_bytes = 2 * (rows * d_in + d_out * d_in + d_out + rows * d_out);
        let nsets = ROTATE_BYTES.div_ceil(set_bytes).clamp(1, MAX_SETS);
        let rand = |n: usize, seed: u64, amp: f32| -> Result<CudaSlice<bf16>> {
            let mut b = stream
                .alloc_zeros::<bf16>(n)
                .map_err(|e| cuda_err(format!("gemm bench: alloc {n} bf16"), e))?;
            fill_bf16(gpu, &stream, &mut b, Fill::Uniform { seed, amp })?;
            Ok(b)
        };
        let w_amp = 3.0 / (d_in as f32).sqrt();
        let mut sets = Vec::with_capacity(nsets);
        for s in 0..nsets {
            let seed = ((ci as u64) << 32) ^ ((s as u64) << 8);
            sets.push((
                rand(rows * d_in, seed + 1, 1.0)?,
                rand(d_out * d_in, seed + 2, w_amp)?,
                rand(d_out, seed + 3, 0.5)?,
                rand(rows * d_out, seed + 4, 1.0)?,
            ));
        }
        let mut pass = |gemm: &mut Gemm| -> Result<()> {
            for (x, w, b, y) in sets.iter_mut() {
                let bias: Option<&dyn DevicePtr<bf16>> = if case.bias { Some(&*b) } else { None };
                gemm.linear(case.shape, &*x, &*w, bias, y, case.epilogue, false)?;
            }
            Ok(())
        };
        pass(&mut gemm)?;
        pass(&mut gemm)?;
        let mut samples = Vec::with_capacity(iters);
        for _ in 0..iters {
            timer.start(&stream)?;
            pass(&mut gemm)?;
            samples.push(f64::from(timer.stop_ms(&stream)?) / nsets as f64);
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let ms = samples[samples.len() / 2];
        let tflops = case.shape.flops() / (ms * 1e-3) / 1e12;
        out.push((*case, ms, tflops));
    }
    stream
        .synchronize()
        .map_err(|e| cuda_err("gemm bench: cuStreamSynchronize", e))?;
    Ok(out)
}
