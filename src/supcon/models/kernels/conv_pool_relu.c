/* relu(max_pool2d(conv2d(x, w, b), 2)) for a 3x3 "valid" convolution with few input channels (an
 * image network's first layer), and its weight/bias gradients, without the convolution's output.
 *
 * With 3 input channels a convolution does little arithmetic per byte it writes, so PyTorch's
 * conv -> pool -> ReLU chain on the CPU is bound by memory passes over the full-resolution output
 * (forward: write it, read it, write int64 indices; backward: zero-fill and scatter its gradient,
 * read it again for the weight gradient). Here each 2x2 pooling window's four convolution outputs are
 * computed in registers, pooled at once, and only the pooled output and a one-byte winner code are
 * written; the backward recomputes nothing but re-reads the input and accumulates
 *     dW[t][co] += x_winner(co)[t] * g[co],   db[co] += g[co]    (where the ReLU passes)
 * per pooled output.
 *
 * Arithmetic: products and sums in float32. With round_bf16 set, inputs and weights are rounded to
 * bfloat16 first and the convolution output is rounded to bfloat16 before pooling, as PyTorch's CPU
 * autocast does (bf16 operands, float32 accumulation, bf16 output); where the compiler targets
 * AVX512-BF16 this path uses bf16 dot-product instructions (half the instructions of float32 FMAs;
 * products of bf16 values are exact in float32). Pooling/ReLU semantics are those of pool_relu.c
 * (first maximum in row-major order wins, NaN wins, gradient where the output is > 0 or NaN). Sums
 * run in another order than oneDNN's, so results agree to rounding, not necessarily bit for bit.
 *
 * Layout: x is [N, H, W, Cin] with any strides in N, H, W and unit stride in Cin (NHWC, possibly a
 * crop); wt is [3, 3, Cin, Cout] float32 (already rounded when round_bf16); y and code are
 * [N, Ho, Wo, Cout] contiguous, in bfloat16 when round_bf16 is set, else float32. Cout must be a
 * multiple of 32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool2.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* Register blocks sized to the vector registers: 32 of 16 floats with AVX-512, 16 of 8 with AVX2.
 * VW: floats per vector; CB: output channels per block (two vectors); TB: weight rows (kernel taps x
 * input channels) per block in the backward. With AVX2's 16 registers, TB = 3 keeps the backward's
 * 6 sums and 8 gradient vectors in registers (blocks sized for AVX-512 spill: 15-18x slower). */
#if defined(__AVX512F__)
#define VW 16
#define TB 9
#else
#define VW 8
#define TB 3
#endif
#define CB (2 * VW)

/* GCC/Clang vector extension: one register of VW floats. */
typedef float vec __attribute__((vector_size(VW * 4)));

static inline vec vload(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }

#define PARALLEL_MIN (1 << 14)  /* outputs below which OpenMP threads cost more than they save */

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN (quiet) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded); /* branch-free */
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* Image n's input window [rows, cols, cin] as float32 (rounded to bf16 if asked), contiguous.
 * A row of an NHWC image is one contiguous run of cols * cin values (sw == cin). */
static void load_image(const void *images, int64_t n, int is_bf16, int64_t sn, int64_t sh, int64_t sw,
                       int64_t rows, int64_t cols, int64_t cin, int rnd, float *restrict out) {
    const char *x = (const char *)images + n * sn * (is_bf16 ? 2 : 4);
    const int64_t run = sw == cin ? cols * cin : cin, runs = sw == cin ? 1 : cols;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t q = 0; q < runs; q++) {
            float *restrict o = out + (r * cols + q) * cin;
            const int64_t src = r * sh + q * sw;
            if (is_bf16) {
                const uint16_t *restrict p = (const uint16_t *)x + src;
                for (int64_t k = 0; k < run; k++) o[k] = bf16_to_f32(p[k]); /* already bf16 */
            } else if (rnd) {
                const float *restrict p = (const float *)x + src;
                for (int64_t k = 0; k < run; k++) o[k] = round_bf16(p[k]);
            } else {
                memcpy(o, (const float *)x + src, sizeof(float) * run);
            }
        }
}

