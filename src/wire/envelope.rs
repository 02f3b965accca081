//! Preflight and the two envelope types: [`PreparedEnvelope`] (the only sendable thing) and
//! [`ReceivedEnvelope`] (what a receive loop hands up).
//!
//! Contract: `prepare` does every check that could fail (meta serialization and round trip,
//! specs, dtype allowlist, sizes against [`Limits`], tensor bytes vs specs) and only then builds
//! the header. `PreparedEnvelope` has private fields, so no code path can emit a header for an
//! envelope that did not pass preflight (docs/spec.md §3 anti-stranding, break-it C2).
use super::header::{Action, Header, HEADER_LEN};
use super::meta::{canonical_json, untyped_meta_from_json, DType, Limits, MetaDoc, TensorSpec};
use crate::digest::fnv64;
use crate::error::{Error, Result};
use crate::ids::{CacheEpoch, CallId, ChunkIndex};

/// Where a tensor's bytes live: host memory (`Vec<u8>`) or a data plane's device buffer. `wire`
/// only needs the length (preflight checks it against `dtype × shape`); it never touches the
/// bytes of a device buffer, so nothing here knows about CUDA.
pub trait TensorBytes {
    fn byte_len(&self) -> u64;
}

impl TensorBytes for Vec<u8> {
    fn byte_len(&self) -> u64 {
        self.len() as u64
    }
}

/// Borrowed storage (an envelope sent as a view of one the caller keeps: `by_ref`).
impl<S: TensorBytes> TensorBytes for &S {
    fn byte_len(&self) -> u64 {
        (**self).byte_len()
    }
}

/// A top-level envelope tensor: name, dtype, shape and its bytes in storage `S` (host memory by
/// default; a data plane's device buffer for device-resident envelopes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor<S = Vec<u8>> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: S,
}

/// A tensor in host memory, ready to travel as a top-level envelope entry.
pub type HostTensor = Tensor<Vec<u8>>;

impl<S: TensorBytes> Tensor<S> {
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<u64>, data: S) -> Self {
        Tensor {
            name: name.into(),
            dtype,
            shape,
            data,
        }
    }
    pub fn spec(&self) -> TensorSpec {
        TensorSpec {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: self.shape.clone(),
            byte_len: self.data.byte_len(),
        }
    }
    /// The same tensor, its bytes borrowed.
    pub fn by_ref(&self) -> Tensor<&S> {
        Tensor {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: self.shape.clone(),
            data: &self.data,
        }
    }
    /// The same tensor with its bytes moved to other storage by `f` (upload, download).
    pub fn map_data<T, E>(
        self,
        f: impl FnOnce(S) -> std::result::Result<T, E>,
    ) -> std::result::Result<Tensor<T>, E> {
        Ok(Tensor {
            name: self.name,
            dtype: self.dtype,
            shape: self.shape,
            data: f(self.data)?,
        })
    }
}

impl Tensor<Vec<u8>> {
    pub fn from_f32(name: impl Into<String>, shape: Vec<u64>, values: &[f32]) -> Self {
        Self::new(
            name,
            DType::F32,
            shape,
            bytemuck::cast_slice(values).to_vec(),
        )
    }
    /// Zero-filled tensor of `spec` (the receiver's allocation, strictly from the manifest).
    pub fn zeros(spec: &TensorSpec) -> Result<Self> {
        let len = usize::try_from(spec.byte_len).map_err(|_| {
            Error::Decode(format!("tensor `{}` too large for this host", spec.name))
        })?;
        Ok(Self::new(
            spec.name.clone(),
            spec.dtype,
            spec.shape.clone(),
            vec![0u8; len],
        ))
    }
    /// The values as f32 (copying, so alignment never matters). `None` unless dtype is f32.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }
}

/// The three ids every envelope carries (docs/spec.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EnvelopeIds {
    pub call_id: CallId,
    pub chunk_index: ChunkIndex,
    pub cache_epoch: CacheEpoch,
}

