//! The model's view of its tensor-parallel group: a small trait (`TpComm`) that the mesh's real
//! communicator implements, plus two in-process implementations — `SoloComm` (TP=1) and
//! `ThreadComm` (TP=n on threads over channels, used by the model's unit tests, e.g. TP=2 ==
//! TP=1). `lockstep run` uses the `mesh` group's collective wrapper (`pipeline::ranks`).
//!
//! Contract: all ranks call the same collectives in the same order. `ThreadComm` tags every
//! message with (sequence number, op name) and fails with both sides' op on a mismatch, instead
//! of silently pairing the wrong buffers. Every receive is bounded by a timeout (→
//! `Error::Timeout` naming the op) and a vanished peer is `Error::PeerLost` at once (its channel
//! disconnects): crash > hang.
//!
//! All-reduce sums partials in group-rank order on every rank, so every rank gets bitwise the
//! same result (determinism across ranks, not across TP degrees).
//!
//! Spans (`crate::spans`): an implementation makes each collective of a group of more than one
//! rank a span named by op, dtype and the bytes this rank sends (`all_reduce f32 49152 B`); a
//! group of one moves nothing and makes none.
use crate::ids::GroupRank;
use crate::spans;
use crate::{Error, Result};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

/// A tensor-parallel group as the model sees it.
pub trait TpComm: Send {
    fn rank(&self) -> GroupRank;
    fn size(&self) -> u32;
    /// Element-wise sum across the group, in place.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Every rank's `local` (all the same length), indexed by group rank.
    fn all_gather_u64(&mut self, local: &[u64]) -> Result<Vec<Vec<u64>>>;
    /// Whether the group sums a model's own device buffers (a GPU data plane: NCCL): the GPU
    /// model then calls `device_all_reduce_*` on its stream instead of staging its partial sums
    /// through the host. Host groups (the default) say no.
    fn has_device_path(&self) -> bool {
        false
    }
    /// In-place sum over the group of a bf16 device buffer, enqueued on `stream` (only when
    /// `has_device_path`).
    fn device_all_reduce_bf16(
        &mut self,
        _stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        _buf: &mut cudarc::driver::CudaViewMut<'_, half::bf16>,
    ) -> Result<()> {
        Err(Error::Invariant(
            "device all-reduce on a group without a device path".into(),
        ))
    }
    /// In-place sum over the group of an f32 device buffer, enqueued on `stream`.
    fn device_all_reduce_f32(
        &mut self,
        _stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        _buf: &mut cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<()> {
        Err(Error::Invariant(
            "device all-reduce on a group without a device path".into(),
        ))
    }
    /// The caller saw its stream pass every device op issued so far (it read an output computed
    /// after them): their flight-recorder records are completed.
    fn settle_device_ops(&mut self) {}
}

/// TP = 1: every collective is the identity.
#[derive(Debug, Default)]
pub struct SoloComm;

impl TpComm for SoloComm {
    fn rank(&self) -> GroupRank {
        GroupRank(0)
    }
    fn size(&self) -> u32 {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&mut self, local: &[u64]) -> Result<Vec<Vec<u64>>> {
        Ok(vec![local.to_vec()])
    }
}

enum Payload {
    F32(Vec<f32>),
    U64(Vec<u64>),
}

struct Msg {
    seq: u64,
    op: &'static str,
    payload: Payload,
}

/// One rank of an in-process group over channels.
pub struct ThreadComm {
    rank: u32,
    size: u32,
    seq: u64,
    timeout: Duration,
    to: Vec<Option<Sender<Msg>>>,
    from: Vec<Option<Receiver<Msg>>>,
}

impl ThreadComm {
    /// A fully connected group of `n` ranks; element `r` is group-rank `r`.
    pub fn group(n: u32, timeout: Duration) -> Vec<ThreadComm> {
        let n_us = n as usize;
        let mut to: Vec<Vec<Option<Sender<Msg>>>> = (0..n_us)
            .map(|_| (0..n_us).map(|_| None).collect())
            .collect();
        let mut from: Vec<Vec<Option<Receiver<Msg>>>> = (0..n_us)
            .map(|_| (0..n_us).map(|_| None).collect())
            .collect();
        for a in 0..n_us {
            for b in 0..n_us {
                if a != b {
                    let (tx, rx) = channel();
                    to[a][b] = Some(tx);
                    from[b][a] = Some(rx);
                }
            }
        }
        to.into_iter()
            .zip(from)
            .enumerate()
            .map(|(r, (to, from))| ThreadComm {
                rank: r as u32,
                size: n,
                seq: 0,
                timeout,
                to,
                from,
            })
            .collect()
    }

    fn send(&self, peer: usize, op: &'static str, payload: Payload) -> Result<()> {
        let tx = self.to.get(peer).and_then(|t| t.as_ref()).ok_or_else(|| {
            Error::Invariant(format!("mesh {op}: no channel to group-rank {peer}"))
        })?;
        tx.send(Msg {
            seq: self.seq,
            op,
            payload,
        })
        .map_err(|_| {
            Error::PeerLost(format!(
                "mesh group-rank {peer} is gone (during {op} #{})",
                self.seq
            ))
        })
    }

