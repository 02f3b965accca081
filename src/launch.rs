//! `lockstep launch -n N -- CMD…`: the local launcher (docs/spec.md §8).
//!
//! Contract:
//! - Spawns N ranks of CMD with the torchrun environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//!   `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` = a free port) plus `LOCKSTEP_JOB_TOKEN`
//!   (fresh random secret) and `LOCKSTEP_DUMP_DIR`; all ranks in one new process group, each with
//!   `PR_SET_PDEATHSIG = SIGTERM` (the launcher dying takes its ranks with it).
//! - First non-zero exit → a short settle window (ranks are told by the control plane and
//!   usually exit on their own with their own diagnosis) → SIGTERM the group → grace → SIGKILL.
//!   The launcher exits with the **primary** failure's code: the first failing rank whose code
//!   is not a consequence (`peer-lost`, `peer-failed`, `signal`), else the first; a rank killed by a signal
//!   counts as `128 + signo`. It prints every rank's exit and the failing rank's dump file.
//! - SIGTERM/SIGINT to the launcher reaches every rank (C3), then the same grace/SIGKILL; exit
//!   code `signal` (75).
//! - The culprit is named with evidence: a rank that had to be SIGKILLed after the grace
//!   ("launch: culprit: …"), and `fr analyze`'s culprit and witness lines for a rank that left no
//!   dump ("launch: fr analyze: culprit: …", "launch: fr analyze: evidence from …").
use crate::exit::ExitCode;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Number of ranks.
    #[arg(short = 'n', long)]
    pub nprocs: u32,
    /// Address rank 0 listens on for the rendezvous.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Where ranks write flight-recorder dumps (default ./lockstep-dumps/<job>).
    #[arg(long)]
    pub dump_dir: Option<PathBuf>,
    /// After the first failure, how long ranks get to exit on their own before SIGTERM.
    #[arg(long, default_value_t = 500)]
    pub settle_ms: u64,
    /// After SIGTERM, how long before SIGKILL.
    #[arg(long, default_value_t = 2000)]
    pub grace_ms: u64,
    /// The command each rank runs.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

static SIGNALED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALED.store(sig, Ordering::SeqCst);
}

fn random_token() -> String {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        let seed = format!("{:?}{}", Instant::now(), std::process::id());
        b[..8].copy_from_slice(&crate::digest::fnv64(seed.as_bytes()).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn free_port(addr: &str) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((addr, 0))?.local_addr()?.port())
}

/// How a rank ended, as the launcher reports it.
#[derive(Clone, Copy, Debug)]
struct Ended {
    rank: u32,
    code: i32,
    signal: Option<i32>,
    /// Killed by the launcher's own SIGKILL: it did not exit on SIGTERM within the grace period.
    killed_by_launcher: bool,
}

impl Ended {
    fn describe(&self) -> String {
        match self.signal {
            Some(s) => format!("killed by signal {s} ({})", signal_name(s)),
            None => format!(
                "exit {} ({})",
                self.code,
                ExitCode::from_code(self.code).map_or("unknown", |c| c.name())
            ),
        }
    }
    fn launcher_code(&self) -> i32 {
        self.signal.map_or(self.code, |s| 128 + s)
    }
    fn is_consequence(&self) -> bool {
        // Peer loss, a relayed failure and our own SIGTERM are effects of another rank's failure.
        self.signal.is_none()
            && [ExitCode::PeerFailed, ExitCode::Signal, ExitCode::PeerLost]
                .iter()
                .any(|c| c.code() == self.code)
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        _ => "signal",
    }
}

/// Creates `dir` if needed and checks a file can be written in it.
fn writable_dir(dir: &std::path::Path) -> std::result::Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create it: {e}"))?;
    let probe = dir.join(format!(".lockstep-write-check-{}", std::process::id()));
    std::fs::File::create(&probe).map_err(|e| format!("cannot write in it: {e}"))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub fn main(args: &LaunchArgs) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            crate::diag!("launch: {e}");
            ExitCode::BadInput.code()
        }
    }
}

