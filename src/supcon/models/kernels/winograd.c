/* relu(max_pool2d(conv2d(x, w, b), 2)) in float32 for a 3x3, stride-1, unpadded convolution with
 * Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016), and its backward: dx, dU, db.
 *
 * F(2x2, 3x3) computes a 2x2 block of convolution outputs from a 4x4 input tile with 16 products per
 * (input, output) channel pair instead of 36:
 *     Y = A^T [ U (.) V ] A,   V = B^T d B (the tile),   U = G g G^T (the 3x3 filter g),
 * and a 2x2 output block is exactly one window of the 2x2 max-pooling that follows, so each tile's
 * four outputs are pooled in registers and only the pooled output and a one-byte winner code
 * (pool2.h) are written. Summed over the input channels, the 16 elementwise products of a tile are
 * 16 matrix products per image, V[xi] [tiles, cin] @ U[xi] [cin, cout] (gemm.h), 2.25x fewer
 * multiply-adds than the direct convolution. The backward is the same in reverse:
 *     dM = A dY A^T (the masked 2x2 gradient of each window),
 *     dV[xi] = dM[xi] @ U[xi]^T,  dx += B dV B^T per tile,     dU[xi] += V[xi]^T @ dM[xi],
 * and dg = G^T dU G, db = sum dY (the filter transforms are done by the caller).
 *
 * Arithmetic: float32; the transforms add and subtract inputs before the products, so results agree
 * with the direct convolution to rounding (relative differences of about 1e-6), not bit for bit.
 * dU and db: each thread sums its images, the threads' sums are added in thread order
 * (deterministic for a given thread count).
 *
 * Layout: x [N, H, W, cin] contiguous (NHWC) with H = 2 * Ho + 2, W = 2 * Wo + 2 (the rows and
 * columns the floor pooling reads); u [16, cin, cout] and ut [16, cout, cin]; y, g and code
 * [N, Ho, Wo, cout] contiguous; dx [N, H, W, cin] (written when not NULL); du [16, cin, cout] and
 * db [cout] (overwritten). cin and cout must be multiples of NR (gemm.h).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "pool2.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define PARALLEL_MIN (1 << 14) /* pooled outputs below which threads cost more than they save */

int winograd_block_columns(void) { return NR; }

/* V[xi][t][c0:c0+VW] = (B^T d B)[xi] of the 4x4 tile at p (rows rs floats apart, pixels cin apart). */
static inline void tile_in(const float *p, int64_t rs, int64_t cin, float *V, int64_t tstride) {
    vf d[4][4], t[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) d[r][c] = vld(p + r * rs + c * cin);
    for (int c = 0; c < 4; c++) {
        t[0][c] = d[0][c] - d[2][c];
        t[1][c] = d[1][c] + d[2][c];
        t[2][c] = d[2][c] - d[1][c];
        t[3][c] = d[1][c] - d[3][c];
    }
    for (int r = 0; r < 4; r++) {
        vst(V + (r * 4 + 0) * tstride, t[r][0] - t[r][2]);
        vst(V + (r * 4 + 1) * tstride, t[r][1] + t[r][2]);
        vst(V + (r * 4 + 2) * tstride, t[r][2] - t[r][1]);
        vst(V + (r * 4 + 3) * tstride, t[r][1] - t[r][3]);
    }
}

/* V [16, T, cin] of image x: the input transform of every tile, VW channels at a time. */
static void transform_input(const float *x, int64_t W, int64_t cin, int64_t Ho, int64_t Wo, float *V) {
    const int64_t T = Ho * Wo;
    for (int64_t i = 0; i < Ho; i++)
        for (int64_t j = 0; j < Wo; j++)
            for (int64_t c = 0; c < cin; c += VW)
                tile_in(x + ((2 * i) * W + 2 * j) * cin + c, W * cin, cin, V + (i * Wo + j) * cin + c, T * cin);
}

