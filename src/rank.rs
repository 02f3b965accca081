//! One rank's life: environment → rendezvous → parity → groups → watchdog, then the envelope
//! endpoint (send/receive with manifest-driven allocation, call_id acceptance, heartbeats, relay
//! to the mesh) and the two ways out: `finish` (drain) and `crash` (abort).
//!
//! Contract:
//! - The environment follows torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT`) plus `LOCKSTEP_JOB_TOKEN` (falls back to torchrun's `TORCHELASTIC_RUN_ID`),
//!   `LOCKSTEP_DUMP_DIR`, `LOCKSTEP_WATCHDOG_MS`, `LOCKSTEP_DEBUG_COLLECTIVES`, `LOCKSTEP_FAULT`.
//! - Rank 0 hosts the rendezvous. A connection without the job token, with garbage or truncated
//!   bytes, or from a duplicate rank is refused and logged; the job goes on. Every wait in
//!   bootstrap is bounded by the rendezvous timeout.
//! - Parity runs on the control plane **before** any communicator exists: a mismatch ends every
//!   rank with `ParityMismatch` and the per-field diff (B3, G1).
//! - Mesh-side acceptance (SPEC §4): `call_id == last + 1` is accepted; an exact duplicate (same
//!   call_id, cache_epoch and meta digest) is **dropped** after its payload is drained (the
//!   header is a commitment), and counted; a regression, a gap, or a reused call_id with other
//!   content is an invariant violation naming both values. `chunk_index` strictly increases
//!   across INFERs; `cache_epoch` never decreases.
//! - Control-connection loss without a goodbye is `PeerLost` at once (C1); a peer's failure
//!   notice makes every rank dump and exit `PeerFailed`.
//! - `pp` payloads never cross (SPEC §8; `docs/manual/02-deadlock-patterns.md`): rank 0 sends
//!   its INFER payloads at will, but the mesh leader sends a RESULT payload only after rank 0's
//!   `ClearToSend` for that call_id, which rank 0 writes from its receive path right before it
//!   posts the matching receives. Envelopes that arrive while the leader waits for the CTS are
//!   received whole (acceptance + payload) and queued for its next `recv_envelope`. So rank 0
//!   is never inside an INFER payload send while the leader is inside a RESULT payload send —
//!   two blocking sends in opposite directions on one NCCL communicator (and one stream per
//!   rank) that would wait for each other forever. Tripwire: rank 0 issues `pp` payload ops from
//!   one thread at a time (the driver's); heartbeats carry no payload.
use crate::comm::control::{
    from_json, read_frame, to_json, write_frame, FailedNotice, FrameKind, Hello, Welcome,
    PROTOCOL_VERSION,
};
use crate::comm::group::{standard_groups, Group, PeerTable};
use crate::comm::lane::{LanePeek, LaneReader, LaneWriter};
use crate::comm::parity::{parity_diff, Fingerprint};
use crate::comm::plane::DataPlane;
use crate::comm::recorder::{OpContext, OpDesc, Recorder};
use crate::comm::{watchdog, HostPlane};
use crate::digest::fnv64;
use crate::error::{Error, Result};
use crate::fault;
use crate::ids::{CacheEpoch, CallId, ChunkIndex, GlobalRank, GroupRank};
use crate::wire::{
    Action, EnvelopeIds, Header, HostTensor, Limits, MetaDoc, PreparedEnvelope, ReceivedEnvelope,
    Tensor, HEADER_LEN,
};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// What a rank learns from its environment.
#[derive(Clone, Debug)]
pub struct RankEnv {
    pub rank: u32,
    pub world_size: u32,
    pub local_rank: u32,
    pub master_addr: String,
    pub master_port: u16,
    pub token: String,
    pub dump_dir: PathBuf,
}

