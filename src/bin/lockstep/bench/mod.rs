//! `lockstep bench`: kernel, transport and pipeline benchmarks (not tests). Each benchmark runs
//! its baseline in the same invocation where one exists.
//!
//! `wire`: (1) a decode fuzz of at least a million cases (random bytes and mutated valid
//! envelopes through `Header::decode` + `MetaDoc::decode`; any panic is counted and fails the
//! run), (2) the header round trip and the 4.6 MB envelope round trip between two processes on
//! this host (`lockstep launch -n 2 -- lockstep harness bench`).
//!
//! `model` (the GPU DiT against its floors, `--idle` the GPU's idle share), `kernels`,
//! `transport`, `session` (what the session API adds per chunk over `lockstep run`): see each
//! file's comment.
mod activity;
mod kernels;
mod model;
mod session;
mod transport;

use lockstep::wire::{decode_frame, prepare, Action, EnvelopeIds, HostTensor, Limits, HEADER_LEN};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to benchmark: kernels | model | session | transport | wire.
    pub what: String,
    /// Extra arguments for that benchmark (wire: [CASES] [RTT_ITERS]).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

pub fn main(args: &BenchArgs) -> i32 {
    match args.what.as_str() {
        "wire" => wire(args),
        "echo-peer" => echo_peer(args),
        "transport" => transport::main(&args.rest),
        "kernels" => kernels::main(&args.rest),
        "model" => model::main(&args.rest),
        "session" => session::main(&args.rest),
        other => {
            lockstep::diag!("bench: unknown benchmark {other:?}");
            lockstep::exit::ExitCode::BadInput.code()
        }
    }
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn seed_frames() -> Vec<Vec<u8>> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Plan {
        steps: u32,
        recompute: bool,
        timesteps: Vec<u32>,
    }
    let mut out = Vec::new();
    for n in 0..4u64 {
        let tensors: Vec<HostTensor> = (0..n)
            .map(|i| {
                HostTensor::from_f32(
                    format!("t{i}"),
                    vec![2, i + 1],
                    &vec![1.0; 2 * (i as usize + 1)],
                )
            })
            .collect();
        if let Ok(env) = prepare(
            Action::Infer,
            EnvelopeIds::default().with_chunk(n),
            &Plan {
                steps: 4,
                recompute: n % 2 == 0,
                timesteps: vec![999, 750, 500, 250],
            },
            tensors,
            &Limits::default(),
        ) {
            let mut f = env.header_bytes().to_vec();
            f.extend_from_slice(env.meta_bytes());
            out.push(f);
        }
    }
    out
}

fn wire(args: &BenchArgs) -> i32 {
    let cases: u64 = args
        .rest
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let iters: u64 = args
        .rest
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let limits = Limits::default();
    let seeds = seed_frames();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut err, mut panics) = (0u64, 0u64, 0u64);
    let t = std::time::Instant::now();
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..cases {
        let mut f = if i % 10 < 3 || seeds.is_empty() {
            let len = (rng.next() % 400) as usize;
            (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>()
        } else {
            let mut f = seeds[(rng.next() % seeds.len() as u64) as usize].clone();
            let flips = 1 + rng.next() % 4;
            for _ in 0..flips {
                if f.is_empty() {
                    break;
                }
                let pos = (rng.next() % f.len() as u64) as usize;
                match rng.next() % 3 {
                    0 => f[pos] ^= 1 << (rng.next() % 8),
                    1 => f[pos] = rng.next() as u8,
                    _ => f.truncate(pos),
                }
            }
            f
        };
        if i % 2 == 0 {
            // Keep the checksum valid sometimes, so meta decoding sees hostile input too.
            if f.len() >= HEADER_LEN {
                let sum = lockstep::digest::fnv64(&f[..HEADER_LEN - 8]);
                f[HEADER_LEN - 8..HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
            }
        }
        match std::panic::catch_unwind(|| decode_frame(&f, &limits).is_ok()) {
            Ok(true) => ok += 1,
            Ok(false) => err += 1,
            Err(_) => panics += 1,
        }
    }
    std::panic::set_hook(prev);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{{\"bench\":\"wire.decode_fuzz\",\"cases\":{cases},\"decoded\":{ok},\"typed_errors\":{err},\"panics\":{panics},\"seconds\":{secs:.2},\"cases_per_s\":{:.0}}}",
        cases as f64 / secs
    );
    if panics > 0 {
        lockstep::diag!("bench wire: {panics} decode panics");
        return lockstep::exit::ExitCode::InvariantViolation.code();
    }
    let Ok(me) = std::env::current_exe() else {
        lockstep::diag!("bench wire: cannot find own executable");
        return lockstep::exit::ExitCode::BadInput.code();
    };
    if let Err(e) = raw_tcp_baseline(&me, iters) {
        lockstep::diag!("bench wire: raw TCP baseline failed: {e}");
    }
    // Header and envelope round trips, then the protocol's own cost per envelope (`Rank` over
    // the null data plane, `docs/manual/envelope-lane.md`).
    for scenario in ["bench", "protocol"] {
        let st = std::process::Command::new(&me)
            .args(["launch", "-n", "2", "--"])
            .arg(&me)
            .args(["harness", scenario, "--iters", &iters.to_string()])
            .env_remove("LOCKSTEP_FAULT")
            .status();
        match st {
            Ok(s) if s.success() => {}
            Ok(s) => return s.code().unwrap_or(lockstep::exit::ExitCode::Signal.code()),
            Err(e) => {
                lockstep::diag!("bench wire: launch: {e}");
                return lockstep::exit::ExitCode::BadInput.code();
            }
        }
    }
    0
}

/// Baseline measured in the same run: a bare 88-byte TCP ping-pong between two processes
/// (blocking reads, TCP_NODELAY, no threads, no framing): the floor of this host's loopback.
fn raw_tcp_baseline(me: &std::path::Path, iters: u64) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let mut child = std::process::Command::new(me)
        .args(["bench", "echo-peer", &addr.to_string()])
        .spawn()?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let msg = [7u8; 88];
    let mut back = [0u8; 88];
    let mut v = Vec::new();
    for i in 0..(iters + 500) {
        let t = std::time::Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i >= 500 {
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(s);
    let _ = child.wait();
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{{\"bench\":\"baseline.raw_tcp_rtt_88B\",\"iters\":{iters},\"p50_us\":{:.2},\"p99_us\":{:.2}}}",
        at(0.5),
        at(0.99)
    );
    Ok(())
}

fn echo_peer(args: &BenchArgs) -> i32 {
    use std::io::{Read, Write};
    let Some(addr) = args.rest.first() else {
        return lockstep::exit::ExitCode::BadInput.code();
    };
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return lockstep::exit::ExitCode::PeerLost.code();
    };
    let _ = s.set_nodelay(true);
    let mut b = [0u8; 88];
    while s.read_exact(&mut b).is_ok() {
        if s.write_all(&b).is_err() {
            break;
        }
    }
    0
}
