//! Running under torchrun (torchelastic): what its environment tells a rank, a client of its
//! TCPStore, and its error file.
//!
//! Contract:
//! - torchrun's agent serves a TCPStore on `MASTER_ADDR:MASTER_PORT` and says so with
//!   `TORCHELASTIC_USE_AGENT_STORE=True`. Then lockstep never binds that port: rank 0 binds an
//!   ephemeral port on the interface it reaches the store through, publishes `ip:port` in the
//!   store under [`rendezvous_key`], and every other rank waits for that key (bounded by the
//!   rendezvous timeout) and connects there. Without the variable `MASTER_PORT` is lockstep's own
//!   rendezvous port, as with `lockstep launch`.
//! - The store protocol spoken here is the client side of TCPStore's: one byte of query type,
//!   strings and values as a little-endian `u64` length and the bytes; a connection opens with
//!   `VALIDATE` + the magic number; `SET key value` has no answer, `WAIT n keys` answers one byte
//!   (`STOP_WAITING`) once every key exists, `GET key` answers the value. Nothing else is used.
//! - The job token of a rank without `LOCKSTEP_JOB_TOKEN` is derived from `TORCHELASTIC_RUN_ID`
//!   *and* `MASTER_ADDR:MASTER_PORT` *and* `TORCHELASTIC_RESTART_COUNT` ([`job_token`]): static
//!   rendezvous sets the run id to `none` for every job, and a restarted attempt must not meet
//!   the ranks of the attempt before it.
//! - A rank that fails writes `TORCHELASTIC_ERROR_FILE` ([`write_error_file`]) in torchrun's
//!   format, `{"message": {"message": …, "extraInfo": {"py_callstack": …, "timestamp": …}}}`, with
//!   its diagnosis. torchrun names as "root cause" the failure with the smallest timestamp (whole
//!   seconds, ties to the lowest local rank); a failure that is a consequence of another rank's
//!   (peer-lost, peer-failed, signal) is stamped two seconds later, so the cause wins: a rank that
//!   was killed writes no file and is stamped by the agent when it polls (≈ 0.1 s later, which
//!   can cross a second boundary), a rank that failed on its own stamps the second it failed in.
use crate::error::{Error, Result};
use crate::exit::ExitCode;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// torchrun's agent serves its TCPStore on `MASTER_ADDR:MASTER_PORT` for the workers.
pub fn agent_store_in_use() -> bool {
    std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v == "True")
}

