//! Canonical meta: the manifest (`tensor_specs`) plus the sender's typed body, as deterministic
//! JSON bytes (sorted keys, compact, no NaN/∞, no lossy numbers) so that digests agree across
//! ranks and a bug report can be diffed.
//!
//! Contract: `MetaDoc::encode` is canonical (encode → decode → encode is byte-identical, and
//! `decode` refuses non-canonical bytes); `decode` checks the size limit first, then the digest,
//! then every spec (allowlisted dtype, `byte_len == numel × size` without overflow, unique
//! names, totals equal to the header's). Untyped meta (JSON from the C ABI) is refused when it
//! hides a tensor or holds a value that does not round-trip.
use crate::digest::fnv64;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Element types. Only the allowlist ([`DType::is_allowed`]) may cross the wire; the others exist
/// so that a foreign tensor (C ABI, a future Python shim) can be named and refused precisely.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Bf16,
    F16,
    F32,
    I32,
    I64,
    U8,
    /// Not on the wire: cast to u8 explicitly in preflight if you need it.
    Bool,
    /// Not on the wire.
    F64,
    /// Not on the wire.
    F8E4m3,
    /// Not on the wire.
    F8E5m2,
}

impl DType {
    pub const ALLOWED: [DType; 6] = [
        DType::Bf16,
        DType::F16,
        DType::F32,
        DType::I32,
        DType::I64,
        DType::U8,
    ];
    pub fn is_allowed(self) -> bool {
        Self::ALLOWED.contains(&self)
    }
    pub fn size(self) -> u64 {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 | DType::F64 => 8,
            DType::U8 | DType::Bool | DType::F8E4m3 | DType::F8E5m2 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::Bool => "bool",
            DType::F64 => "f64",
            DType::F8E4m3 => "f8e4m3",
            DType::F8E5m2 => "f8e5m2",
        }
    }
    /// Parses a dtype name as a foreign caller writes it (`"bf16"`, `"torch.bool"`, `"fp8"`).
    pub fn parse(s: &str) -> Result<DType> {
        let s = s.trim().trim_start_matches("torch.").to_ascii_lowercase();
        Ok(match s.as_str() {
            "bf16" | "bfloat16" => DType::Bf16,
            "f16" | "float16" | "half" => DType::F16,
            "f32" | "float32" | "float" => DType::F32,
            "i32" | "int32" => DType::I32,
            "i64" | "int64" | "long" => DType::I64,
            "u8" | "uint8" => DType::U8,
            "bool" => DType::Bool,
            "f64" | "float64" | "double" => DType::F64,
            "f8e4m3" | "fp8" | "float8_e4m3fn" | "fp8_e4m3" => DType::F8E4m3,
            "f8e5m2" | "float8_e5m2" | "fp8_e5m2" => DType::F8E5m2,
            _ => return Err(Error::BadInput(format!("unknown dtype {s:?}"))),
        })
    }
    pub(crate) fn allowlist_error(self) -> String {
        format!(
            "dtype {} is not in the wire allowlist (bf16, f16, f32, i32, i64, u8); cast it explicitly before preflight",
            self.name()
        )
    }
}

/// One manifest entry: the receiver allocates exactly this, nothing inferred.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub byte_len: u64,
}

