//! Reference DiT model: CPU reference math (the kernels' oracle), the TP comm trait, the
//! Wan-style causal DiT on the CPU, and the model presets (docs/spec.md §11).
//!
//! Presets: `tiny` runs on the CPU in CI; `wan-1.3b` and `wan-14b` are geometry-only
//! descriptors (what the GPU path sizes itself by). The tiny preset departs from Wan in size
//! only, and in one documented place: it cross-attends to 32 text tokens of width 64 (Wan: 512
//! tokens of T5 width 4096), because the text encoder is outside this project and random text
//! features of that size cost CI time without testing anything new.
pub mod dit;
pub mod gpu;
pub mod ops;
pub mod tp;
pub mod weights;

use crate::{Error, Result};

/// Geometry of a Wan-style causal DiT and of its streaming schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct DitConfig {
    pub name: &'static str,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    /// VAE latent channels; patch (1, 2, 2) makes a token of `latent_channels · 4` features.
    pub latent_channels: usize,
    /// Patch grid per latent frame (tokens per frame = grid_h · grid_w).
    pub grid_h: usize,
    pub grid_w: usize,
    pub frames_per_chunk: usize,
    pub text_tokens: usize,
    pub text_dim: usize,
    /// Width of the sinusoidal timestep embedding.
    pub freq_dim: usize,
    pub sink_frames: u32,
    pub window_frames: u32,
    pub denoise_timesteps: Vec<u32>,
    pub eps: f32,
}

impl DitConfig {
    pub fn tiny() -> Self {
        Self {
            name: "tiny",
            dim: 128,
            layers: 2,
            heads: 4,
            head_dim: 32,
            ffn_dim: 384,
            latent_channels: 16,
            grid_h: 8,
            grid_w: 8,
            frames_per_chunk: 3,
            text_tokens: 32,
            text_dim: 64,
            freq_dim: 64,
            sink_frames: 3,
            window_frames: 6,
            denoise_timesteps: vec![1000, 750, 500, 250],
            eps: 1e-6,
        }
    }

    /// Wan 2.1 T2V 1.3B at 480×832 (geometry only: the CPU model does not run it).
    pub fn wan_1_3b() -> Self {
        Self {
            name: "wan-1.3b",
            dim: 1536,
            layers: 30,
            heads: 12,
            head_dim: 128,
            ffn_dim: 8960,
            latent_channels: 16,
            grid_h: 30,
            grid_w: 52,
            frames_per_chunk: 3,
            text_tokens: 512,
            text_dim: 4096,
            freq_dim: 256,
            sink_frames: 3,
            window_frames: 18,
            denoise_timesteps: vec![1000, 750, 500, 250],
            eps: 1e-6,
        }
    }

    /// Wan 2.1 T2V 14B at 480×832 (geometry only).
    pub fn wan_14b() -> Self {
        Self {
            name: "wan-14b",
            dim: 5120,
            layers: 40,
            heads: 40,
            head_dim: 128,
            ffn_dim: 13824,
            ..Self::wan_1_3b()
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "wan-1.3b" => Ok(Self::wan_1_3b()),
            "wan-14b" => Ok(Self::wan_14b()),
            _ => Err(Error::BadInput(format!(
                "unknown model preset {name:?} (known: tiny, wan-1.3b, wan-14b)"
            ))),
        }
    }

    /// The same geometry with `layers` blocks instead of the preset's (e.g. a 2-layer
    /// `wan-1.3b` for checks against another implementation); `None` keeps the preset's.
    pub fn with_layers(mut self, layers: Option<usize>) -> Result<Self> {
        if let Some(n) = layers {
            if n == 0 || n > 1024 {
                return Err(Error::BadInput(format!(
                    "--layers {n}: must be in 1..=1024"
                )));
            }
            self.layers = n;
        }
        Ok(self)
    }

    pub fn tokens_per_frame(&self) -> usize {
        self.grid_h * self.grid_w
    }
    pub fn tokens_per_chunk(&self) -> usize {
        self.tokens_per_frame() * self.frames_per_chunk
    }
    /// Features per token: latent channels × patch (1, 2, 2).
    pub fn in_dim(&self) -> usize {
        self.latent_channels * 4
    }
    /// Latent frame height/width (patch 2 × 2).
    pub fn latent_hw(&self) -> (usize, usize) {
        (self.grid_h * 2, self.grid_w * 2)
    }

    /// Whether TP degree `tp` divides the heads and the FFN (Megatron sharding).
    pub fn check_tp(&self, tp: u32) -> Result<()> {
        let t = tp as usize;
        if t == 0 || self.heads % t != 0 || self.ffn_dim % t != 0 {
            return Err(Error::BadInput(format!(
                "TP degree {tp} must divide heads ({}) and ffn_dim ({}) of preset {}",
                self.heads, self.ffn_dim, self.name
            )));
        }
        if self.heads * self.head_dim != self.dim {
            return Err(Error::BadInput(format!(
                "preset {}: heads × head_dim ({} × {}) != dim {}",
                self.name, self.heads, self.head_dim, self.dim
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_spec_geometry() {
        let t = DitConfig::tiny();
        assert_eq!(
            (t.dim, t.head_dim, t.tokens_per_frame(), t.frames_per_chunk),
            (128, 32, 64, 3)
        );
        assert_eq!(t.denoise_timesteps.len(), 4);
        let s = DitConfig::wan_1_3b();
        assert_eq!(
            (s.dim, s.layers, s.heads, s.head_dim, s.ffn_dim),
            (1536, 30, 12, 128, 8960)
        );
        assert_eq!((s.tokens_per_frame(), s.tokens_per_chunk()), (1560, 4680));
        let b = DitConfig::wan_14b();
        assert_eq!((b.dim, b.layers, b.heads, b.ffn_dim), (5120, 40, 40, 13824));
        for c in [t, s, b] {
            c.check_tp(1).unwrap();
            c.check_tp(2).unwrap();
        }
        assert!(DitConfig::tiny().check_tp(3).is_err());
        assert!(DitConfig::preset("wan-2b").is_err());
    }
}
