//! KV cache state machine (docs/spec.md §6): per layer, a ring buffer with sink frames; append,
//! O(1) evict, recompute (requires `context_frames_override`), reset by epoch. Every mutation comes
//! from the phase plan.
//!
//! Contract:
//! - Slots are frame-sized. Slots `0..sink_frames` hold the first frames of an epoch and never
//!   move; slots `sink_frames..sink_frames+window_frames` are a ring for the rolling window.
//! - `append` fills sinks first, then the ring; it fails (never overwrites) when there is no
//!   room: the plan must evict first. `evict` advances the ring head: O(1), moves no bytes.
//! - A slot has three states: free, **reserved** (counted against capacity by `append`, its
//!   bytes not yet this frame's: zeros, or an evicted frame's K/V once the ring has wrapped) and
//!   **written** (readable). `append` reserves; `mark_written` (the executor, after the clean
//!   pass wrote every layer) makes the reservation readable. `readable_slots` — what attention
//!   reads — never includes a reserved slot, so the clean pass that fills the slots attends over
//!   exactly [cache after the plan's eviction + the chunk], like a reference without a ring.
//! - `recompute` overwrites the slots of frames that are in the cache (from
//!   `context_frames_override`); it never changes which frames are cached.
//! - `reset` starts a new epoch; an epoch never goes backwards.
//! - Attention over the cache is a set operation (see `ops::attention` test), so `gather` returns
//!   occupied slots in physical order and the ring needs no reordering.
//!
//! Tripwires: every mutation bumps `mutations`; the ledger's fields feed the chunk-end state
//! digest (`plan::StateDigest`), so a rank that mutates out of band diverges from its peers and
//! from Stage 0's shadow ledger within one chunk (break-it F3).
use crate::ids::CacheEpoch;
use crate::{Error, Result};

/// Cache metadata only: what the state digest covers. Stage 0 keeps a shadow ledger to build
/// plans; every mesh rank keeps one inside its `KvCache`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheLedger {
    sink_frames: u32,
    window_frames: u32,
    epoch: CacheEpoch,
    sinks_len: u32,
    window_head: u32,
    window_len: u32,
    /// Logical frame (within the epoch) of the oldest window frame.
    window_start_frame: u64,
    /// Logical frame the next append writes.
    next_frame: u64,
    /// The last `unwritten` appended frames are reserved but not written (not readable).
    unwritten: u32,
    mutations: u64,
}

impl CacheLedger {
    pub fn new(sink_frames: u32, window_frames: u32) -> Result<Self> {
        if window_frames == 0 {
            return Err(Error::BadInput(
                "kv cache: window_frames must be > 0 (the ring needs at least one slot)".into(),
            ));
        }
        Ok(Self {
            sink_frames,
            window_frames,
            epoch: CacheEpoch(0),
            sinks_len: 0,
            window_head: 0,
            window_len: 0,
            window_start_frame: 0,
            next_frame: 0,
            unwritten: 0,
            mutations: 0,
        })
    }

    pub fn sink_frames(&self) -> u32 {
        self.sink_frames
    }
    pub fn window_frames(&self) -> u32 {
        self.window_frames
    }
    pub fn capacity_frames(&self) -> u32 {
        self.sink_frames + self.window_frames
    }
    pub fn epoch(&self) -> CacheEpoch {
        self.epoch
    }
    /// Frames holding a slot (sinks + window), reserved ones included: what capacity counts.
    pub fn len_frames(&self) -> u32 {
        self.sinks_len + self.window_len
    }
    /// Frames attention may read: held and written (`len_frames` minus a pending reservation).
    pub fn readable_frames(&self) -> u32 {
        self.len_frames() - self.unwritten
    }
    /// Frames reserved by the last `append` and not yet marked written.
    pub fn unwritten_frames(&self) -> u32 {
        self.unwritten
    }
    pub fn sinks_len(&self) -> u32 {
        self.sinks_len
    }
    pub fn window_len(&self) -> u32 {
        self.window_len
    }
    /// Logical frame of the oldest non-sink frame (the window start); the next append position
    /// when the window is empty.
    pub fn start_frame(&self) -> u64 {
        if self.window_len > 0 {
            self.window_start_frame
        } else {
            self.next_frame.max(u64::from(self.sinks_len))
        }
    }
    pub fn next_frame(&self) -> u64 {
        self.next_frame
    }
    pub fn mutations(&self) -> u64 {
        self.mutations
    }

