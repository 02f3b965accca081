//! GPU smoke test (issue 2, item 6, kernel half): every embedded cubin loads on the GPU, and the
//! trivial kernel runs and writes what it should. Skips, printing why, without a GPU or kernels.
mod common;

use lockstep::cuda::context::{smoke_affine_f32, Gpu};
use lockstep::cuda::embedded;

#[test]
fn gpu_smoke_every_cubin_loads_and_smoke_kernel_writes_affine_ramp() {
    if common::skip_without_gpu("gpu_smoke_every_cubin_loads_and_smoke_kernel_writes_affine_ramp") {
        return;
    }
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(e) => panic!("opening GPU 0 and loading every cubin failed: {e}"),
    };
    let mut loaded = gpu.module_names();
    loaded.sort_unstable();
    let mut embedded_names: Vec<&str> = embedded::CUBINS.iter().map(|(n, _)| *n).collect();
    embedded_names.sort_unstable();
    assert_eq!(
        loaded, embedded_names,
        "every embedded cubin must be loaded"
    );
    println!(
        "loaded {} cubins on {}: {:?} (build id {})",
        loaded.len(),
        gpu.name(),
        loaded,
        embedded::KERNEL_BUILD_ID
    );

    let stream = gpu.new_stream().unwrap_or_else(|e| panic!("stream: {e}"));
    let n = 1000; // not a multiple of the block: the bound check in the kernel matters
    let mut out = stream
        .clone_htod(&vec![f32::NAN; n])
        .unwrap_or_else(|e| panic!("upload poison: {e}"));
    smoke_affine_f32(&gpu, &stream, &mut out, 0.5, -3.0).unwrap_or_else(|e| panic!("launch: {e}"));
    let host = stream
        .clone_dtoh(&out)
        .unwrap_or_else(|e| panic!("download (kernel fault?): {e}"));
    for (i, v) in host.iter().enumerate() {
        assert_eq!(*v, 0.5 * i as f32 - 3.0, "element {i}");
    }
}
