//! `lockstep bench transport`: raw NCCL transport figures on 2 GPUs, two processes.
//!
//! The parent creates one NCCL unique id per communicator mode, re-executes this binary as two
//! children (`--child RANK`), collects the `RESULT {json}` lines rank 0 prints, and prints a table
//! (and `--json PATH`). The torch.distributed baseline is `benches/baselines/transport_torch.py`,
//! run in the same device command; it measures the same loops.
//!
//! What is measured (host wall clock per iteration, median over many; the host sees every
//! completion through a `Completion`, never a device-wide synchronize):
//! - `pingpong`: rank 0 sends N bytes, rank 1's host sees the recv complete and sends them back,
//!   rank 0's host sees its recv complete. Reported: half round trip. The echoed bytes are
//!   checked once per size before timing.
//! - `allreduce`: in-place f32 sum on both ranks, host sees each one complete. Checked once.
//! - `envelope`: header (64 B) + latent (600 KB) + conditioning (4 MB) to rank 1 (grouped in one
//!   `ncclGroupStart/End`, or as three sends), rank 1's host sees them land, sends the result
//!   (600 KB) back; rank 0's host sees it. Reported: full round trip.
//!
//! Modes: blocking communicator with a host-flag or an event wait; non-blocking communicator with
//! a host-flag wait (its calls are polled with `ncclCommGetAsyncError` until enqueued). Launch
//! variants (suffix): none = one NCCL call per op, enqueued when the host decides; `+graph` = the
//! ops captured once into a CUDA graph, one `cuGraphLaunch` per step; `+gated` = the next step's
//! ops enqueued ahead behind a `Gate` (stream wait on a host word), released by one host store
//! once the host has seen the previous hop complete (rows report release → completion seen).
use crate::comm::nccl::{
    CommOptions, Communicator, Completion, CompletionKind, DeviceBuf, Gate, Gpu, ReduceDtype,
    Ticket, UniqueId,
};
use crate::ids::GroupRank;
use crate::{Error, Result};
use serde::Serialize;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const PINGPONG_SIZES: [usize; 5] = [64, 4 << 10, 64 << 10, 1 << 20, 16 << 20];
pub const ALLREDUCE_SIZES: [usize; 4] = [64, 1 << 20, 16 << 20, 256 << 20];
pub const HEADER_BYTES: usize = 64;
pub const LATENT_BYTES: usize = 600 * 1024;
pub const COND_BYTES: usize = 4 << 20;
pub const RESULT_BYTES: usize = 600 * 1024;

const OP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub bench: String,
    pub mode: String,
    pub bytes: usize,
    pub iters: usize,
    /// Median per reported unit (half round trip for ping-pong, one op for all-reduce, one round
    /// trip for the envelope), microseconds.
    pub p50_us: f64,
    pub p10_us: f64,
    pub p90_us: f64,
    /// Bytes / p50 (GB/s); for a 2-rank all-reduce the bus bandwidth equals this.
    pub gbps: f64,
}

struct Opts {
    child: Option<u32>,
    uid_blocking: Option<String>,
    uid_nonblocking: Option<String>,
    scale: f64,
    json: Option<String>,
}

fn parse(rest: &[String]) -> Result<Opts> {
    let mut o = Opts {
        child: None,
        uid_blocking: None,
        uid_nonblocking: None,
        scale: 1.0,
        json: None,
    };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| Error::BadInput(format!("bench transport: {name} needs a value")))
        };
        match a.as_str() {
            "--child" => {
                o.child = Some(
                    val("--child")?
                        .parse()
                        .map_err(|_| Error::BadInput("--child RANK".into()))?,
                )
            }
            "--uid-blocking" => o.uid_blocking = Some(val(a)?),
            "--uid-nonblocking" => o.uid_nonblocking = Some(val(a)?),
            "--scale" => {
                o.scale = val(a)?
                    .parse()
                    .map_err(|_| Error::BadInput("--scale FACTOR (iterations)".into()))?
            }
            "--json" => o.json = Some(val(a)?),
            other => {
                return Err(Error::BadInput(format!(
                    "bench transport: unknown argument {other:?} (use --scale F, --json PATH)"
                )))
            }
        }
    }
    Ok(o)
}

