/*
 * lockstep.h — the C ABI of the lockstep crate (written by hand; `tools/check-ffi.sh` checks
 * that every exported `lockstep_*` symbol of the cdylib is declared here and vice versa, and
 * `src/ffi.rs` tests that every code below matches the Rust side).
 *
 * What it is for: a server that is not written in Rust builds envelopes with exactly the Rust
 * preflight (docs/spec.md §3: preflight before header, dtype allowlist, top-level tensors
 * only) and
 * decodes headers it received, without ever getting a header for an envelope that failed.
 *
 * Link:   cc app.c -I ffi -L target/release -llockstep
 *
 * Conventions that hold for every function below:
 *  - No function aborts or unwinds into C. A lockstep bug caught at the boundary returns
 *    LOCKSTEP_ERR_PANIC (or NULL) with its message in lockstep_last_error().
 *  - Functions returning `int32_t` return LOCKSTEP_OK (0) or a lockstep_status code, and set
 *    (on failure) or clear (on success) the calling thread's last error.
 *  - Thread safety: every function may be called from any thread concurrently. The last error
 *    is per thread. A lockstep_envelope is immutable once made: several threads may read it at
 *    once, but lockstep_envelope_free must not race with any use of that envelope.
 *  - Input pointers are borrowed only for the duration of the call (lockstep copies what it
 *    keeps). Output pointers state their owner and lifetime below.
 */
#ifndef LOCKSTEP_H
#define LOCKSTEP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Wire constants (docs/spec.md §3). */
enum {
    LOCKSTEP_HEADER_LEN = 80,          /* bytes of an encoded header */
    LOCKSTEP_ENVELOPE_VERSION = 1,     /* the version this build speaks */
    LOCKSTEP_MAGIC = 0x54534b4c,       /* "LKST" read as a little-endian u32 */
};

/*
 * Status codes. 0 and 70..77 mirror the process exit codes (src/exit.rs,
 * docs/manual/03-graceful-shutdown.md): a preflight rejection or bad argument is
 * LOCKSTEP_ERR_BAD_INPUT like `Error::Preflight`, a malformed header LOCKSTEP_ERR_INVARIANT_VIOLATION
 * like `Error::Decode`. 80..83 tell apart the header faults a server must handle differently.
 * The envelope functions return OK, INVARIANT_VIOLATION, BAD_INPUT, the HEADER_* codes and PANIC;
 * the session functions return any of 70..77 (the job's own exit code when it failed), plus
 * AGAIN and NO_RESULT (outcomes, not failures: the last error is cleared) and DECODER_FAILED.
 * Never renumbered.
 */
typedef enum lockstep_status {
    LOCKSTEP_OK = 0,
    LOCKSTEP_AGAIN = 1,                    /* session submit: D_in is full; recv first (not an error) */
    LOCKSTEP_NO_RESULT = 2,                /* session recv: nothing within the timeout (not an error) */
    LOCKSTEP_ERR_INVARIANT_VIOLATION = 70, /* header decodes but is invalid (action, flags, ...) */
    LOCKSTEP_ERR_WATCHDOG_TIMEOUT = 71,
    LOCKSTEP_ERR_PEER_LOST = 72,
    LOCKSTEP_ERR_PARITY_MISMATCH = 73,
    LOCKSTEP_ERR_BAD_INPUT = 74,           /* preflight rejected the envelope, or a bad argument */
    LOCKSTEP_ERR_SIGNAL = 75,
    LOCKSTEP_ERR_DEVICE_ERROR = 76,
    LOCKSTEP_ERR_PEER_FAILED = 77,
    LOCKSTEP_ERR_HEADER_TRUNCATED = 80,    /* fewer than LOCKSTEP_HEADER_LEN bytes */
    LOCKSTEP_ERR_HEADER_BAD_MAGIC = 81,    /* not a lockstep envelope */
    LOCKSTEP_ERR_HEADER_BAD_VERSION = 82,  /* a peer speaking another envelope_version */
    LOCKSTEP_ERR_HEADER_BAD_CHECKSUM = 83, /* corrupted in transit */
    LOCKSTEP_ERR_DECODER_FAILED = 84,      /* session recv: the decode callback returned non-zero */
    LOCKSTEP_ERR_PANIC = 101,              /* a lockstep bug, caught at the boundary */
} lockstep_status;