impl EnvelopeIds {
    /// The ids a header carries (a RESULT answers with the ids of its INFER).
    pub fn of(h: &Header) -> Self {
        EnvelopeIds {
            call_id: h.call_id(),
            chunk_index: h.chunk_index(),
            cache_epoch: h.cache_epoch(),
        }
    }
    pub fn with_chunk(self, chunk_index: u64) -> Self {
        EnvelopeIds {
            chunk_index: ChunkIndex(chunk_index),
            ..self
        }
    }
    pub fn with_epoch(self, cache_epoch: u64) -> Self {
        EnvelopeIds {
            cache_epoch: CacheEpoch(cache_epoch),
            ..self
        }
    }
}

/// An envelope that passed preflight: header, canonical meta bytes and materialized tensors
/// (host memory, or device buffers of a data plane: `PreparedEnvelope<D::Buffer>`).
/// Fields are private: only [`prepare`], [`prepare_untyped`], [`PreparedEnvelope::noop`] and
/// [`PreparedEnvelope::shutdown`] make one.
///
/// Break-it C2 ("sender fails after the header") cannot be written: building one outside
/// preflight fails on the private fields (E0451) and on nothing else — the same literal compiles
/// inside this module (`c2_doctest_literal_is_well_typed_so_only_privacy_rejects_it_outside`).
/// ```compile_fail,E0451
/// use lockstep::wire::{Header, PreparedEnvelope};
/// let header: Header = bytemuck::Zeroable::zeroed();
/// let _: PreparedEnvelope = PreparedEnvelope { header, meta: Vec::new(), tensors: Vec::new() };
/// ```
/// ```
/// use lockstep::wire::{EnvelopeIds, PreparedEnvelope};
/// let _: PreparedEnvelope = PreparedEnvelope::noop(EnvelopeIds::default());
/// ```
#[derive(Clone, Debug)]
pub struct PreparedEnvelope<S = Vec<u8>> {
    header: Header,
    meta: Vec<u8>,
    tensors: Vec<Tensor<S>>,
}

impl PreparedEnvelope {
    /// A NOOP (heartbeat): no meta, no tensors.
    pub fn noop(ids: EnvelopeIds) -> Self {
        Self::bare(Action::Noop, ids)
    }
    /// A SHUTDOWN: no meta, no tensors.
    pub fn shutdown(ids: EnvelopeIds) -> Self {
        Self::bare(Action::Shutdown, ids)
    }
    fn bare(action: Action, ids: EnvelopeIds) -> Self {
        PreparedEnvelope {
            header: Header::new(
                action,
                ids.call_id,
                ids.chunk_index,
                ids.cache_epoch,
                0,
                0,
                0,
                0,
            ),
            meta: Vec::new(),
            tensors: Vec::new(),
        }
    }
}

impl<S> PreparedEnvelope<S> {
    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn header_bytes(&self) -> [u8; HEADER_LEN] {
        self.header.encode()
    }
    pub fn meta_bytes(&self) -> &[u8] {
        &self.meta
    }
    pub fn tensors(&self) -> &[Tensor<S>] {
        &self.tensors
    }
    pub fn action(&self) -> Action {
        self.header.action()
    }
    /// Hands the parts to the sender that owns the wire (`Rank`), which sends header and meta
    /// first and then moves the tensors' storage into the data plane. The parts cannot be put
    /// back together into a `PreparedEnvelope`.
    pub fn into_parts(self) -> (Header, Vec<u8>, Vec<Tensor<S>>) {
        (self.header, self.meta, self.tensors)
    }
}

impl<S: TensorBytes> PreparedEnvelope<S> {
    /// The same envelope with its tensors' bytes borrowed: sending it leaves this one with the
    /// caller (to send again, e.g. a duplicate). It passed preflight as this one did.
    pub fn by_ref(&self) -> PreparedEnvelope<&S> {
        PreparedEnvelope {
            header: self.header,
            meta: self.meta.clone(),
            tensors: self.tensors.iter().map(Tensor::by_ref).collect(),
        }
    }
}

