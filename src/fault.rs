//! Fault injection (SPEC §12): `LOCKSTEP_FAULT=point[@rank][#nth]`, compiled in with the
//! `fault-injection` feature.
