//! A stream a server drives: open a job, set a prompt's conditioning, submit chunks with
//! backpressure, receive results with their ids, hard cut, close. `docs/manual/session.md`.
//!
//! Shape: the server's process holds a [`Session`] (the client). Rank 0 — Stage 0, the one
//! driver (`pipeline::driver::Driver`) — runs in a child process, `lockstep run` with
//! [`host::SOCKET_ENV`] set, which answers the client's requests one at a time over a
//! Unix-domain socket ([`proto`]). With [`Launch::Local`] the child is `lockstep launch`, which
//! starts rank 0 and the TP mesh; with [`Launch::Join`] the child is rank 0 alone and joins mesh
//! ranks started elsewhere with the same `MASTER_ADDR:MASTER_PORT` and job token.
//!
//! Why a child: a rank ends itself on any failure (the crash path exits the process after the
//! dump and the peer notices). In a child that is the job's business; the server only sees the
//! job's exit code and diagnosis as an `Error`, and its own process, threads and signal mask
//! stay as they were.
//!
//! Contract:
//! - Every call is bounded: `submit` answers `Submit::Again` when D_in is full (never a wait),
//!   `recv` waits at most its timeout plus the job's own bound, `close` at most the drain plus
//!   the job's bound. A job that fails — a mesh rank killed, a hang caught by a watchdog, a
//!   digest mismatch — surfaces from the next call as the `Error` whose `exit_code()` is the
//!   job's, with the failing rank's diagnosis in its message, within the watchdog bound + 1 s.
//! - Results come in call order with their (epoch, chunk, call_id); after `cut` no result of an
//!   older epoch surfaces (Stage 0 drops them on arrival and flushes undecoded ones).
//! - `close` drains (every chunk in flight comes back), sends SHUTDOWN and waits for every rank
//!   to exit 0. Dropping a session that was not closed stops the job (SIGTERM, then SIGKILL):
//!   no rank is left running.
//! - Conditioning: a caller's tensor (a text encoder's output, checked for shape and dtype
//!   here) travels to every mesh rank with the first chunk of each epoch, and the model embeds
//!   its values (`pipeline::conditioning`); its digest (dtype, shape, bytes) names the prompt in
//!   every plan and is checked on every mesh rank at every chunk end. A seed prompt's text
//!   features come from the seed (`model::dit::prompt_features`).
pub mod host;
pub mod proto;
pub mod schedule;

use crate::exit::ExitCode;
use crate::ids::{CacheEpoch, CallId, ChunkIndex};
use crate::model::DitConfig;
use crate::pipeline::conditioning::{self, PromptTensor};
use crate::pipeline::RunArgs;
use crate::wire::{DType, EnvelopeIds};
use crate::{Error, Result};
use proto::{Conn, PromptMsg, Reply, Request};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the mesh ranks come from.
#[derive(Clone, Debug, Default)]
pub enum Launch {
    /// `lockstep launch` starts rank 0 and `--tp` mesh ranks on this machine.
    #[default]
    Local,
    /// Rank 0 binds `master_addr:master_port` and waits for mesh ranks started elsewhere
    /// (`lockstep run` with `RANK` 1..=TP and the same `token` as `LOCKSTEP_JOB_TOKEN`).
    Join {
        master_addr: String,
        master_port: u16,
        token: String,
    },
}

/// How to open a session.
#[derive(Clone, Debug, Default)]
pub struct SessionConfig {
    /// The stream's settings, as `lockstep run` takes them (preset, tp, generator, depth,
    /// timeout, seed, …; `chunks` and `hard_cut_every` are the caller's, not used).
    pub run: RunArgs,
    pub launch: Launch,
    /// The `lockstep` executable (default: `LOCKSTEP_BIN`, else `lockstep` beside this
    /// executable or one directory up, else this executable if it is `lockstep`).
    pub exe: Option<PathBuf>,
    /// Ask rank 0 for the preview decoder's RGB frames with every result.
    pub frames: bool,
    /// Where the ranks write flight-recorder dumps (default: the launcher's,
    /// `./lockstep-dumps/<job>`, or `LOCKSTEP_DUMP_DIR`).
    pub dump_dir: Option<PathBuf>,
}

/// A prompt's conditioning: a text encoder's output whose values the mesh's model embeds, or a
/// prompt seed its text features come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conditioning {
    seed: u64,
    tensor: Option<Arc<PromptTensor>>,
}

