//! Envelope framing (docs/spec.md §3): header, canonical meta, tensor manifest, preflight →
//! `PreparedEnvelope`.
//!
//! Contract:
//! - An envelope is a fixed-size [`Header`], canonical meta bytes ([`MetaDoc`]: the manifest
//!   `tensor_specs` plus a typed body), and top-level tensors described by the manifest.
//! - Only a [`PreparedEnvelope`] can be sent, and only [`prepare`] makes one: schema, meta
//!   serialization, specs, dtypes, sizes and tensor bytes are all checked **before** a header
//!   exists. A header is a commitment: the peer can receive the whole payload from it alone.
//! - Decoding any byte string ([`Header::decode`], [`MetaDoc::decode`]) returns a value or a
//!   typed [`crate::Error::Decode`]; limits ([`Limits`]) are checked before any allocation.
//!
//! Tripwires: unknown magic/version/action/flag bits, a checksum or meta-digest mismatch, a dtype
//! outside the allowlist, a spec whose `byte_len` disagrees with `dtype × shape`, a tensor hidden
//! in untyped meta, a NaN/∞ or lossy number in meta — all are typed errors, never a panic.
mod envelope;
mod header;
mod meta;

pub use envelope::{
    decode_frame, prepare, prepare_untyped, EnvelopeIds, HostTensor, PreparedEnvelope,
    ReceivedEnvelope, Tensor, TensorBytes,
};
pub use header::{Action, Header, ENVELOPE_VERSION, HEADER_LEN, MAGIC};
pub use meta::{canonical_json, untyped_meta_from_json, DType, Limits, MetaDoc, TensorSpec};
