#!/usr/bin/env python3
"""torch.distributed (NCCL) baseline for `lockstep bench transport`: the same loops, 2 processes.

Run in the SAME device command as `lockstep bench transport` (same host, same cards):
    python3 transport_torch.py [--scale F] [--json PATH]
Prints `RESULT {json}` lines with the schema of `lockstep bench transport` (mode "torch" or
"torch-batch") and a table. Host wall clock per iteration, median; the host sees each hop
complete (stream synchronize), as ours does.
"""
import argparse, json, os, socket, statistics, sys, time

PINGPONG = [64, 4 << 10, 64 << 10, 1 << 20, 16 << 20]
ALLREDUCE = [64, 1 << 20, 16 << 20, 256 << 20]
HEADER, LATENT, COND, RESULT = 64, 600 * 1024, 4 << 20, 600 * 1024


def iters_for(nbytes, scale):
    if nbytes <= 64 << 10:
        warm, n = 200, 2000
    elif nbytes <= 1 << 20:
        warm, n = 50, 500
    elif nbytes <= 16 << 20:
        warm, n = 20, 200
    else:
        warm, n = 5, 40
    return warm, max(5, int(n * scale + 0.999))


def pct(v, p):
    v = sorted(v)
    return v[round((len(v) - 1) * p)]


def emit(rank, bench, mode, nbytes, samples, div, out):
    if rank != 0:
        return
    s = [x / div for x in samples]
    p50 = pct(s, 0.5)
    row = dict(bench=bench, mode=mode, bytes=nbytes, iters=len(s), p50_us=p50,
               p10_us=pct(s, 0.1), p90_us=pct(s, 0.9), gbps=nbytes / (p50 * 1e3))
    out.append(row)
    print("RESULT " + json.dumps(row), flush=True)


def worker(rank, port, scale, q):
    import torch
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, device_id=dev)
    peer = 1 - rank
    sync = torch.cuda.current_stream().synchronize
    out = []

    def pattern(n, salt):
        return ((torch.arange(n, device=dev, dtype=torch.int64) * 31 + salt) % 256).to(torch.uint8)

    # ping-pong, half round trip
    for nb in PINGPONG:
        warm, n = iters_for(nb, scale)
        sent = pattern(nb, 7)
        rbuf = torch.empty(nb, dtype=torch.uint8, device=dev)
        samples = []
        for i in range(warm + n + 1):
            t = time.perf_counter()
            if rank == 0:
                dist.send(sent, peer)
                dist.recv(rbuf, peer)
                sync()
            else:
                dist.recv(rbuf, peer)
                sync()
                dist.send(rbuf, peer)
            us = (time.perf_counter() - t) * 1e6
            if i == 0 and rank == 0 and not torch.equal(rbuf, sent):
                raise SystemExit(f"torch ping-pong {nb} B: echo differs")
            if i > warm:
                samples.append(us)
        sync()
        emit(rank, "pingpong", "torch", nb, samples, 2.0, out)

    # all-reduce, in place, f32 sum
    for nb in ALLREDUCE:
        warm, n = iters_for(nb, scale)
        buf = torch.full((nb // 4,), float(rank + 1), dtype=torch.float32, device=dev)
        samples = []
        for i in range(warm + n + 1):
            t = time.perf_counter()
            dist.all_reduce(buf)
            sync()
            us = (time.perf_counter() - t) * 1e6
            if i == 0 and not bool((buf == 3.0).all()):
                raise SystemExit(f"torch all-reduce {nb} B: wrong sum")
            if i > warm:
                samples.append(us)
        emit(rank, "allreduce", "torch", nb, samples, 1.0, out)

    # envelope: header + latent + cond to rank 1, result back
    hdr = torch.arange(8, device=dev, dtype=torch.int64)
    lat, cond, res = pattern(LATENT, 2), pattern(COND, 3), pattern(RESULT, 4)
    hdr_in = torch.empty_like(hdr)
    lat_in, cond_in, res_in = (torch.empty_like(x) for x in (lat, cond, res))
    for batched in (False, True):
        warm, n = iters_for(COND, scale)
        samples = []
        for i in range(warm + n + 1):
            t = time.perf_counter()
            if rank == 0:
                if batched:
                    ops = [dist.P2POp(dist.isend, x, peer) for x in (hdr, lat, cond)]
                    for r in dist.batch_isend_irecv(ops):
                        r.wait()
                else:
                    dist.send(hdr, peer); dist.send(lat, peer); dist.send(cond, peer)
                dist.recv(res_in, peer)
                sync()
            else:
                if batched:
                    ops = [dist.P2POp(dist.irecv, x, peer) for x in (hdr_in, lat_in, cond_in)]
                    for r in dist.batch_isend_irecv(ops):
                        r.wait()
                else:
                    dist.recv(hdr_in, peer); dist.recv(lat_in, peer); dist.recv(cond_in, peer)
                sync()
                dist.send(res, peer)
            us = (time.perf_counter() - t) * 1e6
            if i == 0:
                ok = torch.equal(res_in, res) if rank == 0 else (
                    torch.equal(hdr_in, hdr) and torch.equal(lat_in, lat) and torch.equal(cond_in, cond))
                if not ok:
                    raise SystemExit(f"torch envelope: rank {rank} got corrupted bytes")
            if i > warm:
                samples.append(us)
        sync()
        emit(rank, "env-group" if batched else "env-3send", "torch-batch" if batched else "torch",
             HEADER + LATENT + COND + RESULT, samples, 1.0, out)
    if rank == 0:
        q.put(dict(rows=out, torch=torch.__version__,
                   nccl=".".join(map(str, torch.cuda.nccl.version())),
                   gpu=torch.cuda.get_device_name(0)))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--json")
    a = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, a.scale, q)) for r in range(2)]
    for p in procs:
        p.start()
    import queue
    try:
        info = q.get(timeout=240)
    except queue.Empty:
        for p in procs:
            p.kill()
        sys.exit("torch baseline: no result from rank 0 within 240 s")
    for p in procs:
        p.join(timeout=120)
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    print(f"# torch {info['torch']}, NCCL {info['nccl']}, {info['gpu']}")
    print(f"{'bench':<10} {'mode':<22} {'bytes':>10} {'iters':>7} {'p50 us':>10} {'p10 us':>10} {'p90 us':>10} {'GB/s':>9}")
    for r in info["rows"]:
        print(f"{r['bench']:<10} {r['mode']:<22} {r['bytes']:>10} {r['iters']:>7} {r['p50_us']:>10.2f} "
              f"{r['p10_us']:>10.2f} {r['p90_us']:>10.2f} {r['gbps']:>9.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)
    if bad:
        sys.exit(f"worker exit codes {bad}")


if __name__ == "__main__":
    main()
