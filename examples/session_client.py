#!/usr/bin/env python3
"""A lockstep session from Python through the C ABI (ctypes, standard library only).

Opens a job (rank 0 + a TP=2 mesh on this machine, calibrated generator), sets a prompt's
conditioning from a float32 tensor, streams chunks with backpressure (LOCKSTEP_AGAIN means
"receive first"), hard cuts to a new prompt and streams it with one call per turn
(lockstep_session_submit_and_recv), and closes cleanly; checks bad input on the way.
Exits 0 when every expectation held.

    python3 examples/session_client.py [--lib target/debug/liblockstep.so] [--chunks N] [--kill]

The lockstep executable comes from $LOCKSTEP_BIN (else the one beside the library).
--kill SIGKILLs mesh rank 2 mid-stream and expects the job's error within the watchdog bound.
"""
import argparse
import array
import ctypes as C
import os
import signal
import sys
import time

OK, AGAIN, NO_RESULT, BAD_INPUT = 0, 1, 2, 74
DTYPE_F32, GENERATOR_CALIBRATED = 3, 1


class Config(C.Structure):
    _fields_ = [
        ("struct_size", C.c_uint32), ("tp", C.c_uint32), ("preset", C.c_char_p),
        ("generator", C.c_int32), ("depth", C.c_uint32), ("gen_cost_ms", C.c_double),
        ("timeout_s", C.c_double), ("seed", C.c_uint64), ("exe", C.c_char_p),
        ("master_addr", C.c_char_p), ("master_port", C.c_uint32), ("frames", C.c_int32),
        ("token", C.c_char_p), ("dump_dir", C.c_char_p),
    ]


class Ids(C.Structure):
    _fields_ = [("call_id", C.c_uint64), ("chunk_index", C.c_uint64), ("cache_epoch", C.c_uint64)]


class Chunk(C.Structure):
    _fields_ = [
        ("ids", Ids), ("s1_us", C.c_uint64), ("latent", C.POINTER(C.c_float)),
        ("latent_len", C.c_uint64), ("latent_shape", C.c_uint64 * 2),
        ("frames", C.POINTER(C.c_uint8)), ("n_frames", C.c_uint32), ("frame_h", C.c_uint32),
        ("frame_w", C.c_uint32), ("reserved", C.c_uint32),
    ]


