/* A register-blocked matrix product for the kernels' small, cache-resident operands:
 *     C [M, Nc] (+)= A [M, K] @ B [K, Nc],   A(m, k) = A[k * sak + m * sar] (any two strides),
 * B and C row-major with Nc a multiple of NR. Blocks of MR = 6 rows x NR = 2 vectors of sums stay in
 * registers (vectors of 8 floats with AVX2/FMA: 12 of the 16 registers; 16 floats with AVX-512). */
#ifndef SUPCON_GEMM_H
#define SUPCON_GEMM_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
#define NR (2 * VW) /* columns of a register block */
#define MR 6        /* rows of a register block */

typedef float vf __attribute__((vector_size(VW * 4)));

static inline vf vld(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vst(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* C[r][0:NR] (+)= sum_k A[k * sak + r * sar] * B[k * ldb + 0:NR] for rows r < mr (mr <= MR). */
static inline __attribute__((always_inline)) void block(const int mr, const int64_t K, const float *A,
                                                        const int64_t sak, const int64_t sar,
                                                        const float *restrict B, const int64_t ldb,
                                                        float *C, const int64_t ldc, const int add) {
    vf c[MR][2];
    for (int r = 0; r < MR; r++) c[r][0] = c[r][1] = (vf){0};
    for (int64_t k = 0; k < K; k++) {
        const vf b0 = vld(B + k * ldb), b1 = vld(B + k * ldb + VW);
        const float *a = A + k * sak;
        for (int r = 0; r < MR; r++)
            if (r < mr) {
                const float s = a[r * sar];
                c[r][0] += s * b0;
                c[r][1] += s * b1;
            }
    }
    for (int r = 0; r < MR; r++)
        if (r < mr) {
            float *d = C + r * ldc;
            vst(d, add ? vld(d) + c[r][0] : c[r][0]);
            vst(d + VW, add ? vld(d + VW) + c[r][1] : c[r][1]);
        }
}

static inline void gemm(int64_t M, int64_t Nc, int64_t K, const float *A, int64_t sak, int64_t sar, const float *B,
                 int64_t ldb, float *C, int64_t ldc, int add) {
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int64_t mr = M - m0 < MR ? M - m0 : MR;
        const float *a = A + m0 * sar;
        for (int64_t n0 = 0; n0 < Nc; n0 += NR) {
            float *c = C + m0 * ldc + n0;
            switch (mr) { /* one specialised copy of the block per row count */
            case 6: block(6, K, a, sak, sar, B + n0, ldb, c, ldc, add); break;
            case 5: block(5, K, a, sak, sar, B + n0, ldb, c, ldc, add); break;
            case 4: block(4, K, a, sak, sar, B + n0, ldb, c, ldc, add); break;
            case 3: block(3, K, a, sak, sar, B + n0, ldb, c, ldc, add); break;
            case 2: block(2, K, a, sak, sar, B + n0, ldb, c, ldc, add); break;
            default: block(1, K, a, sak, sar, B + n0, ldb, c, ldc, add); break;
            }
        }
    }
}

#endif
