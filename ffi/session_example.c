/*
 * session_example.c — a server's view of a lockstep stream through the C ABI (ffi/lockstep.h):
 * open a job (rank 0 + a TP=2 mesh on this machine, calibrated generator), set a prompt's
 * conditioning, stream chunks with backpressure through a decode callback, hard cut to a new
 * prompt and stream it with one call per turn (submit_and_recv), close cleanly; bad input
 * refused with a status and a message.
 *
 *   session_example stream   the stream above (exit 0 when every expectation held)
 *   session_example kill     kills mesh rank 2 mid-stream and expects the job's error to reach
 *                            this caller within the watchdog bound + 1 s
 *
 * The lockstep executable comes from $LOCKSTEP_BIN (else the one beside liblockstep.so).
 * Build: cc -std=c11 -Wall -Wextra -Werror -pedantic -Iffi ffi/session_example.c \
 *          -Ltarget/debug -llockstep -Wl,-rpath,$PWD/target/debug -o session_example
 */
#define _POSIX_C_SOURCE 200809L
#include "lockstep.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int failures = 0;

#define EXPECT(cond, ...)                                                  \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "session_example: FAILED %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, " (last error: %s)\n",                         \
                    lockstep_last_error() ? lockstep_last_error() : "none"); \
            failures++;                                                    \
        }                                                                  \
    } while (0)

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* The server's decoder: here it only checks what it is given and counts. */
typedef struct decoded {
    uint64_t chunks;
    uint64_t last_epoch;
    int fail_next; /* make the next call fail, as a server's VAE might */
} decoded;

static int32_t decode(void *user, const lockstep_chunk *c) {
    decoded *d = (decoded *)user;
    if (d->fail_next) {
        d->fail_next = 0;
        return 5;
    }
    if (c->latent == NULL || c->latent_len != c->latent_shape[0] * c->latent_shape[1]) {
        return 1;
    }
    /* The stream asked for the preview decoder's frames: RGB, frame_h x frame_w x 3 each. */
    if (c->n_frames == 0 || c->frames == NULL || c->frame_h == 0 || c->frame_w == 0) {
        return 2;
    }
    d->chunks++;
    d->last_epoch = c->ids.cache_epoch;
    return 0;
}

static lockstep_session_config config(void) {
    lockstep_session_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.struct_size = sizeof cfg;
    cfg.tp = 2;
    cfg.generator = LOCKSTEP_GENERATOR_CALIBRATED;
    cfg.gen_cost_ms = 2.0;
    cfg.timeout_s = 4.0;
    return cfg;
}

/* Receives `n` results (submitting whenever D_in has room); returns how many came. */
static int stream(lockstep_session *s, int n, uint64_t epoch, uint64_t *next_chunk) {
    int got = 0;
    double t0 = now_s();
    while (got < n && now_s() - t0 < 20.0) {
        int32_t st = lockstep_session_submit(s, NULL);
        if (st == LOCKSTEP_OK) {
            continue;
        }
        EXPECT(st == LOCKSTEP_AGAIN, "submit: status %d", st);
        if (st != LOCKSTEP_AGAIN) {
            return got;
        }
        lockstep_chunk *c = NULL;
        st = lockstep_session_recv(s, 5000, &c);
        EXPECT(st == LOCKSTEP_OK || st == LOCKSTEP_NO_RESULT, "recv: status %d", st);
        if (st != LOCKSTEP_OK) {
            return got;
        }
        EXPECT(c->ids.cache_epoch == epoch, "result of epoch %llu, expected %llu",
               (unsigned long long)c->ids.cache_epoch, (unsigned long long)epoch);
        /* Chunk indices count across epochs: after a cut the first result's index skips the
         * chunks dropped with the old epoch; within an epoch they are consecutive. */
        EXPECT(got == 0 ? c->ids.chunk_index >= *next_chunk : c->ids.chunk_index == *next_chunk,
               "chunk %llu, expected %s%llu", (unsigned long long)c->ids.chunk_index,
               got == 0 ? ">= " : "", (unsigned long long)*next_chunk);
        *next_chunk = c->ids.chunk_index + 1;
        lockstep_chunk_free(c);
        got++;
    }
    return got;
}

