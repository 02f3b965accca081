//! Startup parity (docs/spec.md §9): every rank's fingerprint, compared field by field at
//! rendezvous.
//!
//! Contract: a [`Fingerprint`] is an open, ordered map of named fields (versions, group table and
//! creation order, world/TP size, kernel build id, data-plane backend, execution flags, debug
//! mode, and whatever the pipeline adds: model geometry, dtype, plan settings). Any field that
//! differs between ranks — or exists on some ranks only — is a mismatch; [`parity_diff`] prints
//! one line per field with the value each rank holds, and every rank exits `ParityMismatch`
//! before inference.
use super::spec::GroupSpec;
use crate::ids::GlobalRank;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub fields: BTreeMap<String, String>,
}

impl Fingerprint {
    /// Sets (or replaces) one field. Use dotted names: `model.dim`, `exec.cuda_graphs`.
    pub fn set(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        self.fields.insert(key.to_owned(), value.to_string());
        self
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }
    /// Merges `other`'s fields (other wins).
    pub fn extend(&mut self, other: &Fingerprint) {
        for (k, v) in &other.fields {
            self.fields.insert(k.clone(), v.clone());
        }
    }
    /// The group table as one comparable value, in creation order: `world[0,1,2] → pp[0,1] → …`.
    pub fn group_table(groups: &[GroupSpec]) -> String {
        groups
            .iter()
            .map(GroupSpec::describe)
            .collect::<Vec<_>>()
            .join(" → ")
    }
}

/// None when all ranks agree; otherwise the per-field diff.
pub fn parity_diff(fps: &[(GlobalRank, Fingerprint)]) -> Option<String> {
    let mut keys: Vec<&String> = fps.iter().flat_map(|(_, f)| f.fields.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut lines = Vec::new();
    for key in keys {
        // value → ranks holding it, in rank order.
        let mut by_value: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (r, f) in fps {
            let v = f
                .get(key)
                .map_or("<absent>".to_string(), |v| format!("{v:?}"));
            by_value.entry(v).or_default().push(r.0);
        }
        if by_value.len() > 1 {
            let mut parts: Vec<(Vec<u32>, String)> =
                by_value.into_iter().map(|(v, r)| (r, v)).collect();
            parts.sort();
            let shown: Vec<String> = parts
                .iter()
                .map(|(ranks, v)| {
                    let rs: Vec<String> = ranks.iter().map(u32::to_string).collect();
                    format!("global-rank {} = {v}", rs.join(","))
                })
                .collect();
            lines.push(format!("  {key}: {}", shown.join("; ")));
        }
    }
    (!lines.is_empty()).then(|| lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parity_diff_names_each_differing_field_and_rank() {
        let mut a = Fingerprint::default();
        a.set("exec.cuda_graphs", "off").set("tp.size", 2);
        let mut b = a.clone();
        b.set("exec.cuda_graphs", "on");
        let diff = parity_diff(&[
            (GlobalRank(0), a.clone()),
            (GlobalRank(1), a.clone()),
            (GlobalRank(2), b),
        ])
        .unwrap();
        assert_eq!(
            diff,
            "  exec.cuda_graphs: global-rank 0,1 = \"off\"; global-rank 2 = \"on\""
        );
        assert!(parity_diff(&[(GlobalRank(0), a.clone()), (GlobalRank(1), a)]).is_none());
    }
}
