//! The stream on the ring cache (Stage 0's planner → `MeshRank::execute` → the CPU DiT, the
//! path `lockstep run` takes on a mesh rank) against a straightforward re-computation with no
//! ring: every frame's K/V kept by logical frame, the attended set computed from frame numbers
//! (the sinks, then the most recent frames that fit the window), each call's output compared.
//! Long enough for the ring to wrap several times, with recomputes of the sink frames.
use lockstep::cache::KvStore;
use lockstep::model::dit::{CacheMode, DitShard};
use lockstep::model::ops;
use lockstep::model::tp::SoloComm;
use lockstep::model::DitConfig;
use lockstep::pipeline::trace::{chunk_noise, record_stream};
use lockstep::Result;
use std::collections::BTreeMap;

/// K and V of one frame of one layer.
type FrameKv = (Vec<f32>, Vec<f32>);

/// K/V by logical frame, per layer; `visible` is what the next call reads, `writes` the frames
/// the next call's K/V go to (slots are ignored: there is no ring here).
struct History {
    frames: Vec<BTreeMap<u64, FrameKv>>,
    visible: Vec<u64>,
    writes: Vec<u64>,
    frame_elems: usize,
    tokens_per_frame: usize,
}

impl KvStore for History {
    fn gather(&self, layer: usize) -> (Vec<f32>, Vec<f32>, usize) {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for f in &self.visible {
            let (fk, fv) = &self.frames[layer][f];
            k.extend_from_slice(fk);
            v.extend_from_slice(fv);
        }
        (k, v, self.visible.len() * self.tokens_per_frame)
    }

    fn write_frames(&mut self, layer: usize, _slots: &[u32], k: &[f32], v: &[f32]) -> Result<()> {
        let fe = self.frame_elems;
        for (i, f) in self.writes.iter().enumerate() {
            self.frames[layer].insert(
                *f,
                (
                    k[i * fe..(i + 1) * fe].to_vec(),
                    v[i * fe..(i + 1) * fe].to_vec(),
                ),
            );
        }
        Ok(())
    }
}

/// Frames a call may read when `written` frames of the epoch exist and `reserve` more must fit
/// after it (0 for a denoise call, which runs before the plan's eviction): the first `sinks`
/// frames, then the most recent ones that leave room for `reserve` in the window.
fn attended(written: u64, sinks: u64, window: u64, reserve: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..written.min(sinks)).collect();
    let lo = sinks.max(written.saturating_sub(window.saturating_sub(reserve)));
    v.extend(lo..written);
    v
}

