//! `lockstep launch -n N -- CMD…`: the local launcher (SPEC §8).

#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Number of ranks.
    #[arg(short = 'n', long)]
    pub nprocs: u32,
    /// The command each rank runs.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

pub fn main(_args: &LaunchArgs) -> i32 {
    eprintln!("launch: not built yet");
    crate::exit::ExitCode::BadInput.code()
}