/// Entry point of `lockstep bench transport ARGS…`; returns the process exit code.
pub fn main(rest: &[String]) -> i32 {
    let r = parse(rest).and_then(|o| match o.child {
        Some(rank) => child(rank, &o),
        None => parent(&o),
    });
    match r {
        Ok(()) => 0,
        Err(e) => {
            crate::diag!("bench transport: {e}");
            e.exit_code().code()
        }
    }
}

fn parent(o: &Opts) -> Result<()> {
    if let Some(why) = crate::comm::nccl::unavailable_reason(2) {
        return Err(Error::BadInput(format!(
            "cannot run on this machine: {why}"
        )));
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
    let ub = UniqueId::new()?.to_hex();
    let unb = UniqueId::new()?.to_hex();
    let mut kids = Vec::new();
    for rank in 0..2u32 {
        let child = Command::new(&exe)
            .args(["bench", "transport", "--child", &rank.to_string()])
            .args(["--uid-blocking", &ub, "--uid-nonblocking", &unb])
            .args(["--scale", &o.scale.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::io("spawn bench child", e))?;
        kids.push(child);
    }
    let out = kids[0]
        .stdout
        .take()
        .ok_or_else(|| Error::BadInput("child stdout".into()))?;
    // Rank 1's stdout must be drained too, or it could block on a full pipe.
    if let Some(o1) = kids[1].stdout.take() {
        std::thread::spawn(move || for _ in BufReader::new(o1).lines() {});
    }
    let mut rows: Vec<Row> = Vec::new();
    println!(
        "{:<10} {:<22} {:>10} {:>7} {:>10} {:>10} {:>10} {:>9}",
        "bench", "mode", "bytes", "iters", "p50 us", "p10 us", "p90 us", "GB/s"
    );
    for line in BufReader::new(out)
        .lines()
        .map_while(std::result::Result::ok)
    {
        let Some(j) = line.strip_prefix("RESULT ") else {
            println!("{line}");
            continue;
        };
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(j) {
            let g = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_owned();
            println!(
                "{:<10} {:<22} {:>10} {:>7} {:>10.2} {:>10.2} {:>10.2} {:>9.2}",
                s("bench"),
                s("mode"),
                g("bytes"),
                g("iters"),
                g("p50_us"),
                g("p10_us"),
                g("p90_us"),
                g("gbps")
            );
            rows.push(Row {
                bench: s("bench"),
                mode: s("mode"),
                bytes: g("bytes") as usize,
                iters: g("iters") as usize,
                p50_us: g("p50_us"),
                p10_us: g("p10_us"),
                p90_us: g("p90_us"),
                gbps: g("gbps"),
            });
        }
    }
    let mut failed = None;
    for (rank, k) in kids.iter_mut().enumerate() {
        let st = k.wait().map_err(|e| Error::io("wait bench child", e))?;
        if !st.success() {
            failed = Some(format!("rank {rank} exited with {st}"));
        }
    }
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&rows)
            .map_err(|e| Error::BadInput(format!("json: {e}")))?;
        std::fs::write(path, text).map_err(|e| Error::io(path.clone(), e))?;
    }
    match failed {
        Some(f) => Err(Error::Invariant(format!("bench child failed: {f}"))),
        None => Ok(()),
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn emit(bench: &str, mode: &str, bytes: usize, samples_us: &mut [f64], unit_div: f64) {
    for s in samples_us.iter_mut() {
        *s /= unit_div;
    }
    let p50 = pct(samples_us, 0.5);
    let row = Row {
        bench: bench.into(),
        mode: mode.into(),
        bytes,
        iters: samples_us.len(),
        p50_us: p50,
        p10_us: pct(samples_us, 0.1),
        p90_us: pct(samples_us, 0.9),
        gbps: bytes as f64 / (p50 * 1e3),
    };
    if let Ok(j) = serde_json::to_string(&row) {
        println!("RESULT {j}");
        let _ = std::io::stdout().flush();
    }
}

fn iters_for(bytes: usize, scale: f64) -> (usize, usize) {
    let (warm, n) = match bytes {
        b if b <= 64 << 10 => (200, 2000),
        b if b <= 1 << 20 => (50, 500),
        b if b <= 16 << 20 => (20, 200),
        _ => (5, 40),
    };
    (warm, ((n as f64 * scale).ceil() as usize).max(5))
}

struct Rank<'a> {
    gpu: &'a Gpu,
    comm: &'a Communicator,
    done: &'a mut Completion,
    me: u32,
}

impl Rank<'_> {
    fn peer(&self) -> GroupRank {
        GroupRank(1 - self.me)
    }

    fn wait(&mut self, what: &str) -> Result<()> {
        let t = self.done.mark()?;
        self.comm
            .wait(self.done, t, Instant::now() + OP_TIMEOUT, what)
    }
}

