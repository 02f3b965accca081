//! Process exit codes. Distinct per failure class so that operators, the launcher and the
//! break-it tests can tell failures apart without parsing logs. Documented in
//! `docs/manual/03-graceful-shutdown.md`; never renumber (scripts depend on them).

/// Exit code of a rank or of the launcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum ExitCode {
    /// Drained cleanly: SHUTDOWN sent/received, everything in flight finished.
    Clean = 0,
    /// A protocol invariant was violated (plan mismatch, call_id regression or gap, digest
    /// drift, wrong-group collective caught by a guard, …).
    InvariantViolation = 70,
    /// The watchdog saw no progress for its timeout (a suspected hang).
    WatchdogTimeout = 71,
    /// A peer disappeared (control-plane connection lost or peer-death notice).
    PeerLost = 72,
    /// The startup parity handshake found ranks that disagree.
    ParityMismatch = 73,
    /// Bad input or configuration (CLI, environment, envelope preflight at the API edge).
    BadInput = 74,
    /// Terminated by a signal (SIGTERM/SIGINT) after dumping.
    Signal = 75,
    /// A CUDA or NCCL call failed.
    DeviceError = 76,
    /// Another rank failed and asked everyone to dump and exit.
    PeerFailed = 77,
}

impl ExitCode {
    pub const ALL: [ExitCode; 9] = [
        ExitCode::Clean,
        ExitCode::InvariantViolation,
        ExitCode::WatchdogTimeout,
        ExitCode::PeerLost,
        ExitCode::ParityMismatch,
        ExitCode::BadInput,
        ExitCode::Signal,
        ExitCode::DeviceError,
        ExitCode::PeerFailed,
    ];

    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn from_code(code: i32) -> Option<ExitCode> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Short stable name printed in diagnoses (`exit 71 (watchdog-timeout)`).
    pub fn name(self) -> &'static str {
        match self {
            ExitCode::Clean => "clean",
            ExitCode::InvariantViolation => "invariant-violation",
            ExitCode::WatchdogTimeout => "watchdog-timeout",
            ExitCode::PeerLost => "peer-lost",
            ExitCode::ParityMismatch => "parity-mismatch",
            ExitCode::BadInput => "bad-input",
            ExitCode::Signal => "signal",
            ExitCode::DeviceError => "device-error",
            ExitCode::PeerFailed => "peer-failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ExitCode::ALL {
            assert!(seen.insert(c.code()), "duplicate code {}", c.code());
            assert_eq!(ExitCode::from_code(c.code()), Some(c));
        }
    }
}