impl TensorSpec {
    /// Checks one spec: allowlisted dtype, sane name and rank, `byte_len == numel × size`
    /// computed without overflow.
    pub fn validate(&self, limits: &Limits) -> std::result::Result<(), String> {
        if self.name.is_empty() || self.name.len() > limits.max_name_len {
            return Err(format!(
                "tensor name {:?} must be 1..={} bytes",
                self.name, limits.max_name_len
            ));
        }
        if !self
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-/".contains(&b))
        {
            return Err(format!(
                "tensor name {:?} has characters outside [A-Za-z0-9_.-/]",
                self.name
            ));
        }
        if !self.dtype.is_allowed() {
            return Err(format!(
                "tensor `{}`: {}",
                self.name,
                self.dtype.allowlist_error()
            ));
        }
        if self.shape.len() > limits.max_ndim {
            return Err(format!(
                "tensor `{}` has {} dims (limit {})",
                self.name,
                self.shape.len(),
                limits.max_ndim
            ));
        }
        let numel = self
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor `{}`: shape {:?} overflows", self.name, self.shape))?;
        let want = numel
            .checked_mul(self.dtype.size())
            .ok_or_else(|| format!("tensor `{}`: byte size overflows", self.name))?;
        if want != self.byte_len {
            return Err(format!(
                "tensor `{}`: byte_len {} but {} × {:?} needs {want}",
                self.name,
                self.byte_len,
                self.dtype.name(),
                self.shape
            ));
        }
        Ok(())
    }
}

/// Bounds checked before any allocation on receive (and on send, so a sender cannot emit what a
/// receiver would refuse).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_meta_bytes: u64,
    pub max_tensors: u32,
    pub max_total_bytes: u64,
    pub max_ndim: usize,
    pub max_name_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_meta_bytes: 1 << 20,
            max_tensors: 64,
            max_total_bytes: 8 << 30,
            max_ndim: 8,
            max_name_len: 128,
        }
    }
}

/// The decoded meta of one envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaDoc {
    /// The manifest, in send order.
    pub tensor_specs: Vec<TensorSpec>,
    /// The sender's typed meta (phase plan, …) as canonical JSON; convert with [`MetaDoc::body_as`].
    pub body: Value,
}

/// Canonical meta bytes are `{"tensor_specs":<specs>,"body":<body>}` (serde's field order, no
/// spaces). A stream of envelopes with one manifest repeats everything up to the body; the
/// encoder and the decoder remember that prefix (per thread) and redo only the body. The cache
/// changes no result: the decoder takes it only when the bytes start with a prefix it fully
/// decoded and validated under the same limits, and falls back to the full decode for anything
/// else (so error messages are the full decoder's); test builds cross-check every cached result
/// against the full path.
const SPECS_KEY: &[u8] = b"{\"tensor_specs\":";
const BODY_KEY: &[u8] = b",\"body\":";

/// A manifest whose canonical prefix was seen: its specs, their total, the limits it passed.
struct KnownManifest {
    limits: Limits,
    prefix: Vec<u8>,
    specs: Vec<TensorSpec>,
    total: u64,
}

