//! What a rank learns from its environment: torchrun's variables and the lockstep options.
use crate::comm::parity::Fingerprint;
use crate::digest::fnv64;
use crate::error::{Error, Result};
use crate::wire::Limits;
use std::path::PathBuf;
use std::time::Duration;

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
    /// torchrun's agent serves its TCPStore on `MASTER_ADDR:MASTER_PORT`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`): rank 0 publishes its own rendezvous address there
    /// under this key instead of binding `MASTER_PORT` (`crate::torchrun`).
    pub agent_store_key: Option<String>,
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
        let master_addr = env_var("MASTER_ADDR")?;
        let master_port = match env_parse::<u16>("MASTER_PORT")? {
            // Port 0 would bind an arbitrary port no peer can know: it cannot rendezvous.
            0 => {
                return Err(Error::BadInput(
                    "MASTER_PORT=0: the rendezvous needs a fixed port every rank knows".into(),
                ))
            }
            p => p,
        };
        let restart = crate::torchrun::restart_count();
        let token = match (std::env::var("LOCKSTEP_JOB_TOKEN"), std::env::var("TORCHELASTIC_RUN_ID")) {
            (Ok(t), _) if !t.is_empty() => t,
            // Static rendezvous sets the run id to `none` for every job: the store's address and
            // the attempt make it this job's (`torchrun::job_token`).
            (_, Ok(t)) if !t.is_empty() => {
                crate::torchrun::job_token(&t, &master_addr, master_port, restart)
            }
            _ => {
                return Err(Error::BadInput(
                    "LOCKSTEP_JOB_TOKEN is not set (the same secret on every rank; `lockstep launch` sets it)".into(),
                ))
            }
        };
        let job = job_id(&token);
        let agent_store_key = crate::torchrun::agent_store_in_use()
            .then(|| crate::torchrun::rendezvous_key(&job, restart));
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
            master_addr,
            master_port,
            token,
            dump_dir,
            agent_store_key,
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

/// envelope lane's ring files; `lockstep launch` computes the same.
pub fn job_id(token: &str) -> String {
    format!("{:08x}", fnv64(token.as_bytes()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