/* The four convolution outputs of pooling window (i, j), output channels [co0, co0 + CB). */
static inline void window_conv(const float *restrict xf, int64_t cols, int64_t cin, int64_t i, int64_t j,
                               const float *restrict wt, const float *restrict bias, int64_t cout,
                               int64_t co0, float acc[4][CB]) {
    vec a0 = vload(bias + co0), a1 = vload(bias + co0 + VW);
    vec b0 = a0, b1 = a1, c0 = a0, c1 = a1, d0 = a0, d1 = a1;
    for (int64_t kh = 0; kh < 3; kh++)
        for (int64_t kw = 0; kw < 3; kw++) {
            const float *p00 = xf + ((2 * i + kh) * cols + 2 * j + kw) * cin;
            const float *p01 = p00 + cin, *p10 = p00 + cols * cin, *p11 = p10 + cin;
            for (int64_t ci = 0; ci < cin; ci++) {
                const float *w = wt + ((kh * 3 + kw) * cin + ci) * cout + co0;
                const vec w0 = vload(w), w1 = vload(w + VW);
                const float xa = p00[ci], xb = p01[ci], xc = p10[ci], xd = p11[ci];
                a0 += xa * w0; a1 += xa * w1;
                b0 += xb * w0; b1 += xb * w1;
                c0 += xc * w0; c1 += xc * w1;
                d0 += xd * w0; d1 += xd * w1;
            }
        }
    vstore(acc[0], a0); vstore(acc[0] + VW, a1);
    vstore(acc[1], b0); vstore(acc[1] + VW, b1);
    vstore(acc[2], c0); vstore(acc[2] + VW, c1);
    vstore(acc[3], d0); vstore(acc[3] + VW, d1);
}

/* Nonzero: use the portable float32 code even where the CPU has bf16 dot products (for tests). */
static int force_generic = 0;

void conv_pool_relu_force_generic(int on) { force_generic = on; }

/* Round (when rnd) the four window positions' sums, pool them with the ReLU, and store the CB
 * outputs and winner codes at offset q. */