impl Conditioning {
    /// A prompt given by its seed (what `lockstep run --seed` uses).
    pub fn from_seed(seed: u64) -> Self {
        Self { seed, tensor: None }
    }
    /// A text encoder's output for the model `cfg`: shape `[text_tokens, text_dim]`
    /// (512 × 4096 for the Wan presets), dtype f32, f16 or bf16, `bytes` exactly that long.
    /// The bytes are copied; they travel to every mesh rank with the epoch's first chunk.
    pub fn from_tensor(cfg: &DitConfig, dtype: DType, shape: &[u64], bytes: &[u8]) -> Result<Self> {
        // Checked before the copy: a wrong length is refused without allocating it.
        conditioning::check(cfg, dtype, shape, bytes.len() as u64)?;
        Self::from_prompt_tensor(PromptTensor::new(cfg, dtype, shape, bytes.to_vec())?)
    }
    /// The tensor `name` (or the file's only tensor) of a safetensors file.
    pub fn from_safetensors(cfg: &DitConfig, path: &Path, name: Option<&str>) -> Result<Self> {
        Self::from_prompt_tensor(PromptTensor::from_safetensors(cfg, path, name)?)
    }
    fn from_prompt_tensor(t: PromptTensor) -> Result<Self> {
        Ok(Self {
            seed: t.digest(),
            tensor: Some(Arc::new(t)),
        })
    }
    /// The prompt's key in the plan (`PhasePlan::prompt_seed`): the seed, or the tensor's
    /// digest (dtype, shape and bytes), which every mesh rank recomputes from what it received.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// The tensor, when the prompt is one.
    pub fn tensor(&self) -> Option<&PromptTensor> {
        self.tensor.as_deref()
    }
    /// The prompt as it crosses the session socket, and the payload that goes with it.
    fn to_msg(&self) -> (PromptMsg, &[u8]) {
        match &self.tensor {
            None => (PromptMsg::Seed(self.seed), &[]),
            Some(t) => (
                PromptMsg::Tensor {
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                },
                t.bytes(),
            ),
        }
    }
}

/// What `submit` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    /// The chunk is on its way with these ids.
    Sent(EnvelopeIds),
    /// D_in is full: receive a result, then submit again.
    Again,
}

/// One result, in call order.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkOut {
    pub ids: EnvelopeIds,
    /// Clean latent `[tokens_per_chunk, in_dim]` (`Session::latent_shape`).
    pub latent: Vec<f32>,
    /// Mesh time for this chunk, µs.
    pub s1_us: u64,
    /// Preview RGB frames (`SessionConfig::frames`), each `frame_h × frame_w × 3` bytes.
    pub frames: Vec<Vec<u8>>,
    pub frame_h: u32,
    pub frame_w: u32,
}

/// What `close` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseReport {
    /// Chunks Stage 0 decoded (received by the caller or drained at close).
    pub emitted: u64,
    pub stale_dropped: u64,
}

#[derive(Debug)]
enum State {
    Open,
    Closed,
    /// The job failed; every later call returns this again.
    Failed {
        code: i32,
        message: String,
    },
}

/// A running stream. Not `Sync`: one thread drives it (move it between threads freely).
pub struct Session {
    /// The job's process; `None` when the host runs in this process (`lockstep run`'s rank 0:
    /// `schedule`), whose failure ends this process through the rank's crash path.
    child: Option<Child>,
    conn: Conn,
    state: State,
    /// The child's last stderr lines (the ranks' and the launcher's diagnoses).
    diag: Arc<Mutex<VecDeque<String>>>,
    /// The socket's and reports' directory (removed at the end); none in-process.
    dir: Option<PathBuf>,
    local: bool,
    latent_shape: [u64; 2],
    text_shape: [u64; 2],
    cfg: DitConfig,
    epoch: u64,
    sent_in_epoch: u64,
    in_flight: usize,
    /// Rank 0 said D_in is full after the last `Sent`; `submit` answers `Again` without asking
    /// until a `recv` or `cut` may have made room.
    full: bool,
    /// Bound on one request beyond its own wait: the job's watchdog + grace.
    margin: Duration,
    /// The job's `--timeout` (each result of a drain is due within it).
    timeout: Duration,
    /// D_in, from rank 0's greeting.
    d_in: usize,
    /// Bound on the job's exit after a failure or SHUTDOWN.
    exit_bound: Duration,
}

