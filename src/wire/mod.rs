//! Envelope framing (SPEC §3): header, canonical meta, tensor manifest, preflight →
//! `PreparedEnvelope`.