/// Preflight for typed meta: everything that can fail happens here, before a header exists.
pub fn prepare<T: serde::Serialize + serde::de::DeserializeOwned, S: TensorBytes>(
    action: Action,
    ids: EnvelopeIds,
    meta: &T,
    tensors: Vec<Tensor<S>>,
    limits: &Limits,
) -> Result<PreparedEnvelope<S>> {
    let body = canonical_json(meta)?;
    finish(action, ids, body, tensors, limits)
}

/// Preflight for untyped meta (JSON text, the C ABI's entry point): hidden tensors and values
/// that do not round-trip are refused.
pub fn prepare_untyped<S: TensorBytes>(
    action: Action,
    ids: EnvelopeIds,
    meta_json: &str,
    tensors: Vec<Tensor<S>>,
    limits: &Limits,
) -> Result<PreparedEnvelope<S>> {
    let body = untyped_meta_from_json(meta_json, limits)?;
    finish(action, ids, body, tensors, limits)
}

fn finish<S: TensorBytes>(
    action: Action,
    ids: EnvelopeIds,
    body: serde_json::Value,
    tensors: Vec<Tensor<S>>,
    limits: &Limits,
) -> Result<PreparedEnvelope<S>> {
    if !action.has_payload() {
        return Err(Error::Preflight(format!(
            "{} carries no payload; use PreparedEnvelope::{}",
            action.name(),
            action.name().to_ascii_lowercase()
        )));
    }
    let doc = MetaDoc {
        tensor_specs: tensors.iter().map(Tensor::spec).collect(),
        body,
    };
    // Each spec took its byte_len from the tensor's storage, so a data/shape disagreement shows
    // up in the per-spec validation inside.
    let total = doc.validate_specs(limits).map_err(Error::Preflight)?;
    let meta = doc.encode()?;
    if meta.len() as u64 > limits.max_meta_bytes {
        return Err(Error::Preflight(format!(
            "meta of {} bytes exceeds the limit of {}",
            meta.len(),
            limits.max_meta_bytes
        )));
    }
    let header = Header::new(
        action,
        ids.call_id,
        ids.chunk_index,
        ids.cache_epoch,
        meta.len() as u64,
        tensors.len() as u32,
        total,
        fnv64(&meta),
    );
    Ok(PreparedEnvelope {
        header,
        meta,
        tensors,
    })
}

/// An envelope as a receive loop hands it up: validated header, decoded meta (None for NOOP and
/// SHUTDOWN), tensors allocated strictly from the manifest (host memory, or a data plane's device
/// buffers: `ReceivedEnvelope<D::Buffer>`).
#[derive(Clone, Debug)]
pub struct ReceivedEnvelope<S = Vec<u8>> {
    pub header: Header,
    pub meta: Option<MetaDoc>,
    pub tensors: Vec<Tensor<S>>,
}