/* Envelope actions (header field `action`). NOOP and SHUTDOWN carry no meta and no tensors. */
typedef enum lockstep_action {
    LOCKSTEP_ACTION_INFER = 1,
    LOCKSTEP_ACTION_NOOP = 2,
    LOCKSTEP_ACTION_SHUTDOWN = 3,
    LOCKSTEP_ACTION_RESULT = 4,
} lockstep_action;

/*
 * Element types. Only BF16..U8 may cross the wire; BOOL, F64 and the FP8 types exist so that a
 * foreign tensor can be named and refused precisely (cast explicitly before preflight).
 */
typedef enum lockstep_dtype {
    LOCKSTEP_DTYPE_BF16 = 1,
    LOCKSTEP_DTYPE_F16 = 2,
    LOCKSTEP_DTYPE_F32 = 3,
    LOCKSTEP_DTYPE_I32 = 4,
    LOCKSTEP_DTYPE_I64 = 5,
    LOCKSTEP_DTYPE_U8 = 6,
    LOCKSTEP_DTYPE_BOOL = 7,     /* refused */
    LOCKSTEP_DTYPE_F64 = 8,      /* refused */
    LOCKSTEP_DTYPE_F8E4M3 = 9,   /* refused */
    LOCKSTEP_DTYPE_F8E5M2 = 10,  /* refused */
} lockstep_dtype;

/*
 * A decoded header, fields in host byte order. Same layout as the Rust `wire::Header`
 * (#[repr(C)], 80 bytes, no padding). The wire form is little-endian.
 */
typedef struct lockstep_header {
    uint32_t magic;
    uint16_t envelope_version;
    uint16_t action;         /* a lockstep_action */
    uint32_t flags;          /* no bits defined: always 0 */
    uint32_t n_tensors;
    uint64_t call_id;
    uint64_t chunk_index;
    uint64_t cache_epoch;
    uint64_t meta_len;
    uint64_t payload_bytes;  /* sum of every tensor's byte_len */
    uint64_t meta_digest;    /* FNV-1a 64 of the meta bytes */
    uint64_t reserved;       /* always 0 */
    uint64_t checksum;       /* FNV-1a 64 of the 72 bytes before it */
} lockstep_header;

/*
 * One top-level tensor in host memory, borrowed for the duration of lockstep_envelope_prepare.
 *  name      NUL-terminated UTF-8, 1..=128 bytes of [A-Za-z0-9_.-/], unique in the envelope.
 *  dtype     a lockstep_dtype code.
 *  ndim      entries in `shape`, at most 8 (checked before `shape` is read).
 *  shape     `ndim` uint64_t (may be NULL when ndim == 0).
 *  data      `byte_len` readable bytes (may be NULL when byte_len == 0); no alignment needed.
 *  byte_len  must equal product(shape) * dtype size.
 */
typedef struct lockstep_tensor_desc {
    const char *name;
    int32_t dtype;
    uint32_t ndim;
    const uint64_t *shape;
    const void *data;
    uint64_t byte_len;
} lockstep_tensor_desc;

/* An envelope that passed preflight. Opaque; made by lockstep_envelope_prepare only. */
typedef struct lockstep_envelope lockstep_envelope;

/* The crate version, e.g. "0.1.0". Static: never free it. */
const char *lockstep_version(void);

/* The embedded kernels' build id (16 hex digits, or "none" when built without kernels).
 * Static: never free it. */
const char *lockstep_kernel_build_id(void);

