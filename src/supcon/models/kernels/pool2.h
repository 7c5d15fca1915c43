/* Shared by pool_relu.c and conv_pool_relu.c: bfloat16 <-> float32, and the rule by which a 2x2
 * max-pool followed by a ReLU picks its output and passes its gradient. */
#ifndef SUPCON_POOL2_H
#define SUPCON_POOL2_H

#include <stdint.h>
#include <string.h>

/* Winner codes: 0..3 = row-major position in the 2x2 window; NO_GRAD = the ReLU output is 0. */
#define NO_GRAD 4

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The bf16 bits of a float that holds a bf16 value exactly (its low 16 bits are zero). */
static inline uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

/* relu(max(v0, v1, v2, v3)) as PyTorch computes relu(max_pool2d(x, 2)): the first maximum in
 * row-major order wins ties and a NaN wins over numbers (a later NaN over an earlier one), as in
 * ATen's max-pool kernel; the gradient passes where the output is > 0 or NaN, as in ATen's
 * threshold_backward. Returns the output (the winner's value, or +0) and sets *code. Branch-free,
 * so that loops over channels vectorise. */
static inline float pool4_relu(float v0, float v1, float v2, float v3, uint8_t *code) {
    float m = v0;
    uint8_t k = 0;
    int t;
    t = (v1 > m) | (v1 != v1); m = t ? v1 : m; k = t ? 1 : k;
    t = (v2 > m) | (v2 != v2); m = t ? v2 : m; k = t ? 2 : k;
    t = (v3 > m) | (v3 != v3); m = t ? v3 : m; k = t ? 3 : k;
    const int pass = !(m <= 0.0f);
    *code = pass ? k : NO_GRAD;
    return pass ? m : 0.0f;
}

#endif
