//! Bootstrap: environment → rendezvous (rank 0 hosts it) → parity → communicators in the one
//! creation order → envelope lane → control readers → watchdog, on any data plane; the host and
//! NCCL entry points (module contract in `rank/mod.rs`).
use super::env::{job_id, RankEnv, RankOptions};
use super::reader::{reader_loop, ReaderCtx};
use super::recv::RecvPool;
use super::send::{Outbox, SendState};
use super::{Acceptance, Rank};
use crate::comm::control::{
    from_json, read_frame, to_json, write_frame, FailedNotice, FrameKind, Hello, Welcome,
    PROTOCOL_VERSION,
};
use crate::comm::group::{standard_groups, Group, PeerTable};
use crate::comm::nccl::NcclPlane;
use crate::comm::parity::{parity_diff, Fingerprint};
use crate::comm::plane::DataPlane;
use crate::comm::recorder::Recorder;
use crate::comm::{watchdog, HostPlane};
use crate::digest::fnv64;
use crate::error::{Error, Result};
use crate::fault;
use crate::ids::GlobalRank;
use crate::wire::EnvelopeIds;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

impl Rank<HostPlane> {
    /// Bootstraps a rank on the host data plane.
    pub fn bootstrap_host(env: &RankEnv, opts: RankOptions) -> Result<Rank<HostPlane>> {
        Rank::bootstrap_with(env, opts, |ip, token_digest| {
            let p = HostPlane::bind(ip, token_digest)?;
            let addr = p.addr().to_string();
            Ok((p, addr))
        })
    }
}

/// Bootstraps a rank on the NCCL data plane (rendezvous, parity, communicators, watchdog), the
/// NCCL counterpart of [`Rank::bootstrap_host`]: the GPU is `LOCKSTEP_GPU` or
/// `local_rank mod #GPUs`.
pub fn bootstrap_nccl(env: &RankEnv, opts: RankOptions) -> Result<Rank<NcclPlane>> {
    let local = env.local_rank;
    Rank::bootstrap_with(env, opts, move |_ip, _token| {
        Ok((NcclPlane::for_rank(local)?, String::new()))
    })
}

impl<D: DataPlane> Rank<D> {
    /// Bootstraps a rank; `make_plane(local_ip, token_digest)` builds the data plane and returns
    /// the address it advertises (empty when it needs none).
    pub fn bootstrap_with(
        env: &RankEnv,
        opts: RankOptions,
        make_plane: impl FnOnce(IpAddr, u64) -> Result<(D, String)>,
    ) -> Result<Rank<D>> {
        let recorder = Arc::new(Recorder::new(
            env.rank,
            env.world_size,
            opts.recorder_capacity,
            env.dump_dir.clone(),
        ));
        let r = Self::bootstrap_inner(env, opts, make_plane, recorder.clone());
        if let Err(e) = &r {
            // A rank that fails its rendezvous (a peer stopped or killed before it registered)
            // leaves a dump like any failing rank, so `fr analyze` sees the witnesses and names
            // the rank that left none. Bad input (a duplicated RANK, a port in use) is this
            // process's own configuration, not a witness: its dump would take a real rank's file.
            if !matches!(e, Error::BadInput(_)) {
                let code = e.exit_code();
                match recorder.dump(&format!("bootstrap: {e}"), Some(code)) {
                    Ok(p) => crate::diag!(
                        "lockstep[global-rank {}]: flight recorder dumped to {}",
                        env.rank,
                        p.display()
                    ),
                    Err(d) => crate::diag!(
                        "lockstep[global-rank {}]: flight recorder dump failed: {d}",
                        env.rank
                    ),
                }
            }
        }
        r
    }

