//! Host data plane: the [`DataPlane`] trait over TCP between processes (CI, the tiny model,
//! correctness runs without GPUs).
//!
//! Contract: NCCL's semantics, on host memory. One TCP connection per (group, peer pair), a
//! writer thread per connection (so simultaneous all-reduce writes never deadlock on full socket
//! buffers) and one worker thread per communicator that executes ops in issue order (the
//! "stream"). Every message carries a descriptor (op kind, dtype, root, bytes); when a peer's
//! descriptor does not match the op this rank issued, the worker **parks until aborted**, exactly
//! the hang NCCL gives (it prints what it saw so a human can read the hang; the watchdog and the
//! guards are what end it). All-reduce sums contributions in group-rank order, so every member
//! gets bitwise-identical results. A connection that closes mid-message is `PeerLost` with the
//! byte counts.
//! Tripwires: token mismatch on a data connection (refused, logged), peer EOF (PeerLost), abort
//! (every op fails), deadline (Timeout).
use super::plane::{AbortHandle, DataPlane};
use super::spec::{GroupSpec, PeerTable};
use crate::error::{Error, Result};
use crate::ids::GroupRank;
use crate::wire::DType;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"LKDH");
const DESC_MAGIC: u32 = u32::from_le_bytes(*b"LKDP");
const DESC_LEN: usize = 32;

struct Shared {
    aborted: AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
    conns: Mutex<HashMap<(u32, u32), TcpStream>>,
    conn_cv: Condvar,
    park: Mutex<()>,
    park_cv: Condvar,
}