/* The forward of one image: the pooled output and codes of every tile from M [16, T, cout]. */
static void output_tiles(const float *M, const float *bias, int64_t T, int64_t cout, float *y, uint8_t *code) {
    const int64_t ts = T * cout;
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < cout; c += VW) {
            vf m[4][4], s[2][4];
            for (int k = 0; k < 16; k++) m[k / 4][k % 4] = vld(M + k * ts + t * cout + c);
            for (int q = 0; q < 4; q++) { /* A^T m: rows */
                s[0][q] = m[0][q] + m[1][q] + m[2][q];
                s[1][q] = m[1][q] - m[2][q] - m[3][q];
            }
            const vf b = vld(bias + c);
            const vf y00 = s[0][0] + s[0][1] + s[0][2] + b, y01 = s[0][1] - s[0][2] - s[0][3] + b;
            const vf y10 = s[1][0] + s[1][1] + s[1][2] + b, y11 = s[1][1] - s[1][2] - s[1][3] + b;
            float a0[VW], a1[VW], a2[VW], a3[VW];
            vst(a0, y00), vst(a1, y01), vst(a2, y10), vst(a3, y11);
            for (int l = 0; l < VW; l++)
                y[t * cout + c + l] = pool4_relu(a0[l], a1[l], a2[l], a3[l], code + t * cout + c + l);
        }
}

void winograd_fwd(const float *x, const float *u, const float *bias, float *y, uint8_t *code, int64_t N,
                  int64_t H, int64_t W, int64_t cin, int64_t cout) {
    const int64_t Ho = (H - 2) / 2, Wo = (W - 2) / 2, T = Ho * Wo;
#pragma omp parallel if (N * T * cout > PARALLEL_MIN)
    {
        float *V = malloc(sizeof(float) * 16 * T * cin), *M = malloc(sizeof(float) * 16 * T * cout);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            transform_input(x + n * H * W * cin, W, cin, Ho, Wo, V);
            for (int k = 0; k < 16; k++)
                gemm(T, cout, cin, V + k * T * cin, 1, cin, u + k * cin * cout, cout, M + k * T * cout, cout, 0);
            output_tiles(M, bias, T, cout, y + n * T * cout, code + n * T * cout);
        }
        free(V);
        free(M);
    }
}

/* dM [16, T, cout] = A dY A^T of each window's masked gradient dY (the winner's g, else 0); db += dY. */
static void transform_grad(const float *g, const uint8_t *code, int64_t T, int64_t cout, float *dM,
                           float *pdb) {
    const int64_t ts = T * cout;
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < cout; c++) {
            const int64_t q = t * cout + c;
            const float v = g[q];
            const uint8_t k = code[q];
            const float y00 = k == 0 ? v : 0.0f, y01 = k == 1 ? v : 0.0f;
            const float y10 = k == 2 ? v : 0.0f, y11 = k == 3 ? v : 0.0f;
            pdb[c] += k < NO_GRAD ? v : 0.0f;
            /* A y: [y0, y0 + y1, y0 - y1, -y1] along rows, then along columns */
            const float r[4][2] = {{y00, y01}, {y00 + y10, y01 + y11}, {y00 - y10, y01 - y11}, {-y10, -y11}};
            for (int i = 0; i < 4; i++) {
                float *o = dM + (i * 4) * ts + q;
                o[0] = r[i][0];
                o[ts] = r[i][0] + r[i][1];
                o[2 * ts] = r[i][0] - r[i][1];
                o[3 * ts] = -r[i][1];
            }
        }
}

