//! Token layout, end to end: with Wan's weights (names and layouts as in Wan's checkpoint), the
//! model's output equals Wan's head output put back in place by Wan's unpatchify rule, computed
//! here from the raw tensors with explicit convolution and unpatchify loops, not through the
//! model's own layout code. The model is reduced to patch embedding → head (no blocks, time
//! embedding zeroed) so the expected value can be written down by hand.
use lockstep::cache::{CacheGeometry, KvCache};
use lockstep::model::dit::{CacheMode, DitShard};
use lockstep::model::ops;
use lockstep::model::tp::SoloComm;
use lockstep::model::weights::{SeededWeights, WeightSource};
use lockstep::model::DitConfig;
use lockstep::Result;

/// Seeded weights with the time embedding's last linear zeroed (so `e = 0`).
struct NoTime(SeededWeights);

impl NoTime {
    fn zeroed(name: &str) -> bool {
        name.starts_with("time_embedding.2.")
    }
}

impl WeightSource for NoTime {
    fn full(&self, name: &str) -> Result<Vec<f32>> {
        let v = self.0.full(name)?;
        Ok(if Self::zeroed(name) {
            vec![0.0; v.len()]
        } else {
            v
        })
    }
    fn rows(&self, name: &str, lo: usize, hi: usize) -> Result<Vec<f32>> {
        let v = self.0.rows(name, lo, hi)?;
        Ok(if Self::zeroed(name) {
            vec![0.0; v.len()]
        } else {
            v
        })
    }
    fn cols(&self, name: &str, lo: usize, hi: usize) -> Result<Vec<f32>> {
        let v = self.0.cols(name, lo, hi)?;
        Ok(if Self::zeroed(name) {
            vec![0.0; v.len()]
        } else {
            v
        })
    }
}

#[test]
fn head_output_is_in_the_patch_embeddings_input_layout_as_wan_unpatchifies_it() {
    let cfg = DitConfig {
        layers: 0,
        ..DitConfig::tiny()
    };
    let src = NoTime(SeededWeights::new(&cfg, 17));
    let shard = DitShard::from_source(&cfg, &src, 0, 1).unwrap();
    let (c_n, gh, gw, f_n, d) = (
        cfg.latent_channels,
        cfg.grid_h,
        cfg.grid_w,
        cfg.frames_per_chunk,
        cfg.dim,
    );
    let (hh, ww) = (2 * gh, 2 * gw);
    // A video latent [C, F, H, W].
    let video: Vec<f32> = (0..c_n * f_n * hh * ww)
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
        .collect();
    let vid = |c: usize, f: usize, y: usize, x: usize| video[((c * f_n + f) * hh + y) * ww + x];
    // The model's documented input layout: token (f, h, w), feature c·4 + kh·2 + kw.
    let tokens = f_n * gh * gw;
    let mut x_in = vec![0f32; tokens * c_n * 4];
    for f in 0..f_n {
        for h in 0..gh {
            for w in 0..gw {
                let tok = (f * gh + h) * gw + w;
                for c in 0..c_n {
                    for kh in 0..2 {
                        for kw in 0..2 {
                            x_in[tok * c_n * 4 + c * 4 + kh * 2 + kw] =
                                vid(c, f, 2 * h + kh, 2 * w + kw);
                        }
                    }
                }
            }
        }
    }
    let mut cache = KvCache::new(CacheGeometry {
        layers: 0,
        tokens_per_frame: gh * gw,
        heads: 0,
        head_dim: 0,
        sink_frames: cfg.sink_frames,
        window_frames: cfg.window_frames,
    })
    .unwrap();
    let text = shard.text_kv(&mut SoloComm, 1).unwrap();
    let out = shard
        .forward(
            &mut SoloComm,
            &mut cache,
            &text,
            &x_in,
            f_n,
            0,
            500,
            CacheMode::Read,
        )
        .unwrap();

    // Expected, from the raw tensors: Conv3d [dim, C, 1, 2, 2] stride (1, 2, 2), LayerNorm ·
    // (1 + scale) + shift with head.modulation (e = 0), head.head, Wan's unpatchify.
    let pw = src.full("patch_embedding.weight").unwrap();
    let pb = src.full("patch_embedding.bias").unwrap();
    let hm = src.full("head.modulation").unwrap();
    let hw = src.full("head.head.weight").unwrap();
    let hb = src.full("head.head.bias").unwrap();
    let o_n = c_n * 4;
    let mut expected = vec![0f32; video.len()];
    for f in 0..f_n {
        for h in 0..gh {
            for w in 0..gw {
                let mut hid = vec![0f64; d];
                for (j, hj) in hid.iter_mut().enumerate() {
                    let mut s = f64::from(pb[j]);
                    for c in 0..c_n {
                        for kh in 0..2 {
                            for kw in 0..2 {
                                let wt = pw[((j * c_n + c) * 2 + kh) * 2 + kw];
                                s += f64::from(wt) * f64::from(vid(c, f, 2 * h + kh, 2 * w + kw));
                            }
                        }
                    }
                    *hj = s;
                }
                let mean = hid.iter().sum::<f64>() / d as f64;
                let var = hid.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
                let xn: Vec<f64> = (0..d)
                    .map(|j| {
                        let n = (hid[j] - mean) / (var + f64::from(cfg.eps)).sqrt();
                        n * (1.0 + f64::from(hm[d + j])) + f64::from(hm[j])
                    })
                    .collect();
                for o in 0..o_n {
                    let mut s = f64::from(hb[o]);
                    for j in 0..d {
                        s += f64::from(hw[o * d + j]) * xn[j];
                    }
                    // Wan's unpatchify: output o of token (f, h, w) is (kh, kw, c).
                    let (kh, kw, c) = (o / (2 * c_n), (o / c_n) % 2, o % c_n);
                    expected[((c * f_n + f) * hh + 2 * h + kh) * ww + 2 * w + kw] = s as f32;
                }
            }
        }
    }
    // The model's output, read back through the same documented token layout as its input.
    let mut got = vec![0f32; video.len()];
    for f in 0..f_n {
        for h in 0..gh {
            for w in 0..gw {
                let tok = (f * gh + h) * gw + w;
                for c in 0..c_n {
                    for kh in 0..2 {
                        for kw in 0..2 {
                            got[((c * f_n + f) * hh + 2 * h + kh) * ww + 2 * w + kw] =
                                out[tok * o_n + c * 4 + kh * 2 + kw];
                        }
                    }
                }
            }
        }
    }
    let e = ops::rel_l2(&got, &expected);
    println!("model output vs Wan's unpatchified head output: rel L2 {e:.2e}");
    assert!(e < 1e-5, "token layout: rel L2 {e}");
}