    /// Frames that can be appended without evicting.
    pub fn free_frames(&self) -> u32 {
        (self.sink_frames - self.sinks_len) + (self.window_frames - self.window_len)
    }

    /// Frames to evict so that `n` more frames fit (sinks fill first and never evict).
    pub fn evict_needed_for(&self, n: u32) -> u32 {
        n.saturating_sub(self.free_frames())
    }

    /// Starts a new, empty cache world. The epoch may stay (first reset of a run) but never
    /// goes backwards.
    pub fn reset(&mut self, epoch: CacheEpoch) -> Result<()> {
        if epoch < self.epoch {
            return Err(Error::Invariant(format!(
                "kv cache reset to {epoch} would move the epoch backwards (current {})",
                self.epoch
            )));
        }
        *self = Self {
            epoch,
            mutations: self.mutations + 1,
            ..Self::new(self.sink_frames, self.window_frames)?
        };
        Ok(())
    }

    /// Drops the `n` oldest window frames by moving the ring head: O(1), no bytes move.
    pub fn evict(&mut self, n: u32) -> Result<()> {
        if self.unwritten > 0 {
            return Err(Error::Invariant(format!(
                "kv cache evict of {n} frames while {} appended frames are unwritten ({})",
                self.unwritten, self.epoch
            )));
        }
        if n > self.window_len {
            return Err(Error::Invariant(format!(
                "kv cache evict of {n} frames but the window holds {} ({})",
                self.window_len, self.epoch
            )));
        }
        self.window_head = (self.window_head + n) % self.window_frames;
        self.window_len -= n;
        self.window_start_frame += u64::from(n);
        self.mutations += 1;
        Ok(())
    }

    /// Reserves slots for the next `n` frames (sinks first, then the ring) and returns them in
    /// frame order. They are not readable until `mark_written`. Fails without side effects when
    /// they do not fit, or while an earlier reservation is still unwritten.
    pub fn append(&mut self, n: u32) -> Result<Vec<u32>> {
        if self.unwritten > 0 {
            return Err(Error::Invariant(format!(
                "kv cache append of {n} frames while the last {} appended frames are still \
                 unwritten ({}): a clean pass must write and mark them first",
                self.unwritten, self.epoch
            )));
        }
        if n > self.free_frames() {
            return Err(Error::Invariant(format!(
                "kv cache append of {n} frames does not fit: {} free ({} sinks + {} window \
                 cached of {} + {}); the plan must evict first",
                self.free_frames(),
                self.sinks_len,
                self.window_len,
                self.sink_frames,
                self.window_frames
            )));
        }
        let mut slots = Vec::with_capacity(n as usize);
        for _ in 0..n {
            if self.sinks_len < self.sink_frames {
                slots.push(self.sinks_len);
                self.sinks_len += 1;
            } else {
                if self.window_len == 0 {
                    self.window_start_frame = self.next_frame;
                }
                let ring = (self.window_head + self.window_len) % self.window_frames;
                slots.push(self.sink_frames + ring);
                self.window_len += 1;
            }
            self.next_frame += 1;
        }
        self.unwritten = n;
        self.mutations += 1;
        Ok(slots)
    }

    /// The reserved frames now hold their K/V in every layer: they become readable. Not a plan
    /// mutation (the append was), so `mutations` does not move.
    pub fn mark_written(&mut self) {
        self.unwritten = 0;
    }

    /// Whether logical frame `frame` is reserved but not written.
    fn is_unwritten(&self, frame: u64) -> bool {
        frame < self.next_frame && frame >= self.next_frame - u64::from(self.unwritten)
    }