/* The same with one call per turn: lockstep_session_submit_and_recv (one round trip). */
static int stream_combined(lockstep_session *s, int n, uint64_t epoch, uint64_t *next_chunk) {
    int got = 0, sent = 0;
    double t0 = now_s();
    while (got < n && now_s() - t0 < 20.0) {
        int32_t sub = -1;
        lockstep_ids ids = {0, 0, 0};
        lockstep_chunk *c = NULL;
        int32_t st = lockstep_session_submit_and_recv(s, 5000, &sub, &ids, &c);
        EXPECT(st == LOCKSTEP_OK || st == LOCKSTEP_NO_RESULT, "submit_and_recv: status %d", st);
        if (st != LOCKSTEP_OK && st != LOCKSTEP_NO_RESULT) {
            return got;
        }
        EXPECT(sub == LOCKSTEP_OK || sub == LOCKSTEP_AGAIN, "submitted: %d", sub);
        if (sub == LOCKSTEP_OK) {
            EXPECT(ids.cache_epoch == epoch, "sent into epoch %llu", (unsigned long long)ids.cache_epoch);
            sent++;
        }
        if (c == NULL) {
            continue;
        }
        EXPECT(c->ids.cache_epoch == epoch, "result of epoch %llu, expected %llu",
               (unsigned long long)c->ids.cache_epoch, (unsigned long long)epoch);
        EXPECT(got == 0 ? c->ids.chunk_index >= *next_chunk : c->ids.chunk_index == *next_chunk,
               "chunk %llu, expected %s%llu", (unsigned long long)c->ids.chunk_index,
               got == 0 ? ">= " : "", (unsigned long long)*next_chunk);
        *next_chunk = c->ids.chunk_index + 1;
        lockstep_chunk_free(c);
        got++;
    }
    /* The pipeline stays full: D_in = 2 ahead of what was received. */
    EXPECT(sent >= got, "sent %d, received %d", sent, got);
    return got;
}