def load(path):
    lib = C.CDLL(path)
    P = C.c_void_p
    sig = {
        "lockstep_last_error": (C.c_char_p, []),
        "lockstep_session_open": (C.c_int32, [C.POINTER(Config), C.POINTER(P)]),
        "lockstep_session_shapes": (C.c_int32, [P, C.POINTER(C.c_uint64), C.POINTER(C.c_uint64)]),
        "lockstep_session_set_conditioning": (
            C.c_int32, [P, C.c_int32, C.POINTER(C.c_uint64), C.c_uint32, P, C.c_uint64]),
        "lockstep_session_submit": (C.c_int32, [P, C.POINTER(Ids)]),
        "lockstep_session_recv": (C.c_int32, [P, C.c_uint32, C.POINTER(C.POINTER(Chunk))]),
        "lockstep_session_submit_and_recv": (
            C.c_int32, [P, C.c_uint32, C.POINTER(C.c_int32), C.POINTER(Ids),
                        C.POINTER(C.POINTER(Chunk))]),
        "lockstep_chunk_free": (None, [C.POINTER(Chunk)]),
        "lockstep_session_cut": (C.c_int32, [P, C.POINTER(C.c_uint64)]),
        "lockstep_session_close": (C.c_int32, [P]),
        "lockstep_session_free": (None, [P]),
        "lockstep_session_rank_pid": (C.c_int32, [P, C.c_uint32, C.POINTER(C.c_uint32)]),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib


failures = []


def expect(cond, what, lib):
    if not cond:
        err = lib.lockstep_last_error()
        failures.append(what)
        print(f"session_client: FAILED {what} (last error: {err.decode() if err else 'none'})",
              file=sys.stderr)


def stream(lib, s, n, epoch, nxt):
    """Receives n results, submitting whenever D_in has room; returns (got, next chunk)."""
    got, t0 = 0, time.monotonic()
    while got < n and time.monotonic() - t0 < 20:
        st = lib.lockstep_session_submit(s, None)
        if st == OK:
            continue
        expect(st == AGAIN, f"submit status {st}", lib)
        if st != AGAIN:
            break
        c = C.POINTER(Chunk)()
        st = lib.lockstep_session_recv(s, 5000, C.byref(c))
        expect(st == OK, f"recv status {st}", lib)
        if st != OK:
            break
        ch = c.contents
        expect(ch.ids.cache_epoch == epoch, f"epoch {ch.ids.cache_epoch} != {epoch}", lib)
        # Chunk indices count across epochs: after a cut the first result skips the chunks
        # dropped with the old epoch; within an epoch they are consecutive.
        ok = ch.ids.chunk_index >= nxt if got == 0 else ch.ids.chunk_index == nxt
        expect(ok, f"chunk {ch.ids.chunk_index} after {nxt}", lib)
        expect(ch.latent_len == ch.latent_shape[0] * ch.latent_shape[1], "latent shape", lib)
        # Copy out what we keep before freeing the chunk.
        head = [ch.latent[i] for i in range(min(4, ch.latent_len))]
        expect(all(v == v for v in head), "finite latent", lib)
        nxt = ch.ids.chunk_index + 1
        lib.lockstep_chunk_free(c)
        got += 1
    return got, nxt


def stream_combined(lib, s, n, epoch, nxt):
    """The same with one call per turn (submit, then receive: one round trip to rank 0)."""
    got, t0 = 0, time.monotonic()
    while got < n and time.monotonic() - t0 < 20:
        sub, ids, c = C.c_int32(-1), Ids(), C.POINTER(Chunk)()
        st = lib.lockstep_session_submit_and_recv(s, 5000, C.byref(sub), C.byref(ids), C.byref(c))
        expect(st in (OK, NO_RESULT), f"submit_and_recv status {st}", lib)
        expect(sub.value in (OK, AGAIN), f"submitted {sub.value}", lib)
        if st not in (OK, NO_RESULT):
            break
        if sub.value == OK:
            expect(ids.cache_epoch == epoch, f"sent into epoch {ids.cache_epoch}", lib)
        if st == NO_RESULT:
            continue
        ch = c.contents
        expect(ch.ids.cache_epoch == epoch, f"epoch {ch.ids.cache_epoch} != {epoch}", lib)
        ok = ch.ids.chunk_index >= nxt if got == 0 else ch.ids.chunk_index == nxt
        expect(ok, f"chunk {ch.ids.chunk_index} after {nxt}", lib)
        nxt = ch.ids.chunk_index + 1
        lib.lockstep_chunk_free(c)
        got += 1
    return got, nxt


def config(args):
    cfg = Config()
    cfg.struct_size = C.sizeof(Config)
    cfg.tp, cfg.generator, cfg.gen_cost_ms, cfg.timeout_s = 2, GENERATOR_CALIBRATED, 2.0, 4.0
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=os.environ.get("LOCKSTEP_LIB", "target/debug/liblockstep.so"))
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--kill", action="store_true")
    args = ap.parse_args()
    lib = load(args.lib)
    s = C.c_void_p()
    cfg = config(args)
    st = lib.lockstep_session_open(C.byref(cfg), C.byref(s))
    expect(st == OK, f"open status {st}", lib)
    if st != OK:
        return 1
    if args.kill:
        got, _ = stream(lib, s, 2, 0, 0)
        expect(got == 2, "2 results before the kill", lib)
        pid = C.c_uint32()
        expect(lib.lockstep_session_rank_pid(s, 2, C.byref(pid)) == OK, "rank 2's pid", lib)
        os.kill(pid.value, signal.SIGKILL)
        t0, err = time.monotonic(), OK
        while time.monotonic() - t0 < 12:
            st = lib.lockstep_session_submit(s, None)
            if st == AGAIN:
                c = C.POINTER(Chunk)()
                st = lib.lockstep_session_recv(s, 200, C.byref(c))
                if st == OK:
                    lib.lockstep_chunk_free(c)
                if st == NO_RESULT:
                    st = OK
            if st != OK:
                err = st
                break
        took = time.monotonic() - t0
        msg = (lib.lockstep_last_error() or b"").decode()
        expect(70 <= err <= 77, f"a job exit status, got {err}", lib)
        expect(took < 9.0, f"error after {took:.1f} s", lib)
        expect("global-rank 2" in msg, "diagnosis names rank 2", lib)
        lib.lockstep_session_free(s)
        print(f"session_client kill: status {err} after {took:.2f} s, "
              f"{'FAILED' if failures else 'ok'}")
        return 1 if failures else 0

    latent, text = (C.c_uint64 * 2)(), (C.c_uint64 * 2)()
    expect(lib.lockstep_session_shapes(s, latent, text) == OK, "shapes", lib)
    n = text[0] * text[1]
    emb = array.array("f", [(i % 89) * 0.01 for i in range(n)])
    buf, _ = emb.buffer_info()
    wrong = (C.c_uint64 * 2)(text[0], text[1] + 1)
    st = lib.lockstep_session_set_conditioning(s, DTYPE_F32, wrong, 2, buf, n * 4)
    expect(st == BAD_INPUT, f"wrong shape refused (status {st})", lib)
    expect(b"shape" in (lib.lockstep_last_error() or b""), "message names the shape", lib)
    st = lib.lockstep_session_set_conditioning(s, DTYPE_F32, text, 2, buf, n * 4)
    expect(st == OK, f"conditioning status {st}", lib)
    got, nxt = stream(lib, s, args.chunks, 0, 0)
    expect(got == args.chunks, f"{args.chunks} results in epoch 0, got {got}", lib)
    epoch = C.c_uint64()
    expect(lib.lockstep_session_cut(s, C.byref(epoch)) == OK and epoch.value == 1, "cut", lib)
    emb[0] = 3.0
    st = lib.lockstep_session_set_conditioning(s, DTYPE_F32, text, 2, buf, n * 4)
    expect(st == OK, f"new prompt after the cut (status {st})", lib)
    got, nxt = stream_combined(lib, s, 2, 1, nxt)
    expect(got == 2, f"2 results in epoch 1 (submit_and_recv), got {got}", lib)
    expect(lib.lockstep_session_close(s) == OK, "close", lib)
    expect(lib.lockstep_session_close(s) == BAD_INPUT, "double close refused", lib)
    expect(lib.lockstep_session_submit(s, None) == BAD_INPUT, "submit after close refused", lib)
    lib.lockstep_session_free(s)
    print(f"session_client stream: {args.chunks + 2} chunks, {'FAILED' if failures else 'ok'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