const DIAG_LINES: usize = 40;
/// The longest wait a call honours (a week): "forever" stays bounded, and the arithmetic too.
const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

fn locate_exe(given: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("LOCKSTEP_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(me) = std::env::current_exe() {
        if me.file_stem().is_some_and(|s| s == "lockstep") {
            return Ok(me);
        }
        let mut dir = me.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let cand = d.join("lockstep");
            if cand.is_file() {
                return Ok(cand);
            }
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    Err(Error::BadInput(
        "session: cannot find the `lockstep` executable; set LOCKSTEP_BIN or SessionConfig::exe"
            .into(),
    ))
}

/// The `lockstep run` command line that reproduces `a` (every flag that shapes the job).
fn run_argv(a: &RunArgs) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["run".into(), "--quiet".into()];
    let mut kv = |k: &str, val: String| {
        v.push(k.into());
        v.push(val.into());
    };
    kv("--tp", a.tp.to_string());
    kv("--depth", a.depth.to_string());
    if let Some(d) = a.depth_in {
        kv("--depth-in", d.to_string());
    }
    if let Some(d) = a.depth_out {
        kv("--depth-out", d.to_string());
    }
    kv("--recompute-every", a.recompute_every.to_string());
    kv("--preset", a.preset.clone());
    kv(
        "--generator",
        match a.generator {
            crate::pipeline::GeneratorKind::Dit => "dit",
            crate::pipeline::GeneratorKind::Calibrated => "calibrated",
            crate::pipeline::GeneratorKind::Gpu => "gpu",
        }
        .into(),
    );
    kv("--gen-cost-ms", a.gen_cost_ms.to_string());
    kv("--decoder-cost-ms", a.decoder_cost_ms.to_string());
    kv("--seed", a.seed.to_string());
    kv("--timeout", a.timeout.to_string());
    kv("--heartbeat-ms", a.heartbeat_ms.to_string());
    if let Some(b) = &a.backend {
        kv("--backend", b.clone());
    }
    let mut v2 = v;
    if a.no_backpressure {
        v2.push("--no-backpressure".into());
    }
    if let Some(t) = &a.conditioning_tensor {
        v2.push("--conditioning-tensor".into());
        v2.push(t.into());
    }
    for (flag, p) in [
        ("--conditioning", &a.conditioning),
        ("--weights", &a.weights),
        ("--frames-out", &a.frames_out),
        ("--video-out", &a.video_out),
    ] {
        if let Some(p) = p {
            v2.push(flag.into());
            v2.push(p.clone().into_os_string());
        }
    }
    v2
}

/// A fresh private directory for the socket and the ranks' reports.
fn session_dir() -> Result<PathBuf> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("lockstep-session-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
    Ok(d)
}

/// An error whose `exit_code()` is `code` (the job's), with message `m`.
fn error_with_code(code: i32, m: String) -> Error {
    match ExitCode::from_code(code) {
        Some(ExitCode::InvariantViolation) => Error::Invariant(m),
        Some(ExitCode::WatchdogTimeout) => Error::Timeout(m),
        Some(ExitCode::ParityMismatch) => Error::Parity(m),
        Some(ExitCode::BadInput) => Error::BadInput(m),
        Some(ExitCode::Signal) => Error::Signal(m),
        Some(ExitCode::DeviceError) => Error::Cuda(m),
        Some(ExitCode::PeerFailed) => Error::PeerFailed(m),
        _ => Error::PeerLost(m),
    }
}

/// The job's exit as the error a caller gets: the variant whose `exit_code()` is the job's.
fn job_error(code: i32, what: &str, diag: &str) -> Error {
    let name = match ExitCode::from_code(code) {
        Some(c) => c.name().to_string(),
        None if code > 128 => format!("a process was killed by signal {}", code - 128),
        None => "unknown".into(),
    };
    error_with_code(
        code,
        format!("session: {what}: the job exited {code} ({name}); diagnosis:\n{diag}"),
    )
}

/// The code a failed session's error carries back (for `State::Failed`).
fn error_code(e: &Error) -> i32 {
    e.exit_code().code()
}

