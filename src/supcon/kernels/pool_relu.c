/* relu(max_pool2d(x, 2)) and its gradient in one pass each, for channels-last (NHWC) tensors.
 *
 * PyTorch's eager ops take five memory passes for this on the CPU (the pooling with int64 indices,
 * the ReLU, its backward, a zero-fill of the input gradient and a scatter into it). Here the forward
 * reads x once and writes the pooled output plus a one-byte winner code per output; the backward
 * writes the input gradient once. Results equal PyTorch's bit for bit: the first maximum of each 2x2
 * window in row-major order wins ties and a NaN wins over numbers (later NaNs over earlier ones), as
 * in ATen's max-pool kernel; the gradient passes where the ReLU output is positive or NaN, as in ATen's
 * threshold_backward. Odd trailing rows/columns are dropped (floor) and get zero gradient.
 *
 * Inner loops run over fixed blocks of 32 channels so that the compiler vectorises them (with the
 * channel count unknown at compile time it keeps a scalar loop for short rows). Built with -fopenmp,
 * the batch is split over the OpenMP threads of the process, which are PyTorch's own (the library
 * resolves libgomp to the copy PyTorch has loaded), so torch.set_num_threads applies.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 32
#define PARALLEL_MIN (1 << 16) /* elements below which threads cost more than they save */

static inline float bf16_load(const uint16_t *p) {
    uint32_t u = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float f32_load(const float *p) { return *p; }

/* Winner codes: 0..3 = row-major position in the 2x2 window; 4 = no gradient (ReLU output is 0). */
#define NO_GRAD 4

#define DEFINE_POOL(NAME, T, LOAD)                                                                   \
    static inline void NAME##_fwd_block(const T *restrict p0, const T *restrict p1,                  \
                                        const T *restrict p2, const T *restrict p3,                  \
                                        T *restrict y, uint8_t *restrict code, int64_t len) {        \
        for (int64_t c = 0; c < len; c++) {                                                          \
            float m = LOAD(p0 + c), v;                                                               \
            T mb = p0[c];                                                                            \
            uint8_t k = 0;                                                                           \
            int t;                                                                                   \
            v = LOAD(p1 + c); t = (v > m) | (v != v);                                                \
            m = t ? v : m; mb = t ? p1[c] : mb; k = t ? 1 : k;                                       \
            v = LOAD(p2 + c); t = (v > m) | (v != v);                                                \
            m = t ? v : m; mb = t ? p2[c] : mb; k = t ? 2 : k;                                       \
            v = LOAD(p3 + c); t = (v > m) | (v != v);                                                \
            m = t ? v : m; mb = t ? p3[c] : mb; k = t ? 3 : k;                                       \
            int pass = !(m <= 0.0f);                                                                 \
            y[c] = pass ? mb : (T)0;                                                                 \
            if (code) code[c] = pass ? k : NO_GRAD;                                                  \
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

DEFINE_POOL(pool_relu_bf16, uint16_t, bf16_load)
DEFINE_POOL(pool_relu_f32, float, f32_load)
