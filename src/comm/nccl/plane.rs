//! The NCCL backend of the data-plane trait (`comm::plane::DataPlane`).
//!
//! Contract:
//! - One GPU and one stream per rank (`LOCKSTEP_GPU`, else `LOCAL_RANK mod #GPUs`: with 3 ranks on
//!   2 GPUs that is rank 0 → GPU 0, rank 1 → GPU 1, rank 2 → GPU 0). Buffers are device memory.
//! - One NCCL communicator per group this rank belongs to, created in the one creation order;
//!   **`world` gets none** (rank 0 may share a GPU with a mesh rank, which NCCL refuses inside one
//!   communicator): any op on `world` fails with a clear error instead.
//! - Communicators are non-blocking by default (init, connection setup and finalize stay
//!   abortable; see `docs/manual/nccl-api.md`); `LOCKSTEP_NCCL_BLOCKING=1` selects blocking
//!   ones, and the choice is part of the backend name, hence of the startup parity check.
//! - An op returns once NCCL enqueued it; its `Pending` carries a host-flag ticket marked on the
//!   stream right after it (inside an open group: after `group_end`, when NCCL really launches).
//!   `wait` spins on that flag, polls the communicator's async error, and honours the deadline.
//! - The abort handle aborts every live communicator of the process (`abort_all_live`): safe from
//!   the watchdog thread while another thread waits; it hard-exits if a thread is stuck in NCCL.
//!
//! Tripwire: a `Pending` issued inside an open group has no ticket until `group_end`; waiting on it
//! before that is an invariant violation, reported as such.
use super::{
    abort_all_live, AbortHandle, CommOptions, Communicator, Completion, CompletionKind, DeviceBuf,
    Gpu, ReduceDtype, Ticket, UniqueId,
};
use crate::comm::plane::{AbortHandle as PlaneAbort, DataPlane, FromPlane, IntoPlane};
use crate::comm::spec::{GroupRole, GroupSpec, PeerTable};
use crate::exit::ExitCode;
use crate::ids::GroupRank;
use crate::wire::DType;
use crate::{Error, Result};
use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Bound for `group_end` and `destroy_comm`, which the trait gives no deadline.
const PLANE_OP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct NcclPlane {
    /// Shared with the model on this rank (one GPU layer: the same context and kernels).
    gpu: Arc<Gpu>,
    done: Completion,
    /// Serializes "enqueue + mark" so that ticket order is stream order.
    stream_lock: Mutex<()>,
    blocking: bool,
}

/// This rank's communicator for one group.
pub enum NcclComm {
    Nccl(Communicator),
    /// `world`: no NCCL communicator exists (see the module contract).
    Absent(String),
}

pub struct NcclPending {
    slot: Arc<OnceLock<Ticket>>,
    buf: DeviceBuf,
    /// Kept alive until completion (all-gather's send buffer).
    _keep: Option<DeviceBuf>,
    comm: AbortHandle,
    what: &'static str,
}

thread_local! {
    /// Slots of the ops issued inside the open group(s) of this thread; depth of nesting.
    static OPEN_GROUP: RefCell<(u32, Vec<Arc<OnceLock<Ticket>>>)> = const { RefCell::new((0, Vec::new())) };
}

fn reduce_dtype(d: DType) -> Result<ReduceDtype> {
    Ok(match d {
        DType::F32 => ReduceDtype::F32,
        DType::Bf16 => ReduceDtype::Bf16,
        DType::F16 => ReduceDtype::F16,
        DType::I32 => ReduceDtype::I32,
        DType::I64 => ReduceDtype::I64,
        DType::U8 => ReduceDtype::U8,
        other => {
            return Err(Error::BadInput(format!(
                "all-reduce of {other:?} is not supported on the NCCL data plane"
            )))
        }
    })
}

impl NcclPlane {
    /// Opens GPU `ordinal` for this rank.
    pub fn open(ordinal: usize, blocking: bool) -> Result<NcclPlane> {
        super::api::api()?;
        let gpu = Arc::new(Gpu::open_for_plane(ordinal)?);
        let done = gpu.completion(CompletionKind::HostFlag)?;
        Ok(NcclPlane {
            gpu,
            done,
            stream_lock: Mutex::new(()),
            blocking,
        })
    }

