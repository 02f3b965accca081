//! Phase plan (SPEC §5) and the chunk-end state digest.