impl Shared {
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        if let Ok(socks) = self.sockets.lock() {
            for s in socks.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        self.park_cv.notify_all();
        self.conn_cv.notify_all();
    }
    fn aborted_err(&self) -> Error {
        Error::PeerFailed("data plane aborted".into())
    }
    fn track(&self, s: &TcpStream) {
        if let (Ok(c), Ok(mut v)) = (s.try_clone(), self.sockets.lock()) {
            v.push(c);
        }
    }
    /// The NCCL-like hang: block until aborted.
    fn park_until_aborted(&self) -> Error {
        let mut g = self.park.lock().unwrap_or_else(|p| p.into_inner());
        while !self.aborted.load(Ordering::SeqCst) {
            g = match self.park_cv.wait_timeout(g, Duration::from_millis(200)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        self.aborted_err()
    }
}

/// The host backend. Binds its data listener at construction; the address goes into the
/// rendezvous registration.
pub struct HostPlane {
    addr: SocketAddr,
    token_digest: u64,
    shared: Arc<Shared>,
}

impl HostPlane {
    /// Binds the data listener on `ip` (port chosen by the OS) and starts accepting peers that
    /// present `token_digest`.
    pub fn bind(ip: IpAddr, token_digest: u64) -> Result<HostPlane> {
        let listener =
            TcpListener::bind((ip, 0)).map_err(|e| Error::io("bind data-plane listener", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("data-plane listener address", e))?;
        let shared = Arc::new(Shared {
            aborted: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            conn_cv: Condvar::new(),
            park: Mutex::new(()),
            park_cv: Condvar::new(),
        });
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("lockstep-data-accept".into())
            .spawn(move || accept_loop(listener, token_digest, sh))
            .map_err(|e| Error::io("spawn data-plane acceptor", e))?;
        Ok(HostPlane {
            addr,
            token_digest,
            shared,
        })
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Handshakes in progress at once; a connection beyond them is refused at once (a flood of
/// stray connections costs threads only up to this).
const MAX_PENDING_HELLOS: usize = 64;
/// How long a connection may take to present its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts connections and hands each to its own short handshake thread, so a silent or
/// garbage connection delays nobody: peers are registered as soon as their own hello arrives.
fn accept_loop(listener: TcpListener, token_digest: u64, shared: Arc<Shared>) {
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(s) = conn else { continue };
        if shared.aborted.load(Ordering::SeqCst) {
            return;
        }
        if pending.load(Ordering::SeqCst) >= MAX_PENDING_HELLOS {
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            crate::diag!(
                "lockstep: data plane: refused connection from {peer}: {MAX_PENDING_HELLOS} \
                 handshakes already pending"
            );
            continue;
        }
        pending.fetch_add(1, Ordering::SeqCst);
        let (sh, pend) = (shared.clone(), pending.clone());
        let spawned = std::thread::Builder::new()
            .name("lockstep-data-hello".into())
            .spawn(move || {
                handshake(s, token_digest, &sh);
                pend.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            pending.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reads one connection's hello (bounded by `HELLO_TIMEOUT`) and registers it, or refuses it
/// with one line naming the peer.
fn handshake(mut s: TcpStream, token_digest: u64, shared: &Shared) {
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let _ = s.set_read_timeout(Some(HELLO_TIMEOUT));
    let mut hello = [0u8; 24];
    if s.read_exact(&mut hello).is_err() {
        crate::diag!(
            "lockstep: data plane: refused connection from {peer}: no hello within {HELLO_TIMEOUT:?}"
        );
        return;
    }
    let magic = u32::from_le_bytes([hello[0], hello[1], hello[2], hello[3]]);
    let token = u64::from_le_bytes(hello[8..16].try_into().unwrap_or([0; 8]));
    if magic != HELLO_MAGIC || token != token_digest {
        crate::diag!(
            "lockstep: data plane: refused connection from {peer}: bad magic or job token"
        );
        return;
    }
    let gid = u32::from_le_bytes(hello[16..20].try_into().unwrap_or([0; 4]));
    let from = u32::from_le_bytes(hello[20..24].try_into().unwrap_or([0; 4]));
    let _ = s.set_read_timeout(None);
    let _ = s.set_nodelay(true);
    shared.track(&s);
    if let Ok(mut m) = shared.conns.lock() {
        m.insert((gid, from), s);
    }
    shared.conn_cv.notify_all();
}

struct WriteReq {
    desc: [u8; DESC_LEN],
    data: Arc<Vec<u8>>,
    done: mpsc::SyncSender<Result<()>>,
}

struct Link {
    read: TcpStream,
    write: mpsc::Sender<WriteReq>,
    global: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Desc {
    kind: u32,
    dtype: u32,
    root: u32,
    nbytes: u64,
}

impl Desc {
    fn encode(&self) -> [u8; DESC_LEN] {
        let mut b = [0u8; DESC_LEN];
        b[0..4].copy_from_slice(&DESC_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..12].copy_from_slice(&self.dtype.to_le_bytes());
        b[12..16].copy_from_slice(&self.root.to_le_bytes());
        b[16..24].copy_from_slice(&self.nbytes.to_le_bytes());
        b
    }
    fn decode(b: &[u8; DESC_LEN]) -> Option<Desc> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        if u32_at(0) != DESC_MAGIC {
            return None;
        }
        Some(Desc {
            kind: u32_at(4),
            dtype: u32_at(8),
            root: u32_at(12),
            nbytes: u64::from_le_bytes(b[16..24].try_into().ok()?),
        })
    }
    fn describe(&self) -> String {
        let kind = ["?", "p2p", "all_reduce", "broadcast", "all_gather"]
            .get(self.kind as usize)
            .copied()
            .unwrap_or("?");
        let dtype = DType::ALLOWED
            .get(self.dtype as usize)
            .map_or("bytes", |d| d.name());
        format!("{kind} {dtype} root {} {} bytes", self.root, self.nbytes)
    }
}

fn dtype_code(d: DType) -> u32 {
    DType::ALLOWED
        .iter()
        .position(|&x| x == d)
        .map_or(99, |i| i as u32)
}

enum JobKind {
    Send(u32),
    Recv(u32),
    AllReduce(DType),
    Broadcast(u32),
    AllGather(Vec<u8>),
}

struct Job {
    kind: JobKind,
    buf: Vec<u8>,
    done: mpsc::SyncSender<Result<Vec<u8>>>,
}

/// One communicator of the host plane.
pub struct HostComm {
    spec: GroupSpec,
    me: u32,
    tx: Mutex<Option<mpsc::Sender<Vec<Job>>>>,
    batch: Mutex<Option<Vec<Job>>>,
}

/// An enqueued host op.
pub struct HostPending {
    rx: mpsc::Receiver<Result<Vec<u8>>>,
    slot: Mutex<Option<Result<Vec<u8>>>>,
}

impl HostComm {
    fn submit(&self, kind: JobKind, buf: Vec<u8>) -> Result<HostPending> {
        let (done, rx) = mpsc::sync_channel(1);
        let job = Job { kind, buf, done };
        let mut batch = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = batch.as_mut() {
            b.push(job);
        } else {
            self.send_batch(vec![job])?;
        }
        Ok(HostPending {
            rx,
            slot: Mutex::new(None),
        })
    }
    fn send_batch(&self, jobs: Vec<Job>) -> Result<()> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.as_ref().and_then(|t| t.send(jobs).ok()).ok_or_else(|| {
            Error::PeerFailed(format!("group `{}`: communicator is gone", self.spec.name))
        })
    }
}

struct Worker {
    group: String,
    me: u32,
    links: Vec<Option<Link>>,
    shared: Arc<Shared>,
}

impl Worker {
    fn run(self, rx: mpsc::Receiver<Vec<Job>>) {
        while let Ok(batch) = rx.recv() {
            self.execute(batch);
        }
    }

    fn link(&self, q: u32) -> Result<&Link> {
        self.links
            .get(q as usize)
            .and_then(|l| l.as_ref())
            .ok_or_else(|| {
                Error::Invariant(format!("group `{}`: no link to group-rank {q}", self.group))
            })
    }

    fn post_write(
        &self,
        q: u32,
        desc: Desc,
        data: Arc<Vec<u8>>,
        waits: &mut Vec<mpsc::Receiver<Result<()>>>,
    ) -> Result<()> {
        let (done, rx) = mpsc::sync_channel(1);
        self.link(q)?
            .write
            .send(WriteReq {
                desc: desc.encode(),
                data,
                done,
            })
            .map_err(|_| self.shared.aborted_err())?;
        waits.push(rx);
        Ok(())
    }

    fn read_msg(&self, q: u32, want: Desc, into: &mut [u8]) -> Result<()> {
        let link = self.link(q)?;
        let mut r = &link.read;
        let mut d = [0u8; DESC_LEN];
        self.read_full(&mut r, &mut d, link.global, "descriptor")?;
        let got = Desc::decode(&d);
        if got != Some(want) {
            let seen = got.map_or("garbage".to_string(), |g| g.describe());
            crate::diag!(
                "lockstep: host data plane: group `{}`: global-rank {} sent [{seen}] while this rank waits for [{}]; NCCL would hang here, and so does the host plane (watchdog/guards end it)",
                self.group,
                link.global,
                want.describe()
            );
            return Err(self.shared.park_until_aborted());
        }
        self.read_full(&mut r, into, link.global, "payload")
    }

    fn read_full(&self, r: &mut &TcpStream, buf: &mut [u8], from: u32, what: &str) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match r.read(&mut buf[got..]) {
                Ok(0) => {
                    if self.shared.aborted.load(Ordering::SeqCst) {
                        return Err(self.shared.aborted_err());
                    }
                    return Err(Error::PeerLost(format!(
                        "data plane: global-rank {from} closed its connection on group `{}` mid-message ({what}: got {got} of {} bytes)",
                        self.group,
                        buf.len()
                    )));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if self.shared.aborted.load(Ordering::SeqCst) {
                        return Err(self.shared.aborted_err());
                    }
                    return Err(Error::PeerLost(format!(
                        "data plane: connection to global-rank {from} on group `{}` failed ({what}: got {got} of {} bytes): {e}",
                        self.group,
                        buf.len()
                    )));
                }
            }
        }
        Ok(())
    }

    fn post_job_writes(
        &self,
        job: &Job,
        peers: &[u32],
        nbytes: u64,
        data: &Arc<Vec<u8>>,
        waits: &mut Vec<mpsc::Receiver<Result<()>>>,
    ) -> Result<()> {
        match &job.kind {
            JobKind::Send(q) => self.post_write(
                *q,
                Desc {
                    kind: 1,
                    dtype: 99,
                    root: 0,
                    nbytes,
                },
                data.clone(),
                waits,
            ),
            JobKind::AllReduce(dt) => peers.iter().try_for_each(|&q| {
                self.post_write(
                    q,
                    Desc {
                        kind: 2,
                        dtype: dtype_code(*dt),
                        root: 0,
                        nbytes,
                    },
                    data.clone(),
                    waits,
                )
            }),
            JobKind::Broadcast(root) if *root == self.me => peers.iter().try_for_each(|&q| {
                self.post_write(
                    q,
                    Desc {
                        kind: 3,
                        dtype: 99,
                        root: *root,
                        nbytes,
                    },
                    data.clone(),
                    waits,
                )
            }),
            JobKind::AllGather(_) => peers.iter().try_for_each(|&q| {
                self.post_write(
                    q,
                    Desc {
                        kind: 4,
                        dtype: 99,
                        root: 0,
                        nbytes,
                    },
                    data.clone(),
                    waits,
                )
            }),
            _ => Ok(()),
        }
    }

    fn execute(&self, jobs: Vec<Job>) {
        let n = self.links.len() as u32;
        let peers: Vec<u32> = (0..n).filter(|&q| q != self.me).collect();
        // Phase 1: post every write (writer threads progress them independently).
        // A job that writes moves its buffer into an Arc shared with the writer threads (no
        // copy); it gets it back after the writes completed.
        let mut jobs = jobs;
        let mut waits = Vec::new();
        let mut first_err: Option<Error> = None;
        let mut datas: Vec<Option<Arc<Vec<u8>>>> = Vec::with_capacity(jobs.len());
        for job in jobs.iter_mut() {
            let writes = match &job.kind {
                JobKind::Send(_) | JobKind::AllReduce(_) | JobKind::AllGather(_) => true,
                JobKind::Broadcast(root) => *root == self.me,
                JobKind::Recv(_) => false,
            };
            if !writes {
                datas.push(None);
                continue;
            }
            let nbytes = job.buf.len() as u64;
            let data = Arc::new(std::mem::take(&mut job.buf));
            let r = self.post_job_writes(job, &peers, nbytes, &data, &mut waits);
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
            datas.push(Some(data));
        }
        // Phase 2: reads, in issue order; then phase 3: write completions.
        let mut results: Vec<Result<Vec<u8>>> = Vec::new();
        for (i, job) in jobs.iter_mut().enumerate() {
            if let Some(e) = &first_err {
                results.push(Err(clone_err(e)));
                continue;
            }
            let mine: &[u8] = match &datas[i] {
                Some(d) => d.as_slice(),
                None => &job.buf,
            };
            let nbytes = mine.len() as u64;
            let r = match &job.kind {
                // Filled in after the writes completed.
                JobKind::Send(_) => Ok(Vec::new()),
                JobKind::Recv(q) => {
                    let mut b = std::mem::take(&mut job.buf);
                    self.read_msg(
                        *q,
                        Desc {
                            kind: 1,
                            dtype: 99,
                            root: 0,
                            nbytes,
                        },
                        &mut b,
                    )
                    .map(|_| b)
                }
                JobKind::Broadcast(root) => {
                    if *root == self.me {
                        Ok(Vec::new())
                    } else {
                        let mut b = std::mem::take(&mut job.buf);
                        self.read_msg(
                            *root,
                            Desc {
                                kind: 3,
                                dtype: 99,
                                root: *root,
                                nbytes,
                            },
                            &mut b,
                        )
                        .map(|_| b)
                    }
                }
                JobKind::AllReduce(dt) => (|| {
                    let mut parts: Vec<Vec<u8>> = Vec::with_capacity(n as usize);
                    for q in 0..n {
                        if q == self.me {
                            parts.push(mine.to_vec());
                        } else {
                            let mut b = vec![0u8; mine.len()];
                            self.read_msg(
                                q,
                                Desc {
                                    kind: 2,
                                    dtype: dtype_code(*dt),
                                    root: 0,
                                    nbytes,
                                },
                                &mut b,
                            )?;
                            parts.push(b);
                        }
                    }
                    sum_in_rank_order(*dt, &parts)
                })(),
                JobKind::AllGather(recv) => (|| {
                    let len = mine.len();
                    let mut out = recv.clone();
                    if out.len() != len * n as usize {
                        return Err(Error::Invariant(format!(
                            "all_gather on `{}`: recv buffer is {} bytes, needs {}",
                            self.group,
                            out.len(),
                            len * n as usize
                        )));
                    }
                    for q in 0..n {
                        let dst = &mut out[q as usize * len..(q as usize + 1) * len];
                        if q == self.me {
                            dst.copy_from_slice(mine);
                        } else {
                            self.read_msg(
                                q,
                                Desc {
                                    kind: 4,
                                    dtype: 99,
                                    root: 0,
                                    nbytes,
                                },
                                dst,
                            )?;
                        }
                    }
                    Ok(out)
                })(),
            };
            if let Err(e) = &r {
                first_err.get_or_insert(clone_err(e));
            }
            results.push(r);
        }
        for w in waits {
            match w.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(self.shared.aborted_err());
                }
            }
        }
        for ((job, r), data) in jobs.into_iter().zip(results).zip(datas) {
            let r = match (&first_err, r) {
                (Some(e), Ok(_)) => Err(clone_err(e)),
                (_, Ok(v))
                    if matches!(job.kind, JobKind::Send(_) | JobKind::Broadcast(_))
                        && v.is_empty() =>
                {
                    // The writers are done with it: take the buffer back (copy only if shared).
                    Ok(data.map_or_else(Vec::new, |d| {
                        Arc::try_unwrap(d).unwrap_or_else(|d| (*d).clone())
                    }))
                }
                (_, r) => r,
            };
            let _ = job.done.send(r);
        }
    }
}

/// Errors are not Clone (io::Error); keep the class and the message.
fn clone_err(e: &Error) -> Error {
    match e {
        Error::PeerLost(m) => Error::PeerLost(m.clone()),
        Error::PeerFailed(m) => Error::PeerFailed(m.clone()),
        Error::Timeout(m) => Error::Timeout(m.clone()),
        other => Error::Invariant(other.to_string()),
    }
}

fn sum_in_rank_order(dt: DType, parts: &[Vec<u8>]) -> Result<Vec<u8>> {
    let Some(first) = parts.first() else {
        return Ok(Vec::new());
    };
    let mut acc = first.clone();
    for p in &parts[1..] {
        match dt {
            DType::F32 => {
                for (a, b) in acc.chunks_exact_mut(4).zip(p.chunks_exact(4)) {
                    let s = f32::from_le_bytes([a[0], a[1], a[2], a[3]])
                        + f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    a.copy_from_slice(&s.to_le_bytes());
                }
            }
            DType::Bf16 | DType::F16 => {
                for (a, b) in acc.chunks_exact_mut(2).zip(p.chunks_exact(2)) {
                    let (x, y) = (
                        u16::from_le_bytes([a[0], a[1]]),
                        u16::from_le_bytes([b[0], b[1]]),
                    );
                    let s = if dt == DType::Bf16 {
                        half::bf16::from_f32(
                            half::bf16::from_bits(x).to_f32() + half::bf16::from_bits(y).to_f32(),
                        )
                        .to_bits()
                    } else {
                        half::f16::from_f32(
                            half::f16::from_bits(x).to_f32() + half::f16::from_bits(y).to_f32(),
                        )
                        .to_bits()
                    };
                    a.copy_from_slice(&s.to_le_bytes());
                }
            }
            DType::I32 => {
                for (a, b) in acc.chunks_exact_mut(4).zip(p.chunks_exact(4)) {
                    let s = i32::from_le_bytes([a[0], a[1], a[2], a[3]])
                        .wrapping_add(i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    a.copy_from_slice(&s.to_le_bytes());
                }
            }
            DType::I64 => {
                for (a, b) in acc.chunks_exact_mut(8).zip(p.chunks_exact(8)) {
                    let x = i64::from_le_bytes(a[..8].try_into().unwrap_or([0; 8]));
                    let y = i64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
                    a.copy_from_slice(&x.wrapping_add(y).to_le_bytes());
                }
            }
            DType::U8 => {
                for (a, b) in acc.iter_mut().zip(p) {
                    *a = a.wrapping_add(*b);
                }
            }
            other => {
                return Err(Error::Invariant(format!(
                    "all_reduce: dtype {} not supported",
                    other.name()
                )))
            }
        }
    }
    Ok(acc)
}

fn writer_loop(mut s: TcpStream, rx: mpsc::Receiver<WriteReq>, to: u32, group: String) {
    while let Ok(req) = rx.recv() {
        let WriteReq { desc, data, done } = req;
        let r = s
            .write_all(&desc)
            .and_then(|_| s.write_all(&data))
            .map_err(|e| {
                Error::PeerLost(format!(
                    "data plane: write to global-rank {to} on group `{group}` failed: {e}"
                ))
            });
        // Release our share of the buffer before reporting, so the op can take it back.
        drop(data);
        let _ = done.send(r);
    }
}

impl DataPlane for HostPlane {
    type Buffer = Vec<u8>;
    type Comm = HostComm;
    type Pending = HostPending;

    fn name(&self) -> &'static str {
        "host"
    }
    fn bootstrap_blob(&self, _spec: &GroupSpec) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }

    fn create_comm(
        &self,
        spec: &GroupSpec,
        me: GroupRank,
        _blob: &[u8],
        peers: &PeerTable,
        deadline: Instant,
    ) -> Result<HostComm> {
        let n = spec.size();
        let mut links: Vec<Option<Link>> = (0..n).map(|_| None).collect();
        for q in 0..n {
            if q == me.0 {
                continue;
            }
            let global = spec.members[q as usize].0;
            let stream = if q < me.0 {
                let addr = peers.data_addrs.get(global as usize).ok_or_else(|| {
                    Error::Invariant(format!("no data address for global-rank {global}"))
                })?;
                let mut s = connect_until(addr, deadline)?;
                let mut hello = [0u8; 24];
                hello[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
                hello[8..16].copy_from_slice(&self.token_digest.to_le_bytes());
                hello[16..20].copy_from_slice(&spec.id.to_le_bytes());
                hello[20..24].copy_from_slice(&me.0.to_le_bytes());
                s.write_all(&hello)
                    .map_err(|e| Error::io("data-plane hello", e))?;
                let _ = s.set_nodelay(true);
                self.shared.track(&s);
                s
            } else {
                let mut m = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(s) = m.remove(&(spec.id, q)) {
                        break s;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::Timeout(format!(
                            "group `{}`: global-rank {global} did not connect its data plane in time",
                            spec.name
                        )));
                    }
                    m = match self.shared.conn_cv.wait_timeout(m, deadline - now) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    };
                }
            };
            let w = stream
                .try_clone()
                .map_err(|e| Error::io("clone data socket", e))?;
            let (wtx, wrx) = mpsc::channel();
            let gname = spec.name.clone();
            std::thread::Builder::new()
                .name(format!("lockstep-w-{}-{global}", spec.name))
                .spawn(move || writer_loop(w, wrx, global, gname))
                .map_err(|e| Error::io("spawn writer", e))?;
            links[q as usize] = Some(Link {
                read: stream,
                write: wtx,
                global,
            });
        }
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            group: spec.name.clone(),
            me: me.0,
            links,
            shared: self.shared.clone(),
        };
        std::thread::Builder::new()
            .name(format!("lockstep-comm-{}", spec.name))
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::io("spawn comm worker", e))?;
        Ok(HostComm {
            spec: spec.clone(),
            me: me.0,
            tx: Mutex::new(Some(tx)),
            batch: Mutex::new(None),
        })
    }

    fn destroy_comm(&self, comm: HostComm) -> Result<()> {
        // Closing the job channel ends the worker; sockets close with their threads.
        let _ = comm.me;
        drop(comm);
        Ok(())
    }

    fn alloc(&self, bytes: usize) -> Result<Vec<u8>> {
        Ok(vec![0u8; bytes])
    }
    fn upload(&self, host: &[u8]) -> Result<Vec<u8>> {
        Ok(host.to_vec())
    }
    fn upload_owned(&self, host: Vec<u8>) -> Result<Vec<u8>> {
        Ok(host)
    }
    fn download(&self, buf: &Vec<u8>) -> Result<Vec<u8>> {
        Ok(buf.clone())
    }
    fn take_host(&self, buf: Vec<u8>) -> Result<Vec<u8>> {
        Ok(buf)
    }
    fn buffer_len(&self, buf: &Vec<u8>) -> usize {
        buf.len()
    }

    fn send(&self, comm: &HostComm, buf: Vec<u8>, peer: GroupRank) -> Result<HostPending> {
        comm.submit(JobKind::Send(peer.0), buf)
    }
    fn recv(&self, comm: &HostComm, buf: Vec<u8>, peer: GroupRank) -> Result<HostPending> {
        comm.submit(JobKind::Recv(peer.0), buf)
    }
    fn all_reduce_sum(&self, comm: &HostComm, buf: Vec<u8>, dtype: DType) -> Result<HostPending> {
        comm.submit(JobKind::AllReduce(dtype), buf)
    }
    fn broadcast(&self, comm: &HostComm, buf: Vec<u8>, root: GroupRank) -> Result<HostPending> {
        comm.submit(JobKind::Broadcast(root.0), buf)
    }
    fn all_gather(&self, comm: &HostComm, send: Vec<u8>, recv: Vec<u8>) -> Result<HostPending> {
        comm.submit(JobKind::AllGather(recv), send)
    }
    fn group_start(&self, comm: &HostComm) -> Result<()> {
        let mut b = comm.batch.lock().unwrap_or_else(|p| p.into_inner());
        if b.is_some() {
            return Err(Error::Invariant(format!(
                "group `{}`: nested group_start",
                comm.spec.name
            )));
        }
        *b = Some(Vec::new());
        Ok(())
    }
    fn group_end(&self, comm: &HostComm) -> Result<()> {
        let jobs = comm
            .batch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                Error::Invariant(format!(
                    "group `{}`: group_end without group_start",
                    comm.spec.name
                ))
            })?;
        if jobs.is_empty() {
            return Ok(());
        }
        comm.send_batch(jobs)
    }

    fn poll(&self, p: &HostPending) -> bool {
        let mut slot = p.slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return true;
        }
        match p.rx.try_recv() {
            Ok(r) => {
                *slot = Some(r);
                true
            }
            Err(mpsc::TryRecvError::Empty) => false,
            Err(mpsc::TryRecvError::Disconnected) => true,
        }
    }

    fn wait(&self, p: HostPending, deadline: Instant) -> Result<Vec<u8>> {
        if let Some(r) = p.slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return r;
        }
        let now = Instant::now();
        match p.rx.recv_timeout(deadline.saturating_duration_since(now)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Timeout(
                "data-plane op did not complete by its deadline".into(),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.shared.aborted_err()),
        }
    }

    fn abort_handle(&self) -> AbortHandle {
        let sh = self.shared.clone();
        AbortHandle::new(move || sh.abort())
    }
}

