//! The cubins that build.rs compiled from `kernels/*.cu`, and their build id.
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// True when the binary carries kernels.
pub fn has_kernels() -> bool {
    !CUBINS.is_empty()
}

/// The cubin compiled from `kernels/<name>.cu`.
pub fn cubin(name: &str) -> crate::Result<&'static [u8]> {
    if !has_kernels() {
        return Err(crate::Error::NoKernels(format!("kernel file {name}.cu")));
    }
    CUBINS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
        .ok_or_else(|| crate::Error::BadInput(format!("no embedded kernel file named {name}.cu")))
}

/// Spill counts parsed from the embedded ptxas report: (function, spill stores, spill loads) for
/// every function with a non-zero count.
pub fn spills() -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    let mut func = String::new();
    for line in PTXAS_REPORT.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            func = rest.split('\'').next().unwrap_or("").to_owned();
        }
        if let Some(i) = line.find("bytes spill stores") {
            let nums: Vec<u64> = line[..i]
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|t| t.parse().ok())
                .collect();
            let stores = nums.last().copied().unwrap_or(0);
            let loads = line[i..]
                .split(|c: char| !c.is_ascii_digit())
                .find_map(|t| t.parse::<u64>().ok())
                .unwrap_or(0);
            if stores > 0 || loads > 0 {
                out.push((func.clone(), stores, loads));
            }
        }
    }
    out
}
