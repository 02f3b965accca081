//! The fixed-size envelope header: 80 bytes, little-endian, `#[repr(C)]` + Pod.
//!
//! Contract: `encode` → `decode` round-trips; `decode` of any 80 bytes is a value or a typed
//! error (bad magic, unknown version, unknown action, unknown flag bits, checksum mismatch,
//! payload on a NOOP/SHUTDOWN). The checksum is FNV-1a over every byte before it.
use crate::digest::fnv64;
use crate::error::{Error, Result};
use crate::ids::{CacheEpoch, CallId, ChunkIndex};
use bytemuck::{Pod, Zeroable};

/// `LKST` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"LKST");
/// Bumped on any change to the header layout or meta schema; peers with another version are
/// refused before any collective.
pub const ENVELOPE_VERSION: u16 = 1;
/// Size of an encoded header in bytes.
pub const HEADER_LEN: usize = std::mem::size_of::<Header>();
/// No flag bits are defined yet; any set bit is refused (forward compatibility is a version bump).
const KNOWN_FLAGS: u32 = 0;

/// What the receiver must do with this envelope. NOOP and SHUTDOWN never carry a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Infer = 1,
    Noop = 2,
    Shutdown = 3,
    Result = 4,
}

impl Action {
    pub fn from_u16(v: u16) -> Option<Action> {
        match v {
            1 => Some(Action::Infer),
            2 => Some(Action::Noop),
            3 => Some(Action::Shutdown),
            4 => Some(Action::Result),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Action::Infer => "INFER",
            Action::Noop => "NOOP",
            Action::Shutdown => "SHUTDOWN",
            Action::Result => "RESULT",
        }
    }
    /// Whether this action may carry meta and tensors.
    pub fn has_payload(self) -> bool {
        matches!(self, Action::Infer | Action::Result)
    }
}

/// The wire header. Fields are stored little-endian (`to_le` on encode, `from_le` on decode), so
/// the layout is the same on every host. No padding: every field is naturally aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Header {
    pub magic: u32,
    pub envelope_version: u16,
    pub action: u16,
    pub flags: u32,
    pub n_tensors: u32,
    pub call_id: u64,
    pub chunk_index: u64,
    pub cache_epoch: u64,
    pub meta_len: u64,
    /// Sum of every tensor's `byte_len`; lets the receiver check the total before reading meta.
    pub payload_bytes: u64,
    pub meta_digest: u64,
    pub reserved: u64,
    pub checksum: u64,
}

const _: () = assert!(HEADER_LEN == 80);