static inline void pool_store(float acc[4][CB], int rnd, void *y, uint8_t *code, int64_t q) {
    float m[CB];
    uint8_t k[CB];
    if (rnd)
        for (int a = 0; a < 4; a++)
            for (int c = 0; c < CB; c++) acc[a][c] = round_bf16(acc[a][c]);
    for (int c = 0; c < CB; c++) m[c] = pool4_relu(acc[0][c], acc[1][c], acc[2][c], acc[3][c], &k[c]);
    memcpy(code + q, k, CB);
    if (rnd) /* m holds bf16 values already */
        for (int c = 0; c < CB; c++) ((uint16_t *)y)[q + c] = bf16_bits(m[c]);
    else
        memcpy((float *)y + q, m, sizeof m);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_DPBF16 1

/* Forward of one image with AVX512-BF16 dot products (bf16 operands, float32 sums): each
 * instruction multiplies 16 output channels' pairs of weights by a broadcast pair of inputs. The
 * 9 * cin weight rows are paired as (kw 0, kw 1) for each kh, ci; (kh 0, kh 1) at kw 2; and (kh 2, 0)
 * at kw 2: 5 * cin pair rows instead of 9 * cin FMAs, and no partner is a value outside the window.
 * wp: [5 * cin, cout] pairs; bufs: 3 * rows * cols * cin scratch words. */
static void fwd_image_dp(const float *restrict xf, int64_t n, int64_t cols, int64_t cin, int64_t Ho,
                         int64_t Wo, int64_t cout, const uint32_t *restrict wp, const float *restrict bias,
                         uint32_t *restrict bufs, void *y, uint8_t *code) {
    const int64_t rows = 2 * Ho + 2, plane = rows * cols * cin, rs = cols * cin;
    uint32_t *xc = bufs, *xr = bufs + plane, *xz = bufs + 2 * plane;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t q = 0; q < rs; q++) {
            const int64_t at = r * rs + q;
            const uint32_t v = bf16_bits(xf[at]);
            xz[at] = v;                                                                    /* (x, 0) */
            xc[at] = v | (q + cin < rs ? (uint32_t)bf16_bits(xf[at + cin]) << 16 : 0u);            /* (x, right) */
            xr[at] = v | (r + 1 < rows ? (uint32_t)bf16_bits(xf[at + rs]) << 16 : 0u);             /* (x, below) */
        }
    for (int64_t i = 0; i < Ho; i++)
        for (int64_t j = 0; j < Wo; j++)
            for (int64_t co0 = 0; co0 < cout; co0 += CB) {
                __m512 s[4][2];
                for (int a = 0; a < 4; a++) {
                    s[a][0] = _mm512_loadu_ps(bias + co0);
                    s[a][1] = _mm512_loadu_ps(bias + co0 + 16);
                }
                for (int64_t pr = 0; pr < 5 * cin; pr++) {
                    /* pair row pr -> which buffer, and the input offset from the window's corner */
                    const int64_t kind = pr < 3 * cin ? 0 : (pr < 4 * cin ? 1 : 2);
                    const int64_t ci = pr % cin, kh = kind == 0 ? pr / cin : (kind == 1 ? 0 : 2);
                    const int64_t kw = kind == 0 ? 0 : 2;
                    const uint32_t *buf = kind == 0 ? xc : (kind == 1 ? xr : xz);
                    const uint32_t *p = buf + ((2 * i + kh) * cols + 2 * j + kw) * cin + ci;
                    const uint32_t *w = wp + pr * cout + co0;
                    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w),
                                   w1 = (__m512bh)_mm512_loadu_si512(w + 16);
                    const __m512bh x0 = (__m512bh)_mm512_set1_epi32((int)p[0]),
                                   x1 = (__m512bh)_mm512_set1_epi32((int)p[cin]),
                                   x2 = (__m512bh)_mm512_set1_epi32((int)p[rs]),
                                   x3 = (__m512bh)_mm512_set1_epi32((int)p[rs + cin]);
                    s[0][0] = _mm512_dpbf16_ps(s[0][0], x0, w0);
                    s[0][1] = _mm512_dpbf16_ps(s[0][1], x0, w1);
                    s[1][0] = _mm512_dpbf16_ps(s[1][0], x1, w0);
                    s[1][1] = _mm512_dpbf16_ps(s[1][1], x1, w1);
                    s[2][0] = _mm512_dpbf16_ps(s[2][0], x2, w0);
                    s[2][1] = _mm512_dpbf16_ps(s[2][1], x2, w1);
                    s[3][0] = _mm512_dpbf16_ps(s[3][0], x3, w0);
                    s[3][1] = _mm512_dpbf16_ps(s[3][1], x3, w1);
                }
                float acc[4][CB];
                for (int a = 0; a < 4; a++) {
                    _mm512_storeu_ps(acc[a], s[a][0]);
                    _mm512_storeu_ps(acc[a] + 16, s[a][1]);
                }
                pool_store(acc, 1, y, code, ((n * Ho + i) * Wo + j) * cout + co0);
            }
}

/* wt [3, 3, cin, cout] (bf16-exact floats) -> wp [5 * cin, cout] pairs in fwd_image_dp's order. */
static void pack_weights(const float *wt, int64_t cin, int64_t cout, uint32_t *wp) {
#define W(kh, kw, ci, co) (uint32_t)bf16_bits(wt[(((kh) * 3 + (kw)) * cin + (ci)) * cout + (co)])
    for (int64_t ci = 0; ci < cin; ci++)
        for (int64_t co = 0; co < cout; co++) {
            for (int64_t kh = 0; kh < 3; kh++) wp[(kh * cin + ci) * cout + co] = W(kh, 0, ci, co) | W(kh, 1, ci, co) << 16;
            wp[(3 * cin + ci) * cout + co] = W(0, 2, ci, co) | W(1, 2, ci, co) << 16;
            wp[(4 * cin + ci) * cout + co] = W(2, 2, ci, co);
        }
#undef W
}
#else
#define HAVE_DPBF16 0
#endif