    fn bootstrap_inner(
        env: &RankEnv,
        opts: RankOptions,
        make_plane: impl FnOnce(IpAddr, u64) -> Result<(D, String)>,
        recorder: Arc<Recorder>,
    ) -> Result<Rank<D>> {
        let me = GlobalRank(env.rank);
        // Signals first, so every thread spawned later inherits the blocked mask.
        watchdog::install_signal_thread(recorder.clone())
            .map_err(|e| Error::io("signal thread", e))?;
        fault::init(env.rank)?;
        watchdog::install(env.rank, recorder.clone());
        let deadline = Instant::now() + opts.rendezvous_timeout;
        let token_digest = fnv64(env.token.as_bytes());
        let master = resolve(&env.master_addr, env.master_port)?;
        let my_groups = standard_groups(env.world_size);

        let mut fp = Fingerprint::default();
        fp.set("protocol.version", PROTOCOL_VERSION)
            .set("envelope.version", crate::wire::ENVELOPE_VERSION)
            .set("world.size", env.world_size)
            .set("tp.size", env.world_size - 1)
            .set(
                "groups.creation_order",
                Fingerprint::group_table(&my_groups),
            )
            .set("kernel.build_id", crate::cuda::embedded::KERNEL_BUILD_ID)
            .set("debug.collectives", opts.debug_collectives)
            .set("limits", format!("{:?}", opts.limits));
        fp.extend(&opts.fingerprint);
        if fault::hit(fault::points::FLIP_GRAPHS) {
            let flipped = if fp.get("exec.cuda_graphs") == Some("on") {
                "off"
            } else {
                "on"
            };
            fp.set("exec.cuda_graphs", flipped);
        }

        let (plane, welcome, conns, lane) = if env.rank == 0 {
            let listener = bind_rendezvous(env, master, deadline)?;
            let local_ip = listener
                .local_addr()
                .map_err(|e| Error::io("rendezvous listener address", e))?
                .ip();
            let (plane, data_addr) = make_plane(local_ip, token_digest)?;
            fp.set("data_plane.backend", plane.name());
            let (hellos, lane) = rendezvous_host(listener, env, deadline)?;
            let mut fps = vec![(me, fp.clone())];
            let mut addrs = vec![String::new(); env.world_size as usize];
            addrs[0] = data_addr;
            for (h, _) in &hellos {
                fps.push((GlobalRank(h.rank), h.fingerprint.clone()));
                if let Some(a) = addrs.get_mut(h.rank as usize) {
                    a.clone_from(&h.data_addr);
                }
            }
            fps.sort_by_key(|(r, _)| *r);
            let diff = parity_diff(&fps);
            let mut blobs = Vec::new();
            for g in &my_groups {
                blobs.push(plane.bootstrap_blob(g)?);
            }
            let welcome = Welcome {
                parity_ok: diff.is_none(),
                parity_diff: diff.unwrap_or_default(),
                groups: my_groups.clone(),
                peers: PeerTable {
                    data_addrs: addrs,
                    token_digest,
                },
                blobs,
            };
            let body = to_json(&welcome)?;
            let mut conns = Vec::new();
            for (h, mut s) in hellos {
                write_frame(&mut s, FrameKind::Welcome, &[&body]).map_err(|e| {
                    Error::PeerLost(format!("rendezvous: global-rank {}: {e}", h.rank))
                })?;
                conns.push((h.rank, s));
            }
            (plane, welcome, conns, lane)
        } else {
            let master = match &env.agent_store_key {
                Some(key) => published_rendezvous(master, key, deadline)?,
                None => master,
            };
            let mut s = connect_until(master, deadline)?;
            let local_ip = s
                .local_addr()
                .map_err(|e| Error::io("control socket address", e))?
                .ip();
            let (plane, data_addr) = make_plane(local_ip, token_digest)?;
            fp.set("data_plane.backend", plane.name());
            let hello = Hello {
                protocol_version: PROTOCOL_VERSION,
                token: env.token.clone(),
                rank: env.rank,
                world_size: env.world_size,
                local_rank: env.local_rank,
                data_addr,
                pid: std::process::id(),
                fingerprint: fp.clone(),
                lane: false,
            };
            write_frame(&mut s, FrameKind::Hello, &[&to_json(&hello)?]).map_err(|e| {
                Error::PeerLost(format!("rendezvous: send hello to global-rank 0: {e}"))
            })?;
            let lane = if env.rank == 1 {
                let mut b = connect_until(master, deadline)?;
                let lane_hello = Hello {
                    lane: true,
                    ..hello.clone()
                };
                write_frame(&mut b, FrameKind::Hello, &[&to_json(&lane_hello)?]).map_err(|e| {
                    Error::PeerLost(format!(
                        "rendezvous: open the envelope lane to global-rank 0: {e}"
                    ))
                })?;
                Some(b)
            } else {
                None
            };
            let _ = s.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ));
            let welcome: Welcome = match read_frame(&mut s, 16 << 20, "rendezvous (global-rank 0)")? {
                Some((FrameKind::Welcome, body)) => from_json(&body, "welcome")?,
                Some((FrameKind::Failed, body)) => {
                    let n: FailedNotice = from_json(&body, "failure notice")?;
                    // Rank 0 refusing this rank's registration is this rank's bad input.
                    if n.name == RANK_REFUSED {
                        return Err(Error::BadInput(format!("rendezvous refused this rank: {}", n.message)));
                    }
                    return Err(Error::PeerFailed(format!("global-rank {} failed during rendezvous: {}", n.origin, n.message)));
                }
                Some((k, _)) => return Err(Error::Decode(format!("rendezvous: expected a welcome, got {k:?}"))),
                None => {
                    return Err(Error::PeerLost(
                        "rendezvous: global-rank 0 closed the connection before the welcome (wrong job token, or rank 0 failed)".into(),
                    ))
                }
            };
            let _ = s.set_read_timeout(None);
            (plane, welcome, vec![(0u32, s)], lane)
        };

        if !welcome.parity_ok {
            let err = Error::Parity(format!(
                "startup parity handshake failed before inference; per field:\n{}",
                welcome.parity_diff
            ));
            watchdog::crash(&err, false);
        }
        let plane = Arc::new(plane);
        recorder.set_groups(
            welcome
                .groups
                .iter()
                .map(|g| (g.name.clone(), g.members.iter().map(|m| m.0).collect()))
                .collect(),
        );
        watchdog::add_abort(plane.abort_handle());
        for (r, s) in &conns {
            watchdog::add_notify(*r, s);
        }

        // Communicators, in the one creation order.
        let mut groups = Vec::new();
        for (i, spec) in welcome.groups.iter().enumerate() {
            let comm = match spec.group_rank_of(me) {
                Some(gr) => {
                    let blob = welcome.blobs.get(i).map(Vec::as_slice).unwrap_or(&[]);
                    Some(plane.create_comm(spec, gr, blob, &welcome.peers, deadline)?)
                }
                None => None,
            };
            groups.push(Group::new(
                spec.clone(),
                me,
                comm,
                plane.clone(),
                recorder.clone(),
                opts.debug_collectives,
            ));
        }

        // Control readers: peer loss at once, failure notices, envelopes.
        let envelope_peer = match env.rank {
            0 => Some(GlobalRank(1)),
            1 => Some(GlobalRank(0)),
            _ => None,
        };
        let recv_progress = Arc::new(Mutex::new(None));
        let frame_busy = Arc::new(AtomicBool::new(false));
        let mut inbox = None;
        let mut outbox = None;
        let mut ctrl_all = Vec::new();
        // The envelope lane settles its transport (shared-memory rings on one host, else TCP)
        // before anyone reads it.
        let mut lane_peek = None;
        if let (Some(peer), Some(b)) = (envelope_peer, lane) {
            let _ = b.set_nodelay(true);
            let _ = b.set_write_timeout(Some(opts.op_timeout));
            let setup = crate::comm::lane::LaneSetup {
                tag: job_id(&env.token),
                driver: env.rank == 0,
                peer: peer.0,
                op_timeout: opts.op_timeout,
                spin: opts.lane_spin,
                shm: opts.lane_shm,
            };
            let l = crate::comm::lane::establish(b, &setup, deadline)?;
            lane_peek = Some(l.peek);
            inbox = Some(Mutex::new(l.reader));
            outbox = Some(Arc::new(Outbox {
                ctrl: Mutex::new(l.writer),
                state: Mutex::new(SendState {
                    next_call_id: 1,
                    last_ids: EnvelopeIds::default(),
                    last_send: Instant::now(),
                }),
                peer,
            }));
        }
        for (r, s) in conns {
            let read = s
                .try_clone()
                .map_err(|e| Error::io("clone control socket", e))?;
            let ctx = ReaderCtx {
                from: r,
                me: env.rank,
                lane: if envelope_peer == Some(GlobalRank(r)) {
                    lane_peek.take()
                } else {
                    None
                },
                recorder: recorder.clone(),
                recv_progress: recv_progress.clone(),
                frame_busy: frame_busy.clone(),
            };
            std::thread::Builder::new()
                .name(format!("lockstep-ctrl-{r}"))
                .spawn(move || reader_loop(read, ctx))
                .map_err(|e| Error::io("spawn control reader", e))?;
            let _ = s.set_nodelay(true);
            let _ = s.set_write_timeout(Some(opts.op_timeout));
            ctrl_all.push((r, s));
        }
        recorder.progress();
        watchdog::spawn_watchdog(recorder.clone(), opts.watchdog, env.rank)
            .map_err(|e| Error::io("spawn watchdog", e))?;
        Ok(Rank {
            env: env.clone(),
            opts,
            me,
            groups,
            recorder,
            outbox,
            inbox,
            stash: Mutex::new(VecDeque::new()),
            recv_pool: Mutex::new(RecvPool::default()),
            recv_allocs: AtomicU64::new(0),
            stashed: AtomicU64::new(0),
            acceptance: Mutex::new(Acceptance::default()),
            recv_progress,
            frame_busy,
            hb_stop: Arc::new(AtomicBool::new(false)),
            ctrl_all,
            plane,
        })
    }
}