impl<S> ReceivedEnvelope<S> {
    pub fn action(&self) -> Action {
        self.header.action()
    }
    pub fn tensor(&self, name: &str) -> Option<&Tensor<S>> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

impl<S: TensorBytes> ReceivedEnvelope<S> {
    /// The same envelope with its tensors' bytes borrowed (to relay one the caller keeps).
    pub fn by_ref(&self) -> ReceivedEnvelope<&S> {
        ReceivedEnvelope {
            header: self.header,
            meta: self.meta.clone(),
            tensors: self.tensors.iter().map(Tensor::by_ref).collect(),
        }
    }
}

/// Decodes an envelope frame (header, then meta) as every receiver does: the header checked,
/// `meta_len` against the frame, the meta against the header's digest, counts and [`Limits`].
/// Never panics, whatever the bytes (the `lockstep bench wire` fuzz and `tests/wire_props.rs`).
pub fn decode_frame(body: &[u8], limits: &Limits) -> Result<(Header, Option<MetaDoc>)> {
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
    Ok((header, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C2 doctest's struct literal, verbatim, compiles where the fields are visible: so
    /// outside this module its only error is privacy (stable rustdoc does not check the pinned
    /// error code; `tools/check-compile-fail.sh` does, and this control shows why it holds).
    #[test]
    fn c2_doctest_literal_is_well_typed_so_only_privacy_rejects_it_outside() {
        let header: Header = bytemuck::Zeroable::zeroed();
        let e: PreparedEnvelope = PreparedEnvelope {
            header,
            meta: Vec::new(),
            tensors: Vec::new(),
        };
        assert!(e.tensors.is_empty());
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Plan {
        steps: u32,
        guidance: f32,
    }

    #[test]
    fn prepared_envelope_round_trips_through_decode() {
        let t = HostTensor::from_f32("latents", vec![2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let ids = EnvelopeIds {
            call_id: CallId(1),
            ..Default::default()
        };
        let env = prepare(
            Action::Infer,
            ids,
            &Plan {
                steps: 4,
                guidance: 5.0,
            },
            vec![t],
            &Limits::default(),
        )
        .unwrap();
        let h = Header::decode(&env.header_bytes()).unwrap();
        let doc = MetaDoc::decode(
            env.meta_bytes(),
            h.meta_digest,
            h.n_tensors,
            h.payload_bytes,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(doc.tensor_specs[0].shape, vec![2, 2]);
        assert_eq!(doc.body_as::<Plan>().unwrap().steps, 4);
    }

    #[test]
    fn device_resident_envelope_has_the_same_header_and_meta_as_its_host_twin() {
        // Storage that is only a length, like a device buffer: preflight never reads the bytes.
        #[derive(Debug)]
        struct Len(u64);
        impl TensorBytes for Len {
            fn byte_len(&self) -> u64 {
                self.0
            }
        }
        let ids = EnvelopeIds {
            call_id: CallId(7),
            ..Default::default()
        };
        let plan = Plan {
            steps: 4,
            guidance: 5.0,
        };
        let host = prepare(
            Action::Infer,
            ids,
            &plan,
            vec![HostTensor::from_f32("latents", vec![2, 3], &[0.5; 6])],
            &Limits::default(),
        )
        .unwrap();
        let dev = prepare(
            Action::Infer,
            ids,
            &plan,
            vec![Tensor::new("latents", DType::F32, vec![2, 3], Len(24))],
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(host.header_bytes(), dev.header_bytes());
        assert_eq!(host.meta_bytes(), dev.meta_bytes());
        // A device buffer of the wrong length fails preflight like host bytes do.
        let err = prepare(
            Action::Infer,
            ids,
            &plan,
            vec![Tensor::new("latents", DType::F32, vec![2, 3], Len(20))],
            &Limits::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("byte_len 20"), "{err}");
    }

    #[test]
    fn bool_tensor_fails_preflight() {
        let t = HostTensor::new("mask", DType::Bool, vec![4], vec![1, 0, 1, 0]);
        let err = prepare(
            Action::Infer,
            EnvelopeIds::default(),
            &Plan {
                steps: 1,
                guidance: 1.0,
            },
            vec![t],
            &Limits::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("dtype bool is not in the wire allowlist"),
            "{err}"
        );
    }

    #[test]
    fn tensor_data_not_matching_shape_fails_preflight() {
        let mut t = HostTensor::from_f32("x", vec![3], &[1.0, 2.0, 3.0]);
        t.data.pop();
        let err = prepare(
            Action::Infer,
            EnvelopeIds::default(),
            &Plan {
                steps: 1,
                guidance: 1.0,
            },
            vec![t],
            &Limits::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("byte_len 11"), "{err}");
    }

    #[test]
    fn manifest_over_the_limit_fails_before_allocation() {
        let limits = Limits {
            max_total_bytes: 8,
            ..Limits::default()
        };
        let t = HostTensor::from_f32("x", vec![3], &[1.0, 2.0, 3.0]);
        let err = prepare(
            Action::Infer,
            EnvelopeIds::default(),
            &Plan {
                steps: 1,
                guidance: 1.0,
            },
            vec![t],
            &limits,
        )
        .unwrap_err();
        assert!(err.to_string().contains("exceeds the limit of 8"), "{err}");
    }
}