#[test]
fn ring_stream_equals_a_ring_free_recomputation_chunk_by_chunk() {
    let cfg = DitConfig::tiny();
    let (chunks, recompute_every, noise_seed, prompt_seed) = (9u64, 4u32, 3u64, 11u64);
    let trace = record_stream(
        DitShard::random(&cfg, 5, 0, 1).unwrap(),
        chunks,
        recompute_every,
        noise_seed,
        prompt_seed,
    )
    .unwrap();
    // The ring wrapped: more frames went through than it holds.
    let frames_total = chunks * cfg.frames_per_chunk as u64;
    assert!(frames_total > u64::from(cfg.sink_frames + cfg.window_frames) * 2);
    assert!(trace.calls.iter().any(|c| c.kind == "recompute"));

    let shard = DitShard::random(&cfg, 5, 0, 1).unwrap();
    let text = shard.text_kv(&mut SoloComm, prompt_seed).unwrap();
    let (tpf, in_dim, f) = (cfg.tokens_per_frame(), cfg.in_dim(), cfg.frames_per_chunk);
    let (sinks, window) = (u64::from(cfg.sink_frames), u64::from(cfg.window_frames));
    let mut h = History {
        frames: vec![BTreeMap::new(); cfg.layers],
        visible: Vec::new(),
        writes: Vec::new(),
        frame_elems: tpf * cfg.heads * cfg.head_dim,
        tokens_per_frame: tpf,
    };
    let mut written = 0u64;
    let mut first_latent: Option<Vec<f32>> = None;
    let mut rec = trace.calls.iter();
    let mut worst = 0f64;
    let mut stale_gap = f64::INFINITY;
    for chunk in 0..chunks {
        let start = written;
        if chunk > 0 && chunk % u64::from(recompute_every) == 0 {
            // Recompute the sinks from the first chunk's latent: attend over themselves only.
            let ctx = &first_latent.as_ref().unwrap()[..sinks as usize * tpf * in_dim];
            h.visible = Vec::new();
            h.writes = (0..sinks).collect();
            let out = shard
                .forward(
                    &mut SoloComm,
                    &mut h,
                    &text,
                    ctx,
                    sinks as usize,
                    0,
                    0,
                    CacheMode::Overwrite(&[0; 0]),
                )
                .unwrap();
            let r = rec.next().unwrap();
            assert_eq!((r.kind, r.chunk), ("recompute", chunk));
            let e = ops::rel_l2(&r.out, &out);
            assert!(e < 1e-6, "chunk {chunk} recompute: rel L2 {e}");
            worst = worst.max(e);
        }
        let mut x = chunk_noise(noise_seed, chunk, cfg.tokens_per_chunk() * in_dim);
        let ts = &cfg.denoise_timesteps;
        for (i, &t) in ts.iter().enumerate() {
            h.visible = attended(written, sinks, window, 0);
            let v = shard
                .forward(
                    &mut SoloComm,
                    &mut h,
                    &text,
                    &x,
                    f,
                    start,
                    t,
                    CacheMode::Read,
                )
                .unwrap();
            let r = rec.next().unwrap();
            assert_eq!((r.kind, r.chunk, r.t), ("denoise", chunk, t));
            let e = ops::rel_l2(&r.out, &v);
            assert!(e < 1e-6, "chunk {chunk} denoise t={t}: rel L2 {e}");
            worst = worst.max(e);
            let t_next = ts.get(i + 1).copied().unwrap_or(0);
            let dt = (t_next as f32 - t as f32) / 1000.0;
            x.iter_mut().zip(&v).for_each(|(a, b)| *a += dt * b);
        }
        // Clean pass: the frames left after making room for the chunk, plus the chunk itself.
        h.visible = attended(written, sinks, window, f as u64);
        h.writes = (start..start + f as u64).collect();
        let r = rec.next().unwrap();
        assert_eq!((r.kind, r.chunk), ("clean", chunk));
        let out = shard
            .forward(
                &mut SoloComm,
                &mut h,
                &text,
                &x,
                f,
                start,
                0,
                CacheMode::Append(&[0; 0]),
            )
            .unwrap();
        let e = ops::rel_l2(&r.out, &out);
        assert!(e < 1e-6, "chunk {chunk} clean pass: rel L2 {e}");
        worst = worst.max(e);
        // The test has power: attending to the frames the eviction dropped (what a clean pass
        // over stale ring slots sees) changes the output far beyond the tolerance.
        if written + f as u64 > sinks + window {
            let mut stale = h.visible.clone();
            stale.extend(
                attended(written, sinks, window, 0)
                    .into_iter()
                    .filter(|g| !h.visible.contains(g)),
            );
            let saved = std::mem::replace(&mut h.visible, stale);
            // The wrong pass writes its own K/V (layers past the first differ): keep the right ones.
            let kept = h.frames.clone();
            let wrong = shard
                .forward(
                    &mut SoloComm,
                    &mut h,
                    &text,
                    &x,
                    f,
                    start,
                    0,
                    CacheMode::Append(&[0; 0]),
                )
                .unwrap();
            h.visible = saved;
            h.frames = kept;
            stale_gap = stale_gap.min(ops::rel_l2(&wrong, &out));
        }
        let latent = &trace.latents[chunk as usize];
        let e = ops::rel_l2(latent, &x);
        assert!(e < 1e-6, "chunk {chunk} latent: rel L2 {e}");
        first_latent.get_or_insert_with(|| x.clone());
        written += f as u64;
    }
    assert!(
        rec.next().is_none(),
        "the stream made more calls than the reference"
    );
    println!("ring stream vs ring-free reference: worst rel L2 {worst:.2e}; stale-slot clean pass differs by ≥ {stale_gap:.2e}");
    assert!(
        stale_gap > 1e-3,
        "the stale-slot control should differ: {stale_gap}"
    );
}