fn exit_code_of(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

impl Session {
    /// Starts the job and waits until rank 0 has bootstrapped (rendezvous, parity, groups) and
    /// greets this client. Bad settings are refused here, before any process starts.
    pub fn open(cfg: &SessionConfig) -> Result<Session> {
        let model = DitConfig::preset(&cfg.run.preset)?;
        model.check_tp(cfg.run.tp)?;
        if let Some(p) = &cfg.run.conditioning {
            // Rank 0 reads it again; a bad file is refused here, before any process starts.
            PromptTensor::from_safetensors(&model, p, cfg.run.conditioning_tensor.as_deref())?;
        }
        if !(cfg.run.timeout > 0.0 && cfg.run.timeout <= 7.0 * 24.0 * 3600.0) {
            return Err(Error::BadInput(format!(
                "session: timeout must be a number of seconds in (0, 604800], got {}",
                cfg.run.timeout
            )));
        }
        let exe = locate_exe(&cfg.exe)?;
        if !exe.is_file() {
            return Err(Error::BadInput(format!(
                "session: lockstep executable {} does not exist",
                exe.display()
            )));
        }
        let timeout = Duration::from_secs_f64(cfg.run.timeout);
        let dir = session_dir()?;
        let sock = dir.join("s.sock");
        let listener = UnixListener::bind(&sock)
            .map_err(|e| Error::io(format!("session: binding {}", sock.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("session: socket setup", e))?;
        let mut cmd = Command::new(&exe);
        let local = matches!(cfg.launch, Launch::Local);
        match &cfg.launch {
            Launch::Local => {
                cmd.arg("launch")
                    .arg("-n")
                    .arg((cfg.run.tp + 1).to_string());
                if let Some(d) = cfg
                    .dump_dir
                    .clone()
                    .or_else(|| std::env::var_os("LOCKSTEP_DUMP_DIR").map(PathBuf::from))
                {
                    cmd.arg("--dump-dir").arg(d);
                }
                cmd.arg("--").arg(&exe);
            }
            Launch::Join {
                master_addr,
                master_port,
                token,
            } => {
                cmd.env("RANK", "0")
                    .env("WORLD_SIZE", (cfg.run.tp + 1).to_string())
                    .env("LOCAL_RANK", "0")
                    .env("LOCAL_WORLD_SIZE", (cfg.run.tp + 1).to_string())
                    .env("MASTER_ADDR", master_addr)
                    .env("MASTER_PORT", master_port.to_string())
                    .env("LOCKSTEP_JOB_TOKEN", token);
                if let Some(d) = &cfg.dump_dir {
                    cmd.env("LOCKSTEP_DUMP_DIR", d);
                }
            }
        }
        cmd.args(run_argv(&cfg.run))
            .env(host::SOCKET_ENV, &sock)
            .env("LOCKSTEP_RUN_DIR", &dir)
            .env_remove("LOCKSTEP_RUN_T0_US")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if cfg.frames {
            cmd.env(host::FRAMES_ENV, "1");
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
        // parent: the job goes with this process if it dies without closing the session.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_dir_all(&dir);
            Error::io(format!("session: starting {}", exe.display()), e)
        })?;
        let diag = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(err) = child.stderr.take() {
            let d = diag.clone();
            let _ = std::thread::Builder::new()
                .name("lockstep-session-diag".into())
                .spawn(move || {
                    for line in BufReader::new(err).lines() {
                        let Ok(line) = line else { break };
                        crate::comm::watchdog::diag(&line);
                        let mut q = d.lock().unwrap_or_else(|p| p.into_inner());
                        if q.len() == DIAG_LINES {
                            q.pop_front();
                        }
                        q.push_back(line);
                    }
                });
        }
        let watchdog = timeout * 2;
        let mut partial = Session {
            child: Some(child),
            // Replaced below once rank 0 connects; a placeholder pair keeps `Drop` simple.
            conn: Conn::new(
                UnixStream::pair()
                    .map_err(|e| Error::io("session: socket pair", e))?
                    .0,
            ),
            state: State::Open,
            diag,
            dir: Some(dir),
            local,
            latent_shape: [0; 2],
            text_shape: [0; 2],
            cfg: model,
            epoch: 0,
            sent_in_epoch: 0,
            in_flight: 0,
            full: false,
            margin: timeout * 4 + Duration::from_secs(2),
            timeout,
            d_in: 0,
            exit_bound: watchdog + Duration::from_secs(4),
        };
        // Rank 0 connects once bootstrapped: bounded by the rendezvous (its own bound ends the
        // job with a diagnosis) plus a margin, watching the job for an early exit.
        let deadline = Instant::now() + Duration::from_secs(60).max(timeout * 3);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(partial.fail(Error::io("session: accept", e))),
            }
            if let Some(Ok(Some(st))) = partial.child.as_mut().map(Child::try_wait) {
                let code = exit_code_of(st);
                let e = job_error(code, "opening", &partial.wait_diag());
                partial.state = State::Failed {
                    code,
                    message: e.to_string(),
                };
                return Err(e);
            }
            if Instant::now() > deadline {
                return Err(partial.fail(Error::Timeout(
                    "session: rank 0 did not connect within the rendezvous bound".into(),
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        drop(listener);
        let _ = std::fs::remove_file(&sock);
        let _ = stream.set_nonblocking(false);
        partial.conn = Conn::new(stream);
        partial.greeted()
    }

    /// A session whose host runs in this process (`lockstep run`'s rank 0, `schedule`): the
    /// client end of a connection that `host::serve_on` serves. Errors are the connection's
    /// (the host's own failure ends this process through the rank's crash path); there is no
    /// job to wait for or stop.
    pub(crate) fn attach(
        stream: UnixStream,
        model: &DitConfig,
        timeout: Duration,
    ) -> Result<Session> {
        let s = Session {
            child: None,
            conn: Conn::new(stream),
            state: State::Open,
            diag: Arc::new(Mutex::new(VecDeque::new())),
            dir: None,
            local: true,
            latent_shape: [0; 2],
            text_shape: [0; 2],
            cfg: model.clone(),
            epoch: 0,
            sent_in_epoch: 0,
            in_flight: 0,
            full: false,
            margin: timeout * 4 + Duration::from_secs(2),
            timeout,
            d_in: 0,
            exit_bound: timeout * 2 + Duration::from_secs(4),
        };
        s.greeted()
    }

    /// Reads rank 0's greeting (the stream's geometry).
    fn greeted(mut self) -> Result<Session> {
        match self.exchange(None, &[], None)? {
            (
                Reply::Hello {
                    latent_shape,
                    text_shape,
                    epoch,
                    d_in,
                    ..
                },
                _,
            ) => {
                self.d_in = d_in;
                self.latent_shape = latent_shape;
                self.text_shape = text_shape;
                self.epoch = epoch;
                Ok(self)
            }
            (other, _) => Err(self.fail(Error::Decode(format!(
                "session: rank 0 greeted with {other:?}"
            )))),
        }
    }

    /// The latent shape of one chunk's result, `[tokens, channels]` (f32).
    pub fn latent_shape(&self) -> [u64; 2] {
        self.latent_shape
    }
    /// The conditioning tensor shape the model takes, `[text_tokens, text_dim]`.
    pub fn text_shape(&self) -> [u64; 2] {
        self.text_shape
    }
    /// The model preset's configuration (for `Conditioning::from_tensor`).
    pub fn model(&self) -> &DitConfig {
        &self.cfg
    }
    pub fn epoch(&self) -> CacheEpoch {
        CacheEpoch(self.epoch)
    }
    /// Chunks submitted and not yet received (this epoch's and stale ones still counted by
    /// D_in are not distinguished here: see `Submit::Again`).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The process id of global rank `rank`, when this session started it (rank 0 always;
    /// mesh ranks with `Launch::Local`). For operators and tests.
    pub fn rank_pid(&self, rank: u32) -> Option<u32> {
        let Some(child) = &self.child else {
            return (rank == 0).then(std::process::id);
        };
        if !self.local {
            return (rank == 0).then_some(child.id());
        }
        let parent = child.id();
        let rd = std::fs::read_dir("/proc").ok()?;
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Field 4 (ppid) follows the parenthesised command name.
            let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
                continue;
            };
            if after
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok())
                != Some(parent)
            {
                continue;
            }
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            let want = format!("RANK={rank}");
            if env.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
                return Some(pid);
            }
        }
        None
    }

    /// The conditioning of the current epoch; only before its first chunk (else `cut`).
    pub fn set_conditioning(&mut self, c: &Conditioning) -> Result<()> {
        let (msg, bytes) = c.to_msg();
        let req = Request::Prompt { prompt: msg };
        match self.request(&req, bytes, None)?.0 {
            Reply::Ok => Ok(()),
            Reply::Refused { message } => Err(Error::BadInput(format!("session: {message}"))),
            other => Err(self.fail(Error::Decode(format!(
                "session: rank 0 answered a prompt with {other:?}"
            )))),
        }
    }

    /// Sends the next chunk, or `Submit::Again` when D_in is full (never waits for room).
    pub fn submit(&mut self) -> Result<Submit> {
        if self.full && matches!(self.state, State::Open) {
            return Ok(Submit::Again);
        }
        let (reply, _) = self.request(&Request::Submit, &[], None)?;
        self.submit_outcome(reply)
    }

    /// The next result of the current epoch, waiting at most `timeout` (zero = poll); `None`
    /// when none came (or none is in flight).
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<ChunkOut>> {
        self.recv_inner(timeout, false)
    }

    /// `recv`, except that no result within `timeout` while chunks are in flight ends the job
    /// with the protocol's RESULT timeout (exit 71, rank 0's diagnosis and dump), as a fixed
    /// schedule wants (`lockstep run`'s).
    pub fn recv_strict(&mut self, timeout: Duration) -> Result<Option<ChunkOut>> {
        self.recv_inner(timeout, true)
    }

    fn recv_inner(&mut self, timeout: Duration, strict: bool) -> Result<Option<ChunkOut>> {
        let timeout = timeout.min(MAX_WAIT);
        let req = Request::Recv {
            timeout_us: timeout.as_micros() as u64,
            strict,
        };
        let (reply, n) = self.request(&req, &[], Some(timeout))?;
        self.full = false;
        self.result_of(reply, n)
    }

    /// `submit` and then a receive, in one round trip to rank 0 (the stream loop's turn for a
    /// server that does not need to act between the two): the receive waits up to `timeout`
    /// only when D_in has no room left after the submit (the pipeline is full, so the next
    /// result is what the caller waits for); with room left it is a poll, and the caller's next
    /// turn submits again. So `loop { submit_and_recv(t) }` keeps D_in chunks in flight, and
    /// each turn hands out at most one result, in call order, like `recv`.
    pub fn submit_and_recv(&mut self, timeout: Duration) -> Result<(Submit, Option<ChunkOut>)> {
        self.submit_and_recv_inner(timeout, false)
    }

    /// `submit_and_recv`, with the receive strict (`recv_strict`) when it waits.
    pub fn submit_and_recv_strict(
        &mut self,
        timeout: Duration,
    ) -> Result<(Submit, Option<ChunkOut>)> {
        self.submit_and_recv_inner(timeout, true)
    }

    fn submit_and_recv_inner(
        &mut self,
        timeout: Duration,
        strict: bool,
    ) -> Result<(Submit, Option<ChunkOut>)> {
        let timeout = timeout.min(MAX_WAIT);
        let req = Request::SubmitRecv {
            timeout_us: timeout.as_micros() as u64,
            strict,
        };
        let (reply, _) = self.request(&req, &[], Some(timeout))?;
        let sub = self.submit_outcome(reply)?;
        let (reply, n) = self.next_reply()?;
        self.full = false;
        Ok((sub, self.result_of(reply, n)?))
    }

    fn submit_outcome(&mut self, reply: Reply) -> Result<Submit> {
        match reply {
            Reply::Sent {
                call_id,
                chunk_index,
                cache_epoch,
                room,
            } => {
                self.full = !room;
                self.in_flight += 1;
                self.sent_in_epoch += 1;
                Ok(Submit::Sent(EnvelopeIds {
                    call_id: CallId(call_id),
                    chunk_index: ChunkIndex(chunk_index),
                    cache_epoch: CacheEpoch(cache_epoch),
                }))
            }
            Reply::Again { .. } => Ok(Submit::Again),
            other => Err(self.fail(Error::Decode(format!(
                "session: rank 0 answered a submit with {other:?}"
            )))),
        }
    }

    /// A receive's reply: reads the result's payload (its latent straight into the vector).
    fn result_of(&mut self, reply: Reply, n: u64) -> Result<Option<ChunkOut>> {
        match reply {
            Reply::Nothing { outstanding } => {
                self.in_flight = self.in_flight.min(outstanding);
                Ok(None)
            }
            Reply::Result {
                call_id,
                chunk_index,
                cache_epoch,
                s1_us,
                latent_len,
                frames,
                frame_h,
                frame_w,
            } => {
                let lb = (latent_len as u128) * 4;
                let fb = (frame_h as u128) * (frame_w as u128) * 3;
                if u128::from(n) != lb + fb * u128::from(frames) {
                    return Err(self.fail(Error::Decode(format!(
                        "session: result payload of {n} bytes, expected {latent_len} latent \
                         values and {frames} frames of {frame_h}×{frame_w}"
                    ))));
                }
                let got = self.conn.read_f32s(latent_len as usize).and_then(|latent| {
                    let frames = (0..frames)
                        .map(|_| self.conn.read_payload(fb as u64))
                        .collect::<Result<Vec<_>>>()?;
                    Ok((latent, frames))
                });
                let (latent, frames) = got.map_err(|e| self.job_ended(e))?;
                self.in_flight = self.in_flight.saturating_sub(1);
                Ok(Some(ChunkOut {
                    ids: EnvelopeIds {
                        call_id: CallId(call_id),
                        chunk_index: ChunkIndex(chunk_index),
                        cache_epoch: CacheEpoch(cache_epoch),
                    },
                    latent,
                    s1_us,
                    frames,
                    frame_h,
                    frame_w,
                }))
            }
            other => Err(self.fail(Error::Decode(format!(
                "session: rank 0 answered a receive with {other:?}"
            )))),
        }
    }

    /// Hard cut: a new epoch (its prompt `c`, else the current one); results of older epochs
    /// never surface.
    pub fn cut(&mut self, c: Option<&Conditioning>) -> Result<CacheEpoch> {
        let (msg, bytes) = match c {
            Some(c) => {
                let (m, b) = c.to_msg();
                (Some(m), b)
            }
            None => (None, &[][..]),
        };
        match self.request(&Request::Cut { prompt: msg }, bytes, None)?.0 {
            Reply::Cut { cache_epoch } => {
                self.full = false;
                self.epoch = cache_epoch;
                self.sent_in_epoch = 0;
                self.in_flight = 0;
                Ok(CacheEpoch(cache_epoch))
            }
            Reply::Refused { message } => Err(Error::BadInput(format!("session: {message}"))),
            other => Err(self.fail(Error::Decode(format!(
                "session: rank 0 answered a cut with {other:?}"
            )))),
        }
    }

    /// Drain, SHUTDOWN, and wait for every rank to exit 0. A second `close` is bad input.
    pub fn close(&mut self) -> Result<CloseReport> {
        match &self.state {
            State::Closed => {
                return Err(Error::BadInput("session: already closed".into()));
            }
            State::Failed { .. } | State::Open => {}
        }
        // The drain: every chunk in flight (at most D_in) is due within the timeout each.
        let drain = self
            .timeout
            .saturating_mul(self.d_in.min(1 << 16) as u32 + 1);
        let (reply, n) = self.request(&Request::Close, &[], Some(drain))?;
        if n != 0 {
            return Err(self.fail(Error::Decode(format!(
                "session: rank 0 answered close with a {n}-byte payload"
            ))));
        }
        let Reply::Closed {
            emitted,
            stale_dropped,
        } = reply
        else {
            return Err(self.fail(Error::Decode(format!(
                "session: rank 0 answered close with {reply:?}"
            ))));
        };
        if self.child.is_none() {
            // In-process: the host returned from serving; this process goes on.
            self.state = State::Closed;
            return Ok(CloseReport {
                emitted,
                stale_dropped,
            });
        }
        let deadline = Instant::now() + self.exit_bound;
        loop {
            match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(st))) => {
                    let code = exit_code_of(st);
                    if code != 0 {
                        let e = job_error(code, "closing", &self.wait_diag());
                        self.state = State::Failed {
                            code,
                            message: e.to_string(),
                        };
                        return Err(e);
                    }
                    self.state = State::Closed;
                    if let Some(d) = &self.dir {
                        let _ = std::fs::remove_dir_all(d);
                    }
                    return Ok(CloseReport {
                        emitted,
                        stale_dropped,
                    });
                }
                Some(Ok(None)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                _ => {
                    return Err(self.fail(Error::Timeout(
                        "session: the job did not exit after SHUTDOWN".into(),
                    )))
                }
            }
        }
    }

    /// One request (`payload`: a tensor's bytes) and the head of its reply, bounded by `wait` +
    /// the job's margin.
    fn request(
        &mut self,
        req: &Request,
        payload: &[u8],
        wait: Option<Duration>,
    ) -> Result<(Reply, u64)> {
        match &self.state {
            State::Open => {}
            State::Closed => {
                return Err(Error::BadInput(format!(
                    "session: {} after close",
                    request_name(req)
                )))
            }
            State::Failed { code, message } => return Err(job_error_again(*code, message)),
        }
        self.exchange(Some(req), payload, wait)
    }

    /// Sends `req` (none: rank 0's greeting is due) and reads its reply's head within the bound.
    fn exchange(
        &mut self,
        req: Option<&Request>,
        payload: &[u8],
        wait: Option<Duration>,
    ) -> Result<(Reply, u64)> {
        let bound = wait.unwrap_or_default().saturating_add(self.margin);
        if let Err(e) = self.conn.set_read_timeout(Some(bound)) {
            return Err(self.job_ended(e));
        }
        if let Some(req) = req {
            if let Err(e) = self.conn.send(req, &[payload]) {
                return Err(self.job_ended(e));
            }
        }
        self.next_reply()
    }

    /// The next reply frame's head (its payload, if any, is the caller's to read).
    fn next_reply(&mut self) -> Result<(Reply, u64)> {
        match self.conn.read_head::<Reply>() {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(self.job_ended(Error::PeerLost("rank 0 closed the session".into()))),
            Err(e) => Err(self.job_ended(e)),
        }
    }

    /// The connection to rank 0 broke (or timed out): the job is ending or hung. Waits for its
    /// exit within the job's bound (stopping it past that) and returns its code and diagnosis.
    fn job_ended(&mut self, cause: Error) -> Error {
        if self.child.is_none() {
            // In-process: the host's own error ends this process; this is the connection's.
            self.state = State::Failed {
                code: error_code(&cause),
                message: cause.to_string(),
            };
            return cause;
        }
        let deadline = Instant::now() + self.exit_bound;
        loop {
            match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(st))) => {
                    let code = exit_code_of(st);
                    let e = job_error(code, &format!("{cause}"), &self.wait_diag());
                    self.state = State::Failed {
                        code,
                        message: e.to_string(),
                    };
                    return e;
                }
                Some(Ok(None)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => return self.fail(cause),
            }
        }
    }

    /// Ends the job (SIGTERM, then SIGKILL after a grace), records `e` and returns it.
    fn fail(&mut self, e: Error) -> Error {
        self.stop_job();
        self.state = State::Failed {
            code: error_code(&e),
            message: e.to_string(),
        };
        e
    }

    fn stop_job(&mut self) {
        // In-process there is no job to stop: dropping the connection ends the host's serving.
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // SAFETY: kill on our own child's pid (not yet reaped, so not reused).
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The diagnosis lines collected from the job's stderr (after a short wait for the pipe
    /// to drain, since the last lines arrive as the processes exit).
    fn wait_diag(&self) -> String {
        std::thread::sleep(Duration::from_millis(50));
        let q = self.diag.lock().unwrap_or_else(|p| p.into_inner());
        let keep: Vec<&String> = q
            .iter()
            .filter(|l| l.contains(": exit ") || l.contains("culprit") || l.contains("failed"))
            .collect();
        let lines: Vec<&String> = if keep.is_empty() {
            q.iter().rev().take(5).rev().collect()
        } else {
            keep
        };
        lines
            .iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Submit => "submit",
        Request::Recv { .. } => "recv",
        Request::SubmitRecv { .. } => "submit_and_recv",
        Request::Prompt { .. } => "set_conditioning",
        Request::Cut { .. } => "cut",
        Request::Close => "close",
    }
}

/// The recorded failure, returned again by every later call.
fn job_error_again(code: i32, message: &str) -> Error {
    error_with_code(code, format!("session already failed: {message}"))
}

impl Drop for Session {
    fn drop(&mut self) {
        if matches!(self.state, State::Open) {
            self.stop_job();
        } else if let Some(Ok(None)) = self.child.as_mut().map(Child::try_wait) {
            self.stop_job();
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