/* What `lockstep doctor --json` prints (kernels, CUDA driver, GPUs, NCCL, advice). Probes the
 * machine (dynamically loads libcuda/libnccl if present); never fails for a missing library.
 * Returns a heap string owned by the caller: free it with lockstep_string_free. NULL on failure
 * (reason in lockstep_last_error). */
char *lockstep_doctor_json(void);

/* Frees a string returned by lockstep_doctor_json. NULL is a no-op. Free each string once. */
void lockstep_string_free(char *s);

/* The calling thread's last error message ("" after a success). Never NULL. Owned by lockstep,
 * valid until the next lockstep call on the same thread: copy it if you keep it. */
const char *lockstep_last_error(void);

/*
 * Preflight (docs/spec.md §3) from C: the same checks, in the same order and with the same
 * messages, as the Rust `wire::prepare_untyped`, then a header.
 *  action       a lockstep_action.
 *  call_id, chunk_index, cache_epoch   the envelope's ids (docs/spec.md §4); not checked for
 *               monotonicity here (that is the sender's and the mesh's job).
 *  meta_json    INFER/RESULT: NUL-terminated UTF-8 JSON (NULL means "{}"), at most 1 MiB.
 *               Refused: invalid JSON, NaN/Infinity/out-of-range numbers (A1), integers that do
 *               not round-trip through a double, and any object that looks like a tensor
 *               ("$tensor"/"__tensor__" keys, or "dtype" + "shape" + one of
 *               "data"/"ptr"/"storage"/"bytes"/"data_ptr") (A3).
 *               NOOP/SHUTDOWN: must be NULL.
 *  tensors      `n_tensors` descriptors (NULL allowed when 0), at most 64, at most 8 GiB in all;
 *               NOOP/SHUTDOWN: n_tensors must be 0. A dtype outside the allowlist (bool, fp8,
 *               f64) is refused (A2). Every descriptor is checked before any data byte is read;
 *               then the data is copied (the caller may free its buffers after the call).
 *  out          receives the envelope; set to NULL first, and left NULL on any failure.
 * Returns LOCKSTEP_OK, or LOCKSTEP_ERR_BAD_INPUT with the reason in lockstep_last_error.
 * The caller owns *out: free it with lockstep_envelope_free.
 */
int32_t lockstep_envelope_prepare(int32_t action, uint64_t call_id, uint64_t chunk_index,
                                  uint64_t cache_epoch, const char *meta_json,
                                  const lockstep_tensor_desc *tensors, size_t n_tensors,
                                  lockstep_envelope **out);

/* The encoded header (LOCKSTEP_HEADER_LEN bytes, little-endian) that would be sent. The
 * pointer is owned by the envelope, valid until lockstep_envelope_free. `len` may be NULL.
 * env == NULL gives NULL and *len = 0. */
const uint8_t *lockstep_envelope_header_bytes(const lockstep_envelope *env, size_t *len);

/* The canonical meta bytes that would be sent after the header
 * ({"tensor_specs":[...],"body":...}: fixed key order, body keys sorted, compact; empty for
 * NOOP/SHUTDOWN). Then come the tensors' bytes, in the order they were passed.
 * Same ownership as lockstep_envelope_header_bytes. */
const uint8_t *lockstep_envelope_meta_bytes(const lockstep_envelope *env, size_t *len);

/* Frees an envelope. NULL is a no-op. Free each envelope once, after every reader is done. */
void lockstep_envelope_free(lockstep_envelope *env);