fn resolve(addr: &str, port: u16) -> Result<SocketAddr> {
    (addr, port)
        .to_socket_addrs()
        .map_err(|e| Error::BadInput(format!("MASTER_ADDR {addr}:{port} does not resolve: {e}")))?
        .next()
        .ok_or_else(|| Error::BadInput(format!("MASTER_ADDR {addr}:{port} resolves to nothing")))
}

/// Rank 0's rendezvous listener. On `MASTER_ADDR:MASTER_PORT`, unless torchrun's agent serves
/// its TCPStore there: then an ephemeral port on the interface this host reaches the store
/// through, published in the store under the job's key (`crate::torchrun`).
fn bind_rendezvous(env: &RankEnv, master: SocketAddr, deadline: Instant) -> Result<TcpListener> {
    let Some(key) = &env.agent_store_key else {
        // A port in use or an address not on this host is the operator's configuration: bad
        // input (74), not a lost peer.
        return TcpListener::bind(master).map_err(|e| {
            Error::BadInput(format!(
                "rendezvous: cannot bind MASTER_ADDR:MASTER_PORT {master}: {e}"
            ))
        });
    };
    let mut store = crate::torchrun::StoreClient::connect(master, deadline)?;
    let ip = store.local_addr()?.ip();
    let listener = TcpListener::bind((ip, 0))
        .map_err(|e| Error::io(format!("rendezvous: bind an ephemeral port on {ip}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("rendezvous listener address", e))?;
    store.set(key, addr.to_string().as_bytes())?;
    // Read it back: the store has taken it before any rank is told to come.
    let back = store.wait_get(key, deadline)?;
    if back != addr.to_string().as_bytes() {
        return Err(Error::BadInput(format!(
            "rendezvous: torchrun store key {key} holds {:?}, not this rank's {addr}: a second \
             global-rank 0 of this job and attempt?",
            String::from_utf8_lossy(&back)
        )));
    }
    Ok(listener)
}

/// Where global-rank 0 listens, as it published it in torchrun's store.
fn published_rendezvous(
    store_addr: SocketAddr,
    key: &str,
    deadline: Instant,
) -> Result<SocketAddr> {
    let mut store = crate::torchrun::StoreClient::connect(store_addr, deadline)?;
    let v = store.wait_get(key, deadline)?;
    let text = String::from_utf8_lossy(&v);
    text.parse().map_err(|_| {
        Error::Decode(format!(
            "rendezvous: torchrun store key {key} holds {text:?}, not an address"
        ))
    })
}

const HELLO_MAX: u32 = 1 << 20;
/// `FailedNotice::name` of rank 0 refusing one rank's registration (e.g. a duplicated RANK).
const RANK_REFUSED: &str = "rank-refused";

/// Registered ranks (sorted) and the mesh leader's envelope lane.
type Registered = (Vec<(Hello, TcpStream)>, Option<TcpStream>);

/// Rank 0's side of the rendezvous: accept until every rank registered or the deadline passes.
/// Each connection's hello is read on its own thread under a 2 s deadline, so a silent or
/// garbage-sending client never stalls the others.
fn rendezvous_host(listener: TcpListener, env: &RankEnv, deadline: Instant) -> Result<Registered> {
    let (tx, rx) = mpsc::channel::<(Hello, TcpStream)>();
    let token = env.token.clone();
    let world = env.world_size;
    let closed = Arc::new(AtomicBool::new(false));
    let closed2 = closed.clone();
    let refused = Arc::new(AtomicU64::new(0));
    std::thread::Builder::new()
        .name("lockstep-rendezvous".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
                if closed2.load(Ordering::SeqCst) {
                    crate::diag!("lockstep[global-rank 0]: rendezvous: refused connection from {peer}: rendezvous is closed");
                    // Say why to a late rank (a duplicated RANK that lost the race, or a process
                    // of another job on this port), instead of closing on it silently. Its hello
                    // is read first (bounded), so closing does not reset the notice away.
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    let _ = read_frame(&mut s, HELLO_MAX, "late rendezvous client");
                    refuse_late(&mut s, world);
                    continue;
                }
                let tx = tx.clone();
                let token = token.clone();
                let closed3 = closed2.clone();
                let refused = refused.clone();
                let _ = std::thread::Builder::new().name("lockstep-hello".into()).spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let refuse = |why: String| {
                        refused.fetch_add(1, Ordering::SeqCst);
                        crate::diag!("lockstep[global-rank 0]: rendezvous: refused connection from {peer}: {why}");
                    };
                    let hello: Hello = match read_frame(&mut s, HELLO_MAX, &format!("rendezvous client {peer}")) {
                        Ok(Some((FrameKind::Hello, body))) => match from_json(&body, "hello") {
                            Ok(h) => h,
                            Err(e) => return refuse(e.to_string()),
                        },
                        Ok(Some((k, _))) => return refuse(format!("expected a hello, got {k:?}")),
                        Ok(None) => return refuse("closed before a hello".into()),
                        Err(e) => return refuse(e.to_string()),
                    };
                    if hello.token != token {
                        return refuse("bad job token".into());
                    }
                    if hello.protocol_version != PROTOCOL_VERSION {
                        return refuse(format!(
                            "protocol version {} (this rank speaks {PROTOCOL_VERSION})",
                            hello.protocol_version
                        ));
                    }
                    if hello.rank == 0 || hello.rank >= world {
                        return refuse(format!("rank {} out of range for WORLD_SIZE {world}", hello.rank));
                    }
                    let _ = s.set_read_timeout(None);
                    if closed3.load(Ordering::SeqCst) {
                        return refuse_late(&mut s, world);
                    }
                    if let Err(mpsc::SendError((h, mut s))) = tx.send((hello, s)) {
                        if !h.lane {
                            refuse_late(&mut s, world);
                        }
                    }
                });
            }
        })
        .map_err(|e| Error::io("spawn rendezvous", e))?;
    let mut got: Vec<(Hello, TcpStream)> = Vec::new();
    // Envelope lanes by the pid of the process that opened them: the lane kept is the one of the
    // process registered as rank 1, not of a duplicated RANK=1 that opened its lane first.
    let mut lanes: Vec<(u32, TcpStream)> = Vec::new();
    let leader_lane = |got: &[(Hello, TcpStream)], lanes: &[(u32, TcpStream)]| {
        got.iter()
            .find(|(g, _)| g.rank == 1)
            .and_then(|(g, _)| lanes.iter().position(|(p, _)| *p == g.pid))
    };
    while got.len() + 1 < world as usize || leader_lane(&got, &lanes).is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((h, s)) if h.lane => {
                if h.rank != 1 || lanes.len() >= 8 || lanes.iter().any(|(p, _)| *p == h.pid) {
                    crate::diag!(
                        "lockstep[global-rank 0]: rendezvous: refused an envelope lane from rank {}",
                        h.rank
                    );
                    continue;
                }
                lanes.push((h.pid, s));
            }
            Ok((h, mut s)) => {
                if got.iter().any(|(g, _)| g.rank == h.rank) {
                    crate::diag!(
                        "lockstep[global-rank 0]: rendezvous: refused a second registration for rank {}",
                        h.rank
                    );
                    // Tell the second registrant why, so it does not blame a token or rank 0.
                    let notice = crate::comm::control::FailedNotice {
                        origin: 0,
                        code: crate::exit::ExitCode::BadInput.code(),
                        name: RANK_REFUSED.into(),
                        message: format!(
                            "RANK={} is already registered by another process (pid {}): a \
                             duplicated RANK in this job",
                            h.rank,
                            got.iter()
                                .find(|(g, _)| g.rank == h.rank)
                                .map_or(0, |(g, _)| g.pid)
                        ),
                    };
                    if let Ok(body) = serde_json::to_vec(&notice) {
                        let _ = write_frame(&mut s, FrameKind::Failed, &[&body]);
                    }
                    continue;
                }
                got.push((h, s));
            }
            Err(_) => {
                closed.store(true, Ordering::SeqCst);
                let have: Vec<u32> = got.iter().map(|(h, _)| h.rank).collect();
                let missing: Vec<u32> = (1..world).filter(|r| !have.contains(r)).collect();
                let err = Error::Timeout(format!(
                    "rendezvous: ranks {missing:?} did not register within the rendezvous timeout{}",
                    if leader_lane(&got, &lanes).is_none() { " (the mesh leader's envelope lane never arrived)" } else { "" }
                ));
                // The ranks that did register hear who is missing, instead of a closed
                // connection they could only blame on a token or on rank 0.
                let notice = FailedNotice {
                    origin: 0,
                    code: err.exit_code().code(),
                    name: err.exit_code().name().into(),
                    message: err.to_string(),
                };
                if let Ok(body) = serde_json::to_vec(&notice) {
                    for (_, s) in got.iter_mut() {
                        let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                        let _ = write_frame(s, FrameKind::Failed, &[&body]);
                    }
                }
                return Err(err);
            }
        }
    }
    closed.store(true, Ordering::SeqCst);
    // Registrations that were read but not taken (a duplicated RANK racing the last rank in)
    // hear why before their connection closes.
    while let Ok((h, mut s)) = rx.try_recv() {
        if !h.lane {
            refuse_late(&mut s, world);
        }
    }
    got.sort_by_key(|(h, _)| h.rank);
    let lane = leader_lane(&got, &lanes).map(|i| lanes.swap_remove(i).1);
    Ok((got, lane))
}

/// Tells a client whose hello came after the rendezvous closed why it is refused (exit 74 on
/// its side: `RANK_REFUSED`), bounded by a short write timeout.
fn refuse_late(s: &mut TcpStream, world: u32) {
    let notice = FailedNotice {
        origin: 0,
        code: crate::exit::ExitCode::BadInput.code(),
        name: RANK_REFUSED.into(),
        message: format!(
            "the rendezvous is closed: all {world} ranks of this job registered already (a \
             duplicated RANK, or a process of another job?)"
        ),
    };
    if let Ok(body) = serde_json::to_vec(&notice) {
        let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
        let _ = write_frame(s, FrameKind::Failed, &[&body]);
    }
}

fn connect_until(addr: SocketAddr, deadline: Instant) -> Result<TcpStream> {
    // Rank 0 may still be starting: bounded retry (the crate's one connect loop).
    let s = crate::comm::host::connect_retrying(addr, deadline).map_err(|e| {
        Error::Timeout(format!(
            "rendezvous: could not reach global-rank 0 at {addr} before the deadline: {e}"
        ))
    })?;
    let _ = s.set_nodelay(true);
    Ok(s)
}