fn child(rank: u32, o: &Opts) -> Result<()> {
    if rank > 1 {
        return Err(Error::BadInput("--child RANK must be 0 or 1".into()));
    }
    let gpu = Gpu::open_for_plane(rank as usize)?;
    let modes: [(&str, bool, Option<&String>, &[CompletionKind]); 2] = [
        (
            "blocking",
            true,
            o.uid_blocking.as_ref(),
            &[CompletionKind::HostFlag, CompletionKind::Event],
        ),
        (
            "nonblocking",
            false,
            o.uid_nonblocking.as_ref(),
            &[CompletionKind::HostFlag],
        ),
    ];
    for (mode, blocking, uid, kinds) in modes {
        let uid = UniqueId::from_hex(
            uid.ok_or_else(|| Error::BadInput(format!("--uid-{mode} missing")))?,
        )?;
        let t0 = Instant::now();
        let comm = Communicator::init(
            &gpu,
            &uid,
            2,
            GroupRank(rank),
            &CommOptions {
                name: format!("bench-{mode}"),
                blocking,
                init_timeout: Duration::from_secs(60),
            },
        )?;
        if rank == 0 {
            println!(
                "# {} init {:.3} s",
                comm.label(),
                t0.elapsed().as_secs_f64()
            );
        }
        for &kind in kinds {
            let mut done = gpu.completion(kind)?;
            // The kind actually used (a host flag falls back to an event without stream writes).
            let tag = format!("{mode}+{}", done.kind().name());
            let mut r = Rank {
                gpu: &gpu,
                comm: &comm,
                done: &mut done,
                me: rank,
            };
            pingpong(&mut r, &tag, o.scale)?;
            if kind == CompletionKind::HostFlag {
                allreduce(&mut r, &tag, o.scale)?;
                envelope(&mut r, &tag, o.scale, true)?;
                envelope(&mut r, &tag, o.scale, false)?;
                // Same loops with NCCL's enqueue cost taken off the critical path.
                pingpong_graph(&mut r, &format!("{tag}+graph"), o.scale)?;
                allreduce_graph(&mut r, &format!("{tag}+graph"), o.scale)?;
                envelope_graph(&mut r, &format!("{tag}+graph"), o.scale)?;
                pingpong_gated(&mut r, &format!("{tag}+gated"), o.scale)?;
                envelope_gated(&mut r, &format!("{tag}+gated"), o.scale)?;
            }
        }
        let closed = comm.close(Duration::from_secs(20))?;
        if rank == 0 {
            println!("# {mode} finalize+destroy {:.3} s", closed.as_secs_f64());
        }
    }
    Ok(())
}

