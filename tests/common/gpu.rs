//! The GPU tests' device: GPU 0, one stream, and the bf16 buffers every kernel test needs
//! (random inputs with their host copy, NaN-poisoned outputs, uploads, downloads).
use super::Rng;
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use lockstep::cuda::context::{fill_bf16, Fill, Gpu, BF16_NAN_BITS};
use std::sync::Arc;

pub struct Dev {
    pub gpu: Gpu,
    pub stream: Arc<CudaStream>,
}

/// GPU 0 and a stream, or `None` after [`super::skip_without_gpu`] (a failure instead under
/// `LOCKSTEP_REQUIRE_GPU=1`).
pub fn dev(test: &str) -> Option<Dev> {
    if super::skip_without_gpu(test) {
        return None;
    }
    let gpu = Gpu::open(0).unwrap_or_else(|e| panic!("open GPU 0: {e}"));
    let stream = gpu.new_stream().unwrap_or_else(|e| panic!("stream: {e}"));
    Some(Dev { gpu, stream })
}

impl Dev {
    /// Random bf16 in [-amp, amp) on the device, and the same values on the host as f32.
    pub fn rand(&self, n: usize, amp: f32, rng: &mut Rng) -> (CudaSlice<bf16>, Vec<f32>) {
        let mut b = self
            .stream
            .alloc_zeros::<bf16>(n)
            .unwrap_or_else(|e| panic!("alloc: {e}"));
        fill_bf16(
            &self.gpu,
            &self.stream,
            &mut b,
            Fill::Uniform {
                seed: rng.next(),
                amp,
            },
        )
        .unwrap_or_else(|e| panic!("fill: {e}"));
        let host = self.host(&b);
        (b, host)
    }

    /// Writes bf16 NaN into every element.
    pub fn poison(&self, b: &mut CudaSlice<bf16>) {
        fill_bf16(&self.gpu, &self.stream, b, Fill::Bits(BF16_NAN_BITS))
            .unwrap_or_else(|e| panic!("poison: {e}"));
    }

    /// A device buffer filled with bf16 NaN.
    pub fn poisoned(&self, n: usize) -> CudaSlice<bf16> {
        let mut b = self
            .stream
            .alloc_zeros::<bf16>(n)
            .unwrap_or_else(|e| panic!("alloc: {e}"));
        self.poison(&mut b);
        b
    }

    pub fn upload(&self, v: &[f32]) -> CudaSlice<bf16> {
        let b: Vec<bf16> = v.iter().map(|x| bf16::from_f32(*x)).collect();
        self.stream
            .clone_htod(&b)
            .unwrap_or_else(|e| panic!("upload: {e}"))
    }

    pub fn host(&self, b: &CudaSlice<bf16>) -> Vec<f32> {
        self.host_bits(b).into_iter().map(f32::from).collect()
    }

    pub fn host_bits(&self, b: &CudaSlice<bf16>) -> Vec<bf16> {
        self.stream
            .clone_dtoh(b)
            .unwrap_or_else(|e| panic!("download (kernel fault?): {e}"))
    }

    pub fn host_f32(&self, b: &CudaSlice<f32>) -> Vec<f32> {
        self.stream
            .clone_dtoh(b)
            .unwrap_or_else(|e| panic!("download (kernel fault?): {e}"))
    }
}