    /// The GPU and mode a rank uses: `LOCKSTEP_GPU` or `local_rank mod #GPUs`;
    /// `LOCKSTEP_NCCL_BLOCKING=1` for blocking communicators.
    pub fn for_rank(local_rank: u32) -> Result<NcclPlane> {
        // A missing driver stays a device error (76); no GPU or a bad LOCKSTEP_GPU is bad input.
        let ordinal = crate::cuda::probe::rank_gpu_ordinal(local_rank)?;
        let blocking = std::env::var("LOCKSTEP_NCCL_BLOCKING").is_ok_and(|v| v == "1");
        NcclPlane::open(ordinal, blocking)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn comm<'a>(&self, c: &'a NcclComm) -> Result<&'a Communicator> {
        match c {
            NcclComm::Nccl(c) => Ok(c),
            NcclComm::Absent(name) => Err(Error::Invariant(format!(
                "group {name} has no NCCL communicator on this backend (world collectives are not \
                 supported: rank 0 may share a GPU with a mesh rank)"
            ))),
        }
    }

    /// Enqueues one op (`f`) and its ticket; inside an open group the ticket waits for
    /// `group_end`.
    fn issue(
        &self,
        c: &NcclComm,
        what: &'static str,
        buf: DeviceBuf,
        keep: Option<DeviceBuf>,
        f: impl FnOnce(&Communicator, &mut DeviceBuf, Option<&DeviceBuf>) -> Result<()>,
    ) -> Result<NcclPending> {
        let comm = self.comm(c)?;
        let mut buf = buf;
        let slot = Arc::new(OnceLock::new());
        let in_group = OPEN_GROUP.with(|g| g.borrow().0 > 0);
        let _l = self
            .stream_lock
            .lock()
            .map_err(|_| Error::Invariant("NCCL plane stream lock poisoned".into()))?;
        f(comm, &mut buf, keep.as_ref())?;
        if in_group {
            OPEN_GROUP.with(|g| g.borrow_mut().1.push(slot.clone()));
        } else {
            let t = self.done.mark()?;
            let _ = slot.set(t);
        }
        Ok(NcclPending {
            slot,
            buf,
            _keep: keep,
            comm: comm.abort_handle(),
            what,
        })
    }
}

fn deadline() -> Instant {
    Instant::now() + PLANE_OP_TIMEOUT
}

/// Device-resident on NCCL: a device buffer is envelope storage as it is (no host staging).
impl IntoPlane<NcclPlane> for DeviceBuf {
    fn into_plane(self, _plane: &NcclPlane) -> Result<DeviceBuf> {
        Ok(self)
    }
}

impl FromPlane<NcclPlane> for DeviceBuf {
    fn from_plane(buf: DeviceBuf, _plane: &NcclPlane) -> Result<DeviceBuf> {
        Ok(buf)
    }
}

impl DataPlane for NcclPlane {
    type Buffer = DeviceBuf;
    type Comm = NcclComm;
    type Pending = NcclPending;

    fn take_device(buf: DeviceBuf) -> std::result::Result<DeviceBuf, DeviceBuf> {
        Ok(buf)
    }
    fn from_device(buf: DeviceBuf) -> std::result::Result<DeviceBuf, DeviceBuf> {
        Ok(buf)
    }
    const DEVICE_BUFFERS: bool = true;