void conv_pool_relu_fwd(const void *x, int is_bf16, int64_t sn, int64_t sh, int64_t sw, const float *wt,
                        const float *bias, void *y, uint8_t *code, int64_t N, int64_t cin, int64_t Ho,
                        int64_t Wo, int64_t cout, int rnd) {
    const int64_t rows = 2 * Ho + 2, cols = 2 * Wo + 2;
    const int dp = HAVE_DPBF16 && rnd && !force_generic;
    uint32_t *wp = NULL;
#if HAVE_DPBF16
    if (dp) {
        wp = malloc(sizeof(uint32_t) * 5 * cin * cout);
        pack_weights(wt, cin, cout, wp);
    }
#endif
#pragma omp parallel if (N * Ho * Wo * cout > PARALLEL_MIN)
    {
        float *xf = malloc(sizeof(float) * rows * cols * cin);
        uint32_t *bufs = dp ? malloc(sizeof(uint32_t) * 3 * rows * cols * cin) : NULL;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            load_image(x, n, is_bf16, sn, sh, sw, rows, cols, cin, rnd, xf);
#if HAVE_DPBF16
            if (dp) {
                fwd_image_dp(xf, n, cols, cin, Ho, Wo, cout, wp, bias, bufs, y, code);
                continue;
            }
#endif
            for (int64_t i = 0; i < Ho; i++)
                for (int64_t j = 0; j < Wo; j++)
                    for (int64_t co0 = 0; co0 < cout; co0 += CB) {
                        float acc[4][CB];
                        window_conv(xf, cols, cin, i, j, wt, bias, cout, co0, acc);
                        pool_store(acc, rnd, y, code, ((n * Ho + i) * Wo + j) * cout + co0);
                    }
        }
        free(xf);
        free(bufs);
    }
    free(wp);
}

/* Backward of one image into the thread's sums pdw [K, cout] and pdb [cout].
 * xf: the image's input window (float32, bf16-exact when rnd); gs: scratch for masked gradients. */
static void bwd_image(const float *restrict xf, const void *g, int g_bf16, const uint8_t *restrict code,
                      int64_t n, int64_t cols, int64_t cin, int64_t Ho, int64_t Wo, int64_t cout,
                      const int64_t *restrict off, float *restrict gs, float *restrict pdw,
                      float *restrict pdb) {
    const int64_t K = 9 * cin;
    /* Masked gradients of each window position: gs [Ho, Wo, cout / CB, 4, CB]. */
    for (int64_t i = 0; i < Ho; i++)
        for (int64_t j = 0; j < Wo; j++) {
            const int64_t o = ((n * Ho + i) * Wo + j) * cout;
            for (int64_t co0 = 0; co0 < cout; co0 += CB) {
                float G[4][CB];
                for (int c = 0; c < CB; c++) {
                    const int64_t q = o + co0 + c;
                    const float gv = g_bf16 ? bf16_to_f32(((const uint16_t *)g)[q]) : ((const float *)g)[q];
                    const uint8_t k = code[q];
                    G[0][c] = k == 0 ? gv : 0.0f;
                    G[1][c] = k == 1 ? gv : 0.0f;
                    G[2][c] = k == 2 ? gv : 0.0f;
                    G[3][c] = k == 3 ? gv : 0.0f;
                    pdb[co0 + c] += k < NO_GRAD ? gv : 0.0f;
                }
                memcpy(gs + ((i * Wo + j) * (cout / CB) + co0 / CB) * 4 * CB, G, sizeof G);
            }
        }
    /* dW rows in blocks of TB, each block's sums held in registers over the image's windows. */
    for (int64_t t0 = 0; t0 < K; t0 += TB)
        for (int64_t co0 = 0; co0 < cout; co0 += CB) {
            vec acc[TB][2];
#pragma GCC unroll 9
            for (int tt = 0; tt < TB; tt++) acc[tt][0] = acc[tt][1] = (vec){0};
            for (int64_t i = 0; i < Ho; i++)
                for (int64_t j = 0; j < Wo; j++) {
                    const float *G = gs + ((i * Wo + j) * (cout / CB) + co0 / CB) * 4 * CB;
                    const vec g00 = vload(G), g01 = vload(G + VW), g10 = vload(G + CB),
                              g11 = vload(G + CB + VW), g20 = vload(G + 2 * CB), g21 = vload(G + 2 * CB + VW),
                              g30 = vload(G + 3 * CB), g31 = vload(G + 3 * CB + VW);
                    const float *base = xf + (2 * i * cols + 2 * j) * cin;
#pragma GCC unroll 9 /* >= TB: the accumulators stay in registers */
                    for (int tt = 0; tt < TB; tt++) {
                        const float *p = base + off[t0 + tt];
                        const float xa = p[0], xb = p[cin], xc = p[cols * cin], xd = p[cols * cin + cin];
                        acc[tt][0] += xa * g00;
                        acc[tt][1] += xa * g01;
                        acc[tt][0] += xb * g10;
                        acc[tt][1] += xb * g11;
                        acc[tt][0] += xc * g20;
                        acc[tt][1] += xc * g21;
                        acc[tt][0] += xd * g30;
                        acc[tt][1] += xd * g31;
                    }
                }
#pragma GCC unroll 9
            for (int tt = 0; tt < TB; tt++) {
                float *d = pdw + (t0 + tt) * cout + co0;
                vstore(d, vload(d) + acc[tt][0]);
                vstore(d + VW, vload(d + VW) + acc[tt][1]);
            }
        }
}