fn connect_until(addr: &str, deadline: Instant) -> Result<TcpStream> {
    let sa: SocketAddr = addr
        .parse()
        .map_err(|_| Error::BadInput(format!("bad data-plane address {addr:?}")))?;
    connect_retrying(sa, deadline).map_err(|e| Error::io(format!("connect data plane {addr}"), e))
}

/// Connects to `addr`, retrying a refused or timed-out attempt (the peer may still be starting)
/// with a short pause, until `deadline`; each attempt is bounded by the time left (at most
/// 500 ms). The last attempt's error when the deadline passes. The one TCP connect loop of the
/// crate: the data plane's links and the rendezvous (`rank::bootstrap`) both use it.
pub(crate) fn connect_retrying(addr: SocketAddr, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = left.clamp(Duration::from_millis(1), Duration::from_millis(500));
        match TcpStream::connect_timeout(&addr, attempt) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::group::{GroupRole, GroupSpec};
    use crate::ids::GlobalRank;

    /// Two host planes in one process, one communicator each over `[0, 1]`.
    fn pair() -> ((HostPlane, HostComm), (HostPlane, HostComm)) {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        pair_with(HostPlane::bind(ip, 7).unwrap())
    }

    /// `pair` with `a` as group-rank 0.
    fn pair_with(a: HostPlane) -> ((HostPlane, HostComm), (HostPlane, HostComm)) {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let b = HostPlane::bind(ip, 7).unwrap();
        let peers = PeerTable {
            data_addrs: vec![a.addr().to_string(), b.addr().to_string()],
            token_digest: 7,
        };
        let spec = GroupSpec {
            name: "mesh".into(),
            id: 2,
            role: GroupRole::Mesh,
            members: vec![GlobalRank(0), GlobalRank(1)],
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let (s2, p2) = (spec.clone(), peers.clone());
        let t = std::thread::spawn(move || {
            let cb = b
                .create_comm(&s2, GroupRank(1), &[], &p2, deadline)
                .unwrap();
            (b, cb)
        });
        let ca = a
            .create_comm(&spec, GroupRank(0), &[], &peers, deadline)
            .unwrap();
        ((a, ca), t.join().unwrap())
    }

    /// Stray connections during bootstrap (silent ones that never say hello, and garbage)
    /// neither delay nor stop the real peers: handshakes run concurrently.
    #[test]
    fn stray_connections_do_not_delay_the_data_plane_bootstrap() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = HostPlane::bind(ip, 7).unwrap();
        let mut strays = Vec::new();
        for i in 0..20 {
            let mut s = TcpStream::connect(a.addr()).unwrap();
            if i % 2 == 1 {
                let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\ngarbage-garbage");
            }
            strays.push(s);
        }
        let t0 = Instant::now();
        let ((_pa, _ca), (_pb, _cb)) = pair_with(a);
        let took = t0.elapsed();
        // One at a time with a 2 s deadline each, 10 silent strays cost 20 s; now they cost
        // nothing.
        assert!(
            took < Duration::from_millis(1500),
            "bootstrap took {took:?} behind strays"
        );
        drop(strays);
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn host_all_reduce_gives_identical_sums_on_every_member() {
        let ((a, ca), (b, cb)) = pair();
        let d = Instant::now() + Duration::from_secs(5);
        let pa = a
            .all_reduce_sum(&ca, f32s(&[1.0, 2.0]), DType::F32)
            .unwrap();
        let pb = b
            .all_reduce_sum(&cb, f32s(&[10.0, 20.0]), DType::F32)
            .unwrap();
        let (ra, rb) = (a.wait(pa, d).unwrap(), b.wait(pb, d).unwrap());
        assert_eq!(ra, f32s(&[11.0, 22.0]));
        assert_eq!(ra, rb);
    }

    #[test]
    fn host_mismatched_collectives_hang_until_aborted_like_nccl() {
        let ((a, ca), (b, cb)) = pair();
        let pa = a.all_reduce_sum(&ca, f32s(&[1.0]), DType::F32).unwrap();
        let pb = b.broadcast(&cb, vec![0u8; 4], GroupRank(1)).unwrap();
        // Neither side errors on its own: the mismatch hangs (bounded here by the deadline).
        let err = a
            .wait(pa, Instant::now() + Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not complete by its deadline"), "{err}");
        let _ = b.wait(pb, Instant::now() + Duration::from_secs(5));
        // The parked side stays parked until its abort handle, called from another thread,
        // releases it; then its ops fail instead of hanging.
        let pa2 = a.all_reduce_sum(&ca, f32s(&[1.0]), DType::F32).unwrap();
        let abort = a.abort_handle();
        let t = std::thread::spawn(move || abort.abort());
        let err = a
            .wait(pa2, Instant::now() + Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        t.join().unwrap();
        assert!(err.contains("data plane aborted"), "{err}");
    }
}
