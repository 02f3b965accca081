//! The one error type. Every variant says what went wrong, where, and the ids involved; each maps
//! to one exit code (`Error::exit_code`). Errors travel up as values; only the top of a rank
//! decides to crash.
use crate::exit::ExitCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad CLI/env/config or API input, caught at the edge.
    #[error("bad input: {0}")]
    BadInput(String),
    /// An envelope failed preflight; nothing was sent.
    #[error("preflight rejected envelope (nothing was sent): {0}")]
    Preflight(String),
    /// Bytes from a peer or a file failed to decode (typed, never a panic).
    #[error("wire decode: {0}")]
    Decode(String),
    /// A protocol invariant was violated.
    #[error("invariant violated: {0}")]
    Invariant(String),
    /// The startup parity handshake found a disagreement; the string is the per-field diff.
    #[error("parity mismatch between ranks:\n{0}")]
    Parity(String),
    /// A peer is gone (connection lost, EOF mid-message, peer-death notice).
    #[error("peer lost: {0}")]
    PeerLost(String),
    /// Another rank failed and asked everyone to dump and exit.
    #[error("peer failed: {0}")]
    PeerFailed(String),
    /// A bounded wait ran out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// I/O on a socket, file or pipe.
    #[error("io: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A shared library (libcuda, libnccl) could not be loaded.
    #[error("library not available: {0}")]
    LibraryMissing(String),
    /// A CUDA driver call failed (the driver's own error string and code).
    #[error("cuda: {0}")]
    Cuda(String),
    /// An NCCL call failed (NCCL's own error string and code).
    #[error("nccl: {0}")]
    Nccl(String),
    /// A GPU path was asked for but the binary was built without kernels.
    #[error("built without kernels: {0} (install the toolchain: tools/install-cuda-toolchain.sh, then rebuild)")]
    NoKernels(String),
    /// Terminated by a signal (SIGTERM/SIGINT), after dumping.
    #[error("terminated by signal: {0}")]
    Signal(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The same error with `note` appended to its message: the variant, and so the exit code,
    /// stays (a cleanup that failed after the first error is reported beside it, not dropped).
    pub fn with_note(self, note: &str) -> Self {
        match self {
            Error::BadInput(m) => Error::BadInput(m + note),
            Error::Preflight(m) => Error::Preflight(m + note),
            Error::Decode(m) => Error::Decode(m + note),
            Error::Invariant(m) => Error::Invariant(m + note),
            Error::Parity(m) => Error::Parity(m + note),
            Error::PeerLost(m) => Error::PeerLost(m + note),
            Error::PeerFailed(m) => Error::PeerFailed(m + note),
            Error::Timeout(m) => Error::Timeout(m + note),
            Error::Io { context, source } => Error::Io {
                context: context + note,
                source,
            },
            Error::LibraryMissing(m) => Error::LibraryMissing(m + note),
            Error::Cuda(m) => Error::Cuda(m + note),
            Error::Nccl(m) => Error::Nccl(m + note),
            Error::NoKernels(m) => Error::NoKernels(m + note),
            Error::Signal(m) => Error::Signal(m + note),
        }
    }

    /// The exit code a rank uses when this error ends it.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::BadInput(_) | Error::Preflight(_) => ExitCode::BadInput,
            Error::Decode(_) | Error::Invariant(_) => ExitCode::InvariantViolation,
            Error::Parity(_) => ExitCode::ParityMismatch,
            Error::PeerLost(_) | Error::Io { .. } => ExitCode::PeerLost,
            Error::PeerFailed(_) => ExitCode::PeerFailed,
            Error::Timeout(_) => ExitCode::WatchdogTimeout,
            Error::LibraryMissing(_) | Error::Cuda(_) | Error::Nccl(_) | Error::NoKernels(_) => {
                ExitCode::DeviceError
            }
            Error::Signal(_) => ExitCode::Signal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_keeps_the_variant_and_so_the_exit_code() {
        let e = Error::Timeout("ncclCommFinalize on pp did not finish".into())
            .with_note("; cleaning up, ncclCommAbort on pp failed too");
        assert_eq!(e.exit_code(), ExitCode::WatchdogTimeout);
        assert_eq!(
            e.to_string(),
            "timed out: ncclCommFinalize on pp did not finish; cleaning up, ncclCommAbort on pp \
             failed too"
        );
    }
}