/// `TORCHELASTIC_RESTART_COUNT` (0 when unset or unreadable).
pub fn restart_count() -> u32 {
    std::env::var("TORCHELASTIC_RESTART_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The job token of a rank torchrun started, when `LOCKSTEP_JOB_TOKEN` is not set: the run id,
/// the store's address and the attempt. Not a secret (every part is on the command line); it
/// keeps jobs and attempts apart.
pub fn job_token(run_id: &str, master_addr: &str, master_port: u16, restart: u32) -> String {
    format!("torchelastic:{run_id}@{master_addr}:{master_port}#attempt-{restart}")
}

/// The store key under which rank 0 publishes its rendezvous address for one job and attempt.
pub fn rendezvous_key(job: &str, restart: u32) -> String {
    format!("/lockstep/{job}/attempt_{restart}/rendezvous")
}

const VALIDATE: u8 = 0;
const SET: u8 = 1;
const GET: u8 = 3;
const WAIT: u8 = 6;
const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;
const STOP_WAITING: u8 = 0;
/// Bound on a value read from the store (an address is a few dozen bytes).
const VALUE_MAX: u64 = 1 << 16;

/// A client connection to a TCPStore (torchrun's agent store).
pub struct StoreClient {
    s: TcpStream,
    addr: SocketAddr,
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
    buf.extend_from_slice(b);
}

impl StoreClient {
    /// Connects (retrying until `deadline`: the agent may still be starting) and validates.
    pub fn connect(addr: SocketAddr, deadline: Instant) -> Result<StoreClient> {
        let s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::Timeout(format!(
                        "torchrun store: could not reach torchrun's TCPStore at {addr} \
                         (MASTER_ADDR:MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE=True) before the \
                         rendezvous deadline: {e}"
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let _ = s.set_nodelay(true);
        let mut c = StoreClient { s, addr };
        let mut msg = vec![VALIDATE];
        msg.extend_from_slice(&VALIDATION_MAGIC.to_le_bytes());
        c.send(&msg, "validate")?;
        Ok(c)
    }

    /// This end's address (the interface this host reaches the store through).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.s
            .local_addr()
            .map_err(|e| Error::io("torchrun store: local address", e))
    }

    fn lost(&self, what: &str, e: std::io::Error) -> Error {
        Error::PeerLost(format!(
            "torchrun store at {}: {what}: {e} (torchrun's agent gone?)",
            self.addr
        ))
    }

    fn send(&mut self, msg: &[u8], what: &str) -> Result<()> {
        let _ = self.s.set_write_timeout(Some(Duration::from_secs(5)));
        self.s.write_all(msg).map_err(|e| self.lost(what, e))
    }

    /// `SET key value` (the store answers nothing).
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let mut msg = vec![SET];
        put_bytes(&mut msg, key.as_bytes());
        put_bytes(&mut msg, value);
        self.send(&msg, &format!("set {key}"))
    }

    /// Waits until `key` exists (bounded by `deadline`), then reads it.
    pub fn wait_get(&mut self, key: &str, deadline: Instant) -> Result<Vec<u8>> {
        let mut msg = vec![WAIT];
        msg.extend_from_slice(&1u64.to_le_bytes());
        put_bytes(&mut msg, key.as_bytes());
        self.send(&msg, &format!("wait {key}"))?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let _ = self.s.set_read_timeout(Some(left));
        let mut b = [0u8; 1];
        match self.s.read_exact(&mut b) {
            Ok(()) if b[0] == STOP_WAITING => {}
            Ok(()) => {
                return Err(Error::Decode(format!(
                    "torchrun store at {}: wait {key}: answer {} is not STOP_WAITING",
                    self.addr, b[0]
                )))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Timeout(format!(
                    "torchrun store at {}: {key} was not published within the rendezvous \
                     timeout (global-rank 0 did not start, or failed before its listener was up)",
                    self.addr
                )))
            }
            Err(e) => return Err(self.lost(&format!("wait {key}"), e)),
        }
        let mut msg = vec![GET];
        put_bytes(&mut msg, key.as_bytes());
        self.send(&msg, &format!("get {key}"))?;
        let _ = self.s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut len = [0u8; 8];
        self.s
            .read_exact(&mut len)
            .map_err(|e| self.lost(&format!("get {key}"), e))?;
        let len = u64::from_le_bytes(len);
        if len > VALUE_MAX {
            return Err(Error::Decode(format!(
                "torchrun store at {}: get {key}: a value of {len} bytes (at most {VALUE_MAX})",
                self.addr
            )));
        }
        let mut v = vec![0u8; len as usize];
        self.s
            .read_exact(&mut v)
            .map_err(|e| self.lost(&format!("get {key}"), e))?;
        Ok(v)
    }
}

/// Where torchrun wants this process's error file, if it does.
pub fn error_file() -> Option<PathBuf> {
    std::env::var_os("TORCHELASTIC_ERROR_FILE")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The error file's JSON for one failure: `headline` is torchrun's one-line message, `details`
/// what it prints as the traceback.
pub fn error_file_json(headline: &str, details: &str, code: ExitCode, now_s: u64) -> String {
    let consequence = matches!(
        code,
        ExitCode::PeerLost | ExitCode::PeerFailed | ExitCode::Signal
    );
    let stamp = if consequence { now_s + 2 } else { now_s };
    serde_json::json!({
        "message": {
            "message": headline,
            "extraInfo": {
                "py_callstack": details,
                "timestamp": stamp.to_string(),
            }
        }
    })
    .to_string()
}

/// Writes `TORCHELASTIC_ERROR_FILE` (when torchrun set it) for a failure with `code`. Best
/// effort: a rank that is ending says so on stderr either way.
pub fn write_error_file(headline: &str, details: &str, code: ExitCode) {
    let Some(path) = error_file() else { return };
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let body = error_file_json(headline, details, code, now_s);
    if let Err(e) = std::fs::write(&path, body) {
        crate::diag!(
            "lockstep: cannot write TORCHELASTIC_ERROR_FILE {}: {e}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_file_has_torchruns_shape_and_a_consequence_stamped_later() {
        let j: serde_json::Value = serde_json::from_str(&error_file_json(
            "lockstep global-rank 2: exit 71 (watchdog-timeout)",
            "details",
            ExitCode::WatchdogTimeout,
            100,
        ))
        .unwrap_or_default();
        assert_eq!(
            j["message"]["message"],
            "lockstep global-rank 2: exit 71 (watchdog-timeout)"
        );
        assert_eq!(j["message"]["extraInfo"]["py_callstack"], "details");
        assert_eq!(j["message"]["extraInfo"]["timestamp"], "100");
        let c: serde_json::Value =
            serde_json::from_str(&error_file_json("x", "y", ExitCode::PeerLost, 100))
                .unwrap_or_default();
        assert_eq!(c["message"]["extraInfo"]["timestamp"], "102");
    }

    #[test]
    fn static_rendezvous_tokens_differ_per_store_and_attempt() {
        let a = job_token("none", "127.0.0.1", 29500, 0);
        assert_ne!(a, job_token("none", "127.0.0.1", 29501, 0));
        assert_ne!(a, job_token("none", "127.0.0.1", 29500, 1));
        assert_ne!(a, job_token("none", "node0", 29500, 0));
    }
}
