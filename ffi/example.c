/*
 * example.c — a C server's view of lockstep's C ABI, run by CI (tools/check-ffi.sh).
 *
 * Builds a valid INFER envelope and prints its header; then shows the break-it cases A1 (NaN in
 * meta), A2 (bool and fp8 tensors) and A3 (a tensor hidden in meta) being rejected before any
 * header exists; then decodes garbage headers. Exits non-zero if any expectation fails, so a
 * regression in the ABI fails CI.
 */
#include "lockstep.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

static int failures = 0;

static void expect(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "EXPECTATION FAILED: %s (last error: %s)\n", what, lockstep_last_error());
        failures++;
    }
}

/* Preflight must refuse this envelope with LOCKSTEP_ERR_BAD_INPUT, leave out NULL, and say
 * `needle` in its message. */
static void expect_rejected(const char *label, const char *meta,
                            const lockstep_tensor_desc *tensors, size_t n, const char *needle) {
    lockstep_envelope *env = NULL;
    int32_t st = lockstep_envelope_prepare(LOCKSTEP_ACTION_INFER, 2, 1, 0, meta, tensors, n, &env);
    printf("%s: status %d, envelope %s\n  -> %s\n", label, (int)st, env ? "MADE" : "NULL",
           lockstep_last_error());
    expect(st == LOCKSTEP_ERR_BAD_INPUT, label);
    expect(env == NULL, "no envelope (so no header) after a rejection");
    expect(strstr(lockstep_last_error(), needle) != NULL, needle);
    lockstep_envelope_free(env);
}