#if HAVE_DPBF16
/* The same for bf16 operands (rnd), with AVX512-BF16 dot products: each instruction multiplies 16
 * pairs (window positions 0,1 or 2,3 of one weight row) and adds both products to float32 sums,
 * half the instructions of float32 FMAs. The products of bf16 values are exact in float32, so the
 * sums differ from the FMA path only by the order of additions (and denormals, flushed to zero). */
static void bwd_image_dp(const float *restrict xf, const uint16_t *g, const uint8_t *restrict code,
                         int64_t n, int64_t cols, int64_t cin, int64_t Ho, int64_t Wo, int64_t cout,
                         const int64_t *restrict off, uint32_t *restrict xc, uint32_t *restrict gs,
                         float *restrict pdw, float *restrict pdb) {
    const int64_t K = 9 * cin, rows = 2 * Ho + 2;
    /* xc[r][c][ci] = (x[r][c][ci], x[r][c + 1][ci]) as a bf16 pair: positions 0,1 (or 2,3 one row down). */
    for (int64_t r = 0; r < rows; r++)
        for (int64_t q = 0; q < (cols - 1) * cin; q++) {
            uint32_t lo, hi;
            memcpy(&lo, xf + r * cols * cin + q, 4);
            memcpy(&hi, xf + r * cols * cin + q + cin, 4);
            xc[r * cols * cin + q] = (lo >> 16) | (hi & 0xffff0000u);
        }
    /* gs [Ho, Wo, cout / CB, 2 pairs, CB]: (G0, G1) and (G2, G3) as bf16 pairs. */
    for (int64_t i = 0; i < Ho; i++)
        for (int64_t j = 0; j < Wo; j++) {
            const int64_t o = ((n * Ho + i) * Wo + j) * cout;
            for (int64_t co0 = 0; co0 < cout; co0 += CB) {
                uint32_t *G = gs + ((i * Wo + j) * (cout / CB) + co0 / CB) * 2 * CB;
                for (int c = 0; c < CB; c++) {
                    const uint32_t gv = g[o + co0 + c];
                    const uint8_t k = code[o + co0 + c];
                    G[c] = (k == 0 ? gv : 0u) | (k == 1 ? gv << 16 : 0u);
                    G[CB + c] = (k == 2 ? gv : 0u) | (k == 3 ? gv << 16 : 0u);
                    pdb[co0 + c] += k < NO_GRAD ? bf16_to_f32((uint16_t)gv) : 0.0f;
                }
            }
        }
    for (int64_t t0 = 0; t0 < K; t0 += TB)
        for (int64_t co0 = 0; co0 < cout; co0 += CB) {
            __m512 acc[TB][2];
#pragma GCC unroll 9
            for (int tt = 0; tt < TB; tt++) acc[tt][0] = acc[tt][1] = _mm512_setzero_ps();
            for (int64_t i = 0; i < Ho; i++)
                for (int64_t j = 0; j < Wo; j++) {
                    const uint32_t *G = gs + ((i * Wo + j) * (cout / CB) + co0 / CB) * 2 * CB;
                    const __m512bh g010 = (__m512bh)_mm512_loadu_si512(G),
                                   g011 = (__m512bh)_mm512_loadu_si512(G + 16),
                                   g230 = (__m512bh)_mm512_loadu_si512(G + CB),
                                   g231 = (__m512bh)_mm512_loadu_si512(G + CB + 16);
                    const uint32_t *base = xc + (2 * i * cols + 2 * j) * cin;
#pragma GCC unroll 9
                    for (int tt = 0; tt < TB; tt++) {
                        const uint32_t *p = base + off[t0 + tt];
                        const __m512bh x01 = (__m512bh)_mm512_set1_epi32((int)p[0]);
                        const __m512bh x23 = (__m512bh)_mm512_set1_epi32((int)p[cols * cin]);
                        acc[tt][0] = _mm512_dpbf16_ps(acc[tt][0], x01, g010);
                        acc[tt][1] = _mm512_dpbf16_ps(acc[tt][1], x01, g011);
                        acc[tt][0] = _mm512_dpbf16_ps(acc[tt][0], x23, g230);
                        acc[tt][1] = _mm512_dpbf16_ps(acc[tt][1], x23, g231);
                    }
                }
#pragma GCC unroll 9
            for (int tt = 0; tt < TB; tt++) {
                float *d = pdw + (t0 + tt) * cout + co0;
                _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), acc[tt][0]));
                _mm512_storeu_ps(d + 16, _mm512_add_ps(_mm512_loadu_ps(d + 16), acc[tt][1]));
            }
        }
}
#endif