    /// The slot of a cached logical frame, if it is cached.
    pub fn slot_of_frame(&self, frame: u64) -> Option<u32> {
        if frame < u64::from(self.sinks_len) {
            return Some(frame as u32);
        }
        let start = self.window_start_frame;
        if self.window_len > 0 && frame >= start && frame < start + u64::from(self.window_len) {
            let off = (frame - start) as u32;
            return Some(self.sink_frames + (self.window_head + off) % self.window_frames);
        }
        None
    }

    /// Slots of `frames` consecutive cached frames starting at `first` (for recompute). Fails
    /// if any of them is not cached (or reserved and unwritten): recompute never changes which
    /// frames are cached.
    pub fn recompute_slots(&mut self, first: u64, frames: u32) -> Result<Vec<u32>> {
        let slots = (first..first + u64::from(frames))
            .map(|f| {
                let written = if self.is_unwritten(f) {
                    None
                } else {
                    self.slot_of_frame(f)
                };
                written.ok_or_else(|| {
                    Error::Invariant(format!(
                        "kv cache recompute of frame {f} but it is not cached \
                         (sinks 0..{}, window {}..{}, {})",
                        self.sinks_len,
                        self.window_start_frame,
                        self.window_start_frame + u64::from(self.window_len),
                        self.epoch
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.mutations += 1;
        Ok(slots)
    }

    /// Slots attention reads: held and written, in physical order (attention is a set
    /// operation: no reordering). A reserved, unwritten slot is never among them.
    pub fn readable_slots(&self) -> Vec<u32> {
        let written = u64::from(self.readable_frames());
        let mut v: Vec<u32> = Vec::with_capacity(self.len_frames() as usize);
        // Held frames in logical order: sinks, then the window (its frames are consecutive).
        let held = (0..u64::from(self.sinks_len))
            .chain((0..u64::from(self.window_len)).map(|i| self.window_start_frame + i));
        for (n, f) in held.enumerate() {
            if (n as u64) < written {
                if let Some(s) = self.slot_of_frame(f) {
                    v.push(s);
                }
            }
        }
        v.sort_unstable();
        v
    }
}

/// What a generator call reads and writes of a KV cache: the ring `KvCache` in production; a
/// ring-free reference in the tests that check the ring against it.
pub trait KvStore {
    /// K and V `[tokens, heads, head_dim]` of every frame attention may read in `layer`, in any
    /// order (attention is a set operation), and the token count.
    fn gather(&self, layer: usize) -> (Vec<f32>, Vec<f32>, usize);
    /// Writes K (RoPE applied) and V of consecutive frames into `slots` (one per frame).
    fn write_frames(&mut self, layer: usize, slots: &[u32], k: &[f32], v: &[f32]) -> Result<()>;
}

/// Geometry of one rank's cache: slots of `tokens_per_frame` tokens × `heads` (local) ×
/// `head_dim` per layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheGeometry {
    pub layers: usize,
    pub tokens_per_frame: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub sink_frames: u32,
    pub window_frames: u32,
}

/// One rank's KV cache: the ledger plus K/V storage per layer, `[slots·tokens, heads, head_dim]`.
/// A geometry with zero layers keeps only the ledger (calibrated-cost generators).
pub struct KvCache {
    geom: CacheGeometry,
    ledger: CacheLedger,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(geom: CacheGeometry) -> Result<Self> {
        let ledger = CacheLedger::new(geom.sink_frames, geom.window_frames)?;
        let n =
            ledger.capacity_frames() as usize * geom.tokens_per_frame * geom.heads * geom.head_dim;
        Ok(Self {
            geom,
            ledger,
            k: (0..geom.layers).map(|_| vec![0.0; n]).collect(),
            v: (0..geom.layers).map(|_| vec![0.0; n]).collect(),
        })
    }

    pub fn geometry(&self) -> &CacheGeometry {
        &self.geom
    }
    pub fn ledger(&self) -> &CacheLedger {
        &self.ledger
    }
    /// Mutable ledger access for the plan executor (stage 1) only.
    pub fn ledger_mut(&mut self) -> &mut CacheLedger {
        &mut self.ledger
    }

    fn frame_elems(&self) -> usize {
        self.geom.tokens_per_frame * self.geom.heads * self.geom.head_dim
    }
}

impl KvStore for KvCache {
    fn write_frames(&mut self, layer: usize, slots: &[u32], k: &[f32], v: &[f32]) -> Result<()> {
        let fe = self.frame_elems();
        if layer >= self.geom.layers || k.len() != slots.len() * fe || v.len() != k.len() {
            return Err(Error::Invariant(format!(
                "kv cache write: layer {layer} of {}, {} slots, k {} v {} elements (want {} each)",
                self.geom.layers,
                slots.len(),
                k.len(),
                v.len(),
                slots.len() * fe
            )));
        }
        for (i, &s) in slots.iter().enumerate() {
            let dst = s as usize * fe..(s as usize + 1) * fe;
            self.k[layer][dst.clone()].copy_from_slice(&k[i * fe..(i + 1) * fe]);
            self.v[layer][dst].copy_from_slice(&v[i * fe..(i + 1) * fe]);
        }
        Ok(())
    }

    /// K and V of every readable frame of `layer`, `[tokens, heads, head_dim]`, in slot order
    /// (reserved, unwritten slots are left out).
    fn gather(&self, layer: usize) -> (Vec<f32>, Vec<f32>, usize) {
        let fe = self.frame_elems();
        let slots = self.ledger.readable_slots();
        let mut k = Vec::with_capacity(slots.len() * fe);
        let mut v = Vec::with_capacity(slots.len() * fe);
        for s in &slots {
            let r = *s as usize * fe..(*s as usize + 1) * fe;
            k.extend_from_slice(&self.k[layer][r.clone()]);
            v.extend_from_slice(&self.v[layer][r]);
        }
        (k, v, slots.len() * self.geom.tokens_per_frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_fill_first_then_ring_and_evict_moves_only_the_head() {
        let mut l = CacheLedger::new(2, 4).unwrap();
        assert_eq!(l.append(3).unwrap(), vec![0, 1, 2]);
        l.mark_written();
        assert_eq!(l.sinks_len(), 2);
        assert_eq!(l.window_len(), 1);
        assert_eq!(l.start_frame(), 2);
        assert_eq!(l.append(3).unwrap(), vec![3, 4, 5]);
        l.mark_written();
        assert_eq!(l.free_frames(), 0);
        assert!(
            l.append(1).is_err(),
            "append into a full cache must fail, never overwrite"
        );
        assert_eq!(l.evict_needed_for(3), 3);
        l.evict(3).unwrap();
        assert_eq!(l.start_frame(), 5);
        // Ring wraps: frames 6, 7, 8 go to ring positions 0, 1, 2 = slots 2, 3, 4.
        assert_eq!(l.append(3).unwrap(), vec![2, 3, 4]);
        l.mark_written();
        assert_eq!(l.slot_of_frame(0), Some(0));
        assert_eq!(l.slot_of_frame(5), Some(5));
        assert_eq!(l.slot_of_frame(6), Some(2));
        assert_eq!(l.slot_of_frame(4), None);
        assert_eq!(l.readable_slots(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(l.len_frames(), 6);
    }

    #[test]
    fn reserved_slots_are_not_readable_until_written_also_after_the_ring_wraps() {
        // 1 sink + a 4-frame ring, chunks of 2 frames.
        let mut l = CacheLedger::new(1, 4).unwrap();
        let s = l.append(2).unwrap();
        assert_eq!(s, vec![0, 1]);
        assert_eq!((l.len_frames(), l.readable_frames()), (2, 0));
        assert!(
            l.readable_slots().is_empty(),
            "reserved slots must not be read"
        );
        // Nothing else moves while a reservation is pending.
        assert!(l.append(1).unwrap_err().to_string().contains("unwritten"));
        assert!(l.evict(0).unwrap_err().to_string().contains("unwritten"));
        assert!(l
            .recompute_slots(0, 1)
            .unwrap_err()
            .to_string()
            .contains("not cached"));
        l.mark_written();
        assert_eq!(l.readable_slots(), vec![0, 1]);
        for _ in 0..2 {
            let n = l.evict_needed_for(2);
            l.evict(n).unwrap();
            l.append(2).unwrap();
            l.mark_written();
        }
        // Frames 0..6 appended: sink 0, window 1..5 held in slots 1..4 (frame 5 wrapped to
        // slot 1, evicting frame 1). Now evict two more and reserve frames 6, 7.
        let n = l.evict_needed_for(2);
        assert_eq!(n, 2);
        l.evict(n).unwrap();
        let s = l.append(2).unwrap();
        // The reserved slots still hold evicted frames' bytes: they must not be readable.
        assert_eq!(s, vec![2, 3]);
        assert_eq!(l.readable_slots(), vec![0, 1, 4]);
        assert_eq!(l.readable_frames(), 3);
        l.mark_written();
        assert_eq!(l.readable_slots(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn evict_more_than_window_fails() {
        let mut l = CacheLedger::new(1, 2).unwrap();
        l.append(2).unwrap();
        l.mark_written();
        assert!(l.evict(2).is_err());
        l.evict(1).unwrap();
        assert_eq!(l.window_len(), 0);
        assert_eq!(l.start_frame(), 2);
    }

    #[test]
    fn reset_empties_and_epoch_never_goes_backwards() {
        let mut l = CacheLedger::new(1, 2).unwrap();
        l.append(3).unwrap();
        l.mark_written();
        l.reset(CacheEpoch(2)).unwrap();
        assert_eq!(l.len_frames(), 0);
        assert_eq!(l.next_frame(), 0);
        assert_eq!(l.epoch(), CacheEpoch(2));
        let e = l.reset(CacheEpoch(1)).unwrap_err();
        assert!(e.to_string().contains("backwards"), "{e}");
    }

    #[test]
    fn every_mutation_bumps_the_counter() {
        let mut l = CacheLedger::new(1, 4).unwrap();
        let m0 = l.mutations();
        l.append(2).unwrap();
        l.mark_written();
        l.evict(1).unwrap();
        l.recompute_slots(0, 1).unwrap();
        l.reset(CacheEpoch(1)).unwrap();
        assert_eq!(l.mutations(), m0 + 4);
    }

    #[test]
    fn recompute_requires_cached_frames() {
        let mut l = CacheLedger::new(1, 2).unwrap();
        l.append(3).unwrap();
        l.mark_written();
        l.evict(1).unwrap();
        assert_eq!(l.recompute_slots(0, 1).unwrap(), vec![0]);
        let e = l.recompute_slots(1, 1).unwrap_err();
        assert!(e.to_string().contains("not cached"), "{e}");
    }

    #[test]
    fn gather_returns_written_frames_as_a_set() {
        let g = CacheGeometry {
            layers: 1,
            tokens_per_frame: 2,
            heads: 1,
            head_dim: 2,
            sink_frames: 1,
            window_frames: 2,
        };
        let mut c = KvCache::new(g).unwrap();
        let fe = 4;
        for f in 0..4u32 {
            let need = c.ledger().evict_needed_for(1);
            c.ledger_mut().evict(need).unwrap();
            let slots = c.ledger_mut().append(1).unwrap();
            let k = vec![f as f32; fe];
            let v = vec![10.0 + f as f32; fe];
            c.write_frames(0, &slots, &k, &v).unwrap();
            c.ledger_mut().mark_written();
        }
        // Cached frames: sink 0, window 2 and 3.
        let (k, v, n) = c.gather(0);
        assert_eq!(n, 6);
        let mut frames: Vec<u32> = k.chunks(fe).map(|ch| ch[0] as u32).collect();
        frames.sort_unstable();
        assert_eq!(frames, vec![0, 2, 3]);
        assert!(v.chunks(fe).all(|ch| ch[0] >= 10.0));
        assert!(c.write_frames(0, &[0], &[0.0; 3], &[0.0; 3]).is_err());
    }
}
