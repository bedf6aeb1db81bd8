/* MXFP4 and block FP8 -> bf16 / fp32 on CPU: nexus.base.native compiles this file with the system C compiler.
 *
 * MXFP4. blocks: uint8 [groups, 16] (two E2M1 codes per byte, the low nibble first); scales: uint8 [groups]
 * (E8M0, bias 127); out: [groups, 32] values, as bf16 or fp32 bits. The result is bit-for-bit what
 * nexus.base.mxfp4.decode's torch arithmetic gives (E2M1 value x 2^(scale - 127), rounded to the output
 * type; scale 255 is 2^127 then x 2, as transformers' ldexp computes it).
 *
 * Fast path (scale 2..252, every group of a real checkpoint): the E2M1 code's bits in bf16 are
 * sign << 15 | (16128 + 64 c) for magnitude code c >= 2 and 16128 for c = 1 (0.5); the scale adds
 * (scale - 127) << 7 to the exponent field, which stays within 1..254. Branch-free 16-bit arithmetic the
 * compiler vectorizes. Other scales take the exact float path. fp32 is bf16 << 16 on the fast path.
 *
 * Block FP8. weight: float8_e4m3fn [mats, rows, cols]; scale_inv: float32 [mats, ceil(rows/bo), ceil(cols/bi)];
 * out: [mats, rows, cols]. Each value is float32(e4m3) x its tile's scale in float32, then rounded to the
 * output type once: nexus.base.fp8.decode's arithmetic, bit for bit.
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

static inline uint16_t bf16_round(float v) { /* round to nearest even, as torch's float -> bf16; NaN stays NaN */
    uint32_t u = f32_bits(v);
    uint16_t rounded = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    uint16_t quiet = (uint16_t)((u >> 16) | 0x40);
    uint16_t is_nan = (uint16_t)(0u - (uint32_t)((u & 0x7FFFFFFFu) > 0x7F800000u)); /* a mask, as in e4m3_bits */
    return (uint16_t)((rounded & ~is_nan) | (quiet & is_nan));
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

/* float32 bits of one float8_e4m3fn byte (exact): bias 7, no infinities, S.1111.111 is NaN. */
static inline uint32_t e4m3_bits(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80) << 24, e = (b >> 3) & 15, m = b & 7;
    uint32_t normal = sign | ((e + 120) << 23) | (m << 20);
    uint32_t sub = sign | f32_bits((float)m * 0x1p-9f); /* e = 0: m x 2^-9 */
    uint32_t nan = sign | 0x7FC00000u;
    /* selects as bit masks: gcc leaves ?: on these as control flow, which stops vectorization */
    uint32_t is_sub = 0u - (uint32_t)(e == 0), is_nan = 0u - (uint32_t)((e == 15) & (m == 7));
    uint32_t value = (normal & ~is_sub) | (sub & is_sub);
    return (value & ~is_nan) | (nan & is_nan);
}

static inline __attribute__((always_inline)) void decode_fp8(const uint8_t *restrict w,
                                                             const float *restrict scale_inv, void *restrict out,
                                                             int64_t mats, int64_t rows, int64_t cols, int64_t bo,
                                                             int64_t bi, int bf16) {
    int64_t grid_rows = (rows + bo - 1) / bo, grid_cols = (cols + bi - 1) / bi;
    for (int64_t m = 0; m < mats; m++)
        for (int64_t r = 0; r < rows; r++) {
            const float *scales = scale_inv + (m * grid_rows + r / bo) * grid_cols;
            int64_t row = (m * rows + r) * cols;
            for (int64_t c0 = 0; c0 < cols; c0 += bi) {
                float s = scales[c0 / bi];
                int64_t n = cols - c0 < bi ? cols - c0 : bi;
                for (int64_t c = 0; c < n; c++) {
                    float v = bits_f32(e4m3_bits(w[row + c0 + c])) * s;
                    put(out, row + c0 + c, bf16 ? (uint32_t)bf16_round(v) << 16 : f32_bits(v), bf16);
                }
            }
        }
}

void nexus_fp8_bf16(const uint8_t *w, const float *scale_inv, void *out, int64_t mats, int64_t rows, int64_t cols,
                    int64_t bo, int64_t bi) {
    decode_fp8(w, scale_inv, out, mats, rows, cols, bo, bi, 1);
}

void nexus_fp8_f32(const uint8_t *w, const float *scale_inv, void *out, int64_t mats, int64_t rows, int64_t cols,
                   int64_t bo, int64_t bi) {
    decode_fp8(w, scale_inv, out, mats, rows, cols, bo, bi, 0);
}