fn pattern(n: usize, salt: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

fn pingpong(r: &mut Rank<'_>, tag: &str, scale: f64) -> Result<()> {
    for &bytes in &PINGPONG_SIZES {
        let (warm, n) = iters_for(bytes, scale);
        let sent = pattern(bytes, 7);
        let sbuf = r.gpu.upload(&sent)?;
        let mut rbuf = r.gpu.alloc(bytes)?;
        let peer = r.peer();
        let mut samples = Vec::with_capacity(n);
        for i in 0..warm + n + 1 {
            let t = Instant::now();
            let dl = t + OP_TIMEOUT;
            if r.me == 0 {
                r.comm.send(r.gpu, &sbuf, bytes, peer, dl)?;
                r.comm.recv(r.gpu, &mut rbuf, bytes, peer, dl)?;
                r.wait("ping-pong recv")?;
            } else {
                r.comm.recv(r.gpu, &mut rbuf, bytes, peer, dl)?;
                r.wait("ping-pong recv")?;
                r.comm.send(r.gpu, &rbuf, bytes, peer, dl)?;
            }
            let us = t.elapsed().as_secs_f64() * 1e6;
            if i == 0 && r.me == 0 {
                // Check once that the bytes came back intact (rank 1 echoes what it received).
                if r.gpu.download(&rbuf)? != sent {
                    return Err(Error::Invariant(format!(
                        "ping-pong {bytes} B: echoed bytes differ from those sent"
                    )));
                }
            }
            if i > warm {
                samples.push(us);
            }
        }
        // Rank 1's last send must be seen complete before its buffers go away.
        r.wait("ping-pong drain")?;
        if r.me == 0 {
            emit("pingpong", tag, bytes, &mut samples, 2.0);
        }
    }
    Ok(())
}

fn allreduce(r: &mut Rank<'_>, tag: &str, scale: f64) -> Result<()> {
    for &bytes in &ALLREDUCE_SIZES {
        let (warm, n) = iters_for(bytes, scale);
        let count = bytes / 4;
        let init: Vec<u8> = std::iter::repeat_n((r.me as f32 + 1.0).to_le_bytes(), count)
            .flatten()
            .collect();
        let mut buf = r.gpu.upload(&init)?;
        let mut samples = Vec::with_capacity(n);
        for i in 0..warm + n + 1 {
            let t = Instant::now();
            r.comm
                .all_reduce_sum(r.gpu, &mut buf, count, ReduceDtype::F32, t + OP_TIMEOUT)?;
            r.wait("all-reduce")?;
            let us = t.elapsed().as_secs_f64() * 1e6;
            if i == 0 {
                let got = r.gpu.download(&buf)?;
                let want = 3.0f32.to_le_bytes();
                if got.chunks_exact(4).any(|c| c != want) {
                    return Err(Error::Invariant(format!(
                        "all-reduce {bytes} B: sum of 1.0 and 2.0 is not 3.0 everywhere"
                    )));
                }
            }
            if i > warm {
                samples.push(us);
            }
        }
        if r.me == 0 {
            emit("allreduce", tag, bytes, &mut samples, 1.0);
        }
    }
    Ok(())
}

fn envelope(r: &mut Rank<'_>, tag: &str, scale: f64, grouped: bool) -> Result<()> {
    let (warm, n) = iters_for(COND_BYTES, scale);
    let hdr = r.gpu.upload(&pattern(HEADER_BYTES, 1))?;
    let lat = r.gpu.upload(&pattern(LATENT_BYTES, 2))?;
    let cond = r.gpu.upload(&pattern(COND_BYTES, 3))?;
    let res_out = r.gpu.upload(&pattern(RESULT_BYTES, 4))?;
    let mut hdr_in = r.gpu.alloc(HEADER_BYTES)?;
    let mut lat_in = r.gpu.alloc(LATENT_BYTES)?;
    let mut cond_in = r.gpu.alloc(COND_BYTES)?;
    let mut res_in = r.gpu.alloc(RESULT_BYTES)?;
    let peer = r.peer();
    let mut samples = Vec::with_capacity(n);
    for i in 0..warm + n + 1 {
        let t = Instant::now();
        let dl = t + OP_TIMEOUT;
        if r.me == 0 {
            if grouped {
                r.comm.group(dl, || {
                    r.comm.send(r.gpu, &hdr, HEADER_BYTES, peer, dl)?;
                    r.comm.send(r.gpu, &lat, LATENT_BYTES, peer, dl)?;
                    r.comm.send(r.gpu, &cond, COND_BYTES, peer, dl)
                })?;
            } else {
                r.comm.send(r.gpu, &hdr, HEADER_BYTES, peer, dl)?;
                r.comm.send(r.gpu, &lat, LATENT_BYTES, peer, dl)?;
                r.comm.send(r.gpu, &cond, COND_BYTES, peer, dl)?;
            }
            r.comm.recv(r.gpu, &mut res_in, RESULT_BYTES, peer, dl)?;
            r.wait("envelope result")?;
        } else {
            if grouped {
                r.comm.group(dl, || {
                    r.comm.recv(r.gpu, &mut hdr_in, HEADER_BYTES, peer, dl)?;
                    r.comm.recv(r.gpu, &mut lat_in, LATENT_BYTES, peer, dl)?;
                    r.comm.recv(r.gpu, &mut cond_in, COND_BYTES, peer, dl)
                })?;
            } else {
                r.comm.recv(r.gpu, &mut hdr_in, HEADER_BYTES, peer, dl)?;
                r.comm.recv(r.gpu, &mut lat_in, LATENT_BYTES, peer, dl)?;
                r.comm.recv(r.gpu, &mut cond_in, COND_BYTES, peer, dl)?;
            }
            r.wait("envelope payload")?;
            r.comm.send(r.gpu, &res_out, RESULT_BYTES, peer, dl)?;
        }
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i == 0 {
            let ok = if r.me == 0 {
                r.gpu.download(&res_in)? == pattern(RESULT_BYTES, 4)
            } else {
                r.gpu.download(&hdr_in)? == pattern(HEADER_BYTES, 1)
                    && r.gpu.download(&lat_in)? == pattern(LATENT_BYTES, 2)
                    && r.gpu.download(&cond_in)? == pattern(COND_BYTES, 3)
            };
            if !ok {
                return Err(Error::Invariant(format!(
                    "envelope round trip: rank {} received corrupted bytes",
                    r.me
                )));
            }
        }
        if i > warm {
            samples.push(us);
        }
    }
    r.wait("envelope drain")?;
    if r.me == 0 {
        let b = if grouped { "env-group" } else { "env-3send" };
        emit(
            b,
            tag,
            HEADER_BYTES + LATENT_BYTES + COND_BYTES + RESULT_BYTES,
            &mut samples,
            1.0,
        );
    }
    Ok(())
}

// ---- graph and gated variants ---------------------------------------------------------------

fn launch(g: &crate::comm::nccl::CapturedOps) -> Result<()> {
    g.launch()
}

fn pingpong_graph(r: &mut Rank<'_>, tag: &str, scale: f64) -> Result<()> {
    for &bytes in &PINGPONG_SIZES {
        let (warm, n) = iters_for(bytes, scale);
        let sent = pattern(bytes, 9);
        let sbuf = r.gpu.upload(&sent)?;
        let mut rbuf = r.gpu.alloc(bytes)?;
        let peer = r.peer();
        let dl = Instant::now() + OP_TIMEOUT;
        let (gpu, comm) = (r.gpu, r.comm);
        // Rank 0: one graph {send, recv}. Rank 1: {recv} and {send} (its host sits between).
        let (g_a, g_b) = if r.me == 0 {
            let g = comm.capture(gpu, || {
                comm.send(gpu, &sbuf, bytes, peer, dl)?;
                comm.recv(gpu, &mut rbuf, bytes, peer, dl)
            })?;
            (g, None)
        } else {
            let g1 = comm.capture(gpu, || comm.recv(gpu, &mut rbuf, bytes, peer, dl))?;
            let g2 = comm.capture(gpu, || comm.send(gpu, &rbuf, bytes, peer, dl))?;
            (g1, Some(g2))
        };
        let mut samples = Vec::with_capacity(n);
        for i in 0..warm + n + 1 {
            let t = Instant::now();
            launch(&g_a)?;
            r.wait("graph ping-pong recv")?;
            if let Some(g2) = &g_b {
                launch(g2)?;
            }
            let us = t.elapsed().as_secs_f64() * 1e6;
            if i == 0 && r.me == 0 && r.gpu.download(&rbuf)? != sent {
                return Err(Error::Invariant(format!(
                    "graph ping-pong {bytes} B: echoed bytes differ"
                )));
            }
            if i > warm {
                samples.push(us);
            }
        }
        r.wait("graph ping-pong drain")?;
        if r.me == 0 {
            emit("pingpong", tag, bytes, &mut samples, 2.0);
        }
    }
    Ok(())
}

fn allreduce_graph(r: &mut Rank<'_>, tag: &str, scale: f64) -> Result<()> {
    for &bytes in &ALLREDUCE_SIZES {
        let (warm, n) = iters_for(bytes, scale);
        let count = bytes / 4;
        let init: Vec<u8> = std::iter::repeat_n((r.me as f32 + 1.0).to_le_bytes(), count)
            .flatten()
            .collect();
        let mut buf = r.gpu.upload(&init)?;
        let dl = Instant::now() + OP_TIMEOUT;
        let (gpu, comm) = (r.gpu, r.comm);
        let g = comm.capture(gpu, || {
            comm.all_reduce_sum(gpu, &mut buf, count, ReduceDtype::F32, dl)
        })?;
        let mut samples = Vec::with_capacity(n);
        for i in 0..warm + n + 1 {
            let t = Instant::now();
            launch(&g)?;
            r.wait("graph all-reduce")?;
            let us = t.elapsed().as_secs_f64() * 1e6;
            if i == 0 {
                let want = 3.0f32.to_le_bytes();
                if r.gpu.download(&buf)?.chunks_exact(4).any(|c| c != want) {
                    return Err(Error::Invariant(format!(
                        "graph all-reduce {bytes} B: wrong sum"
                    )));
                }
            }
            if i > warm {
                samples.push(us);
            }
        }
        if r.me == 0 {
            emit("allreduce", tag, bytes, &mut samples, 1.0);
        }
    }
    Ok(())
}

/// The envelope's buffers on one rank (outgoing filled with known patterns).
struct EnvBufs {
    hdr: DeviceBuf,
    lat: DeviceBuf,
    cond: DeviceBuf,
    res_out: DeviceBuf,
    hdr_in: DeviceBuf,
    lat_in: DeviceBuf,
    cond_in: DeviceBuf,
    res_in: DeviceBuf,
}

impl EnvBufs {
    fn new(gpu: &Gpu) -> Result<EnvBufs> {
        Ok(EnvBufs {
            hdr: gpu.upload(&pattern(HEADER_BYTES, 1))?,
            lat: gpu.upload(&pattern(LATENT_BYTES, 2))?,
            cond: gpu.upload(&pattern(COND_BYTES, 3))?,
            res_out: gpu.upload(&pattern(RESULT_BYTES, 4))?,
            hdr_in: gpu.alloc(HEADER_BYTES)?,
            lat_in: gpu.alloc(LATENT_BYTES)?,
            cond_in: gpu.alloc(COND_BYTES)?,
            res_in: gpu.alloc(RESULT_BYTES)?,
        })
    }

    /// Rank 0: the grouped envelope out, then the result in.
    fn enqueue_rank0(&mut self, gpu: &Gpu, comm: &Communicator, dl: Instant) -> Result<()> {
        let peer = GroupRank(1);
        let (hdr, lat, cond) = (&self.hdr, &self.lat, &self.cond);
        comm.group(dl, || {
            comm.send(gpu, hdr, HEADER_BYTES, peer, dl)?;
            comm.send(gpu, lat, LATENT_BYTES, peer, dl)?;
            comm.send(gpu, cond, COND_BYTES, peer, dl)
        })?;
        comm.recv(gpu, &mut self.res_in, RESULT_BYTES, peer, dl)
    }

    /// Rank 1: the grouped envelope in.
    fn enqueue_rank1_recv(&mut self, gpu: &Gpu, comm: &Communicator, dl: Instant) -> Result<()> {
        let peer = GroupRank(0);
        let (h, l, c) = (&mut self.hdr_in, &mut self.lat_in, &mut self.cond_in);
        comm.group(dl, || {
            comm.recv(gpu, h, HEADER_BYTES, peer, dl)?;
            comm.recv(gpu, l, LATENT_BYTES, peer, dl)?;
            comm.recv(gpu, c, COND_BYTES, peer, dl)
        })
    }

    fn enqueue_rank1_send(&self, gpu: &Gpu, comm: &Communicator, dl: Instant) -> Result<()> {
        comm.send(gpu, &self.res_out, RESULT_BYTES, GroupRank(0), dl)
    }

    fn check(&self, gpu: &Gpu, me: u32) -> Result<()> {
        let ok = if me == 0 {
            gpu.download(&self.res_in)? == pattern(RESULT_BYTES, 4)
        } else {
            gpu.download(&self.hdr_in)? == pattern(HEADER_BYTES, 1)
                && gpu.download(&self.lat_in)? == pattern(LATENT_BYTES, 2)
                && gpu.download(&self.cond_in)? == pattern(COND_BYTES, 3)
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Invariant(format!(
                "envelope round trip: rank {me} received corrupted bytes"
            )))
        }
    }
}

