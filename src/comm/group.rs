//! Process groups and the one collective wrapper.
//!
//! Contract:
//! - Groups are created in one fixed order on every rank: `world` (all), `pp` (0 + leader),
//!   `mesh` (1..=T) ([`standard_groups`]); the order and members are part of the parity
//!   fingerprint, so a rank that differs fails at startup (B3).
//! - Every collective and p2p op goes through [`Group`], which **before the call** checks that
//!   this rank is a member, that the op is allowed on the group's role (TP collectives only on
//!   `mesh`, docs/spec.md §1), and that the root/peer is a group rank of the group; then it bumps
//!   the group's sequence number and records the op in the flight recorder.
//! - Debug mode (`LOCKSTEP_DEBUG_COLLECTIVES=1`) exchanges a fingerprint (group, seq, op, dtype,
//!   shape, root) across the group before each collective and crashes with a per-field diff.
//!
//! Tripwires: guard refusal (exit 70, "refusing … before the call"), fingerprint diff (exit 70).
use super::plane::DataPlane;
use super::recorder::{OpDesc, Recorder};
pub use super::spec::{standard_groups, GroupRole, GroupSpec, PeerTable};
use crate::error::{Error, Result};
use crate::fault;
use crate::ids::{GlobalRank, GroupRank};
use crate::wire::DType;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The op kinds the wrapper knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Send,
    Recv,
    AllReduce,
    Broadcast,
    AllGather,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Send => "send",
            OpKind::Recv => "recv",
            OpKind::AllReduce => "all_reduce",
            OpKind::Broadcast => "broadcast",
            OpKind::AllGather => "all_gather",
        }
    }
    fn code(self) -> u64 {
        self as u64 + 1
    }
    /// docs/spec.md §1: TP collectives (all_reduce, all_gather) run only on `mesh`; `pp` carries
    /// envelopes (p2p + broadcast); `world` carries only broadcasts.
    fn allowed_on(self, role: GroupRole) -> bool {
        match role {
            GroupRole::Mesh => true,
            GroupRole::Pp => matches!(self, OpKind::Send | OpKind::Recv | OpKind::Broadcast),
            GroupRole::World => matches!(self, OpKind::Broadcast),
        }
    }
}

/// An enqueued op: wait on it through the group that issued it.
pub struct Ticket<D: DataPlane> {
    pending: D::Pending,
    rec_id: u64,
}

impl<D: DataPlane> Ticket<D> {
    /// The flight-recorder id of the op (its description: `Recorder::describe`).
    pub fn record_id(&self) -> u64 {
        self.rec_id
    }
}

/// A process group as this rank sees it: the only way to issue data-plane ops.
pub struct Group<D: DataPlane> {
    spec: GroupSpec,
    /// `spec.name`, interned for the flight recorder.
    label: &'static str,
    me_global: GlobalRank,
    me: Option<GroupRank>,
    comm: Option<D::Comm>,
    plane: Arc<D>,
    seq: AtomicU64,
    /// Point-to-point numbering per (is_send, peer group rank).
    p2p_seq: std::sync::Mutex<std::collections::HashMap<(bool, u32), u64>>,
    recorder: Arc<Recorder>,
    debug: bool,
    /// Flight-recorder ids of device ops enqueued on a model's stream, not yet seen passed.
    device_in_flight: std::sync::Mutex<Vec<u64>>,
}