/* dx tile at p += B dV B^T, from dV [16, T, cin] (tile t, channels c0:c0+VW). */
static inline void tile_out(const float *dV, int64_t tstride, float *p, int64_t rs, int64_t cin) {
    vf v[4][4], s[4][4];
    for (int k = 0; k < 16; k++) v[k / 4][k % 4] = vld(dV + k * tstride);
    for (int c = 0; c < 4; c++) { /* B v along rows: [v0, v1 - v2 + v3, -v0 + v1 + v2, -v3] */
        s[0][c] = v[0][c];
        s[1][c] = v[1][c] - v[2][c] + v[3][c];
        s[2][c] = v[1][c] + v[2][c] - v[0][c];
        s[3][c] = -v[3][c];
    }
    for (int r = 0; r < 4; r++) {
        float *o = p + r * rs;
        vst(o, vld(o) + s[r][0]);
        vst(o + cin, vld(o + cin) + s[r][1] - s[r][2] + s[r][3]);
        vst(o + 2 * cin, vld(o + 2 * cin) + s[r][1] + s[r][2] - s[r][0]);
        vst(o + 3 * cin, vld(o + 3 * cin) - s[r][3]);
    }
}

static void image_bwd(const float *x, const float *g, const uint8_t *code, const float *u, const float *ut,
                      float *dx, int64_t H, int64_t W, int64_t cin, int64_t cout, float *V, float *dM,
                      float *dV, float *pdu, float *pdb) {
    const int64_t Ho = (H - 2) / 2, Wo = (W - 2) / 2, T = Ho * Wo;
    (void)u;
    transform_input(x, W, cin, Ho, Wo, V);
    transform_grad(g, code, T, cout, dM, pdb);
    for (int k = 0; k < 16; k++) /* dU[xi] += V[xi]^T @ dM[xi] */
        gemm(cin, cout, T, V + k * T * cin, cin, 1, dM + k * T * cout, cout, pdu + k * cin * cout, cout, 1);
    if (!dx) return;
    for (int k = 0; k < 16; k++) /* dV[xi] = dM[xi] @ U[xi]^T */
        gemm(T, cin, cout, dM + k * T * cout, 1, cout, ut + k * cout * cin, cin, dV + k * T * cin, cin, 0);
    memset(dx, 0, sizeof(float) * H * W * cin);
    for (int64_t i = 0; i < Ho; i++)
        for (int64_t j = 0; j < Wo; j++)
            for (int64_t c = 0; c < cin; c += VW)
                tile_out(dV + (i * Wo + j) * cin + c, T * cin, dx + ((2 * i) * W + 2 * j) * cin + c, W * cin, cin);
}

void winograd_bwd(const float *x, const float *g, const uint8_t *code, const float *u, const float *ut,
                  float *dx, float *du, float *db, int64_t N, int64_t H, int64_t W, int64_t cin, int64_t cout) {
    const int64_t Ho = (H - 2) / 2, Wo = (W - 2) / 2, T = Ho * Wo, nu = 16 * cin * cout;
    int threads = 1;
#ifdef _OPENMP
    if (N * T * cout > PARALLEL_MIN) threads = omp_get_max_threads();
#endif
    float *part = calloc((size_t)threads * (nu + cout), sizeof(float));
#pragma omp parallel num_threads(threads)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *V = malloc(sizeof(float) * 16 * T * cin), *dV = malloc(sizeof(float) * 16 * T * cin);
        float *dM = malloc(sizeof(float) * 16 * T * cout);
        float *pdu = part + (size_t)tid * (nu + cout), *pdb = pdu + nu;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++)
            image_bwd(x + n * H * W * cin, g + n * T * cout, code + n * T * cout, u, ut,
                      dx ? dx + n * H * W * cin : NULL, H, W, cin, cout, V, dM, dV, pdu, pdb);
        free(V);
        free(dV);
        free(dM);
    }
    memset(du, 0, sizeof(float) * nu);
    memset(db, 0, sizeof(float) * cout);
    for (int t = 0; t < threads; t++) {
        const float *pdu = part + (size_t)t * (nu + cout), *pdb = pdu + nu;
        for (int64_t q = 0; q < nu; q++) du[q] += pdu[q];
        for (int64_t q = 0; q < cout; q++) db[q] += pdb[q];
    }
    free(part);
}