int main(void) {
    printf("lockstep %s, kernel build id %s\n", lockstep_version(), lockstep_kernel_build_id());

    char *doctor = lockstep_doctor_json();
    expect(doctor != NULL && strstr(doctor, "\"lockstep_version\"") != NULL, "doctor json");
    if (doctor) {
        printf("doctor json: %zu bytes\n", strlen(doctor));
    }
    lockstep_string_free(doctor);

    /* A valid INFER: one f32 [2,2] latent tensor and plain meta. */
    const float latents[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    const uint64_t shape22[2] = {2, 2};
    lockstep_tensor_desc good = {"latents", LOCKSTEP_DTYPE_F32, 2, shape22, latents,
                                 sizeof latents};
    lockstep_envelope *env = NULL;
    int32_t st = lockstep_envelope_prepare(LOCKSTEP_ACTION_INFER, 1, 0, 0,
                                           "{\"steps\":4,\"guidance\":5.0}", &good, 1, &env);
    expect(st == LOCKSTEP_OK && env != NULL, "valid envelope passes preflight");
    if (env) {
        size_t hlen = 0, mlen = 0;
        const uint8_t *hb = lockstep_envelope_header_bytes(env, &hlen);
        const uint8_t *mb = lockstep_envelope_meta_bytes(env, &mlen);
        expect(hlen == LOCKSTEP_HEADER_LEN && memcmp(hb, "LKST", 4) == 0, "header bytes");
        lockstep_header h;
        st = lockstep_header_decode(hb, hlen, &h);
        expect(st == LOCKSTEP_OK, "own header decodes");
        if (st == LOCKSTEP_OK) {
            printf("header: version %u action %u call_id %" PRIu64 " chunk_index %" PRIu64
                   " cache_epoch %" PRIu64 " meta_len %" PRIu64 " n_tensors %u payload_bytes %" PRIu64
                   " meta_digest %016" PRIx64 "\n",
                   (unsigned)h.envelope_version, (unsigned)h.action, h.call_id, h.chunk_index,
                   h.cache_epoch, h.meta_len, (unsigned)h.n_tensors, h.payload_bytes,
                   h.meta_digest);
            expect(h.action == LOCKSTEP_ACTION_INFER && h.call_id == 1 && h.n_tensors == 1 &&
                       h.payload_bytes == sizeof latents && h.meta_len == mlen,
                   "header fields");
        }
        printf("meta: %.*s\n", (int)mlen, (const char *)mb);

        /* Garbage headers: each fault has its own code, none crashes. */
        uint8_t buf[LOCKSTEP_HEADER_LEN];
        memcpy(buf, hb, sizeof buf);
        buf[0] = 'X';
        st = lockstep_header_decode(buf, sizeof buf, &h);
        printf("bad magic: status %d -> %s\n", (int)st, lockstep_last_error());
        expect(st == LOCKSTEP_ERR_HEADER_BAD_MAGIC, "bad magic code");

        memcpy(buf, hb, sizeof buf);
        buf[4] = 9; /* envelope_version 9 */
        st = lockstep_header_decode(buf, sizeof buf, &h);
        printf("bad version: status %d -> %s\n", (int)st, lockstep_last_error());
        expect(st == LOCKSTEP_ERR_HEADER_BAD_VERSION, "bad version code");

        memcpy(buf, hb, sizeof buf);
        buf[20] ^= 1; /* one bit of call_id flipped in transit */
        st = lockstep_header_decode(buf, sizeof buf, &h);
        printf("bit flip: status %d -> %s\n", (int)st, lockstep_last_error());
        expect(st == LOCKSTEP_ERR_HEADER_BAD_CHECKSUM, "checksum code");

        st = lockstep_header_decode(hb, 17, &h);
        printf("truncated: status %d -> %s\n", (int)st, lockstep_last_error());
        expect(st == LOCKSTEP_ERR_HEADER_TRUNCATED, "truncated code");
    }
    lockstep_envelope_free(env);

    /* Random-looking garbage of every length up to two headers: a status, never a crash. */
    uint8_t noise[2 * LOCKSTEP_HEADER_LEN];
    uint32_t x = 12345;
    for (size_t i = 0; i < sizeof noise; i++) {
        x = x * 1103515245u + 12345u;
        noise[i] = (uint8_t)(x >> 16);
    }
    int garbage_ok = 1;
    for (size_t len = 0; len <= sizeof noise; len++) {
        lockstep_header h;
        st = lockstep_header_decode(noise, len, &h);
        garbage_ok &= (st != LOCKSTEP_OK && st != LOCKSTEP_ERR_PANIC);
    }
    printf("garbage: %zu buffers decoded to typed errors\n", sizeof noise + 1);
    expect(garbage_ok, "garbage never decodes and never panics");

    /* A1: NaN in meta (what printf("%f", NAN) writes) is not serializable. */
    expect_rejected("A1 NaN in meta", "{\"guidance\":nan}", &good, 1,
                    "meta is not serializable JSON");

    /* A2: bool and fp8 tensors are outside the wire allowlist. */
    const uint8_t mask[4] = {1, 0, 1, 0};
    const uint64_t shape4[1] = {4};
    lockstep_tensor_desc with_bool[2] = {
        good, {"mask", LOCKSTEP_DTYPE_BOOL, 1, shape4, mask, sizeof mask}};
    expect_rejected("A2 bool tensor", "{}", with_bool, 2,
                    "dtype bool is not in the wire allowlist");
    lockstep_tensor_desc with_fp8[2] = {
        good, {"scales", LOCKSTEP_DTYPE_F8E4M3, 1, shape4, mask, sizeof mask}};
    expect_rejected("A2 fp8 tensor", "{}", with_fp8, 2,
                    "dtype f8e4m3 is not in the wire allowlist");

    /* A3: a tensor smuggled inside meta (a data pointer with dtype and shape). */
    expect_rejected("A3 tensor in meta",
                    "{\"extra\":{\"mask\":{\"dtype\":\"bool\",\"shape\":[4],\"data_ptr\":4096}}}",
                    &good, 1, "looks like a tensor");

    if (failures) {
        fprintf(stderr, "example: %d expectation(s) failed\n", failures);
        return 1;
    }
    printf("example: all expectations held\n");
    return 0;
}