/*
 * Decodes and validates a received header from the first LOCKSTEP_HEADER_LEN bytes of `bytes`
 * (a longer buffer, e.g. header + meta, is fine). Any input gives a status, never a crash:
 *  LOCKSTEP_ERR_HEADER_TRUNCATED     len < LOCKSTEP_HEADER_LEN (bytes may be NULL when len == 0)
 *  LOCKSTEP_ERR_HEADER_BAD_MAGIC     not "LKST"
 *  LOCKSTEP_ERR_HEADER_BAD_VERSION   another envelope_version
 *  LOCKSTEP_ERR_HEADER_BAD_CHECKSUM  checksum mismatch
 *  LOCKSTEP_ERR_INVARIANT_VIOLATION  unknown action or flag bits, reserved != 0, or a
 *                                    NOOP/SHUTDOWN that declares a payload
 *  LOCKSTEP_ERR_BAD_INPUT            out is NULL, or bytes is NULL with len > 0
 * *out (caller-owned) is written only on LOCKSTEP_OK.
 */
int32_t lockstep_header_decode(const uint8_t *bytes, size_t len, lockstep_header *out);

/* ------------------------------------------------------------------------------------------ *
 * Sessions: a stream a server drives (docs/manual/session.md). Rank 0 (Stage 0) runs in a child
 * process this library starts (`lockstep launch` + the mesh, or rank 0 alone joining mesh ranks
 * started elsewhere); a failure of any rank ends the job, never this process, and comes back as
 * the job's exit code (70..77) with its diagnosis in lockstep_last_error().
 *
 * Lifecycle: open -> [set_conditioning] -> (submit | recv | submit_and_recv)*
 *            -> [cut -> set_conditioning] ...
 *            -> close -> free.   (free without close stops the job: no rank is left running.)
 * Threads: a handle serializes its calls (a mutex); any thread may call; free must not race.
 * Every call is bounded: submit never waits for room (LOCKSTEP_AGAIN), recv waits at most its
 * timeout plus the job's watchdog bound, close at most the drain plus that bound.
 * ------------------------------------------------------------------------------------------ */

typedef struct lockstep_session lockstep_session;

typedef enum lockstep_generator {
    LOCKSTEP_GENERATOR_DIT = 0,        /* the tiny DiT on the CPU (tiny preset) */
    LOCKSTEP_GENERATOR_CALIBRATED = 1, /* a calibrated cost per call, no math */
    LOCKSTEP_GENERATOR_GPU = 2,        /* the DiT on a GPU (build with kernels) */
} lockstep_generator;

/*
 * How to open a session. Zero-initialize, set struct_size = sizeof(lockstep_session_config),
 * then the fields you need; zero/NULL means the default. Strings are borrowed for the call.
 */
typedef struct lockstep_session_config {
    uint32_t struct_size;    /* sizeof(lockstep_session_config): a mismatch is BAD_INPUT */
    uint32_t tp;             /* mesh ranks (0 = 2) */
    const char *preset;      /* NULL = "tiny" */
    int32_t generator;       /* a lockstep_generator */
    uint32_t depth;          /* queue depth D = D_in = D_out (0 = 2) */
    double gen_cost_ms;      /* LOCKSTEP_GENERATOR_CALIBRATED: cost per generator call */
    double timeout_s;        /* bound on every wait of the job (0 = 10); watchdog = 2x */
    uint64_t seed;           /* weights and noise seed */
    const char *exe;         /* the lockstep executable; NULL = $LOCKSTEP_BIN, else the one
                                beside liblockstep.so */
    const char *master_addr; /* join mode (master_port != 0): rank 0 listens here (NULL = 127.0.0.1) */
    uint32_t master_port;    /* 0 = launch the mesh locally; else join mode */
    int32_t frames;          /* non-zero: every chunk carries the preview decoder's RGB frames */
    const char *token;       /* join mode: the mesh ranks' LOCKSTEP_JOB_TOKEN */
    const char *dump_dir;    /* flight-recorder dumps (NULL = the launcher's default) */
} lockstep_session_config;

typedef struct lockstep_ids {
    uint64_t call_id;
    uint64_t chunk_index;
    uint64_t cache_epoch;
} lockstep_ids;

