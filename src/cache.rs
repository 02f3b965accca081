//! KV cache state machine (SPEC §6): per layer, a ring buffer with sink frames; append, O(1)
//! evict, recompute (requires `context_frames_override`), reset by epoch. Every mutation comes
//! from the phase plan.