impl Header {
    /// A header for `action` with no payload (NOOP, SHUTDOWN) or the given sizes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        action: Action,
        call_id: CallId,
        chunk_index: ChunkIndex,
        cache_epoch: CacheEpoch,
        meta_len: u64,
        n_tensors: u32,
        payload_bytes: u64,
        meta_digest: u64,
    ) -> Header {
        let mut h = Header {
            magic: MAGIC,
            envelope_version: ENVELOPE_VERSION,
            action: action as u16,
            flags: 0,
            n_tensors,
            call_id: call_id.0,
            chunk_index: chunk_index.0,
            cache_epoch: cache_epoch.0,
            meta_len,
            payload_bytes,
            meta_digest,
            reserved: 0,
            checksum: 0,
        };
        h.checksum = h.compute_checksum();
        h
    }

    fn compute_checksum(&self) -> u64 {
        let bytes = bytemuck::bytes_of(self);
        fnv64(&bytes[..HEADER_LEN - 8])
    }

    pub fn action(&self) -> Action {
        // `decode` and `new` only ever produce known actions.
        Action::from_u16(self.action).unwrap_or(Action::Noop)
    }
    pub fn call_id(&self) -> CallId {
        CallId(self.call_id)
    }
    pub fn chunk_index(&self) -> ChunkIndex {
        ChunkIndex(self.chunk_index)
    }
    pub fn cache_epoch(&self) -> CacheEpoch {
        CacheEpoch(self.cache_epoch)
    }

    /// Little-endian bytes of this header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let le = Header {
            magic: self.magic.to_le(),
            envelope_version: self.envelope_version.to_le(),
            action: self.action.to_le(),
            flags: self.flags.to_le(),
            n_tensors: self.n_tensors.to_le(),
            call_id: self.call_id.to_le(),
            chunk_index: self.chunk_index.to_le(),
            cache_epoch: self.cache_epoch.to_le(),
            meta_len: self.meta_len.to_le(),
            payload_bytes: self.payload_bytes.to_le(),
            meta_digest: self.meta_digest.to_le(),
            reserved: self.reserved.to_le(),
            checksum: self.checksum.to_le(),
        };
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(bytemuck::bytes_of(&le));
        out
    }

    /// Decodes and validates a header. Any input gives a value or a typed error.
    pub fn decode(bytes: &[u8]) -> Result<Header> {
        if bytes.len() != HEADER_LEN {
            return Err(Error::Decode(format!(
                "header is {} bytes, expected {HEADER_LEN}",
                bytes.len()
            )));
        }
        let raw: Header = bytemuck::pod_read_unaligned(bytes);
        let h = Header {
            magic: u32::from_le(raw.magic),
            envelope_version: u16::from_le(raw.envelope_version),
            action: u16::from_le(raw.action),
            flags: u32::from_le(raw.flags),
            n_tensors: u32::from_le(raw.n_tensors),
            call_id: u64::from_le(raw.call_id),
            chunk_index: u64::from_le(raw.chunk_index),
            cache_epoch: u64::from_le(raw.cache_epoch),
            meta_len: u64::from_le(raw.meta_len),
            payload_bytes: u64::from_le(raw.payload_bytes),
            meta_digest: u64::from_le(raw.meta_digest),
            reserved: u64::from_le(raw.reserved),
            checksum: u64::from_le(raw.checksum),
        };
        if h.magic != MAGIC {
            return Err(Error::Decode(format!(
                "bad magic {:#010x} (expected {MAGIC:#010x} \"LKST\"): not a lockstep envelope",
                h.magic
            )));
        }
        if h.envelope_version != ENVELOPE_VERSION {
            return Err(Error::Decode(format!(
                "unknown envelope_version {} (this build speaks {ENVELOPE_VERSION})",
                h.envelope_version
            )));
        }
        if h.checksum != h.compute_checksum() {
            return Err(Error::Decode(format!(
                "header checksum mismatch (got {:#018x}, computed {:#018x})",
                h.checksum,
                h.compute_checksum()
            )));
        }
        let Some(action) = Action::from_u16(h.action) else {
            return Err(Error::Decode(format!("unknown action {}", h.action)));
        };
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err(Error::Decode(format!("unknown flag bits {:#x}", h.flags)));
        }
        if h.reserved != 0 {
            return Err(Error::Decode("reserved header field is not zero".into()));
        }
        if !action.has_payload() && (h.meta_len != 0 || h.n_tensors != 0 || h.payload_bytes != 0) {
            return Err(Error::Decode(format!(
                "{} carries no payload, but the header declares meta_len {}, n_tensors {}, payload_bytes {}",
                action.name(),
                h.meta_len,
                h.n_tensors,
                h.payload_bytes
            )));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header::new(
            Action::Infer,
            CallId(7),
            ChunkIndex(3),
            CacheEpoch(1),
            12,
            2,
            4096,
            0xdead_beef,
        )
    }

    #[test]
    fn header_round_trips_through_little_endian_bytes() {
        let h = sample();
        let bytes = h.encode();
        assert_eq!(&bytes[..4], b"LKST");
        assert_eq!(Header::decode(&bytes).unwrap(), h);
    }

    #[test]
    fn header_with_unknown_version_is_refused() {
        let mut h = sample();
        h.envelope_version = 2;
        h.checksum = h.compute_checksum();
        let err = Header::decode(&h.encode()).unwrap_err().to_string();
        assert!(err.contains("unknown envelope_version 2"), "{err}");
    }

    #[test]
    fn header_with_bad_magic_is_refused() {
        let mut bytes = sample().encode();
        bytes[0] = b'X';
        let err = Header::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("bad magic"), "{err}");
    }

    #[test]
    fn header_bit_flip_fails_checksum() {
        let mut bytes = sample().encode();
        bytes[20] ^= 1;
        let err = Header::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn noop_with_payload_is_refused() {
        let h = Header::new(
            Action::Noop,
            CallId(1),
            ChunkIndex(0),
            CacheEpoch(0),
            5,
            0,
            0,
            0,
        );
        let err = Header::decode(&h.encode()).unwrap_err().to_string();
        assert!(err.contains("NOOP carries no payload"), "{err}");
    }
}