const ENV_TOTAL: usize = HEADER_BYTES + LATENT_BYTES + COND_BYTES + RESULT_BYTES;

fn envelope_graph(r: &mut Rank<'_>, tag: &str, scale: f64) -> Result<()> {
    let (warm, n) = iters_for(COND_BYTES, scale);
    let mut b = EnvBufs::new(r.gpu)?;
    let dl = Instant::now() + OP_TIMEOUT;
    let (gpu, comm) = (r.gpu, r.comm);
    let (g_a, g_b) = if r.me == 0 {
        (comm.capture(gpu, || b.enqueue_rank0(gpu, comm, dl))?, None)
    } else {
        let g1 = comm.capture(gpu, || b.enqueue_rank1_recv(gpu, comm, dl))?;
        let g2 = comm.capture(gpu, || b.enqueue_rank1_send(gpu, comm, dl))?;
        (g1, Some(g2))
    };
    let mut samples = Vec::with_capacity(n);
    for i in 0..warm + n + 1 {
        let t = Instant::now();
        launch(&g_a)?;
        r.wait("graph envelope")?;
        if let Some(g2) = &g_b {
            launch(g2)?;
        }
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i == 0 {
            b.check(r.gpu, r.me)?;
        }
        if i > warm {
            samples.push(us);
        }
    }
    r.wait("graph envelope drain")?;
    if r.me == 0 {
        emit("env-group", tag, ENV_TOTAL, &mut samples, 1.0);
    }
    Ok(())
}

