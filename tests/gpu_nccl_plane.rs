//! The protocol over the NCCL data plane (issue 6 item 3): real ranks (this test binary re-executed
//! with the torchrun-style environment), `bootstrap_nccl`, an INFER envelope with device tensors
//! from rank 0 to the mesh leader, the relay to the mesh, a TP all-reduce, a RESULT back, drain.
//! Skips with a printed reason with fewer than 2 GPUs or no NCCL.
mod common;

use lockstep::rank::{bootstrap_nccl, RankEnv, RankOptions};
use lockstep::wire::{prepare, Action, HostTensor, Limits, ReceivedEnvelope};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROLE: &str = "LOCKSTEP_NCCL_PLANE_CHILD";
const LATENT: usize = 150 * 1024; // 600 KB of f32
const COND: usize = 1 << 20; // 4 MB of f32

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    steps: u32,
}

fn f32s(t: &HostTensor) -> Vec<f32> {
    t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn child() -> lockstep::Result<()> {
    let env = RankEnv::from_env()?;
    let opts = RankOptions::from_env()?;
    let world = env.world_size;
    let rank = bootstrap_nccl(&env, opts)?;
    let tp = (world - 1) as f32;
    let lat: Vec<f32> = (0..LATENT).map(|i| (i % 1000) as f32).collect();
    if rank.is_driver() {
        let cond: Vec<f32> = (0..COND).map(|i| (i % 7) as f32).collect();
        let t0 = Instant::now();
        rank.send_next(|ids| {
            prepare(
                Action::Infer,
                ids.with_chunk(0),
                &Meta { steps: 4 },
                vec![
                    HostTensor::from_f32("latent", vec![LATENT as u64], &lat),
                    HostTensor::from_f32("cond", vec![COND as u64], &cond),
                ],
                &Limits::default(),
            )
        })?;
        let res: ReceivedEnvelope =
            rank.recv_envelope(Some(Instant::now() + Duration::from_secs(60)))?;
        let got =
            f32s(res.tensor("result").ok_or_else(|| {
                lockstep::Error::Invariant("RESULT without a result tensor".into())
            })?);
        let bad = got
            .iter()
            .zip(&lat)
            .filter(|(g, l)| **g != tp * **l)
            .count();
        if bad != 0 || got.len() != LATENT {
            return Err(lockstep::Error::Invariant(format!(
                "result wrong in {bad} of {} elements",
                got.len()
            )));
        }
        println!(
            "PLANE driver round trip {:.3} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
    } else {
        let first = if rank.is_mesh_leader() {
            Some(rank.recv_envelope(None)?)
        } else {
            None
        };
        let first: Option<ReceivedEnvelope> = first;
        let e: ReceivedEnvelope = rank.relay_to_mesh(first)?;
        let mine =
            f32s(e.tensor("latent").ok_or_else(|| {
                lockstep::Error::Invariant("INFER without a latent tensor".into())
            })?);
        if mine != lat || e.tensor("cond").map(|c| c.data.len()) != Some(COND * 4) {
            return Err(lockstep::Error::Invariant(
                "relayed envelope differs from what rank 0 sent".into(),
            ));
        }
        let sum = rank
            .mesh()
            .all_reduce_f32(&mine, &[LATENT as u64], rank.deadline())?;
        if rank.is_mesh_leader() {
            let chunk = e.header.chunk_index().get();
            rank.send_next(|ids| {
                prepare(
                    Action::Result,
                    ids.with_chunk(chunk),
                    &Meta { steps: 4 },
                    vec![HostTensor::from_f32("result", vec![LATENT as u64], &sum)],
                    &Limits::default(),
                )
            })?;
        }
    }
    let g = rank.global();
    rank.finish()?;
    println!("PLANE ok {g}");
    Ok(())
}

fn run_world(test: &str, world: u32) {
    if std::env::var(ROLE).is_ok() {
        if let Err(e) = child() {
            eprintln!("child failed: {e}");
            std::process::exit(e.exit_code().code());
        }
        return;
    }
    if common::skip_without_nccl(test, 2) {
        return;
    }
    let port = common::free_port();
    let dumps = common::tmp("dumps");
    let exe = std::env::current_exe().expect("test binary");
    let t0 = Instant::now();
    let mut kids: Vec<std::process::Child> = (0..world)
        .map(|r| {
            Command::new(&exe)
                .args(["--exact", test, "--nocapture", "--test-threads=1"])
                .env(ROLE, "1")
                .env("RANK", r.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("LOCKSTEP_JOB_TOKEN", format!("nccl-plane-{port}"))
                .env("LOCKSTEP_DUMP_DIR", &dumps)
                .env("NCCL_NVLS_ENABLE", "0")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn rank")
        })
        .collect();
    // Drain every pipe on its own thread so that no rank blocks on a full pipe.
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = p {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let outs: Vec<_> = kids
        .iter_mut()
        .map(|k| {
            (
                drain(k.stdout.take().map(|o| Box::new(o) as Box<dyn Read + Send>)),
                drain(k.stderr.take().map(|e| Box::new(e) as Box<dyn Read + Send>)),
            )
        })
        .collect();
    let mut failures = Vec::new();
    for ((r, k), (o, e)) in kids.iter_mut().enumerate().zip(outs) {
        let until = Instant::now() + Duration::from_secs(90);
        let status = loop {
            match k.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = k.kill();
                    break None;
                }
            }
        };
        let out = o.join().unwrap_or_default();
        let err = e.join().unwrap_or_default();
        println!("rank {r}: {status:?}\n{out}\n{err}");
        let ok = status.is_some_and(|s| s.success()) && out.contains("PLANE ok");
        if !ok {
            failures.push(format!("rank {r}: {status:?} {err}"));
        }
    }
    for k in kids.iter_mut() {
        let _ = k.kill();
        let _ = k.wait();
    }
    println!(
        "{test}: {world} ranks done in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn nccl_plane_three_ranks_on_two_gpus_carry_envelope_relay_and_mesh_all_reduce() {
    run_world(
        "nccl_plane_three_ranks_on_two_gpus_carry_envelope_relay_and_mesh_all_reduce",
        3,
    );
}

#[test]
fn nccl_plane_rank0_plus_tp1_on_two_gpus_round_trips_an_envelope() {
    run_world(
        "nccl_plane_rank0_plus_tp1_on_two_gpus_round_trips_an_envelope",
        2,
    );
}