thread_local! {
    static ENCODED: std::cell::RefCell<Option<(Vec<TensorSpec>, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
    static DECODED: std::cell::RefCell<Option<KnownManifest>> =
        const { std::cell::RefCell::new(None) };
}

fn manifest_prefix(specs: &[TensorSpec]) -> serde_json::Result<Vec<u8>> {
    let mut p = SPECS_KEY.to_vec();
    serde_json::to_writer(&mut p, specs)?;
    p.extend_from_slice(BODY_KEY);
    Ok(p)
}

impl MetaDoc {
    /// Canonical bytes (sorted keys, compact).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let err = |e: serde_json::Error| Error::Preflight(format!("meta not serializable: {e}"));
        let mut out = ENCODED
            .with(|c| {
                let c = c.borrow();
                c.as_ref()
                    .filter(|(specs, _)| *specs == self.tensor_specs)
                    .map(|(_, prefix)| prefix.clone())
            })
            .map_or_else(
                || {
                    let p = manifest_prefix(&self.tensor_specs)?;
                    ENCODED.with(|c| {
                        *c.borrow_mut() = Some((self.tensor_specs.clone(), p.clone()));
                    });
                    Ok(p)
                },
                Ok,
            )
            .map_err(err)?;
        serde_json::to_writer(&mut out, &self.body).map_err(err)?;
        out.push(b'}');
        debug_assert_eq!(
            serde_json::to_vec(self).ok().as_deref(),
            Some(out.as_slice()),
            "cached meta encoding differs from serde's"
        );
        Ok(out)
    }

    /// Total payload bytes declared by the manifest (checked add).
    pub fn total_bytes(&self) -> Option<u64> {
        self.tensor_specs
            .iter()
            .try_fold(0u64, |acc, s| acc.checked_add(s.byte_len))
    }

    /// Validates the manifest against `limits`; the error names the offending tensor.
    pub fn validate_specs(&self, limits: &Limits) -> std::result::Result<u64, String> {
        if self.tensor_specs.len() > limits.max_tensors as usize {
            return Err(format!(
                "{} tensors exceed the limit of {}",
                self.tensor_specs.len(),
                limits.max_tensors
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for s in &self.tensor_specs {
            s.validate(limits)?;
            if !names.insert(s.name.as_str()) {
                return Err(format!(
                    "tensor name `{}` appears twice in tensor_specs",
                    s.name
                ));
            }
        }
        let total = self
            .total_bytes()
            .ok_or_else(|| "total payload bytes overflow".to_string())?;
        if total > limits.max_total_bytes {
            return Err(format!(
                "payload of {total} bytes exceeds the limit of {}",
                limits.max_total_bytes
            ));
        }
        Ok(total)
    }

    /// Decodes meta bytes announced by a header: size limit, digest, canonical form, manifest.
    /// `meta_len` was already bounded by the caller before it allocated `bytes`.
    pub fn decode(
        bytes: &[u8],
        meta_digest: u64,
        n_tensors: u32,
        payload_bytes: u64,
        limits: &Limits,
    ) -> Result<MetaDoc> {
        if bytes.len() as u64 > limits.max_meta_bytes {
            return Err(Error::Decode(format!(
                "meta of {} bytes exceeds the limit of {}",
                bytes.len(),
                limits.max_meta_bytes
            )));
        }
        if n_tensors > limits.max_tensors {
            return Err(Error::Decode(format!(
                "header announces {n_tensors} tensors, limit {}",
                limits.max_tensors
            )));
        }
        if payload_bytes > limits.max_total_bytes {
            return Err(Error::Decode(format!(
                "header announces {payload_bytes} payload bytes, limit {}",
                limits.max_total_bytes
            )));
        }
        let got = fnv64(bytes);
        if got != meta_digest {
            return Err(Error::Decode(format!(
                "meta digest mismatch (header {meta_digest:#018x}, bytes {got:#018x})"
            )));
        }
        if let Some(doc) = Self::decode_known(bytes, n_tensors, payload_bytes, limits) {
            debug_assert!(
                Self::decode_full(bytes, n_tensors, payload_bytes, limits).is_ok_and(|d| d == doc),
                "cached meta decoding differs from the full decode"
            );
            return Ok(doc);
        }
        let doc = Self::decode_full(bytes, n_tensors, payload_bytes, limits)?;
        if let Ok(prefix) = manifest_prefix(&doc.tensor_specs) {
            if bytes.starts_with(&prefix) {
                let total = doc.total_bytes().unwrap_or(u64::MAX);
                DECODED.with(|c| {
                    *c.borrow_mut() = Some(KnownManifest {
                        limits: *limits,
                        prefix,
                        specs: doc.tensor_specs.clone(),
                        total,
                    });
                });
            }
        }
        Ok(doc)
    }

    /// The fast path of [`MetaDoc::decode`]: `bytes` start with a manifest prefix this thread
    /// decoded and validated under the same limits; only the body is parsed, checked and proved
    /// canonical. `None`: not applicable or not valid (the caller runs the full decode).
    fn decode_known(
        bytes: &[u8],
        n_tensors: u32,
        payload_bytes: u64,
        limits: &Limits,
    ) -> Option<MetaDoc> {
        DECODED.with(|c| {
            let c = c.borrow();
            let m = c.as_ref()?;
            if m.limits != *limits
                || !bytes.starts_with(&m.prefix)
                || bytes.last() != Some(&b'}')
                || bytes.len() < m.prefix.len() + 1
                || m.specs.len() != n_tensors as usize
                || m.total != payload_bytes
            {
                return None;
            }
            let body_bytes = &bytes[m.prefix.len()..bytes.len() - 1];
            let body: Value = serde_json::from_slice(body_bytes).ok()?;
            check_untyped(&body, "body").ok()?;
            if serde_json::to_vec(&body).ok()? != body_bytes {
                return None;
            }
            Some(MetaDoc {
                tensor_specs: m.specs.clone(),
                body,
            })
        })
    }

    /// The full decode (everything after the size, count and digest checks).
    fn decode_full(
        bytes: &[u8],
        n_tensors: u32,
        payload_bytes: u64,
        limits: &Limits,
    ) -> Result<MetaDoc> {
        let doc: MetaDoc = serde_json::from_slice(bytes)
            .map_err(|e| Error::Decode(format!("meta is not a valid MetaDoc: {e}")))?;
        let total = doc.validate_specs(limits).map_err(Error::Decode)?;
        if doc.tensor_specs.len() != n_tensors as usize {
            return Err(Error::Decode(format!(
                "header announces {n_tensors} tensors, manifest lists {}",
                doc.tensor_specs.len()
            )));
        }
        if total != payload_bytes {
            return Err(Error::Decode(format!(
                "header announces {payload_bytes} payload bytes, manifest sums to {total}"
            )));
        }
        check_untyped(&doc.body, "body").map_err(Error::Decode)?;
        let again = serde_json::to_vec(&doc)
            .map_err(|e| Error::Decode(format!("meta does not re-encode: {e}")))?;
        if again != bytes {
            return Err(Error::Decode(
                "meta bytes are not canonical (key order, spacing or number form differs)".into(),
            ));
        }
        Ok(doc)
    }

    /// The body as the receiver's typed meta struct.
    pub fn body_as<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.body).map_err(|e| Error::Decode(format!("meta body: {e}")))
    }
}

/// Canonical JSON value of a typed meta struct. Refuses values that do not serialize or do not
/// round-trip (a NaN/∞ float silently becomes `null` in JSON; we catch that here).
pub fn canonical_json<T: Serialize + serde::de::DeserializeOwned>(meta: &T) -> Result<Value> {
    let v = serde_json::to_value(meta)
        .map_err(|e| Error::Preflight(format!("meta is not serializable: {e}")))?;
    let back: T = T::deserialize(&v).map_err(|e| {
        Error::Preflight(format!(
            "meta does not round-trip ({e}); a NaN or infinite float becomes null in JSON"
        ))
    })?;
    let again = serde_json::to_value(&back)
        .map_err(|e| Error::Preflight(format!("meta is not serializable: {e}")))?;
    if again != v {
        return Err(Error::Preflight(
            "meta does not round-trip: re-serializing the decoded value gives different JSON"
                .into(),
        ));
    }
    check_untyped(&v, "meta").map_err(Error::Preflight)?;
    Ok(v)
}

/// Parses untyped meta (JSON text from the C ABI) and refuses hidden tensors and values that do
/// not round-trip.
pub fn untyped_meta_from_json(text: &str, limits: &Limits) -> Result<Value> {
    if text.len() as u64 > limits.max_meta_bytes {
        return Err(Error::Preflight(format!(
            "meta text of {} bytes exceeds the limit of {}",
            text.len(),
            limits.max_meta_bytes
        )));
    }
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Error::Preflight(format!("meta is not serializable JSON: {e}")))?;
    check_untyped(&v, "meta").map_err(Error::Preflight)?;
    Ok(v)
}