/// Enqueues step `seq` ahead of time. Rank 0: gate, send, recv, mark (returns the mark).
/// Rank 1: recv, mark, gate, send (returns the mark after its recv).
fn gated_step(
    r: &mut Rank<'_>,
    gate: &Gate,
    seq: u32,
    ops: &mut dyn FnMut(&Gpu, &Communicator, Instant, bool) -> Result<()>,
) -> Result<Ticket> {
    let dl = Instant::now() + OP_TIMEOUT;
    if r.me == 0 {
        gate.enqueue(seq)?;
        ops(r.gpu, r.comm, dl, true)?;
        r.done.mark()
    } else {
        ops(r.gpu, r.comm, dl, true)?;
        let t = r.done.mark()?;
        gate.enqueue(seq)?;
        ops(r.gpu, r.comm, dl, false)?;
        Ok(t)
    }
}

/// The gated loop shared by ping-pong and envelope. `ops(gpu, comm, dl, first)`: rank 0 enqueues
/// its whole step when `first`; rank 1 enqueues its receive (`first`) or its reply (`!first`).
fn gated_loop(
    r: &mut Rank<'_>,
    warm: usize,
    n: usize,
    ops: &mut dyn FnMut(&Gpu, &Communicator, Instant, bool) -> Result<()>,
    check: &mut dyn FnMut(&Gpu) -> Result<()>,
) -> Result<Vec<f64>> {
    let gate = Gate::new(r.gpu)?;
    let total = (warm + n + 1) as u32;
    let mut samples = Vec::with_capacity(n);
    let mut next = gated_step(r, &gate, 1, ops)?;
    for seq in 1..=total {
        let dl = Instant::now() + OP_TIMEOUT;
        let t = Instant::now();
        if r.me == 0 {
            gate.release(seq);
            r.comm.wait(r.done, next, dl, "gated step")?;
        } else {
            r.comm.wait(r.done, next, dl, "gated recv")?;
            gate.release(seq);
        }
        let us = t.elapsed().as_secs_f64() * 1e6;
        if seq == 1 && r.me == 0 {
            check(r.gpu)?;
        }
        if seq < total {
            next = gated_step(r, &gate, seq + 1, ops)?;
        }
        if seq as usize > warm + 1 {
            samples.push(us);
        }
    }
    if r.me == 1 {
        check(r.gpu)?;
    }
    r.wait("gated drain")?;
    Ok(samples)
}