static int run_stream(void) {
    lockstep_session *s = NULL;
    lockstep_session_config cfg = config();

    /* Bad input first: NULLs and a config from another header version. */
    EXPECT(lockstep_session_open(NULL, &s) == LOCKSTEP_ERR_BAD_INPUT && s == NULL, "NULL config");
    EXPECT(lockstep_session_submit(NULL, NULL) == LOCKSTEP_ERR_BAD_INPUT, "NULL handle");
    cfg.struct_size = 8;
    EXPECT(lockstep_session_open(&cfg, &s) == LOCKSTEP_ERR_BAD_INPUT, "short struct_size");
    EXPECT(strstr(lockstep_last_error(), "struct_size") != NULL, "message names struct_size");
    cfg.struct_size = sizeof cfg;
    cfg.frames = 1;

    int32_t st = lockstep_session_open(&cfg, &s);
    EXPECT(st == LOCKSTEP_OK && s != NULL, "open: status %d", st);
    if (st != LOCKSTEP_OK) {
        return 1;
    }
    uint64_t latent[2], text[2];
    EXPECT(lockstep_session_shapes(s, latent, text) == LOCKSTEP_OK, "shapes");

    /* A text encoder's output of the wrong shape, then the right one. */
    size_t n = (size_t)(text[0] * text[1]);
    float *emb = calloc(n, sizeof(float));
    if (emb == NULL) {
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        emb[i] = (float)(i % 101) * 0.01f;
    }
    uint64_t wrong[2] = {text[0] + 1, text[1]};
    st = lockstep_session_set_conditioning(s, LOCKSTEP_DTYPE_F32, wrong, 2, emb, n * 4);
    EXPECT(st == LOCKSTEP_ERR_BAD_INPUT, "wrong shape: status %d", st);
    EXPECT(strstr(lockstep_last_error(), "shape") != NULL, "message names the shape");
    st = lockstep_session_set_conditioning(s, LOCKSTEP_DTYPE_I32, text, 2, emb, n * 4);
    EXPECT(st == LOCKSTEP_ERR_BAD_INPUT, "int tensor: status %d", st);
    st = lockstep_session_set_conditioning(s, LOCKSTEP_DTYPE_F32, text, 2, emb, n * 4);
    EXPECT(st == LOCKSTEP_OK, "conditioning: status %d", st);

    decoded d = {0, 0, 0};
    EXPECT(lockstep_session_set_decoder(s, decode, &d) == LOCKSTEP_OK, "set decoder");

    uint64_t next = 0;
    int got = stream(s, 4, 0, &next);
    EXPECT(got == 4, "4 results in epoch 0, got %d", got);
    EXPECT(d.chunks == 4, "decoder saw %llu chunks", (unsigned long long)d.chunks);

    /* A failing decoder: status DECODER_FAILED naming the chunk, the chunk still handed out,
     * the stream goes on. */
    d.fail_next = 1;
    lockstep_chunk *fc = NULL;
    st = lockstep_session_submit(s, NULL);
    EXPECT(st == LOCKSTEP_OK || st == LOCKSTEP_AGAIN, "submit before the failing decode: %d", st);
    st = lockstep_session_recv(s, 5000, &fc);
    EXPECT(st == LOCKSTEP_ERR_DECODER_FAILED && fc != NULL, "failing decoder: status %d", st);
    EXPECT(strstr(lockstep_last_error(), "decode callback returned 5") != NULL,
           "failing decoder message");
    if (fc != NULL) {
        next = fc->ids.chunk_index + 1;
    }
    lockstep_chunk_free(fc);

    /* Mid-epoch prompt change is refused; a hard cut takes a new prompt. */
    st = lockstep_session_set_prompt_seed(s, 7);
    EXPECT(st == LOCKSTEP_ERR_BAD_INPUT, "prompt change mid-epoch: status %d", st);
    uint64_t epoch = 0;
    EXPECT(lockstep_session_cut(s, &epoch) == LOCKSTEP_OK && epoch == 1, "cut to epoch 1");
    emb[0] = 42.0f;
    st = lockstep_session_set_conditioning(s, LOCKSTEP_DTYPE_F32, text, 2, emb, n * 4);
    EXPECT(st == LOCKSTEP_OK, "new prompt after the cut: status %d", st);
    got = stream_combined(s, 3, 1, &next);
    EXPECT(got == 3, "3 results in epoch 1 (submit_and_recv), got %d", got);
    EXPECT(d.last_epoch == 1, "decoder's last epoch %llu", (unsigned long long)d.last_epoch);

    lockstep_session_stats stats;
    EXPECT(lockstep_session_get_stats(s, &stats) == LOCKSTEP_OK, "stats");
    EXPECT(stats.received == 8 && stats.again > 0, "stats: received %llu again %llu",
           (unsigned long long)stats.received, (unsigned long long)stats.again);

    st = lockstep_session_close(s);
    EXPECT(st == LOCKSTEP_OK, "close: status %d", st);
    EXPECT(lockstep_session_close(s) == LOCKSTEP_ERR_BAD_INPUT, "double close");
    EXPECT(strstr(lockstep_last_error(), "already closed") != NULL, "double close message");
    EXPECT(lockstep_session_submit(s, NULL) == LOCKSTEP_ERR_BAD_INPUT, "submit after close");
    lockstep_session_free(s);
    free(emb);
    printf("session_example stream: %llu chunks, mesh %llu us, submit %llu us, %s\n",
           (unsigned long long)stats.received, (unsigned long long)stats.mesh_us,
           (unsigned long long)stats.submit_us, failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}

static int run_kill(void) {
    lockstep_session *s = NULL;
    lockstep_session_config cfg = config();
    int32_t st = lockstep_session_open(&cfg, &s);
    EXPECT(st == LOCKSTEP_OK, "open: status %d", st);
    if (st != LOCKSTEP_OK) {
        return 1;
    }
    uint64_t next = 0;
    EXPECT(stream(s, 2, 0, &next) == 2, "2 results before the kill");
    uint32_t pid = 0;
    EXPECT(lockstep_session_rank_pid(s, 2, &pid) == LOCKSTEP_OK && pid > 0, "rank 2's pid");
    kill((pid_t)pid, SIGKILL);
    double t0 = now_s();
    int32_t err = LOCKSTEP_OK;
    while (now_s() - t0 < 12.0) {
        st = lockstep_session_submit(s, NULL);
        if (st == LOCKSTEP_AGAIN) {
            lockstep_chunk *c = NULL;
            st = lockstep_session_recv(s, 200, &c);
            lockstep_chunk_free(c);
            if (st == LOCKSTEP_NO_RESULT) {
                st = LOCKSTEP_OK;
            }
        }
        if (st != LOCKSTEP_OK) {
            err = st;
            break;
        }
    }
    double took = now_s() - t0;
    /* timeout_s 4 -> watchdog 8 s; the bound is watchdog + 1 s. */
    EXPECT(err >= 70 && err <= 77, "a job exit status, got %d", err);
    EXPECT(took < 9.0, "error after %.1f s", took);
    EXPECT(strstr(lockstep_last_error(), "global-rank 2") != NULL, "diagnosis names rank 2");
    EXPECT(lockstep_session_submit(s, NULL) == err, "the same status again");
    lockstep_session_free(s);
    printf("session_example kill: status %d after %.2f s, %s\n", err, took,
           failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "stream") == 0) {
        return run_stream();
    }
    if (argc == 2 && strcmp(argv[1], "kill") == 0) {
        return run_kill();
    }
    fprintf(stderr, "usage: %s stream|kill\n", argv[0]);
    return 2;
}
