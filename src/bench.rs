//! `lockstep bench`: kernel, transport and pipeline benchmarks (not tests). Each benchmark runs
//! its baseline in the same invocation where one exists.

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to benchmark: kernels | transport | wire.
    pub what: String,
    /// Extra arguments for that benchmark.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

pub fn main(args: &BenchArgs) -> i32 {
    if args.what == "kernels" {
        return crate::cuda::bench::main(&args.rest);
    }
    eprintln!("bench: unknown benchmark {:?}", args.what);
    crate::exit::ExitCode::BadInput.code()
}
