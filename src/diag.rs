//! Diagnosis lines on stderr. A base module: imports nothing of this crate, so every layer (fault
//! points, the model, the data planes, the crash path) can write one.

/// Writes one diagnosis line with a single `write` (lines of ranks sharing a pipe never
/// interleave).
pub fn line(line: &str) {
    use std::io::Write;
    let mut s = String::with_capacity(line.len() + 1);
    s.push_str(line);
    s.push('\n');
    let _ = std::io::stderr().write_all(s.as_bytes());
}