/*
 * One result, owned by the caller until lockstep_chunk_free (the pointers inside belong to it).
 *  latent      latent_len floats, row-major [latent_shape[0] tokens, latent_shape[1] channels],
 *              host memory (this build has no device-pointer results).
 *  frames      n_frames RGB frames of frame_h x frame_w x 3 bytes, back to back; NULL unless
 *              the config asked for frames.
 */
typedef struct lockstep_chunk {
    lockstep_ids ids;
    uint64_t s1_us;          /* the mesh's time for this chunk */
    const float *latent;
    uint64_t latent_len;
    uint64_t latent_shape[2];
    const uint8_t *frames;
    uint32_t n_frames;
    uint32_t frame_h;
    uint32_t frame_w;
    uint32_t reserved;
} lockstep_chunk;

typedef struct lockstep_session_stats {
    uint64_t submitted;      /* chunks sent */
    uint64_t again;          /* submits answered LOCKSTEP_AGAIN */
    uint64_t received;       /* chunks handed out by recv */
    uint64_t mesh_us;        /* sum of s1_us of the chunks received */
    uint64_t decode_us;      /* time inside the decode callback: the server decoder's share */
    uint64_t submit_us;      /* time inside submit */
    uint64_t recv_us;        /* time inside recv (and submit_and_recv) before the callback,
                                waiting included */
} lockstep_session_stats;

/*
 * The decode-stage plug-in (the server's VAE): called by lockstep_session_recv on the calling
 * thread with each chunk before recv returns it. `chunk` is valid for the call only (copy what
 * you keep); return 0, or non-zero to make recv return LOCKSTEP_ERR_DECODER_FAILED (the chunk is
 * still handed out in *out and the session goes on).
 */
typedef int32_t (*lockstep_decode_fn)(void *user, const lockstep_chunk *chunk);

/* Starts the job and waits until rank 0 has bootstrapped (rendezvous, parity). *out (caller-
 * owned, lockstep_session_free) is written on OK, NULL otherwise. Bad settings are BAD_INPUT
 * before any process starts; a port already taken (join mode) is BAD_INPUT from rank 0. */
int32_t lockstep_session_open(const lockstep_session_config *cfg, lockstep_session **out);

/* The current epoch's conditioning (the prompt), only before its first chunk (else BAD_INPUT:
 * change it with lockstep_session_cut first). A text encoder's output of shape
 * [text_tokens, text_dim] (512 x 4096 for the Wan presets), dtype F32/F16/BF16, byte_len exact;
 * anything else is BAD_INPUT naming the expected shape. The values are copied for the call and
 * sent to every mesh rank, whose model embeds them (docs/manual/session.md). */
int32_t lockstep_session_set_conditioning(lockstep_session *s, int32_t dtype,
                                          const uint64_t *shape, uint32_t ndim,
                                          const void *data, uint64_t byte_len);
/* The same from a safetensors file: tensor `name`, or the file's only tensor when NULL. */
int32_t lockstep_session_set_conditioning_file(lockstep_session *s, const char *path,
                                               const char *name);
/* The same by prompt seed (what `lockstep run --seed` derives). */
int32_t lockstep_session_set_prompt_seed(lockstep_session *s, uint64_t seed);

/* The latent shape of one chunk ([tokens, channels], f32) and the conditioning tensor's
 * ([text_tokens, text_dim]); either array (2 values) may be NULL. */
int32_t lockstep_session_shapes(lockstep_session *s, uint64_t *latent, uint64_t *text);

/* Sends the next chunk: OK (ids in *out, which may be NULL) or LOCKSTEP_AGAIN when D_in is full.
 * Never waits for room. */
int32_t lockstep_session_submit(lockstep_session *s, lockstep_ids *out);

/* The next result in call order, waiting at most timeout_ms (0 = poll): OK with *out, or
 * LOCKSTEP_NO_RESULT (*out = NULL). Results of epochs before the last cut never come out. */
int32_t lockstep_session_recv(lockstep_session *s, uint32_t timeout_ms, lockstep_chunk **out);