    fn recv(&self, peer: usize, op: &'static str) -> Result<Payload> {
        let rx = self
            .from
            .get(peer)
            .and_then(|r| r.as_ref())
            .ok_or_else(|| {
                Error::Invariant(format!("mesh {op}: no channel from group-rank {peer}"))
            })?;
        let m = rx.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => Error::Timeout(format!(
                "mesh {op} #{} on group-rank {}: nothing from group-rank {peer} within {:?}",
                self.seq, self.rank, self.timeout
            )),
            RecvTimeoutError::Disconnected => Error::PeerLost(format!(
                "mesh group-rank {peer} is gone (group-rank {} waiting in {op} #{})",
                self.rank, self.seq
            )),
        })?;
        if m.seq != self.seq || m.op != op {
            return Err(Error::Invariant(format!(
                "collective mismatch on the mesh: group-rank {} issued {op} #{}, group-rank {peer} \
                 issued {} #{}",
                self.rank, self.seq, m.op, m.seq
            )));
        }
        Ok(m.payload)
    }

    fn peers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.size as usize).filter(move |p| *p != self.rank as usize)
    }
}

impl TpComm for ThreadComm {
    fn rank(&self) -> GroupRank {
        GroupRank(self.rank)
    }
    fn size(&self) -> u32 {
        self.size
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        const OP: &str = "all_reduce_sum";
        let _span = (self.size > 1)
            .then(|| spans::collective("all_reduce", "f32", std::mem::size_of_val(buf) as u64));
        for p in self.peers() {
            self.send(p, OP, Payload::F32(buf.to_vec()))?;
        }
        let mut parts: Vec<Option<Vec<f32>>> = (0..self.size).map(|_| None).collect();
        for p in self.peers().collect::<Vec<_>>() {
            match self.recv(p, OP)? {
                Payload::F32(v) if v.len() == buf.len() => parts[p] = Some(v),
                _ => {
                    return Err(Error::Invariant(format!(
                        "mesh {OP} #{}: group-rank {p} sent a buffer of another length/type \
                         (want {} f32)",
                        self.seq,
                        buf.len()
                    )))
                }
            }
        }
        let mine = buf.to_vec();
        parts[self.rank as usize] = Some(mine);
        buf.iter_mut().for_each(|v| *v = 0.0);
        for part in parts.iter().flatten() {
            for (a, b) in buf.iter_mut().zip(part) {
                *a += b;
            }
        }
        self.seq += 1;
        Ok(())
    }

    fn all_gather_u64(&mut self, local: &[u64]) -> Result<Vec<Vec<u64>>> {
        const OP: &str = "all_gather_u64";
        let _span = (self.size > 1)
            .then(|| spans::collective("all_gather", "u64", std::mem::size_of_val(local) as u64));
        for p in self.peers() {
            self.send(p, OP, Payload::U64(local.to_vec()))?;
        }
        let mut out: Vec<Vec<u64>> = vec![Vec::new(); self.size as usize];
        for p in self.peers().collect::<Vec<_>>() {
            match self.recv(p, OP)? {
                Payload::U64(v) => out[p] = v,
                _ => {
                    return Err(Error::Invariant(format!(
                        "mesh {OP} #{}: group-rank {p} sent another payload type",
                        self.seq
                    )))
                }
            }
        }
        out[self.rank as usize] = local.to_vec();
        self.seq += 1;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Gathered = (Vec<f32>, Vec<Vec<u64>>);

    #[test]
    fn thread_group_collectives_agree() {
        let comms = ThreadComm::group(3, Duration::from_secs(5));
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || -> Result<Gathered> {
                    let r = c.rank().get();
                    let mut v = vec![r as f32, 1.0];
                    c.all_reduce_sum(&mut v)?;
                    let g = c.all_gather_u64(&[u64::from(r) * 10])?;
                    Ok((v, g))
                })
            })
            .collect();
        for h in handles {
            let (v, g) = h.join().unwrap().unwrap();
            assert_eq!(v, vec![3.0, 3.0]);
            assert_eq!(g, vec![vec![0], vec![10], vec![20]]);
        }
    }

    #[test]
    fn mismatched_collectives_fail_with_both_ops() {
        let mut comms = ThreadComm::group(2, Duration::from_secs(5));
        let mut b = comms.pop().unwrap();
        let mut a = comms.pop().unwrap();
        let t = std::thread::spawn(move || b.all_gather_u64(&[1]).map(|_| ()));
        let e = a.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(e.contains("collective mismatch"), "{e}");
        assert!(
            e.contains("all_reduce_sum") && e.contains("all_gather_u64"),
            "{e}"
        );
        drop(a);
        // The other side sees either the mismatch or the vanished peer: never a hang.
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn vanished_peer_is_peer_lost_not_a_hang() {
        let mut comms = ThreadComm::group(2, Duration::from_secs(30));
        drop(comms.pop());
        let mut a = comms.pop().unwrap();
        let e = a.all_reduce_sum(&mut [1.0]).unwrap_err();
        assert!(matches!(e, Error::PeerLost(_)), "{e}");
    }

    #[test]
    fn silent_peer_times_out_naming_the_op() {
        let mut comms = ThreadComm::group(2, Duration::from_millis(50));
        let _b = comms.pop();
        let mut a = comms.pop().unwrap();
        let e = a.all_gather_u64(&[1]).unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
        assert!(e.to_string().contains("all_gather_u64 #0"), "{e}");
    }
}
