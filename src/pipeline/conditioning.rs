//! A caller's conditioning tensor (a text encoder's output) on its way from Stage 0 to every mesh
//! rank, where the model computes its cross-attention text K/V from the values.
//!
//! Contract:
//! - The tensor is `[text_tokens, text_dim]` of the preset, dtype f32, f16 or bf16, its byte
//!   length exact; anything else is refused (74) before it is sent.
//! - Its digest (dtype, shape, bytes) names the prompt: it is the plan's `prompt_seed` and, on
//!   every mesh rank, the `prompt` word of the chunk-end state digest, computed there from the
//!   bytes that arrived. So every rank's copy is checked against the others' and against Stage
//!   0's at every chunk end (F3's mechanism): a tensor that changed on the way is a digest drift
//!   (70), never a silently different prompt.
//! - The values travel once per epoch, with its first chunk (`ConditioningSpec::tensor`); the
//!   mesh keeps the K/V for the digest.
use crate::digest::fnv64;
use crate::model::DitConfig;
use crate::plan::CONDITIONING_TENSOR;
use crate::wire::{DType, HostTensor};
use crate::{Error, Result};

/// The digest that names a conditioning tensor: dtype name, shape, bytes.
pub fn digest(dtype: DType, shape: &[u64], bytes: &[u8]) -> u64 {
    let mut head = Vec::with_capacity(8 + 8 * shape.len());
    head.extend_from_slice(dtype.name().as_bytes());
    for d in shape {
        head.extend_from_slice(&d.to_le_bytes());
    }
    fnv64(&head) ^ fnv64(bytes).rotate_left(17)
}

/// Checks a tensor against the model's text input; `what` names it in the message.
pub fn check(cfg: &DitConfig, dtype: DType, shape: &[u64], byte_len: u64) -> Result<()> {
    let want = [cfg.text_tokens as u64, cfg.text_dim as u64];
    if !matches!(dtype, DType::F32 | DType::F16 | DType::Bf16) {
        return Err(Error::BadInput(format!(
            "conditioning tensor: dtype {} is not a float type (f32, f16 or bf16)",
            dtype.name()
        )));
    }
    if shape != want {
        return Err(Error::BadInput(format!(
            "conditioning tensor: shape {shape:?} but preset {} takes [{}, {}] \
             (text tokens × text dim)",
            cfg.name, want[0], want[1]
        )));
    }
    let need = want[0] * want[1] * dtype.size();
    if byte_len != need {
        return Err(Error::BadInput(format!(
            "conditioning tensor: {byte_len} bytes but {} × {shape:?} needs {need}",
            dtype.name()
        )));
    }
    Ok(())
}

/// The tensor's values as f32 (the model's text-embedding input). The dtype was checked.
pub fn features(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    let two = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
    match dtype {
        DType::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        DType::F16 => Ok(bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(two(c)).to_f32())
            .collect()),
        DType::Bf16 => Ok(bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(two(c)).to_f32())
            .collect()),
        other => Err(Error::Invariant(format!(
            "conditioning tensor of dtype {} reached the model",
            other.name()
        ))),
    }
}

/// A checked conditioning tensor and its digest.
#[derive(Clone, PartialEq, Eq)]
pub struct PromptTensor {
    dtype: DType,
    shape: [u64; 2],
    bytes: Vec<u8>,
    digest: u64,
}

impl std::fmt::Debug for PromptTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the bytes (8 MiB for a Wan prompt).
        write!(
            f,
            "PromptTensor({} {:?}, digest {:#018x})",
            self.dtype.name(),
            self.shape,
            self.digest
        )
    }
}

impl PromptTensor {
    /// A text encoder's output for the model `cfg` (refused as bad input unless it fits).
    pub fn new(cfg: &DitConfig, dtype: DType, shape: &[u64], bytes: Vec<u8>) -> Result<Self> {
        check(cfg, dtype, shape, bytes.len() as u64)?;
        Ok(Self {
            digest: digest(dtype, shape, &bytes),
            shape: [shape[0], shape[1]],
            dtype,
            bytes,
        })
    }

    /// The tensor `name` (or the file's only tensor) of a safetensors file.
    pub fn from_safetensors(
        cfg: &DitConfig,
        path: &std::path::Path,
        name: Option<&str>,
    ) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::BadInput(format!("conditioning file {}: {e}", path.display())))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            Error::BadInput(format!(
                "conditioning file {}: not safetensors: {e}",
                path.display()
            ))
        })?;
        let names = st.names();
        let pick = match name {
            Some(n) => n.to_string(),
            None if names.len() == 1 => names[0].to_string(),
            None => {
                return Err(Error::BadInput(format!(
                    "conditioning file {} holds {} tensors; name the one to use",
                    path.display(),
                    names.len()
                )))
            }
        };
        let t = st.tensor(&pick).map_err(|e| {
            Error::BadInput(format!(
                "conditioning file {}: tensor {pick:?}: {e}",
                path.display()
            ))
        })?;
        let dtype = match t.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::Bf16,
            other => {
                return Err(Error::BadInput(format!(
                    "conditioning file {}: tensor {pick:?} is {other:?}, not f32/f16/bf16",
                    path.display()
                )))
            }
        };
        let shape: Vec<u64> = t.shape().iter().map(|d| *d as u64).collect();
        Self::new(cfg, dtype, &shape, t.data().to_vec())
    }

    pub fn digest(&self) -> u64 {
        self.digest
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> [u64; 2] {
        self.shape
    }
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// The envelope tensor that carries it ([`CONDITIONING_TENSOR`]).
    pub fn to_tensor(&self) -> HostTensor {
        HostTensor::new(
            CONDITIONING_TENSOR,
            self.dtype,
            self.shape.to_vec(),
            self.bytes.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_values_convert_and_the_digest_covers_dtype_shape_and_bytes() {
        let vals = [1.5f32, -2.0, 0.25];
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(features(DType::F16, &f16).unwrap(), vals);
        assert_eq!(features(DType::Bf16, &bf16).unwrap(), vals);
        assert!(features(DType::I32, &[0; 4]).is_err());
        let d = digest(DType::F16, &[1, 3], &f16);
        assert_ne!(d, digest(DType::Bf16, &[1, 3], &f16));
        assert_ne!(d, digest(DType::F16, &[3, 1], &f16));
        let mut other = f16.clone();
        other[0] ^= 1;
        assert_ne!(d, digest(DType::F16, &[1, 3], &other));
    }
}
