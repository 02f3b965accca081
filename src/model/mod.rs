//! Reference DiT model: CPU reference math (the kernels' oracle) and the tiny preset.
pub mod ops;