impl<D: DataPlane> Group<D> {
    pub(crate) fn new(
        spec: GroupSpec,
        me_global: GlobalRank,
        comm: Option<D::Comm>,
        plane: Arc<D>,
        recorder: Arc<Recorder>,
        debug: bool,
    ) -> Self {
        let me = spec.group_rank_of(me_global);
        Group {
            label: super::recorder::intern(&spec.name),
            spec,
            me_global,
            me,
            comm,
            plane,
            seq: AtomicU64::new(0),
            p2p_seq: std::sync::Mutex::new(std::collections::HashMap::new()),
            recorder,
            debug,
            device_in_flight: std::sync::Mutex::new(Vec::new()),
        }
    }
    pub fn spec(&self) -> &GroupSpec {
        &self.spec
    }
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    /// This rank's group rank, or None when not a member.
    pub fn me(&self) -> Option<GroupRank> {
        self.me
    }
    pub fn is_member(&self) -> bool {
        self.me.is_some()
    }
    pub fn size(&self) -> u32 {
        self.spec.size()
    }
    pub fn plane(&self) -> &D {
        &self.plane
    }
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }
    /// This rank's communicator, bypassing the guard and the flight recorder: only for
    /// benchmarks that measure the raw transfer floor beside the protocol (harness `envelope`).
    #[doc(hidden)]
    pub fn raw_comm(&self) -> Option<&D::Comm> {
        self.comm.as_ref()
    }
    pub(crate) fn take_comm(&mut self) -> Option<D::Comm> {
        self.comm.take()
    }

    /// The guard: membership, role, root/peer in group — all before the call.
    fn guard(&self, op: OpKind, other: Option<GroupRank>) -> Result<()> {
        if fault::hit(fault::points::GUARD_OFF) {
            return Ok(());
        }
        let members =
            || -> Vec<String> { self.spec.members.iter().map(|m| m.0.to_string()).collect() };
        if self.me.is_none() {
            return Err(Error::Invariant(format!(
                "wrong-group collective: refusing {} on group `{}` before the call: {} is not a member (members: global-rank {})",
                op.name(),
                self.spec.name,
                self.me_global,
                members().join(", ")
            )));
        }
        if !op.allowed_on(self.spec.role) {
            return Err(Error::Invariant(format!(
                "wrong-group collective: refusing {} on group `{}` before the call: TP collectives run only on `mesh` (docs/spec.md §1)",
                op.name(),
                self.spec.name
            )));
        }
        if let Some(r) = other {
            if r.0 >= self.spec.size() {
                return Err(Error::Invariant(format!(
                    "refusing {} on group `{}` before the call: {r} is not in the group (size {}); root/peer is a group rank",
                    op.name(),
                    self.spec.name,
                    self.spec.size()
                )));
            }
            if matches!(op, OpKind::Send | OpKind::Recv) && Some(r) == self.me {
                return Err(Error::Invariant(format!(
                    "refusing {} to self on group `{}`",
                    op.name(),
                    self.spec.name
                )));
            }
        }
        Ok(())
    }

    fn comm(&self, op: OpKind) -> Result<&D::Comm> {
        self.comm.as_ref().ok_or_else(|| {
            Error::Invariant(format!(
                "{} on group `{}`: this rank ({}) holds no communicator for it",
                op.name(),
                self.spec.name,
                self.me_global
            ))
        })
    }

    fn issue(
        &self,
        op: OpKind,
        other: Option<GroupRank>,
        dtype: DType,
        shape: &[u64],
        bytes: u64,
        call: impl FnOnce(&D, &D::Comm) -> Result<D::Pending>,
    ) -> Result<Ticket<D>> {
        let (pending, rec_id) = self.issue_with(op, other, dtype, shape, bytes, call)?;
        Ok(Ticket { pending, rec_id })
    }

    /// `issue` for any kind of result: guard, number, record, call; returns the call's result
    /// and the record's id.
    fn issue_with<R>(
        &self,
        op: OpKind,
        other: Option<GroupRank>,
        dtype: DType,
        shape: &[u64],
        bytes: u64,
        call: impl FnOnce(&D, &D::Comm) -> Result<R>,
    ) -> Result<(R, u64)> {
        // Every data-plane op of every group, on the trace and as an NVTX range: `<group> <op>`
        // (the enqueue; the TP collectives' own spans, with op, dtype and bytes, wrap it and
        // its wait).
        let label = self.label;
        let _s = crate::spans::enter(|| format!("{label} {}", op.name()));
        self.guard(op, other)?;
        let comm = self.comm(op)?;
        let other_global = other.and_then(|r| self.spec.global_rank_of(r)).map(|g| g.0);
        // Collectives are numbered by the group's sequence (every member issues the same ones in
        // the same order). Point-to-point ops are numbered per direction and peer: a pipelined
        // send and the opposite direction's receive may interleave differently on the two ranks,
        // yet the k-th send A→B always matches the k-th receive at B from A.
        let seq = match (op, other) {
            (OpKind::Send, Some(p)) | (OpKind::Recv, Some(p)) => {
                let mut m = self.p2p_seq.lock().unwrap_or_else(|e| e.into_inner());
                let c = m.entry((matches!(op, OpKind::Send), p.0)).or_insert(0);
                *c += 1;
                *c
            }
            _ => self.seq.fetch_add(1, Ordering::SeqCst) + 1,
        };
        let (peer, root) = match op {
            OpKind::Send | OpKind::Recv => (other_global, None),
            OpKind::Broadcast => (None, other_global),
            _ => (None, None),
        };
        let desc = OpDesc {
            group: self.label.into(),
            seq,
            op: op.name().into(),
            peer,
            root,
            dtype: Some(dtype.name().into()),
            shape: shape.to_vec(),
            bytes,
        };
        let rec_id = if self.debug && !matches!(op, OpKind::Send | OpKind::Recv) {
            // Debug mode: the op is enqueued while its fingerprint is exchanged, then started.
            let id = self.recorder.enqueue(desc);
            self.check_fingerprint(comm, seq, op, dtype, shape, other)?;
            self.recorder.start(id);
            id
        } else {
            self.recorder.enqueue_started(desc)
        };
        match call(&self.plane, comm) {
            Ok(r) => Ok((r, rec_id)),
            Err(e) => {
                self.recorder.fail(rec_id, &e.to_string());
                Err(e)
            }
        }
    }

    /// Debug mode: all-gather a fixed-size fingerprint and diff it field by field.
    fn check_fingerprint(
        &self,
        comm: &D::Comm,
        seq: u64,
        op: OpKind,
        dtype: DType,
        shape: &[u64],
        root: Option<GroupRank>,
    ) -> Result<()> {
        const FIELDS: usize = 16;
        let mut fp = [0u64; FIELDS];
        fp[0] = u64::from(self.spec.id);
        fp[1] = seq;
        fp[2] = op.code();
        fp[3] = DType::ALLOWED
            .iter()
            .position(|&d| d == dtype)
            .map_or(99, |i| i as u64);
        fp[4] = root.map_or(u64::MAX, |r| u64::from(r.0));
        fp[5] = shape.len() as u64;
        for (i, d) in shape.iter().take(FIELDS - 6).enumerate() {
            fp[6 + i] = *d;
        }
        let bytes: Vec<u8> = fp.iter().flat_map(|v| v.to_le_bytes()).collect();
        let n = self.spec.size() as usize;
        let send = self.plane.upload(&bytes)?;
        let recv = self.plane.alloc(bytes.len() * n)?;
        let pending = self.plane.all_gather(comm, send, recv)?;
        let deadline = Instant::now() + std::time::Duration::from_secs(3600);
        let all = self.plane.download(&self.plane.wait(pending, deadline)?)?;
        let read = |r: usize, f: usize| -> u64 {
            let o = r * FIELDS * 8 + f * 8;
            all.get(o..o + 8)
                .and_then(|s| s.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        let names = ["group", "seq", "op", "dtype", "root", "ndim"];
        let show = |f: usize, v: u64| -> String {
            match f {
                2 => [
                    OpKind::Send,
                    OpKind::Recv,
                    OpKind::AllReduce,
                    OpKind::Broadcast,
                    OpKind::AllGather,
                ]
                .iter()
                .find(|k| k.code() == v)
                .map_or(v.to_string(), |k| k.name().to_string()),
                3 => DType::ALLOWED
                    .get(v as usize)
                    .map_or(v.to_string(), |d| d.name().to_string()),
                _ => v.to_string(),
            }
        };
        let mut diff = Vec::new();
        for f in 0..FIELDS {
            let mine = read(0, f);
            if (0..n).any(|r| read(r, f) != mine) {
                let vals: Vec<String> = (0..n)
                    .map(|r| {
                        let g = self.spec.members.get(r).map_or(r as u32, |g| g.0);
                        format!("global-rank {g} = {}", show(f, read(r, f)))
                    })
                    .collect();
                let name = names.get(f).map_or_else(
                    || format!("shape[{}]", f.saturating_sub(6)),
                    |s| s.to_string(),
                );
                diff.push(format!("  {name}: {}", vals.join("; ")));
            }
        }
        if diff.is_empty() {
            Ok(())
        } else {
            Err(Error::Invariant(format!(
                "collective fingerprint mismatch on group `{}` seq {seq} (debug mode), per field:\n{}",
                self.spec.name,
                diff.join("\n")
            )))
        }
    }

    pub fn send(
        &self,
        buf: D::Buffer,
        peer: GroupRank,
        dtype: DType,
        shape: &[u64],
    ) -> Result<Ticket<D>> {
        let bytes = self.plane.buffer_len(&buf) as u64;
        self.issue(OpKind::Send, Some(peer), dtype, shape, bytes, |p, c| {
            p.send(c, buf, peer)
        })
    }
    pub fn recv(
        &self,
        buf: D::Buffer,
        peer: GroupRank,
        dtype: DType,
        shape: &[u64],
    ) -> Result<Ticket<D>> {
        let bytes = self.plane.buffer_len(&buf) as u64;
        self.issue(OpKind::Recv, Some(peer), dtype, shape, bytes, |p, c| {
            p.recv(c, buf, peer)
        })
    }
    pub fn all_reduce_sum(&self, buf: D::Buffer, dtype: DType, shape: &[u64]) -> Result<Ticket<D>> {
        let bytes = self.plane.buffer_len(&buf) as u64;
        self.issue(OpKind::AllReduce, None, dtype, shape, bytes, |p, c| {
            p.all_reduce_sum(c, buf, dtype)
        })
    }
    pub fn broadcast(
        &self,
        buf: D::Buffer,
        root: GroupRank,
        dtype: DType,
        shape: &[u64],
    ) -> Result<Ticket<D>> {
        let bytes = self.plane.buffer_len(&buf) as u64;
        self.issue(
            OpKind::Broadcast,
            Some(root),
            dtype,
            shape,
            bytes,
            |p, c| p.broadcast(c, buf, root),
        )
    }
    pub fn all_gather(
        &self,
        send: D::Buffer,
        recv: D::Buffer,
        dtype: DType,
        shape: &[u64],
    ) -> Result<Ticket<D>> {
        let bytes = self.plane.buffer_len(&send) as u64;
        self.issue(OpKind::AllGather, None, dtype, shape, bytes, |p, c| {
            p.all_gather(c, send, recv)
        })
    }
    /// Whether this group can sum a model's own device buffers (`device_all_reduce`): a GPU
    /// data plane (NCCL) and a member rank.
    pub fn has_device_path(&self) -> bool {
        self.comm
            .as_ref()
            .is_some_and(|c| self.plane.device_group(c).is_some())
    }

    /// This rank's GPU as the data plane opened it (NCCL), for the model to share: one context,
    /// one set of kernels per rank. `None` on host planes.
    pub fn device_gpu(&self) -> Option<Arc<crate::cuda::Gpu>> {
        let c = self.comm.as_ref()?;
        self.plane.device_group(c).map(|g| g.gpu.clone())
    }

    /// In-place sum of a model's device buffer over the group, enqueued on the model's `stream`
    /// after the kernels that wrote it (no host crossing, no copy): guarded and recorded in the
    /// flight recorder as every collective (numbered in the group's sequence, the same on every
    /// member). The record stays in flight until `settle_device_ops` — called once the stream
    /// passed the op (the caller observed an output computed after it) — so a dump taken while
    /// the stream is stuck in it names it. Fails on a plane without a device path.
    pub fn device_all_reduce<T: crate::comm::nccl::ReduceElem>(
        &self,
        stream: &cudarc::driver::CudaStream,
        buf: &mut cudarc::driver::CudaViewMut<'_, T>,
        shape: &[u64],
        deadline: Instant,
    ) -> Result<()> {
        use crate::comm::nccl::ReduceDtype as R;
        let dtype = match T::DTYPE {
            R::F32 => DType::F32,
            R::Bf16 => DType::Bf16,
            R::F16 => DType::F16,
            R::I32 => DType::I32,
            R::I64 => DType::I64,
            R::U8 => DType::U8,
        };
        let bytes = (buf.len() * std::mem::size_of::<T>()) as u64;
        let ((), id) = self.issue_with(OpKind::AllReduce, None, dtype, shape, bytes, |p, c| {
            let g = p.device_group(c).ok_or_else(|| {
                Error::Invariant(format!(
                    "group {}: the {} data plane has no device path",
                    self.spec.name,
                    p.name()
                ))
            })?;
            g.comm.all_reduce_sum_on(g.gpu, stream, buf, deadline)
        })?;
        // The op is enqueued, not finished: its record stays in flight (see the doc).
        self.device_in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id);
        Ok(())
    }

    /// Marks every device op recorded since the last call completed (the caller saw the stream
    /// pass them).
    pub fn settle_device_ops(&self) {
        let ids = std::mem::take(
            &mut *self
                .device_in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for id in ids {
            self.recorder.complete(id);
        }
    }

    /// Whether debug mode fingerprints each collective. Its fingerprint all-gather must complete
    /// before the op is issued, so collectives cannot be batched in one group then.
    pub fn debug_collectives(&self) -> bool {
        self.debug
    }
    pub fn group_start(&self) -> Result<()> {
        self.plane.group_start(self.comm(OpKind::Send)?)
    }
    pub fn group_end(&self) -> Result<()> {
        self.plane.group_end(self.comm(OpKind::Send)?)
    }

    /// Waits for an op (bounded) and records its completion.
    pub fn wait(&self, t: Ticket<D>, deadline: Instant) -> Result<D::Buffer> {
        match self.plane.wait(t.pending, deadline) {
            Ok(buf) => {
                self.recorder.complete(t.rec_id);
                Ok(buf)
            }
            Err(e) => {
                self.recorder.fail(t.rec_id, &e.to_string());
                Err(match e {
                    Error::Timeout(m) => {
                        let what = self
                            .recorder
                            .describe(t.rec_id)
                            .unwrap_or_else(|| format!("{} op #{}", self.spec.name, t.rec_id));
                        Error::Timeout(format!("{what}: {m}"))
                    }
                    other => other,
                })
            }
        }
    }

    /// Convenience: all_reduce of host f32 values, waited.
    pub fn all_reduce_f32(
        &self,
        values: &[f32],
        shape: &[u64],
        deadline: Instant,
    ) -> Result<Vec<f32>> {
        let buf = self.plane.upload(bytemuck::cast_slice(values))?;
        let t = self.all_reduce_sum(buf, DType::F32, shape)?;
        let out = self.plane.download(&self.wait(t, deadline)?)?;
        Ok(out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Convenience: broadcast host bytes from `root` (non-roots pass a buffer of the same length).
    pub fn broadcast_bytes(
        &self,
        bytes: &[u8],
        root: GroupRank,
        deadline: Instant,
    ) -> Result<Vec<u8>> {
        let buf = self.plane.upload(bytes)?;
        let t = self.broadcast(buf, root, DType::U8, &[bytes.len() as u64])?;
        self.plane.download(&self.wait(t, deadline)?)
    }
}
