//! Stage 0 (driver) and Stage 1 (mesh) of the streaming pipeline, and `lockstep run`.

#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {}

pub fn main(_args: &RunArgs) -> i32 {
    eprintln!("run: not built yet");
    crate::exit::ExitCode::BadInput.code()
}