fn pingpong_gated(r: &mut Rank<'_>, tag: &str, scale: f64) -> Result<()> {
    for &bytes in &PINGPONG_SIZES {
        let (warm, n) = iters_for(bytes, scale);
        let sent = pattern(bytes, 11);
        let sbuf = r.gpu.upload(&sent)?;
        let rbuf = std::cell::RefCell::new(r.gpu.alloc(bytes)?);
        let me = r.me;
        let peer = r.peer();
        let mut ops = |gpu: &Gpu, comm: &Communicator, dl: Instant, first: bool| -> Result<()> {
            let mut rb = rbuf.borrow_mut();
            match (me, first) {
                (0, _) => {
                    comm.send(gpu, &sbuf, bytes, peer, dl)?;
                    comm.recv(gpu, &mut rb, bytes, peer, dl)
                }
                (_, true) => comm.recv(gpu, &mut rb, bytes, peer, dl),
                (_, false) => comm.send(gpu, &rb, bytes, peer, dl),
            }
        };
        let mut check = |gpu: &Gpu| -> Result<()> {
            if me == 0 && gpu.download(&rbuf.borrow())? != sent {
                return Err(Error::Invariant(format!(
                    "gated ping-pong {bytes} B: echoed bytes differ"
                )));
            }
            Ok(())
        };
        let mut samples = gated_loop(r, warm, n, &mut ops, &mut check)?;
        if r.me == 0 {
            emit("pingpong", tag, bytes, &mut samples, 2.0);
        }
    }
    Ok(())
}

fn envelope_gated(r: &mut Rank<'_>, tag: &str, scale: f64) -> Result<()> {
    let (warm, n) = iters_for(COND_BYTES, scale);
    let b = std::cell::RefCell::new(EnvBufs::new(r.gpu)?);
    let me = r.me;
    let mut ops = |gpu: &Gpu, comm: &Communicator, dl: Instant, first: bool| -> Result<()> {
        let mut b = b.borrow_mut();
        match (me, first) {
            (0, _) => b.enqueue_rank0(gpu, comm, dl),
            (_, true) => b.enqueue_rank1_recv(gpu, comm, dl),
            (_, false) => b.enqueue_rank1_send(gpu, comm, dl),
        }
    };
    let mut check = |gpu: &Gpu| -> Result<()> { b.borrow().check(gpu, me) };
    let mut samples = gated_loop(r, warm, n, &mut ops, &mut check)?;
    if r.me == 0 {
        emit("env-group", tag, ENV_TOTAL, &mut samples, 1.0);
    }
    Ok(())
}