fn env_var(name: &str) -> Result<String> {
    std::env::var(name)
        .map_err(|_| Error::BadInput(format!("environment variable {name} is not set")))
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Result<T> {
    let v = env_var(name)?;
    v.parse()
        .map_err(|_| Error::BadInput(format!("environment variable {name}={v:?} is not valid")))
}

impl RankEnv {
    pub fn from_env() -> Result<RankEnv> {
        let rank: u32 = env_parse("RANK")?;
        let world_size: u32 = env_parse("WORLD_SIZE")?;
        if world_size < 2 || rank >= world_size {
            return Err(Error::BadInput(format!(
                "RANK={rank} WORLD_SIZE={world_size}: need WORLD_SIZE >= 2 (rank 0 + a mesh) and RANK < WORLD_SIZE"
            )));
        }
        let token = match (std::env::var("LOCKSTEP_JOB_TOKEN"), std::env::var("TORCHELASTIC_RUN_ID")) {
            (Ok(t), _) if !t.is_empty() => t,
            (_, Ok(t)) if !t.is_empty() => format!("torchelastic-{t}"),
            _ => {
                return Err(Error::BadInput(
                    "LOCKSTEP_JOB_TOKEN is not set (the same secret on every rank; `lockstep launch` sets it)".into(),
                ))
            }
        };
        let job = job_id(&token);
        let dump_dir = std::env::var_os("LOCKSTEP_DUMP_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("lockstep-dumps").join(job));
        Ok(RankEnv {
            rank,
            world_size,
            local_rank: std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(rank),
            master_addr: env_var("MASTER_ADDR")?,
            master_port: match env_parse::<u16>("MASTER_PORT")? {
                // Port 0 would bind an arbitrary port no peer can know: it cannot rendezvous.
                0 => {
                    return Err(Error::BadInput(
                        "MASTER_PORT=0: the rendezvous needs a fixed port every rank knows".into(),
                    ))
                }
                p => p,
            },
            token,
            dump_dir,
        })
    }
}

/// Which data plane a rank runs on: `LOCKSTEP_BACKEND=host|nccl` (default `host`). The plane's
/// name joins the parity fingerprint (`data_plane.backend`), so ranks that disagree fail at
/// startup with the parity code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Host,
    Nccl,
}

impl Backend {
    pub fn from_env() -> Result<Backend> {
        match std::env::var("LOCKSTEP_BACKEND") {
            Err(_) => Ok(Backend::Host),
            Ok(v) => Backend::parse(&v),
        }
    }
    pub fn parse(v: &str) -> Result<Backend> {
        match v {
            "" | "host" => Ok(Backend::Host),
            "nccl" => Ok(Backend::Nccl),
            other => Err(Error::BadInput(format!(
                "LOCKSTEP_BACKEND={other:?} is not a data plane (host or nccl)"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Backend::Host => "host",
            Backend::Nccl => "nccl",
        }
    }
}

/// Tunables; every collective-gating one is also a parity field.
#[derive(Clone, Debug)]
pub struct RankOptions {
    /// No progress for this long → dump, abort, exit `WatchdogTimeout`.
    pub watchdog: Duration,
    /// Bound on every single blocking wait (defaults to 2 × watchdog, so the watchdog names it).
    pub op_timeout: Duration,
    pub rendezvous_timeout: Duration,
    pub debug_collectives: bool,
    pub limits: Limits,
    /// Extra parity fields (model geometry, dtype, execution flags, plan settings).
    pub fingerprint: Fingerprint,
    pub recorder_capacity: usize,
    /// How long a rank waiting for an envelope header spins before it sleeps in `poll(2)`
    /// (`LOCKSTEP_LANE_SPIN_US`, default 50; 0 never spins). A local latency/CPU trade, not a
    /// parity field: it changes no collective.
    pub lane_spin: Duration,
    /// Offer/accept a shared-memory envelope lane on one host (`LOCKSTEP_LANE=shm|tcp`, default
    /// shm; see `comm::lane`). Negotiated at bootstrap, so not a parity field.
    pub lane_shm: bool,
}

impl Default for RankOptions {
    fn default() -> Self {
        RankOptions {
            watchdog: Duration::from_secs(30),
            op_timeout: Duration::from_secs(60),
            rendezvous_timeout: Duration::from_secs(30),
            debug_collectives: false,
            limits: Limits::default(),
            fingerprint: Fingerprint::default(),
            recorder_capacity: 4096,
            lane_spin: Duration::from_micros(50),
            lane_shm: true,
        }
    }
}

impl RankOptions {
    /// Defaults overridden by `LOCKSTEP_WATCHDOG_MS`, `LOCKSTEP_RENDEZVOUS_MS` and
    /// `LOCKSTEP_DEBUG_COLLECTIVES=1`; execution flags `LOCKSTEP_CUDA_GRAPHS`,
    /// `LOCKSTEP_KERNEL_VARIANT` join the fingerprint.
    pub fn from_env() -> Result<RankOptions> {
        let mut o = RankOptions::default();
        if let Ok(v) = std::env::var("LOCKSTEP_WATCHDOG_MS") {
            let ms: u64 = v.parse().map_err(|_| {
                Error::BadInput(format!("LOCKSTEP_WATCHDOG_MS={v:?} is not a number"))
            })?;
            o.watchdog = Duration::from_millis(ms.max(1));
            o.op_timeout = o.watchdog * 2;
        }
        if let Ok(v) = std::env::var("LOCKSTEP_RENDEZVOUS_MS") {
            let ms: u64 = v.parse().map_err(|_| {
                Error::BadInput(format!("LOCKSTEP_RENDEZVOUS_MS={v:?} is not a number"))
            })?;
            o.rendezvous_timeout = Duration::from_millis(ms.max(1));
        }
        o.lane_shm = crate::comm::lane::want_shm()?;
        if let Ok(v) = std::env::var("LOCKSTEP_LANE_SPIN_US") {
            let us: u64 = v.parse().map_err(|_| {
                Error::BadInput(format!("LOCKSTEP_LANE_SPIN_US={v:?} is not a number"))
            })?;
            o.lane_spin = Duration::from_micros(us.min(1_000_000));
        }
        o.debug_collectives = std::env::var("LOCKSTEP_DEBUG_COLLECTIVES").is_ok_and(|v| v == "1");
        o.fingerprint.set(
            "exec.cuda_graphs",
            std::env::var("LOCKSTEP_CUDA_GRAPHS").unwrap_or_else(|_| "off".into()),
        );
        o.fingerprint.set(
            "exec.kernel_variant",
            crate::cuda::attention::AttentionVariant::from_env()?.as_str(),
        );
        Ok(o)
    }
}

/// Mesh-side acceptance of incoming envelopes (SPEC §4).
#[derive(Debug, Default)]
pub struct Acceptance {
    last: Option<(CallId, CacheEpoch, u64)>,
    last_infer_chunk: Option<ChunkIndex>,
    dropped_duplicates: u64,
}

/// What acceptance decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Same call_id, cache_epoch and meta digest as the last accepted envelope: dropped.
    DuplicateDropped,
}

impl Acceptance {
    pub fn check(&mut self, h: &Header) -> Result<Verdict> {
        let (id, epoch, digest) = (h.call_id(), h.cache_epoch(), h.meta_digest);
        let expected = self.last.map_or(CallId(1), |(c, _, _)| c.next());
        if let Some((lc, le, ld)) = self.last {
            if id == lc {
                if epoch == le && digest == ld {
                    self.dropped_duplicates += 1;
                    return Ok(Verdict::DuplicateDropped);
                }
                return Err(Error::Invariant(format!(
                    "{id} reused with different content: last accepted cache_epoch {} meta digest {ld:#x}, got cache_epoch {} meta digest {digest:#x}",
                    le.0, epoch.0
                )));
            }
            if epoch < le {
                return Err(Error::Invariant(format!(
                    "cache_epoch regression: got cache_epoch {} after cache_epoch {} ({id})",
                    epoch.0, le.0
                )));
            }
        }
        if id != expected {
            let kind = if id < expected { "regression" } else { "gap" };
            let last = self
                .last
                .map_or("none".to_string(), |(c, _, _)| c.0.to_string());
            return Err(Error::Invariant(format!(
                "call_id {kind}: got call_id {} but expected call_id {} (last accepted call_id {last})",
                id.0, expected.0
            )));
        }
        if h.action() == Action::Infer {
            if let Some(prev) = self.last_infer_chunk {
                if h.chunk_index() <= prev {
                    return Err(Error::Invariant(format!(
                        "chunk_index not increasing: got chunk_index {} after chunk_index {} ({id})",
                        h.chunk_index().0,
                        prev.0
                    )));
                }
            }
            self.last_infer_chunk = Some(h.chunk_index());
        }
        self.last = Some((id, epoch, digest));
        Ok(Verdict::Accept)
    }
    pub fn dropped_duplicates(&self) -> u64 {
        self.dropped_duplicates
    }
}

struct Inbound {
    header: Header,
    meta: Option<MetaDoc>,
}

struct SendState {
    next_call_id: u64,
    last_ids: EnvelopeIds,
    last_send: Instant,
}

/// Receive buffers kept for reuse, by byte length: a steady stream of envelopes with one manifest
/// allocates its receive buffers once. Bounded per length, so a caller that recycles more than
/// it receives cannot grow it without limit.
struct RecvPool<B> {
    free: std::collections::HashMap<usize, Vec<B>>,
}

impl<B> Default for RecvPool<B> {
    fn default() -> Self {
        RecvPool {
            free: std::collections::HashMap::new(),
        }
    }
}

/// Buffers of one length the pool keeps at most.
const RECV_POOL_PER_LEN: usize = 4;

impl<B> RecvPool<B> {
    fn take(&mut self, len: usize) -> Option<B> {
        self.free.get_mut(&len).and_then(Vec::pop)
    }
    fn put(&mut self, len: usize, b: B) {
        let v = self.free.entry(len).or_default();
        if v.len() < RECV_POOL_PER_LEN {
            v.push(b);
        }
    }
}

/// The control connection to the envelope peer (rank 0 ↔ mesh leader).
struct Outbox {
    ctrl: Mutex<LaneWriter>,
    state: Mutex<SendState>,
    peer: GlobalRank,
}

/// A bootstrapped rank.
pub struct Rank<D: DataPlane = HostPlane> {
    env: RankEnv,
    opts: RankOptions,
    me: GlobalRank,
    groups: Vec<Group<D>>,
    recorder: Arc<Recorder>,
    outbox: Option<Arc<Outbox>>,
    /// The envelope lane (rank 0 ↔ leader), read by the receiving thread itself.
    inbox: Option<Mutex<LaneReader>>,
    /// Leader: envelopes received whole while waiting for a `ClearToSend`, in arrival order
    /// (device-resident: the host API converts when it hands one up).
    stash: Mutex<VecDeque<ReceivedEnvelope<D::Buffer>>>,
    /// Receive buffers handed back with [`Rank::recycle`], by byte length (bounded).
    recv_pool: Mutex<RecvPool<D::Buffer>>,
    /// Receive buffers allocated fresh (not taken from the pool), for tests and reports.
    recv_allocs: AtomicU64,
    /// How many envelopes went into `stash` (the crossing the CTS rule defused).
    stashed: AtomicU64,
    acceptance: Mutex<Acceptance>,
    recv_progress: Arc<Mutex<Option<RecvProgress>>>,
    /// True from "a lane frame is there" until that frame was handled (its payload's receives
    /// posted, or it needed none): the control reader waits for it before it names what a lost
    /// peer interrupted.
    frame_busy: Arc<AtomicBool>,
    hb_stop: Arc<AtomicBool>,
    ctrl_all: Vec<(u32, TcpStream)>,
    plane: Arc<D>,
}

/// The flight-recorder name of a header send (static: no allocation per envelope).
fn send_header_label(a: Action) -> &'static str {
    match a {
        Action::Infer => "send_header INFER",
        Action::Noop => "send_header NOOP",
        Action::Shutdown => "send_header SHUTDOWN",
        Action::Result => "send_header RESULT",
    }
}

/// The job's short id (8 hex digits of the token's digest): names the dump directory and the
/// envelope lane's ring files; `lockstep launch` computes the same.
pub fn job_id(token: &str) -> String {
    format!("{:08x}", fnv64(token.as_bytes()) as u32)
}

/// Header, meta bytes and the tensors of a prepared envelope, ready for `send_locked`.
type EnvelopeParts<B> = (Header, Vec<u8>, Vec<Tensor<B>>);

/// `send_next*`: the envelope `make` built must carry the call_id allocated for it.
fn check_allocated_id(h: &Header, ids: EnvelopeIds) -> Result<()> {
    if h.call_id() != ids.call_id {
        return Err(Error::Invariant(format!(
            "send_next: envelope carries {} but {} was allocated",
            h.call_id(),
            ids.call_id
        )));
    }
    Ok(())
}

fn resolve(addr: &str, port: u16) -> Result<SocketAddr> {
    (addr, port)
        .to_socket_addrs()
        .map_err(|e| Error::BadInput(format!("MASTER_ADDR {addr}:{port} does not resolve: {e}")))?
        .next()
        .ok_or_else(|| Error::BadInput(format!("MASTER_ADDR {addr}:{port} resolves to nothing")))
}

const HELLO_MAX: u32 = 1 << 20;
/// `FailedNotice::name` of rank 0 refusing one rank's registration (e.g. a duplicated RANK).
const RANK_REFUSED: &str = "rank-refused";

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

impl<D: DataPlane> Rank<D> {
    /// Bootstraps a rank; `make_plane(local_ip, token_digest)` builds the data plane and returns
    /// the address it advertises (empty when it needs none).
    pub fn bootstrap_with(
        env: &RankEnv,
        opts: RankOptions,
        make_plane: impl FnOnce(IpAddr, u64) -> Result<(D, String)>,
    ) -> Result<Rank<D>> {
        let me = GlobalRank(env.rank);
        let recorder = Arc::new(Recorder::new(
            env.rank,
            env.world_size,
            opts.recorder_capacity,
            env.dump_dir.clone(),
        ));
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
            // A port in use or an address not on this host is the operator's configuration:
            // bad input (74), not a lost peer.
            let listener = TcpListener::bind(master).map_err(|e| {
                Error::BadInput(format!(
                    "rendezvous: cannot bind MASTER_ADDR:MASTER_PORT {master}: {e}"
                ))
            })?;
            let (plane, data_addr) = make_plane(master.ip(), token_digest)?;
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

    pub fn global(&self) -> GlobalRank {
        self.me
    }
    pub fn world_size(&self) -> u32 {
        self.env.world_size
    }
    pub fn tp_size(&self) -> u32 {
        self.env.world_size - 1
    }
    pub fn env(&self) -> &RankEnv {
        &self.env
    }
    pub fn options(&self) -> &RankOptions {
        &self.opts
    }
    pub fn is_driver(&self) -> bool {
        self.me.0 == 0
    }
    pub fn is_mesh_leader(&self) -> bool {
        self.me.0 == 1
    }
    pub fn is_mesh(&self) -> bool {
        self.me.0 >= 1
    }
    pub fn plane(&self) -> &D {
        &self.plane
    }
    /// Groups in creation order.
    pub fn groups(&self) -> &[Group<D>] {
        &self.groups
    }
    fn group(&self, name: &str) -> &Group<D> {
        // The table always holds world, pp and mesh (parity guarantees every rank agrees).
        self.groups
            .iter()
            .find(|g| g.name() == name)
            .unwrap_or(&self.groups[0])
    }
    pub fn world(&self) -> &Group<D> {
        self.group("world")
    }
    pub fn pp(&self) -> &Group<D> {
        self.group("pp")
    }
    pub fn mesh(&self) -> &Group<D> {
        self.group("mesh")
    }
    /// The envelope lane's transport (`shm` or `tcp`; `none` on ranks without a lane).
    pub fn lane_transport(&self) -> &'static str {
        self.inbox.as_ref().map_or("none", |l| {
            l.lock().unwrap_or_else(|p| p.into_inner()).transport()
        })
    }
    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }
    /// The bound for one blocking wait started now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.opts.op_timeout
    }
    /// Marks progress for the watchdog (a compute step finished).
    pub fn progress(&self) {
        self.recorder.progress();
    }
    pub fn set_context(&self, ctx: OpContext) {
        self.recorder.set_context(ctx);
    }
    /// Leader: envelopes rank 0 sent while a RESULT payload waited for its `ClearToSend` (each
    /// one a send that, without the rule, would have crossed the RESULT on `pp`).
    pub fn envelopes_received_awaiting_cts(&self) -> u64 {
        self.stashed.load(Ordering::Relaxed)
    }

    pub fn dropped_duplicates(&self) -> u64 {
        self.acceptance.lock().map_or(0, |a| a.dropped_duplicates())
    }
    /// Ends this rank through the abort path (dump, notify, exit with the error's code).
    pub fn crash(&self, err: &Error) -> ! {
        watchdog::crash(err, true)
    }

    fn outbox(&self) -> Result<&Arc<Outbox>> {
        self.outbox.as_ref().ok_or_else(|| {
            Error::Invariant(format!(
                "{} has no envelope peer (only rank 0 and the mesh leader exchange envelopes)",
                self.me
            ))
        })
    }

    /// Sends the envelope `make(ids)` returns, with `ids.call_id` the next call_id (allocated
    /// under the send lock, so heartbeats and envelopes share one monotonic sequence). Preflight
    /// errors consume no call_id and send nothing.
    pub fn send_next(
        &self,
        make: impl FnOnce(EnvelopeIds) -> Result<PreparedEnvelope>,
    ) -> Result<CallId> {
        self.send_next_with(make, |env| {
            // Uploads before the header (anti-stranding), then the parts.
            let bufs = self.upload_all(env.tensors())?;
            let (h, meta, _) = env.into_parts();
            Ok((h, meta, bufs))
        })
        .map(|(id, _)| id)
    }

    /// `send_next` and `send_next_device`: allocates the call_id under the send lock, lets `make`
    /// build the envelope for it, `parts` turn it into header, meta and data-plane tensors, and
    /// sends them. Returns the tensors once the sends completed.
    fn send_next_with<S>(
        &self,
        make: impl FnOnce(EnvelopeIds) -> Result<PreparedEnvelope<S>>,
        parts: impl FnOnce(PreparedEnvelope<S>) -> Result<EnvelopeParts<D::Buffer>>,
    ) -> Result<(CallId, Vec<Tensor<D::Buffer>>)> {
        let ob = self.outbox()?.clone();
        let mut st = ob.state.lock().unwrap_or_else(|p| p.into_inner());
        let ids = EnvelopeIds {
            call_id: CallId(st.next_call_id),
            ..st.last_ids
        };
        let env = make(ids)?;
        check_allocated_id(env.header(), ids)?;
        let (h, meta, tensors) = parts(env)?;
        let back = self.send_locked(&ob, &mut st, &h, &meta, tensors)?;
        Ok((ids.call_id, back))
    }

    /// Sends a prepared envelope as is (tests use it to send duplicates and regressions).
    pub fn send_envelope(&self, env: &PreparedEnvelope) -> Result<()> {
        let ob = self.outbox()?.clone();
        let mut st = ob.state.lock().unwrap_or_else(|p| p.into_inner());
        let bufs = self.upload_all(env.tensors())?;
        self.send_locked(&ob, &mut st, env.header(), env.meta_bytes(), bufs)
            .map(drop)
    }

    /// [`Rank::send_next`] for a device-resident envelope: its tensors are data-plane buffers
    /// (`prepare` over `Tensor<D::Buffer>`), sent without host staging. Hands the tensors back
    /// once the data plane completed the sends, for reuse.
    pub fn send_next_device(
        &self,
        make: impl FnOnce(EnvelopeIds) -> Result<PreparedEnvelope<D::Buffer>>,
    ) -> Result<(CallId, Vec<Tensor<D::Buffer>>)> {
        self.send_next_with(make, |env| Ok(env.into_parts()))
    }

    /// Sends a device-resident envelope as is; hands its tensors back once the sends completed.
    pub fn send_envelope_device(
        &self,
        env: PreparedEnvelope<D::Buffer>,
    ) -> Result<Vec<Tensor<D::Buffer>>> {
        let ob = self.outbox()?.clone();
        let mut st = ob.state.lock().unwrap_or_else(|p| p.into_inner());
        let (h, meta, tensors) = env.into_parts();
        self.send_locked(&ob, &mut st, &h, &meta, tensors)
    }

    /// Host tensors → data-plane buffers, all of them **before** the header goes out (an upload
    /// that fails must not strand a peer that already read the header).
    fn upload_all(&self, tensors: &[HostTensor]) -> Result<Vec<Tensor<D::Buffer>>> {
        tensors
            .iter()
            .map(|t| {
                Ok(Tensor::new(
                    t.name.clone(),
                    t.dtype,
                    t.shape.clone(),
                    self.plane.upload(&t.data)?,
                ))
            })
            .collect()
    }

    /// Header + meta on the envelope lane, then the tensors on `pp` in one group. Returns the
    /// tensors once every send completed.
    fn send_locked(
        &self,
        ob: &Outbox,
        st: &mut SendState,
        h: &Header,
        meta: &[u8],
        tensors: Vec<Tensor<D::Buffer>>,
    ) -> Result<Vec<Tensor<D::Buffer>>> {
        let rec = self.recorder.enqueue_started(OpDesc {
            group: "control".into(),
            seq: h.call_id,
            op: send_header_label(h.action()).into(),
            peer: Some(ob.peer.0),
            bytes: (HEADER_LEN + meta.len()) as u64,
            ..Default::default()
        });
        {
            let mut c = ob.ctrl.lock().unwrap_or_else(|p| p.into_inner());
            write_frame(&mut *c, FrameKind::Envelope, &[&h.encode(), meta]).map_err(|e| {
                Error::PeerLost(format!(
                    "control: send {} header to {}: {e}",
                    h.action().name(),
                    ob.peer
                ))
            })?;
        }
        self.recorder.complete(rec);
        st.next_call_id = st.next_call_id.max(h.call_id + 1);
        st.last_ids = EnvelopeIds::of(h);
        st.last_send = Instant::now();
        if tensors.is_empty() {
            return Ok(tensors);
        }
        if !self.is_driver() {
            // Leader → rank 0: only once rank 0 is known to be receiving (module contract).
            self.await_clear_to_send(h.call_id)?;
        }
        let pp = self.pp();
        let peer = GroupRank(if self.is_driver() { 1 } else { 0 });
        let n = tensors.len();
        let mut tensors = tensors.into_iter();
        if fault::hit(fault::points::KILL_MID_PAYLOAD) {
            // C2: the header and the first tensor are out; die before the rest.
            if let Some(t) = tensors.next() {
                let tk = pp.send(t.data, peer, t.dtype, &t.shape)?;
                pp.wait(tk, self.deadline())?;
            }
            crate::diag!(
                "lockstep[{}]: fault: SIGKILL after the header and 1 of {n} tensors",
                self.me
            );
            // SAFETY: sending a signal to our own pid.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        pp.group_start()?;
        let mut sent = Vec::with_capacity(n);
        for t in tensors {
            match pp.send(t.data, peer, t.dtype, &t.shape) {
                Ok(tk) => sent.push((t.name, t.dtype, t.shape, tk)),
                Err(e) => {
                    let _ = pp.group_end();
                    return Err(e);
                }
            }
        }
        pp.group_end()?;
        let mut back = Vec::with_capacity(n);
        for (name, dtype, shape, tk) in sent {
            back.push(Tensor::new(
                name,
                dtype,
                shape,
                pp.wait(tk, self.deadline())?,
            ));
        }
        Ok(back)
    }

    /// Starts rank 0's heartbeat thread: a NOOP whenever nothing was sent for `interval`.
    pub fn start_heartbeats(&self, interval: Duration) -> Result<()> {
        let ob = self.outbox()?.clone();
        let stop = self.hb_stop.clone();
        let rec = self.recorder.clone();
        let tick = (interval / 4).max(Duration::from_millis(1));
        std::thread::Builder::new()
            .name("lockstep-heartbeat".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(tick);
                    let mut st = ob.state.lock().unwrap_or_else(|p| p.into_inner());
                    if stop.load(Ordering::SeqCst) || st.last_send.elapsed() < interval {
                        continue;
                    }
                    let ids = EnvelopeIds {
                        call_id: CallId(st.next_call_id),
                        ..st.last_ids
                    };
                    let env = PreparedEnvelope::noop(ids);
                    let id = rec.enqueue(OpDesc {
                        group: "control".into(),
                        seq: ids.call_id.0,
                        op: "send_header NOOP".into(),
                        peer: Some(ob.peer.0),
                        bytes: HEADER_LEN as u64,
                        ..Default::default()
                    });
                    let r = {
                        let mut c = ob.ctrl.lock().unwrap_or_else(|p| p.into_inner());
                        write_frame(&mut *c, FrameKind::Envelope, &[&env.header_bytes()])
                    };
                    if let Err(e) = r {
                        watchdog::crash(
                            &Error::PeerLost(format!("heartbeat to {}: {e}", ob.peer)),
                            true,
                        );
                    }
                    rec.complete(id);
                    st.next_call_id += 1;
                    st.last_ids.call_id = ids.call_id;
                    st.last_send = Instant::now();
                }
            })
            .map_err(|e| Error::io("spawn heartbeat", e))?;
        Ok(())
    }

    pub fn stop_heartbeats(&self) {
        self.hb_stop.store(true, Ordering::SeqCst);
    }

    /// Receives the next envelope from the envelope peer. On the mesh leader, acceptance runs
    /// first (duplicates are drained and dropped); tensors are allocated strictly from the
    /// manifest. `deadline` None waits without a local bound (the watchdog still applies).
    pub fn recv_envelope(&self, deadline: Option<Instant>) -> Result<ReceivedEnvelope> {
        self.to_host(self.recv_envelope_device(deadline)?)
    }

    /// [`Rank::recv_envelope`] keeping the tensors in data-plane buffers (device-resident on
    /// NCCL): no host staging. Hand the buffers back with [`Rank::recycle`] when done, so the
    /// next envelope with the same manifest allocates nothing.
    pub fn recv_envelope_device(
        &self,
        deadline: Option<Instant>,
    ) -> Result<ReceivedEnvelope<D::Buffer>> {
        match self.recv_envelope_inner(deadline)? {
            Some(e) => Ok(e),
            None => {
                let peer = self.outbox.as_ref().map_or(0, |o| o.peer.0);
                Err(Error::Timeout(format!(
                    "no envelope header from global-rank {peer} before the deadline"
                )))
            }
        }
    }

    /// Like [`Rank::recv_envelope`], but "no header started to arrive within `timeout`" is
    /// `Ok(None)`. The timeout only applies before the first byte of a frame: once a header has
    /// started, the frame is read to its end under the rank's op deadline, so a timeout never
    /// consumes half a frame and desynchronizes the lane.
    pub fn try_recv_envelope(&self, timeout: Duration) -> Result<Option<ReceivedEnvelope>> {
        self.recv_envelope_inner(Some(Instant::now() + timeout))?
            .map(|e| self.to_host(e))
            .transpose()
    }

    /// [`Rank::try_recv_envelope`], device-resident.
    pub fn try_recv_envelope_device(
        &self,
        timeout: Duration,
    ) -> Result<Option<ReceivedEnvelope<D::Buffer>>> {
        self.recv_envelope_inner(Some(Instant::now() + timeout))
    }

    /// Moves a device-resident envelope's tensors to host memory (NCCL: one download each;
    /// host backend: no copy).
    pub fn to_host(&self, env: ReceivedEnvelope<D::Buffer>) -> Result<ReceivedEnvelope> {
        let tensors = env
            .tensors
            .into_iter()
            .map(|t| t.map_data(|b| self.plane.take_host(b)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ReceivedEnvelope {
            header: env.header,
            meta: env.meta,
            tensors,
        })
    }

    /// Hands receive buffers back for reuse by later envelopes of the same manifest (at most
    /// a few per byte length are kept; the rest are freed).
    pub fn recycle(&self, tensors: impl IntoIterator<Item = Tensor<D::Buffer>>) {
        let mut pool = self.recv_pool.lock().unwrap_or_else(|p| p.into_inner());
        for t in tensors {
            let len = self.plane.buffer_len(&t.data);
            pool.put(len, t.data);
        }
    }

    /// A receive buffer of `len` bytes: from the pool, else freshly allocated.
    fn recv_buffer(&self, len: usize) -> Result<D::Buffer> {
        let pooled = self
            .recv_pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(len);
        match pooled {
            Some(b) => Ok(b),
            None => {
                self.recv_allocs.fetch_add(1, Ordering::Relaxed);
                self.plane.alloc_for_recv(len)
            }
        }
    }

    /// How many receive buffers this rank allocated fresh (the rest came from [`Rank::recycle`]).
    pub fn recv_buffers_allocated(&self) -> u64 {
        self.recv_allocs.load(Ordering::Relaxed)
    }

    fn recv_envelope_inner(
        &self,
        deadline: Option<Instant>,
    ) -> Result<Option<ReceivedEnvelope<D::Buffer>>> {
        if let Some(e) = self
            .stash
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
        {
            return Ok(Some(e));
        }
        let inbox = self
            .inbox
            .as_ref()
            .ok_or_else(|| Error::Invariant(format!("{} has no envelope peer", self.me)))?;
        let mut lane = inbox.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match self.read_lane(&mut lane, deadline)? {
                None => return Ok(None),
                Some(LaneFrame::ClearToSend(id)) => {
                    return Err(Error::Invariant(format!(
                        "{}: ClearToSend for call_id {id} while no RESULT payload waits for one",
                        self.me
                    )))
                }
                Some(LaneFrame::Envelope(body)) => {
                    if let Some(e) = self.accept_frame(&body)? {
                        return Ok(Some(e));
                    }
                }
            }
        }
    }

    /// Leader, RESULT header sent: reads the lane until rank 0's `ClearToSend` for `call_id`,
    /// receiving every envelope that comes first whole (acceptance, payload) into the stash, so
    /// rank 0's INFER sends complete. Bounded by the op deadline.
    fn await_clear_to_send(&self, call_id: u64) -> Result<()> {
        let inbox = self
            .inbox
            .as_ref()
            .ok_or_else(|| Error::Invariant(format!("{} has no envelope peer", self.me)))?;
        let mut lane = inbox.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = self.deadline();
        let rec = self.recorder.enqueue_started(OpDesc {
            group: "control".into(),
            seq: call_id,
            op: "await_clear_to_send".into(),
            peer: Some(0),
            ..Default::default()
        });
        loop {
            let got = match self.read_lane(&mut lane, Some(deadline)) {
                Ok(g) => g,
                Err(e) => {
                    self.recorder.fail(rec, &e.to_string());
                    return Err(e);
                }
            };
            match got {
                None => {
                    let e = Error::Timeout(format!(
                        "RESULT call_id {call_id}: global-rank 0 did not clear its payload to \
                         send (no ClearToSend) within the op timeout ({:?})",
                        self.opts.op_timeout
                    ));
                    self.recorder.fail(rec, &e.to_string());
                    return Err(e);
                }
                Some(LaneFrame::ClearToSend(id)) if id == call_id => {
                    self.recorder.complete(rec);
                    return Ok(());
                }
                Some(LaneFrame::ClearToSend(id)) => {
                    let e = Error::Invariant(format!(
                        "ClearToSend for call_id {id} while RESULT call_id {call_id} waits for one"
                    ));
                    self.recorder.fail(rec, &e.to_string());
                    return Err(e);
                }
                Some(LaneFrame::Envelope(body)) => {
                    if let Some(e) = self.accept_frame(&body)? {
                        self.stashed.fetch_add(1, Ordering::Relaxed);
                        self.stash
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push_back(e);
                    }
                    // Receiving is progress: rank 0 may send several envelopes before it reads
                    // our RESULT header.
                    self.recorder.progress();
                }
            }
        }
    }

    /// Rank 0, RESULT header read: tells the leader to send the payload now (this thread posts
    /// the receives next and issues no other `pp` op before they complete).
    fn clear_to_send(&self, call_id: u64) -> Result<()> {
        let ob = self.outbox()?;
        let mut c = ob.ctrl.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *c, FrameKind::ClearToSend, &[&call_id.to_le_bytes()]).map_err(|e| {
            Error::PeerLost(format!(
                "control: send ClearToSend for call_id {call_id} to {}: {e}",
                ob.peer
            ))
        })
    }

    /// Reads the next frame of the envelope lane. `None`: no frame started before `deadline`.
    fn read_lane(
        &self,
        lane: &mut LaneReader,
        deadline: Option<Instant>,
    ) -> Result<Option<LaneFrame>> {
        let peer = self.outbox.as_ref().map_or(0, |o| o.peer.0);
        let max =
            u32::try_from(HEADER_LEN as u64 + self.opts.limits.max_meta_bytes).unwrap_or(u32::MAX);
        let rec = self.recorder.enqueue_started(OpDesc {
            group: "control".into(),
            op: "recv_header".into(),
            peer: Some(peer),
            ..Default::default()
        });
        // Wait for the first byte without consuming anything; only this wait may time out
        // quietly.
        if !lane.readable_by(deadline) {
            self.recorder.note(rec, "no header before the deadline");
            self.recorder.complete(rec);
            return Ok(None);
        }
        // Cleared when the frame is handled (ClearToSend below, envelopes in `accept_frame`).
        self.frame_busy.store(true, Ordering::SeqCst);
        // Data, EOF or an error: read_frame below reports it precisely. The rest of the frame
        // is bounded by the op deadline (a peer that stalls mid-frame is an error, not "nothing
        // arrived").
        lane.bound_reads(self.opts.op_timeout);
        // The name travels beside the reader it names: taken out for the read, put back after
        // (no allocation per frame).
        let what = std::mem::take(&mut lane.what);
        let read = read_frame(lane, max, &what);
        let got = match read {
            Ok(Some((FrameKind::Envelope, body))) => Ok(LaneFrame::Envelope(EnvelopeFrame { body, rec })),
            Ok(Some((FrameKind::ClearToSend, body))) => match <[u8; 8]>::try_from(body.as_slice()) {
                Ok(b) if !self.is_driver() => Ok(LaneFrame::ClearToSend(u64::from_le_bytes(b))),
                _ => Err(Error::Decode(format!(
                    "{what}: malformed or misdirected ClearToSend frame ({} bytes)",
                    body.len()
                ))),
            },
            Ok(Some((k, _))) => Err(Error::Decode(format!("{what}: unexpected {k:?} frame"))),
            Ok(None) => Err(Error::PeerLost(format!(
                "global-rank {peer}{} closed its envelope lane without a goodbye (it died, or left while this rank still waits for envelopes)",
                if peer == 0 { " (driver)" } else { "" }
            ))),
            Err(Error::Timeout(_)) => Err(Error::Timeout(format!(
                "{what}: a frame started but did not complete within the op timeout ({:?}); the peer stalled mid-frame",
                self.opts.op_timeout
            ))),
            Err(e) => Err(e),
        };
        lane.what = what;
        match got {
            Ok(f) => {
                if let LaneFrame::ClearToSend(id) = &f {
                    self.recorder
                        .note(rec, &format!("ClearToSend call_id {id}"));
                    self.recorder.complete(rec);
                    self.frame_busy.store(false, Ordering::SeqCst);
                }
                // Envelope frames: `accept_frame` notes and completes the op.
                Ok(Some(f))
            }
            Err(e) => {
                self.recorder.fail(rec, &e.to_string());
                Err(e)
            }
        }
    }

    /// One envelope frame: decode, acceptance (leader), payload receive. `None`: a duplicate,
    /// drained and dropped.
    fn accept_frame(&self, frame: &EnvelopeFrame) -> Result<Option<ReceivedEnvelope<D::Buffer>>> {
        struct Handled<'a>(&'a AtomicBool);
        impl Drop for Handled<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _handled = Handled(&self.frame_busy);
        let rec = frame.rec;
        let inb = match decode_envelope_frame(&frame.body, &self.opts.limits) {
            Ok(i) => i,
            Err(e) => {
                self.recorder.fail(rec, &e.to_string());
                return Err(e);
            }
        };
        let h = inb.header;
        self.recorder
            .note(rec, &format!("{} call_id {}", h.action().name(), h.call_id));
        self.recorder.complete(rec);
        let verdict = if self.is_mesh_leader() {
            self.acceptance
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .check(&h)?
        } else {
            Verdict::Accept
        };
        self.recorder.set_context(OpContext {
            call_id: h.call_id(),
            chunk_index: h.chunk_index(),
            cache_epoch: h.cache_epoch(),
            action: h.action().name().into(),
            phase: "recv".into(),
        });
        if self.is_driver()
            && inb
                .meta
                .as_ref()
                .is_some_and(|m| !m.tensor_specs.is_empty())
        {
            self.clear_to_send(h.call_id)?;
        }
        let tensors = self.recv_payload(&h, inb.meta.as_ref())?;
        match verdict {
            Verdict::Accept => Ok(Some(ReceivedEnvelope {
                header: h,
                meta: inb.meta,
                tensors,
            })),
            Verdict::DuplicateDropped => {
                crate::diag!(
                    "lockstep[{}]: dropped duplicate envelope call_id {} cache_epoch {} (payload drained)",
                    self.me, h.call_id, h.cache_epoch
                );
                Ok(None)
            }
        }
    }

    fn recv_payload(&self, h: &Header, meta: Option<&MetaDoc>) -> Result<Vec<Tensor<D::Buffer>>> {
        let Some(meta) = meta.filter(|m| !m.tensor_specs.is_empty()) else {
            return Ok(Vec::new());
        };
        let pp = self.pp();
        let peer = GroupRank(if self.is_driver() { 1 } else { 0 });
        let n = meta.tensor_specs.len();
        let set = |i: usize| {
            if let Ok(mut p) = self.recv_progress.lock() {
                *p = Some(RecvProgress {
                    action: h.action().name(),
                    call_id: h.call_id,
                    done: i,
                    of: n,
                });
            }
        };
        set(0);
        // Limits were checked when the meta was decoded; allocation follows the manifest only.
        let mut bufs = Vec::with_capacity(n);
        for spec in &meta.tensor_specs {
            bufs.push(self.recv_buffer(spec.byte_len as usize)?);
        }
        // All receives in one group, as the sender groups its sends: one launch and one
        // host-visible completion per envelope instead of one per tensor.
        pp.group_start()?;
        let mut tickets = Vec::with_capacity(n);
        for (spec, buf) in meta.tensor_specs.iter().zip(bufs) {
            match pp.recv(buf, peer, spec.dtype, &spec.shape) {
                Ok(tk) => tickets.push(tk),
                Err(e) => {
                    let _ = pp.group_end();
                    return Err(e);
                }
            }
        }
        pp.group_end()?;
        let mut tensors = Vec::with_capacity(n);
        for (i, (spec, tk)) in meta.tensor_specs.iter().zip(tickets).enumerate() {
            let data = pp.wait(tk, self.deadline())?;
            tensors.push(Tensor::new(
                spec.name.clone(),
                spec.dtype,
                spec.shape.clone(),
                data,
            ));
            set(i + 1);
        }
        if let Ok(mut p) = self.recv_progress.lock() {
            *p = None;
        }
        Ok(tensors)
    }

    /// Leader: broadcast `env` (header, meta, tensors) to the whole mesh; followers pass None and
    /// get the same envelope, validated by the same decoder. NOOP and SHUTDOWN relay as a header
    /// only. Followers check limits before allocating.
    pub fn relay_to_mesh(&self, env: Option<&ReceivedEnvelope>) -> Result<ReceivedEnvelope> {
        let env = match env {
            Some(e) => Some(ReceivedEnvelope {
                header: e.header,
                meta: e.meta.clone(),
                tensors: self.upload_all(&e.tensors)?,
            }),
            None => None,
        };
        let got = self.relay_to_mesh_device(env)?;
        self.to_host(got)
    }

    /// [`Rank::relay_to_mesh`] for device-resident envelopes: the leader's buffers are broadcast
    /// as they are (and come back as the leader's copy); followers receive into buffers
    /// allocated from the validated manifest (or recycled ones).
    pub fn relay_to_mesh_device(
        &self,
        env: Option<ReceivedEnvelope<D::Buffer>>,
    ) -> Result<ReceivedEnvelope<D::Buffer>> {
        let mesh = self.mesh();
        let root = GroupRank(0);
        let leader = mesh.me() == Some(root);
        let d = self.deadline();
        let head = match (leader, &env) {
            (true, Some(e)) => e.header.encode().to_vec(),
            (true, None) => {
                return Err(Error::Invariant(
                    "relay_to_mesh: the leader must pass the envelope".into(),
                ))
            }
            (false, _) => vec![0u8; HEADER_LEN],
        };
        let head = mesh.broadcast_bytes(&head, root, d)?;
        let h = Header::decode(&head)?;
        self.recorder.set_context(OpContext {
            call_id: h.call_id(),
            chunk_index: h.chunk_index(),
            cache_epoch: h.cache_epoch(),
            action: h.action().name().into(),
            phase: "relay".into(),
        });
        if !h.action().has_payload() {
            return Ok(ReceivedEnvelope {
                header: h,
                meta: None,
                tensors: Vec::new(),
            });
        }
        if h.meta_len > self.opts.limits.max_meta_bytes {
            return Err(Error::Decode(format!(
                "relayed meta of {} bytes exceeds the limit of {}",
                h.meta_len, self.opts.limits.max_meta_bytes
            )));
        }
        let meta_bytes = match env.as_ref().and_then(|e| e.meta.as_ref()) {
            Some(m) if leader => m.encode()?,
            _ => vec![0u8; h.meta_len as usize],
        };
        let meta_bytes = mesh.broadcast_bytes(&meta_bytes, root, d)?;
        let meta = MetaDoc::decode(
            &meta_bytes,
            h.meta_digest,
            h.n_tensors,
            h.payload_bytes,
            &self.opts.limits,
        )?;
        // Buffers first (followers allocate from the validated manifest only), then every
        // tensor's broadcast in one group: one launch and one host-visible completion per
        // envelope instead of one per tensor, as on `pp`. Debug mode issues them one by one: its
        // per-collective fingerprint exchange must complete before each op, which an open group
        // forbids.
        let mut own = match env {
            Some(e) if leader => e.tensors.into_iter().map(Some).collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        let mut bufs = Vec::with_capacity(meta.tensor_specs.len());
        for (i, spec) in meta.tensor_specs.iter().enumerate() {
            bufs.push(match own.get_mut(i).and_then(Option::take) {
                Some(t) if t.spec() == *spec => t.data,
                Some(t) => {
                    return Err(Error::Invariant(format!(
                        "relay_to_mesh: the leader's tensor {i} ({:?}) is not what the manifest \
                         it relays says ({spec:?})",
                        t.spec()
                    )))
                }
                None if leader => {
                    return Err(Error::Invariant(format!(
                        "relay_to_mesh: the manifest names tensor {i} (`{}`) but the leader's \
                         envelope has no such tensor",
                        spec.name
                    )))
                }
                None => self.recv_buffer(spec.byte_len as usize)?,
            });
        }
        let grouped = !mesh.debug_collectives();
        if grouped {
            mesh.group_start()?;
        }
        let mut tickets = Vec::with_capacity(bufs.len());
        for (spec, buf) in meta.tensor_specs.iter().zip(bufs) {
            match mesh.broadcast(buf, root, spec.dtype, &spec.shape) {
                Ok(tk) => tickets.push(tk),
                Err(e) => {
                    if grouped {
                        let _ = mesh.group_end();
                    }
                    return Err(e);
                }
            }
        }
        if grouped {
            mesh.group_end()?;
        }
        let mut tensors = Vec::with_capacity(tickets.len());
        for (spec, tk) in meta.tensor_specs.iter().zip(tickets) {
            let data = mesh.wait(tk, d)?;
            tensors.push(Tensor::new(
                spec.name.clone(),
                spec.dtype,
                spec.shape.clone(),
                data,
            ));
        }
        Ok(ReceivedEnvelope {
            header: h,
            meta: Some(meta),
            tensors,
        })
    }

    /// Drain path, last step: say goodbye on the control plane, destroy communicators. The
    /// watchdog stays armed, so a hanging teardown still ends in a hard exit (C5).
    pub fn finish(mut self) -> Result<()> {
        self.stop_heartbeats();
        let rec = self.recorder.enqueue_started(OpDesc {
            group: "control".into(),
            op: "teardown".into(),
            ..Default::default()
        });
        self.recorder.set_phase("teardown");
        for (_, s) in self.ctrl_all.iter_mut() {
            let _ = write_frame(s, FrameKind::Bye, &[]);
        }
        if fault::hit(fault::points::TEARDOWN_HANG) {
            // Stands in for an ncclCommDestroy that never returns.
            loop {
                std::thread::park();
            }
        }
        for g in self.groups.iter_mut() {
            if let Some(c) = g.take_comm() {
                self.plane.destroy_comm(c)?;
                // Each communicator gone is progress (NCCL finalize + destroy takes 0.2–0.5 s
                // per communicator); a teardown that stops moving still trips the watchdog.
                self.recorder.progress();
            }
        }
        self.recorder.complete(rec);
        Ok(())
    }
}

