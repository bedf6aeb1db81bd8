/* MXFP4 -> bf16 / fp32 on CPU: nexus.base.native compiles this file with the system C compiler.
 *
 * blocks: uint8 [groups, 16] (two E2M1 codes per byte, the low nibble first); scales: uint8 [groups]
 * (E8M0, bias 127); out: [groups, 32] values, as bf16 or fp32 bits. The result is bit-for-bit what
 * nexus.base.mxfp4.decode's torch arithmetic gives (E2M1 value x 2^(scale - 127), rounded to the output
 * type; scale 255 is 2^127 then x 2, as transformers' ldexp computes it).
 *
 * Fast path (scale 2..252, every group of a real checkpoint): the E2M1 code's bits in bf16 are
 * sign << 15 | (16128 + 64 c) for magnitude code c >= 2 and 16128 for c = 1 (0.5); the scale adds
 * (scale - 127) << 7 to the exponent field, which stays within 1..254. Branch-free 16-bit arithmetic the
 * compiler vectorizes. Other scales take the exact float path. fp32 is bf16 << 16 on the fast path.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static const float FP4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

static inline uint16_t fast16(uint16_t n, uint16_t shift) {
    uint16_t c = n & 7;
    uint16_t mag = (uint16_t)(16128 + (c << 6) - ((c == 1) << 6) + shift);
    return (uint16_t)((c ? mag : 0) | ((n & 8) << 12));
}

static inline uint32_t f32_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float v;
    memcpy(&v, &u, 4);
    return v;
}

static inline uint16_t bf16_round(float v) { /* round to nearest even, as torch's float -> bf16 */
    uint32_t u = f32_bits(v);
    if (isnan(v)) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* fp32 bits of an out-of-range-scale value; for bf16 out, rounded to bf16 first (as torch's bf16 multiply) */
static inline uint32_t slow_bits(uint8_t n, uint8_t s, int bf16) {
    float power = ldexpf(1.0f, (s == 255 ? 254 : s) - 127);
    float v = FP4[n] * power;
    if (bf16) v = bits_f32((uint32_t)bf16_round(v) << 16);
    if (s == 255) v = v * 2.0f;
    return bf16 ? (uint32_t)bf16_round(v) << 16 : f32_bits(v);
}

/* Value i of the output as fp32 bits; bf16 output keeps the upper half (exact: see the fast path). */
static inline void put(void *out, int64_t i, uint32_t bits, int bf16) {
    if (bf16)
        ((uint16_t *)out)[i] = (uint16_t)(bits >> 16);
    else
        ((uint32_t *)out)[i] = bits;
}

static inline __attribute__((always_inline)) void decode(const uint8_t *restrict blocks,
                                                         const uint8_t *restrict scales, void *restrict out,
                                                         int64_t groups, int bf16) {
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *b = blocks + g * 16;
        uint8_t s = scales[g];
        if (s >= 2 && s <= 252) {
            uint16_t shift = (uint16_t)(((int)s - 127) * 128);
            for (int i = 0; i < 16; i++) {
                put(out, g * 32 + 2 * i, (uint32_t)fast16(b[i] & 15, shift) << 16, bf16);
                put(out, g * 32 + 2 * i + 1, (uint32_t)fast16(b[i] >> 4, shift) << 16, bf16);
            }
        } else {
            for (int i = 0; i < 32; i++) put(out, g * 32 + i, slow_bits((b[i / 2] >> (4 * (i & 1))) & 15, s, bf16), bf16);
        }
    }
}

void nexus_mxfp4_bf16(const uint8_t *blocks, const uint8_t *scales, void *out, int64_t groups) {
    decode(blocks, scales, out, groups, 1);
}

void nexus_mxfp4_f32(const uint8_t *blocks, const uint8_t *scales, void *out, int64_t groups) {
    decode(blocks, scales, out, groups, 0);
}
