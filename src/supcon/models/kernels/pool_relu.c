/* relu(max_pool2d(x, 2)) and its gradient in one pass each, for channels-last (NHWC) tensors.
 *
 * PyTorch's eager ops take five memory passes for this on the CPU (the pooling with int64 indices,
 * the ReLU, its backward, a zero-fill of the input gradient and a scatter into it). Here the forward
 * reads x once and writes the pooled output plus a one-byte winner code per output; the backward
 * writes the input gradient once. Results equal PyTorch's bit for bit (pool4_relu in pool2.h: ties,
 * NaNs and where the gradient passes). Odd trailing rows/columns are dropped (floor) and get zero
 * gradient.
 *
 * Inner loops run over fixed blocks of 32 channels so that the compiler vectorises them (with the
 * channel count unknown at compile time it keeps a scalar loop for short rows). Built with -fopenmp,
 * the batch is split over the OpenMP threads of the process, which are PyTorch's own (the library
 * resolves libgomp to the copy PyTorch has loaded), so torch.set_num_threads applies.
 */
#include <stdint.h>
#include <string.h>

#include "pool2.h"

#define BLOCK 32
#define PARALLEL_MIN (1 << 16) /* elements below which threads cost more than they save */

static inline float bf16_load(const uint16_t *p) { return bf16_to_f32(*p); }
static inline uint16_t bf16_store(float f) { return bf16_bits(f); }
static inline float f32_load(const float *p) { return *p; }
static inline float f32_store(float f) { return f; }

#define DEFINE_POOL(NAME, T, LOAD, STORE)                                                            \
    static inline void NAME##_fwd_block(const T *restrict p0, const T *restrict p1,                  \
                                        const T *restrict p2, const T *restrict p3,                  \
                                        T *restrict y, uint8_t *restrict code, int64_t len) {        \
        for (int64_t c = 0; c < len; c++) {                                                          \
            uint8_t k;                                                                               \
            /* The output is the winner's value (exact in float32) or +0: stored back unchanged. */  \
            y[c] = STORE(pool4_relu(LOAD(p0 + c), LOAD(p1 + c), LOAD(p2 + c), LOAD(p3 + c), &k));   \
            if (code) code[c] = k;                                                                   \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    void NAME##_fwd(const T *restrict x, T *restrict y, uint8_t *restrict code, int64_t N,           \
                    int64_t H, int64_t W, int64_t C) {                                               \
        const int64_t Ho = H / 2, Wo = W / 2;                                                        \
        _Pragma("omp parallel for schedule(static) if (N * H * W * C > PARALLEL_MIN)")               \
        for (int64_t n = 0; n < N; n++)                                                              \
            for (int64_t i = 0; i < Ho; i++)                                                         \
                for (int64_t j = 0; j < Wo; j++) {                                                   \
                    const T *p0 = x + ((n * H + 2 * i) * W + 2 * j) * C, *p1 = p0 + C;              \
                    const T *p2 = p0 + W * C, *p3 = p2 + C;                                          \
                    const int64_t o = ((n * Ho + i) * Wo + j) * C;                                   \
                    uint8_t *co = code ? code + o : NULL;                                            \
                    int64_t c = 0;                                                                   \
                    for (; c + BLOCK <= C; c += BLOCK)                                               \
                        NAME##_fwd_block(p0 + c, p1 + c, p2 + c, p3 + c, y + o + c,                  \
                                         co ? co + c : NULL, BLOCK);                                 \
                    NAME##_fwd_block(p0 + c, p1 + c, p2 + c, p3 + c, y + o + c,                      \
                                     co ? co + c : NULL, C - c);                                     \
                }                                                                                    \
    }                                                                                                \
                                                                                                     \
    static inline void NAME##_bwd_block(const T *restrict g, const uint8_t *restrict code,           \
                                        T *restrict q0, T *restrict q1, uint8_t k0, int64_t len) {   \
        for (int64_t c = 0; c < len; c++) {                                                          \
            q0[c] = code[c] == k0 ? g[c] : (T)0;                                                     \
            q1[c] = code[c] == k0 + 1 ? g[c] : (T)0;                                                 \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    void NAME##_bwd(const T *restrict g, const uint8_t *restrict code, T *restrict gx, int64_t N,    \
                    int64_t H, int64_t W, int64_t C) {                                               \
        const int64_t Ho = H / 2, Wo = W / 2;                                                        \
        _Pragma("omp parallel for schedule(static) if (N * H * W * C > PARALLEL_MIN)")               \
        for (int64_t n = 0; n < N; n++)                                                              \
            for (int64_t h = 0; h < H; h++) {                                                        \
                T *row = gx + (n * H + h) * W * C;                                                   \
                const int64_t i = h / 2;                                                             \
                if (i >= Ho) {                                                                       \
                    memset(row, 0, (size_t)(W * C) * sizeof(T));                                     \
                    continue;                                                                        \
                }                                                                                    \
                const uint8_t k0 = (uint8_t)(2 * (h % 2));                                           \
                for (int64_t j = 0; j < Wo; j++) {                                                   \
                    const int64_t o = ((n * Ho + i) * Wo + j) * C;                                   \
                    T *q0 = row + 2 * j * C, *q1 = q0 + C;                                           \
                    int64_t c = 0;                                                                   \
                    for (; c + BLOCK <= C; c += BLOCK)                                               \
                        NAME##_bwd_block(g + o + c, code + o + c, q0 + c, q1 + c, k0, BLOCK);        \
                    NAME##_bwd_block(g + o + c, code + o + c, q0 + c, q1 + c, k0, C - c);            \
                }                                                                                    \
                if (W % 2) memset(row + 2 * Wo * C, 0, (size_t)C * sizeof(T));                       \
            }                                                                                        \
    }

DEFINE_POOL(pool_relu_bf16, uint16_t, bf16_load, bf16_store)
DEFINE_POOL(pool_relu_f32, float, f32_load, f32_store)