fn run(args: &LaunchArgs) -> std::io::Result<i32> {
    if args.nprocs < 2 {
        crate::diag!("launch: -n must be at least 2 (rank 0 + a mesh)");
        return Ok(ExitCode::BadInput.code());
    }
    let token = random_token();
    let job = crate::rank::job_id(&token);
    let dump_dir = args
        .dump_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("lockstep-dumps").join(&job));
    let dump_dir = std::path::absolute(&dump_dir).unwrap_or(dump_dir);
    // The dumps are the diagnosis: a directory that cannot take them is found now (exit 74),
    // not at the first failure, when every rank would say "dump failed".
    if let Err(why) = writable_dir(&dump_dir) {
        crate::diag!(
            "launch: exit 74 (bad-input): dump directory {}: {why}",
            dump_dir.display()
        );
        return Ok(ExitCode::BadInput.code());
    }
    let port = free_port(&args.master_addr)?;
    // SAFETY: installing a handler that only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    crate::diag!(
        "launch: job {job}: {} ranks, MASTER_ADDR={}:{port}, dumps in {}",
        args.nprocs,
        args.master_addr,
        dump_dir.display()
    );
    let parent = std::process::id() as i32;
    let mut pgid: i32 = 0;
    let mut children: Vec<(u32, i32)> = Vec::new();
    for r in 0..args.nprocs {
        let mut cmd = std::process::Command::new(&args.command[0]);
        cmd.args(&args.command[1..])
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", args.nprocs.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", args.nprocs.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", port.to_string())
            .env("LOCKSTEP_JOB_TOKEN", &token)
            .env("LOCKSTEP_DUMP_DIR", &dump_dir);
        let group = pgid;
        // SAFETY: only async-signal-safe calls (setpgid, prctl, getppid, _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::setpgid(0, group);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if libc::getppid() != parent {
                    libc::_exit(ExitCode::PeerLost.code());
                }
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                crate::diag!("launch: cannot start {:?}: {e}", args.command[0]);
                if pgid != 0 {
                    // SAFETY: signalling our own job's process group.
                    unsafe { libc::killpg(pgid, libc::SIGKILL) };
                }
                return Ok(ExitCode::BadInput.code());
            }
        };
        let pid = child.id() as i32;
        if pgid == 0 {
            pgid = pid;
        }
        // Also from the parent side, so the group exists before we ever signal it.
        // SAFETY: plain syscall on our child.
        unsafe { libc::setpgid(pid, pgid) };
        crate::diag!("launch: global-rank {r} pid {pid}");
        children.push((r, pid));
    }

    let mut ended: Vec<Ended> = Vec::new();
    let mut first_fail: Option<Instant> = None;
    let mut term_sent: Option<Instant> = None;
    let mut kill_sent = false;
    let mut by_signal = false;
    while ended.len() < children.len() {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid on our own children with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            if let Some(&(rank, _)) = children.iter().find(|(_, p)| *p == pid) {
                let e = if libc::WIFSIGNALED(status) {
                    Ended {
                        rank,
                        code: 0,
                        signal: Some(libc::WTERMSIG(status)),
                        killed_by_launcher: kill_sent && libc::WTERMSIG(status) == libc::SIGKILL,
                    }
                } else {
                    Ended {
                        rank,
                        code: libc::WEXITSTATUS(status),
                        signal: None,
                        killed_by_launcher: false,
                    }
                };
                crate::diag!("launch: global-rank {rank} {}", e.describe());
                if (e.code != 0 || e.signal.is_some()) && first_fail.is_none() {
                    first_fail = Some(Instant::now());
                }
                ended.push(e);
            }
            continue;
        }
        let sig = SIGNALED.swap(0, Ordering::SeqCst);
        if sig != 0 && term_sent.is_none() {
            crate::diag!("launch: {} received; terminating ranks", signal_name(sig));
            by_signal = true;
            // SAFETY: signalling our own job's process group.
            unsafe { libc::killpg(pgid, libc::SIGTERM) };
            term_sent = Some(Instant::now());
        }
        if let (Some(f), None) = (first_fail, term_sent) {
            if f.elapsed() >= Duration::from_millis(args.settle_ms) {
                crate::diag!("launch: a rank failed; SIGTERM to the remaining ranks");
                // SAFETY: as above.
                unsafe { libc::killpg(pgid, libc::SIGTERM) };
                term_sent = Some(Instant::now());
            }
        }
        if let Some(t) = term_sent {
            if !kill_sent && t.elapsed() >= Duration::from_millis(args.grace_ms) {
                crate::diag!("launch: grace period over; SIGKILL to the remaining ranks");
                // SAFETY: as above.
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
                kill_sent = true;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Every rank is gone: a ring file of the envelope lane survives only if rank 0 died between
    // creating it and the leader's answer; sweep this job's.
    let swept = crate::comm::lane::remove_stale(Path::new(crate::comm::lane::SHM_DIR), &job);
    if swept > 0 {
        crate::diag!("launch: removed {swept} leftover envelope-lane ring file(s) of job {job}");
    }
    let failures: Vec<&Ended> = ended
        .iter()
        .filter(|e| e.code != 0 || e.signal.is_some())
        .collect();
    if by_signal {
        crate::diag!("launch: terminated by signal; every rank has exited");
        return Ok(ExitCode::Signal.code());
    }
    let Some(primary) = failures
        .iter()
        .find(|e| !e.is_consequence())
        .or(failures.first())
    else {
        crate::diag!("launch: all {} ranks exited cleanly", children.len());
        return Ok(0);
    };
    let dump = dump_dir.join(format!("rank-{}.jsonl", primary.rank));
    let dump_note = if dump.exists() {
        format!("dump: {}", dump.display())
    } else {
        "no dump file (killed before it could write one)".to_string()
    };
    crate::diag!(
        "launch: failed: global-rank {} {}; {dump_note}; analyze with: lockstep fr analyze {}",
        primary.rank,
        primary.describe(),
        dump_dir.display()
    );
    // A rank that had to be SIGKILLed did not act on SIGTERM: it was stopped or wedged, so it
    // neither made progress nor dumped. That, not the timeout it caused on its peers, is the
    // cause: name it (the exit code stays the first failure's, as the launcher contract says).
    let wedged: Vec<u32> = ended
        .iter()
        .filter(|e| e.killed_by_launcher && e.rank != primary.rank)
        .map(|e| e.rank)
        .collect();
    if let Some(&w) = wedged.first() {
        crate::diag!(
            "launch: culprit: global-rank {w}: it did not exit on SIGTERM within {} ms (stopped or \
             wedged), was SIGKILLed and left no dump; global-rank {}'s {} is what its peers saw",
            args.grace_ms,
            primary.rank,
            primary.describe()
        );
    }
    // The witnesses' evidence against a rank that left no dump (when it last heard from it,
    // what it waited on), as `lockstep fr analyze` gives it, in the summary itself.
    if let Ok(report) = crate::fr::analyze(&dump_dir) {
        for line in report.lines().filter(|l| {
            (l.starts_with("culprit: ") && l.contains("left no dump"))
                || l.starts_with("  evidence from global-rank ")
        }) {
            crate::diag!("launch: fr analyze: {}", line.trim_start());
        }
    }
    Ok(primary.launcher_code())
}