/// Keys that mark an object as a tensor in disguise.
const TENSOR_DATA_KEYS: [&str; 5] = ["data", "ptr", "storage", "bytes", "data_ptr"];

/// Walks untyped meta: no tensor-looking objects, no lossy numbers. The path of an offending
/// field (`meta.a.b[2]`) is spelled out only when there is one: a clean walk allocates nothing.
fn check_untyped(v: &Value, root: &str) -> std::result::Result<(), String> {
    /// One step from the root: an object key or an array index.
    enum Step<'a> {
        Key(&'a str),
        Index(usize),
    }
    fn spell(root: &str, steps: &[Step<'_>]) -> String {
        let mut p = root.to_owned();
        for s in steps {
            match s {
                Step::Key(k) => {
                    p.push('.');
                    p.push_str(k);
                }
                Step::Index(i) => p.push_str(&format!("[{i}]")),
            }
        }
        p
    }
    fn walk<'a>(
        v: &'a Value,
        root: &str,
        steps: &mut Vec<Step<'a>>,
    ) -> std::result::Result<(), String> {
        match v {
            Value::Number(n) => {
                if n.is_f64() {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    if !f.is_finite() {
                        let path = spell(root, steps);
                        return Err(format!("meta field `{path}` is not a finite number"));
                    }
                    if f.fract() == 0.0 && f.abs() >= 9_007_199_254_740_992.0 {
                        let path = spell(root, steps);
                        return Err(format!(
                            "meta field `{path}` = {f} is an integer too large to round-trip (use a string or an i64/u64)"
                        ));
                    }
                }
                Ok(())
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    steps.push(Step::Index(i));
                    walk(item, root, steps)?;
                    steps.pop();
                }
                Ok(())
            }
            Value::Object(map) => {
                let is_marked = map.contains_key("$tensor") || map.contains_key("__tensor__");
                let looks_like = map.contains_key("dtype")
                    && map.contains_key("shape")
                    && TENSOR_DATA_KEYS.iter().any(|k| map.contains_key(*k));
                if is_marked || looks_like {
                    let path = spell(root, steps);
                    return Err(format!(
                        "meta field `{path}` looks like a tensor; tensors travel only as top-level entries in tensor_specs, never inside meta"
                    ));
                }
                for (k, item) in map {
                    steps.push(Step::Key(k));
                    walk(item, root, steps)?;
                    steps.pop();
                }
                Ok(())
            }
            Value::Null | Value::Bool(_) | Value::String(_) => Ok(()),
        }
    }
    walk(v, root, &mut Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_manifest_decodes_and_encodes_exactly_like_the_full_path() {
        let limits = Limits::default();
        let specs = vec![
            TensorSpec {
                name: "latents".into(),
                dtype: DType::F32,
                shape: vec![2, 3],
                byte_len: 24,
            },
            TensorSpec {
                name: "cond".into(),
                dtype: DType::U8,
                shape: vec![5],
                byte_len: 5,
            },
        ];
        let doc = |body: &str| MetaDoc {
            tensor_specs: specs.clone(),
            body: serde_json::from_str(body).unwrap(),
        };
        let decode = |b: &[u8]| MetaDoc::decode(b, fnv64(b), 2, 29, &limits);
        // Same manifest, bodies that change: the second and later ones take the cached path
        // (test builds cross-check it against the full decode inside `decode`).
        for body in [
            r#"{"a":1}"#,
            r#"{"a":2,"b":[1,2]}"#,
            r#"{"z":"s","a":null}"#,
            "7",
            "[]",
        ] {
            let d = doc(body);
            let bytes = d.encode().unwrap();
            assert_eq!(bytes, serde_json::to_vec(&d).unwrap(), "encode({body})");
            assert_eq!(decode(&bytes).unwrap(), d, "decode({body})");
        }
        // Bodies the full decoder refuses are refused with its messages.
        let good = doc(r#"{"a":1}"#).encode().unwrap();
        let prefix = &good[..good.len() - r#"{"a":1}}"#.len()];
        let with_body = |b: &str| [prefix, b.as_bytes()].concat();
        let spaced = with_body(r#"{"a": 1}}"#);
        assert!(decode(&spaced)
            .unwrap_err()
            .to_string()
            .contains("not canonical"));
        let hidden = with_body(r#"{"m":{"dtype":"f32","shape":[1],"data":[0]}}}"#);
        assert!(decode(&hidden)
            .unwrap_err()
            .to_string()
            .contains("looks like a tensor"));
        let trailing = with_body(r#"{"a":1},"x":2}"#);
        assert!(decode(&trailing).is_err());
        // A different total or count than the header announces is still caught.
        assert!(MetaDoc::decode(&good, fnv64(&good), 2, 30, &limits).is_err());
        assert!(MetaDoc::decode(&good, fnv64(&good), 3, 29, &limits).is_err());
        // Other limits: the cached manifest is not reused (a name limit of 3 refuses "latents").
        let tight = Limits {
            max_name_len: 3,
            ..limits
        };
        assert!(MetaDoc::decode(&good, fnv64(&good), 2, 29, &tight).is_err());
    }

    #[test]
    fn hidden_tensor_deep_in_arrays_is_named_by_its_full_path() {
        let v: Value = serde_json::from_str(
            r#"{"a":[1,{"x":[0,0,{"dtype":"f32","shape":[2],"data":[1,2]}]}],"b":2}"#,
        )
        .unwrap();
        let err = check_untyped(&v, "meta").unwrap_err();
        assert!(
            err.starts_with("meta field `meta.a[1].x[2]` looks like a tensor"),
            "{err}"
        );
        let big: Value = serde_json::from_str(r#"{"k":[0.5,{"n":1e300}]}"#).unwrap();
        assert!(check_untyped(&big, "meta")
            .unwrap_err()
            .contains("`meta.k[1].n`"));
        let fine: Value = serde_json::from_str(r#"{"k":[0.5,{"n":1}],"s":"x"}"#).unwrap();
        assert_eq!(check_untyped(&fine, "meta"), Ok(()));
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let v: Value = serde_json::from_str(r#"{"b":1,"a":{"d":2,"c":3}}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"a":{"c":3,"d":2},"b":1}"#
        );
    }

    #[test]
    fn nan_in_typed_meta_is_refused() {
        #[derive(Serialize, Deserialize)]
        struct M {
            guidance: f32,
        }
        let err = canonical_json(&M { guidance: f32::NAN })
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not round-trip"), "{err}");
        assert!(canonical_json(&M { guidance: 0.1 }).is_ok());
    }

    #[test]
    fn untyped_meta_with_hidden_tensor_is_refused() {
        let err = untyped_meta_from_json(
            r#"{"extra":{"mask":{"dtype":"f32","shape":[2],"data":[1,2]}}}"#,
            &Limits::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`meta.extra.mask` looks like a tensor"),
            "{err}"
        );
    }

    #[test]
    fn untyped_meta_with_lossy_integer_is_refused() {
        let err = untyped_meta_from_json(r#"{"seed":18446744073709551616}"#, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("too large to round-trip"), "{err}");
    }

    #[test]
    fn spec_byte_len_must_match_shape() {
        let s = TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![2, 3],
            byte_len: 23,
        };
        assert!(s
            .validate(&Limits::default())
            .unwrap_err()
            .contains("needs 24"));
        let overflow = TensorSpec {
            shape: vec![u64::MAX, 2],
            ..s
        };
        assert!(overflow
            .validate(&Limits::default())
            .unwrap_err()
            .contains("overflows"));
    }

    #[test]
    fn bool_and_fp8_are_outside_the_allowlist() {
        for d in ["bool", "torch.bool", "fp8", "float8_e5m2"] {
            assert!(!DType::parse(d).unwrap().is_allowed(), "{d}");
        }
    }
}