/* g: [N, Ho, Wo, cout] in y's dtype; dw: [3, 3, cin, cout] and db: [cout], float32, overwritten.
 * Each thread sums into its own buffer; buffers are added in thread order (deterministic for a
 * given thread count). */
void conv_pool_relu_bwd(const void *x, int is_bf16, int64_t sn, int64_t sh, int64_t sw, const void *g,
                        int g_bf16, const uint8_t *code, float *dw, float *db, int64_t N, int64_t cin,
                        int64_t Ho, int64_t Wo, int64_t cout, int rnd) {
    const int64_t rows = 2 * Ho + 2, cols = 2 * Wo + 2, K = 9 * cin;
    const int dp = HAVE_DPBF16 && rnd && g_bf16 && !force_generic;
    /* off[t]: offset in the image buffer of weight row t = (kh * 3 + kw) * cin + ci from a window's
     * top-left input; K is a multiple of TB = 9. */
    int64_t *off = malloc(sizeof(int64_t) * K);
    for (int64_t kh = 0; kh < 3; kh++)
        for (int64_t kw = 0; kw < 3; kw++)
            for (int64_t ci = 0; ci < cin; ci++) off[(kh * 3 + kw) * cin + ci] = (kh * cols + kw) * cin + ci;
    int threads = 1;
#ifdef _OPENMP
    if (N * Ho * Wo * cout > PARALLEL_MIN) threads = omp_get_max_threads();
#endif
    float *part = calloc((size_t)threads * (K + 1) * cout, sizeof(float));
#pragma omp parallel num_threads(threads)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *xf = malloc(sizeof(float) * rows * cols * cin);
        float *gs = malloc(sizeof(float) * Ho * Wo * 4 * cout);
        uint32_t *xc = dp ? malloc(sizeof(uint32_t) * rows * cols * cin) : NULL;
        float *pdw = part + (size_t)tid * (K + 1) * cout, *pdb = pdw + K * cout;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            load_image(x, n, is_bf16, sn, sh, sw, rows, cols, cin, rnd, xf);
#if HAVE_DPBF16
            if (dp) {
                bwd_image_dp(xf, g, code, n, cols, cin, Ho, Wo, cout, off, xc, (uint32_t *)gs, pdw, pdb);
                continue;
            }
#endif
            bwd_image(xf, g, g_bf16, code, n, cols, cin, Ho, Wo, cout, off, gs, pdw, pdb);
        }
        free(xf);
        free(gs);
        free(xc);
    }
    memset(dw, 0, sizeof(float) * K * cout);
    memset(db, 0, sizeof(float) * cout);
    for (int t = 0; t < threads; t++) {
        const float *pdw = part + (size_t)t * (K + 1) * cout, *pdb = pdw + K * cout;
        for (int64_t q = 0; q < K * cout; q++) dw[q] += pdw[q];
        for (int64_t q = 0; q < cout; q++) db[q] += pdb[q];
    }
    free(part);
    free(off);
}
