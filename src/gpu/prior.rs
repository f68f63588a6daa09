//! Measured winners shipped with the binary, for the adapters every machine without a GPU has
//! (Mesa's lavapipe natively, SwiftShader in a browser): a first run on such a machine compiles
//! only the kernels it uses instead of measuring every candidate, which costs minutes of
//! pipeline compilation on a CPU.
//!
//! A prior is keyed like the tuning cache (family and problem bucket) but matched loosely: by
//! the adapter's name (a prefix), not by driver version or shader hash, since every candidate is
//! a correct kernel (each is checked against the reference in the suite) and an outdated entry
//! only costs speed. The tuner trusts it where its cache has no measurement, until asked to
//! measure (`shaderformer tune`, or `--tune on` for a problem outside the prior). An entry whose
//! variant no longer exists is ignored.
//!
//! The tables are made by `scripts/make_tuning_prior.sh` (measure on the adapter, then keep each
//! problem's winner), never by hand.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One embedded table: the adapters it serves and each problem's winner.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorFile {
    /// Serves adapters whose name starts with this text (case-insensitive).
    pub adapter_prefix: String,
    /// The adapter, driver and date of the measurement, for people.
    pub measured_on: String,
    pub choices: Vec<PriorChoice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorChoice {
    pub family: String,
    pub problem: String,
    pub winner: String,
}

/// The embedded tables, by file name.
pub const EMBEDDED: &[(&str, &str)] = &[(
    "assets/tuning/llvmpipe.json",
    include_str!("../../assets/tuning/llvmpipe.json"),
)];

/// Parses one embedded table.
pub fn parse(name: &str, text: &str) -> Result<PriorFile, String> {
    serde_json::from_str(text).map_err(|e| format!("{name}: {e}"))
}

/// The winners, by "family: problem" key, for the adapter called `adapter` (empty when no table
/// serves it).
pub fn for_adapter(adapter: &str) -> BTreeMap<String, String> {
    let name = adapter.to_ascii_lowercase();
    let mut out = BTreeMap::new();
    for (file, text) in EMBEDDED {
        // The tables are checked by a test; one that does not parse serves nobody.
        let Ok(table) = parse(file, text) else {
            continue;
        };
        if !name.starts_with(&table.adapter_prefix.to_ascii_lowercase()) {
            continue;
        }
        for c in table.choices {
            out.insert(super::tuning_cache::key(&c.family, &c.problem), c.winner);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_table_parses_and_names_problems_once() {
        for (file, text) in EMBEDDED {
            let t = parse(file, text).unwrap();
            assert!(!t.adapter_prefix.is_empty(), "{file}");
            assert!(!t.choices.is_empty(), "{file}");
            let mut keys: Vec<_> = t
                .choices
                .iter()
                .map(|c| (c.family.as_str(), c.problem.as_str()))
                .collect();
            let n = keys.len();
            keys.sort();
            keys.dedup();
            assert_eq!(keys.len(), n, "{file}: a problem listed twice");
        }
    }

    #[test]
    fn a_table_serves_only_its_adapters() {
        assert!(!for_adapter("llvmpipe (LLVM 15.0.6, 256 bits)").is_empty());
        assert!(!for_adapter("LLVMPIPE (LLVM 19.1.7, 256 bits)").is_empty());
        assert!(for_adapter("NVIDIA H100 80GB HBM3").is_empty());
    }
}