    fn name(&self) -> &'static str {
        if self.blocking {
            "nccl-blocking"
        } else {
            "nccl"
        }
    }

    fn bootstrap_blob(&self, spec: &GroupSpec) -> Result<Vec<u8>> {
        if spec.role == GroupRole::World {
            return Ok(Vec::new());
        }
        Ok(UniqueId::new()?.to_bytes())
    }

    fn create_comm(
        &self,
        spec: &GroupSpec,
        me: GroupRank,
        blob: &[u8],
        _peers: &PeerTable,
        deadline: Instant,
    ) -> Result<NcclComm> {
        if spec.role == GroupRole::World {
            return Ok(NcclComm::Absent(spec.name.clone()));
        }
        let id = UniqueId::from_bytes(blob)?;
        let opts = CommOptions {
            name: spec.name.clone(),
            blocking: self.blocking,
            init_timeout: deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        };
        let c = Communicator::init(&self.gpu, &id, spec.members.len() as u32, me, &opts)?;
        Ok(NcclComm::Nccl(c))
    }

    fn destroy_comm(&self, comm: NcclComm) -> Result<()> {
        match comm {
            NcclComm::Nccl(c) => c.close(PLANE_OP_TIMEOUT).map(|_| ()),
            NcclComm::Absent(_) => Ok(()),
        }
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceBuf> {
        self.gpu.alloc(bytes)
    }

    fn alloc_for_recv(&self, bytes: usize) -> Result<DeviceBuf> {
        self.gpu.alloc_for_overwrite(bytes)
    }

    fn upload(&self, host: &[u8]) -> Result<DeviceBuf> {
        self.gpu.upload(host)
    }

    fn download(&self, buf: &DeviceBuf) -> Result<Vec<u8>> {
        self.gpu.download(buf)
    }

    fn device_group<'a>(&'a self, comm: &'a NcclComm) -> Option<super::DeviceGroup<'a>> {
        match comm {
            NcclComm::Nccl(comm) => Some(super::DeviceGroup {
                comm,
                gpu: &self.gpu,
            }),
            NcclComm::Absent(_) => None,
        }
    }

    fn buffer_len(&self, buf: &DeviceBuf) -> usize {
        buf.len()
    }

    fn send(&self, comm: &NcclComm, buf: DeviceBuf, peer: GroupRank) -> Result<NcclPending> {
        let gpu = &self.gpu;
        self.issue(comm, "send", buf, None, |c, b, _| {
            let n = b.len();
            c.send(gpu, b, n, peer, deadline())
        })
    }

    fn recv(&self, comm: &NcclComm, buf: DeviceBuf, peer: GroupRank) -> Result<NcclPending> {
        let gpu = &self.gpu;
        self.issue(comm, "recv", buf, None, |c, b, _| {
            let n = b.len();
            c.recv(gpu, b, n, peer, deadline())
        })
    }

    fn all_reduce_sum(&self, comm: &NcclComm, buf: DeviceBuf, dtype: DType) -> Result<NcclPending> {
        let dt = reduce_dtype(dtype)?;
        if buf.len() % dt.size() != 0 {
            return Err(Error::BadInput(format!(
                "all-reduce of {} bytes is not a whole number of {dtype:?} elements",
                buf.len()
            )));
        }
        let gpu = &self.gpu;
        self.issue(comm, "all-reduce", buf, None, |c, b, _| {
            let n = b.len() / dt.size();
            c.all_reduce_sum(gpu, b, n, dt, deadline())
        })
    }

    fn broadcast(&self, comm: &NcclComm, buf: DeviceBuf, root: GroupRank) -> Result<NcclPending> {
        let gpu = &self.gpu;
        self.issue(comm, "broadcast", buf, None, |c, b, _| {
            let n = b.len();
            c.broadcast(gpu, b, n, root, deadline())
        })
    }

    fn all_gather(&self, comm: &NcclComm, send: DeviceBuf, recv: DeviceBuf) -> Result<NcclPending> {
        let gpu = &self.gpu;
        self.issue(comm, "all-gather", recv, Some(send), |c, r, s| {
            let s =
                s.ok_or_else(|| Error::Invariant("all-gather without its send buffer".into()))?;
            let n = s.len();
            c.all_gather(gpu, s, n, r, deadline())
        })
    }

    fn group_start(&self, comm: &NcclComm) -> Result<()> {
        self.comm(comm)?.begin_group()?;
        OPEN_GROUP.with(|g| g.borrow_mut().0 += 1);
        Ok(())
    }

    fn group_end(&self, comm: &NcclComm) -> Result<()> {
        let c = self.comm(comm)?;
        let depth = OPEN_GROUP.with(|g| {
            let mut g = g.borrow_mut();
            g.0 = g.0.saturating_sub(1);
            g.0
        });
        let r = c.end_group(deadline());
        if depth == 0 {
            let slots = OPEN_GROUP.with(|g| std::mem::take(&mut g.borrow_mut().1));
            r?;
            let _l = self
                .stream_lock
                .lock()
                .map_err(|_| Error::Invariant("NCCL plane stream lock poisoned".into()))?;
            let t = self.done.mark()?;
            for s in slots {
                let _ = s.set(t);
            }
            return Ok(());
        }
        r
    }

    fn poll(&self, p: &NcclPending) -> bool {
        match p.slot.get() {
            Some(t) => self.done.is_done(*t).unwrap_or(true),
            None => false,
        }
    }

    fn wait(&self, p: NcclPending, deadline: Instant) -> Result<DeviceBuf> {
        let t = *p.slot.get().ok_or_else(|| {
            Error::Invariant(format!(
                "{} on {} waited before its group ended (no ticket yet)",
                p.what,
                p.comm.label()
            ))
        })?;
        let label = p.comm.label().to_owned();
        let what = p.what;
        let h = p.comm.clone();
        let r = self
            .done
            .wait(t, deadline, &|| format!("{what} on {label}"), &mut || {
                h.health()
            });
        if let Err(e) = r {
            h.mark_failed();
            return Err(e);
        }
        Ok(p.buf)
    }

    fn abort_handle(&self) -> PlaneAbort {
        PlaneAbort::new(|| {
            let t = Instant::now();
            let n = abort_all_live(
                "data plane aborted (watchdog or crash path)",
                ExitCode::WatchdogTimeout,
            );
            // One line the break-it tests (C1) and operators can read: the communicators were
            // aborted, not left alive at exit.
            crate::diag::line(&format!(
                "lockstep: nccl data plane: aborted {n} communicator(s) in {} ms (pid {})",
                t.elapsed().as_millis(),
                std::process::id()
            ));
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_dtypes_map_to_nccl_reductions_and_the_rest_are_refused() {
        assert_eq!(reduce_dtype(DType::F32).ok(), Some(ReduceDtype::F32));
        assert_eq!(reduce_dtype(DType::Bf16).ok(), Some(ReduceDtype::Bf16));
        assert_eq!(reduce_dtype(DType::I64).map(|d| d.size()).ok(), Some(8));
        for d in [DType::Bool, DType::F64, DType::F8E4m3] {
            assert!(matches!(reduce_dtype(d), Err(Error::BadInput(_))), "{d:?}");
        }
    }

    #[test]
    fn unique_id_travels_as_128_raw_bytes() {
        let raw: Vec<u8> = (0..128u32).map(|i| (i * 7) as u8).collect();
        let id = UniqueId::from_bytes(&raw).expect("128 bytes");
        assert_eq!(id.to_bytes(), raw);
        assert!(matches!(
            UniqueId::from_bytes(&raw[..127]),
            Err(Error::BadInput(_))
        ));
    }
}