/// One frame read from the envelope lane.
enum LaneFrame {
    Envelope(EnvelopeFrame),
    ClearToSend(u64),
}

/// An envelope frame's bytes and its still-open `recv_header` flight-recorder op.
struct EnvelopeFrame {
    body: Vec<u8>,
    rec: u64,
}

/// Where a payload receive stands (read by the control reader when the sender is lost mid-payload).
#[derive(Clone, Copy, Debug)]
struct RecvProgress {
    action: &'static str,
    call_id: u64,
    done: usize,
    of: usize,
}

struct ReaderCtx {
    from: u32,
    me: u32,
    /// A clone of the envelope lane when this connection's peer is the envelope peer.
    lane: Option<LanePeek>,
    recorder: Arc<Recorder>,
    recv_progress: Arc<Mutex<Option<RecvProgress>>>,
    frame_busy: Arc<AtomicBool>,
}

fn reader_loop(mut s: TcpStream, ctx: ReaderCtx) {
    let from = format!("control connection to global-rank {}", ctx.from);
    let max = 1u32 << 20;
    let mut bye = false;
    let lost = |what: String| -> ! {
        if let Some(lane) = ctx.lane.as_ref() {
            // The envelope lane may still hold a header this rank has not read, or the receiving
            // thread may be between reading one and posting its payload's receives: give it a
            // bounded moment, so the diagnosis says how far the payload got ("mid-payload").
            let until = Instant::now() + Duration::from_millis(100);
            let progressed = || ctx.recv_progress.lock().is_ok_and(|p| p.is_some());
            while (lane.has_unread() || ctx.frame_busy.load(Ordering::SeqCst))
                && !progressed()
                && Instant::now() < until
                && !watchdog::is_crashing()
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let during = ctx
            .recv_progress
            .lock()
            .ok()
            .and_then(|p| *p)
            .map_or(String::new(), |p| {
                format!(
                    " (receiving the payload of {} call_id {}: {} of {} tensors complete)",
                    p.action, p.call_id, p.done, p.of
                )
            });
        let who = if ctx.from == 0 { " (driver)" } else { "" };
        watchdog::crash(
            &Error::PeerLost(format!("global-rank {}{who} {what}{during}", ctx.from)),
            ctx.me == 0,
        )
    };
    loop {
        match read_frame(&mut s, max, &from) {
            Ok(None) if bye => {
                return;
            }
            Ok(None) => lost("closed its control connection without a goodbye".into()),
            Err(Error::PeerLost(m)) if !bye => lost(format!("was lost: {m}")),
            Err(_) if bye => return,
            Err(e) => watchdog::crash(&e, true),
            Ok(Some((FrameKind::Envelope, _))) => watchdog::crash(
                &Error::Invariant(format!(
                    "envelope on the notice connection from global-rank {} (envelopes travel on the lane)",
                    ctx.from
                )),
                true,
            ),
            Ok(Some((FrameKind::Failed, body))) => {
                let n: FailedNotice = match from_json(&body, "failure notice") {
                    Ok(n) => n,
                    Err(e) => watchdog::crash(&e, true),
                };
                let err = Error::PeerFailed(format!(
                    "global-rank {} failed with exit {} ({}): {}",
                    n.origin, n.code, n.name, n.message
                ));
                watchdog::crash_with_origin(&err, ctx.me == 0, Some(&n));
            }
            Ok(Some((FrameKind::Dump, _))) => {
                let _ = ctx.recorder.dump("dump requested by a peer", None);
            }
            Ok(Some((FrameKind::Bye, _))) => {
                bye = true;
            }
            Ok(Some((k, _))) => watchdog::crash(
                &Error::Decode(format!("{from}: unexpected {k:?} frame after rendezvous")),
                true,
            ),
        }
    }
}

fn decode_envelope_frame(body: &[u8], limits: &Limits) -> Result<Inbound> {
    if body.len() < HEADER_LEN {
        return Err(Error::Decode(format!(
            "envelope frame of {} bytes is shorter than a header",
            body.len()
        )));
    }
    let header = Header::decode(&body[..HEADER_LEN])?;
    let meta_bytes = &body[HEADER_LEN..];
    if meta_bytes.len() as u64 != header.meta_len {
        return Err(Error::Decode(format!(
            "header announces meta_len {} but the frame carries {} meta bytes",
            header.meta_len,
            meta_bytes.len()
        )));
    }
    let meta = if header.action().has_payload() {
        Some(MetaDoc::decode(
            meta_bytes,
            header.meta_digest,
            header.n_tensors,
            header.payload_bytes,
            limits,
        )?)
    } else {
        None
    };
    Ok(Inbound { header, meta })
}

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
    let mut lane: Option<TcpStream> = None;
    while got.len() + 1 < world as usize || lane.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((h, s)) if h.lane => {
                if h.rank != 1 || lane.is_some() {
                    crate::diag!(
                        "lockstep[global-rank 0]: rendezvous: refused an envelope lane from rank {}",
                        h.rank
                    );
                    continue;
                }
                lane = Some(s);
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
                return Err(Error::Timeout(format!(
                    "rendezvous: ranks {missing:?} did not register within the rendezvous timeout{}",
                    if lane.is_none() { " (the mesh leader's envelope lane never arrived)" } else { "" }
                )));
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
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Timeout(format!(
                    "rendezvous: could not reach global-rank 0 at {addr} before the deadline: {e}"
                )))
            }
            // Rank 0 may still be starting: bounded retry.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{prepare, Action, Limits};

    fn header(call: u64, chunk: u64, epoch: u64, action: Action) -> Header {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct M {
            x: u32,
        }
        let ids = EnvelopeIds {
            call_id: CallId(call),
            chunk_index: ChunkIndex(chunk),
            cache_epoch: CacheEpoch(epoch),
        };
        match action {
            Action::Noop => *PreparedEnvelope::noop(ids).header(),
            _ => *prepare(
                action,
                ids,
                &M { x: chunk as u32 },
                Vec::<HostTensor>::new(),
                &Limits::default(),
            )
            .unwrap()
            .header(),
        }
    }

    #[test]
    fn recv_pool_reuses_by_length_and_keeps_a_bounded_number() {
        let mut pool = RecvPool::<Vec<u8>>::default();
        assert!(pool.take(8).is_none());
        for i in 0..(RECV_POOL_PER_LEN + 3) {
            pool.put(8, vec![i as u8; 8]);
        }
        pool.put(16, vec![0; 16]);
        let mut got = 0;
        while let Some(b) = pool.take(8) {
            assert_eq!(b.len(), 8);
            got += 1;
        }
        assert_eq!(
            got, RECV_POOL_PER_LEN,
            "at most {RECV_POOL_PER_LEN} kept per length"
        );
        assert_eq!(pool.take(16).map(|b| b.len()), Some(16));
        assert!(pool.take(16).is_none());
    }

    #[test]
    fn backend_parses_host_and_nccl_and_refuses_the_rest() {
        assert_eq!(Backend::parse("").ok(), Some(Backend::Host));
        assert_eq!(Backend::parse("host").ok(), Some(Backend::Host));
        assert_eq!(Backend::parse("nccl").ok(), Some(Backend::Nccl));
        let err = Backend::parse("gloo").unwrap_err().to_string();
        assert!(
            err.contains("LOCKSTEP_BACKEND=\"gloo\" is not a data plane"),
            "{err}"
        );
    }

    #[test]
    fn acceptance_takes_last_plus_one() {
        let mut a = Acceptance::default();
        assert_eq!(
            a.check(&header(1, 0, 0, Action::Infer)).unwrap(),
            Verdict::Accept
        );
        assert_eq!(
            a.check(&header(2, 0, 0, Action::Noop)).unwrap(),
            Verdict::Accept
        );
        assert_eq!(
            a.check(&header(3, 1, 0, Action::Infer)).unwrap(),
            Verdict::Accept
        );
    }

    #[test]
    fn acceptance_drops_exact_duplicate() {
        let mut a = Acceptance::default();
        let h = header(1, 0, 0, Action::Infer);
        a.check(&h).unwrap();
        assert_eq!(a.check(&h).unwrap(), Verdict::DuplicateDropped);
        assert_eq!(a.dropped_duplicates(), 1);
    }

    #[test]
    fn acceptance_crashes_on_call_id_regression_with_both_values() {
        let mut a = Acceptance::default();
        for c in 1..=5 {
            a.check(&header(c, c, 0, Action::Infer)).unwrap();
        }
        let err = a
            .check(&header(3, 9, 0, Action::Infer))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("call_id regression: got call_id 3 but expected call_id 6"),
            "{err}"
        );
    }

    #[test]
    fn acceptance_crashes_on_call_id_gap() {
        let mut a = Acceptance::default();
        a.check(&header(1, 0, 0, Action::Infer)).unwrap();
        let err = a
            .check(&header(3, 1, 0, Action::Infer))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("call_id gap: got call_id 3 but expected call_id 2"),
            "{err}"
        );
    }

    #[test]
    fn acceptance_refuses_reused_call_id_with_other_content() {
        let mut a = Acceptance::default();
        a.check(&header(1, 0, 0, Action::Infer)).unwrap();
        let err = a
            .check(&header(1, 0, 1, Action::Infer))
            .unwrap_err()
            .to_string();
        assert!(err.contains("reused with different content"), "{err}");
    }

    #[test]
    fn acceptance_refuses_non_increasing_chunk_index() {
        let mut a = Acceptance::default();
        a.check(&header(1, 4, 0, Action::Infer)).unwrap();
        let err = a
            .check(&header(2, 4, 0, Action::Infer))
            .unwrap_err()
            .to_string();
        assert!(err.contains("chunk_index not increasing"), "{err}");
    }
}