/*
 * A stream loop's whole turn in one round trip to rank 0: lockstep_session_submit, then a
 * receive. *submitted (may be NULL) gets LOCKSTEP_OK (chunk sent, its ids in *ids, which may be
 * NULL) or LOCKSTEP_AGAIN (D_in full, nothing sent); it is LOCKSTEP_AGAIN whenever the call
 * fails. The receive waits up to timeout_ms only when D_in has no room left after the submit
 * (the pipeline is full); with room left it is a poll, so
 *     for (;;) lockstep_session_submit_and_recv(s, ms, &sub, NULL, &chunk);
 * keeps D_in chunks in flight and hands out at most one result per call, in call order.
 * Returns OK with *out (caller-owned, lockstep_chunk_free), LOCKSTEP_NO_RESULT (*out = NULL),
 * LOCKSTEP_ERR_DECODER_FAILED (the decode callback failed; the chunk is still in *out), or the
 * job's error. The decode callback runs as in lockstep_session_recv; the call's time counts in
 * recv_us of lockstep_session_stats.
 */
int32_t lockstep_session_submit_and_recv(lockstep_session *s, uint32_t timeout_ms,
                                         int32_t *submitted, lockstep_ids *ids,
                                         lockstep_chunk **out);

/* Frees a chunk. NULL is a no-op. */
void lockstep_chunk_free(lockstep_chunk *chunk);

/*
 * The chunk's latent in the caller's GPU memory: copies latent_len f32 into `dst` (a CUdeviceptr
 * of the CUDA context current on the calling thread, `capacity` bytes) on `stream` (a CUstream
 * of that context, or NULL for its default stream). Asynchronous: on return the driver has read
 * the chunk (free it when you like); synchronize `stream` (or wait on an event recorded on it)
 * before reading `dst`. The caller owns `dst`. LOCKSTEP_ERR_BAD_INPUT for a NULL chunk, dst 0 or
 * a capacity below the latent's bytes; LOCKSTEP_ERR_DEVICE_ERROR with CUDA's error string when
 * there is no CUDA driver or the copy is refused (e.g. no current context).
 */
int32_t lockstep_chunk_copy_latent_to_device(const lockstep_chunk *chunk, uint64_t dst,
                                             uint64_t capacity, void *stream);

/* Hard cut: a new epoch (number in *epoch, may be NULL); chunks in flight are dropped. */
int32_t lockstep_session_cut(lockstep_session *s, uint64_t *epoch);

/* Drain (every chunk in flight comes back), SHUTDOWN, every rank exits 0. A second close, or any
 * call but free after it, is BAD_INPUT. */
int32_t lockstep_session_close(lockstep_session *s);

/* Frees the handle; a session not closed is stopped first (SIGTERM, then SIGKILL). NULL is a
 * no-op. */
void lockstep_session_free(lockstep_session *s);

/* Sets (f != NULL) or clears the decode callback. */
int32_t lockstep_session_set_decoder(lockstep_session *s, lockstep_decode_fn f, void *user);

/* This handle's counters. */
int32_t lockstep_session_get_stats(lockstep_session *s, lockstep_session_stats *out);

/* The pid of global rank `rank` (0 = Stage 0; 1..tp the mesh when launched locally). */
int32_t lockstep_session_rank_pid(lockstep_session *s, uint32_t rank, uint32_t *pid);

#ifdef __cplusplus
} /* extern "C" */
#endif

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(lockstep_header) == LOCKSTEP_HEADER_LEN, "lockstep_header must be 80 bytes");
_Static_assert(sizeof(void *) != 8 || sizeof(lockstep_session_config) == 88,
               "lockstep_session_config layout differs from the library's");
_Static_assert(sizeof(void *) != 8 || sizeof(lockstep_chunk) == 88,
               "lockstep_chunk layout differs from the library's");
#endif

#endif /* LOCKSTEP_H */
