// int8 weights times int16 activations with AVX2 integer dot products (vpmaddwd), for CPUs without VNNI.
//
// Why this exists: on an AVX2 CPU torch's int8 matmuls either widen the int8 weights to floats for every row
// (the weight-only kernel) or saturate at 8-bit activations (fbgemm, oneDNN: vpmaddubsw sums two u8 x s8 products
// in int16). Here each row of activations is quantized to int16 levels of its largest |x| (15 bits, finer than
// the bf16 rounding the weight-only kernel applies), and vpmaddwd multiplies 16 int16 x int16 pairs at a time
// into int32 sums, which are exact. Weights stay int8 in memory and are widened in registers, once per tile of
// rows. Built and loaded by kernels/int8_avx2.py (the compiler's -mavx2), never run on a CPU without AVX2.

#include <immintrin.h>
#include <stdint.h>

#define TOP 32767.0f  // the largest level: a row's largest |x|
// Elements summed in int32 lanes before the lanes move to an int64 sum: each vpmaddwd lane adds at most
// 2 * 32767 * 127 per 16 elements, so a lane's sum of 1024 elements stays below 2^29, whatever the values.
#define CHUNK 1024
#define ROW_BLOCK 64  // rows whose activations (2 bytes an element) stay in cache while a weight tile is reused
// Bytes ahead of the weights being read that are asked for early: at batch 1 an expert's matrix is read from memory
// once, and this let a 2048 x 2048 matrix stream at 1.5x-2x the rate without it (no change once it is in cache).
#define PREFETCH 2048

// x [rows, k] float32 -> q [rows, k] int16, step [rows]: x ~= q * step, step = the row's largest |x| / 32767.
void moee_int8_quantize(const float *x, int64_t rows, int64_t k, int16_t *q, float *step) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * k;
        int16_t *qr = q + r * k;
        __m256 most = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) most = _mm256_max_ps(most, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + i)));
        float lanes[8], peak = 0.0f;
        _mm256_storeu_ps(lanes, most);
        for (int j = 0; j < 8; j++) peak = lanes[j] > peak ? lanes[j] : peak;
        for (int64_t t = i; t < k; t++) {
            const float magnitude = xr[t] < 0 ? -xr[t] : xr[t];
            peak = magnitude > peak ? magnitude : peak;
        }
        const float s = peak / TOP;
        const float inverse = s > 0.0f ? 1.0f / s : 0.0f;  // an all-zero row stays zero
        const __m256 scale = _mm256_set1_ps(inverse);
        for (i = 0; i + 16 <= k; i += 16) {
            // cvtps rounds to nearest even (the default rounding mode); packs keeps the int16 range, and its
            // per-128-bit-lane order is undone by the permute
            __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + i), scale));
            __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + i + 8), scale));
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xd8);
            _mm256_storeu_si256((__m256i *)(qr + i), packed);
        }
        for (; i < k; i++) {
            __m128 v = _mm_set_ss(xr[i] * inverse);
            qr[i] = (int16_t)_mm_cvtss_si32(v);  // the same rounding as the vector loop
        }
        step[r] = s;
    }
}

static inline int64_t sum_lanes(__m256i v) {  // eight lanes of up to 2^29 each: their sum needs 64 bits
    int32_t lane[8];
    _mm256_storeu_si256((__m256i *)lane, v);
    int64_t sum = 0;
    for (int j = 0; j < 8; j++) sum += lane[j];
    return sum;
}

// out[i, j] for R rows of q and C rows of w: R x C int32 accumulators, C widened weight vectors and the activation
// vectors. 4 x 2 fits AVX2's 16 registers without spilling and ran fastest of the shapes tried (4 x 3 spilled
// accumulators to the stack and ran 0.77x as fast). Every (i, j) is summed in the same order whatever R and C
// are, so a row's result does not depend on which rows share its tile: a text gets the same vector alone and in
// a batch.
static inline __attribute__((always_inline)) void tile(const int16_t *q, const float *step, int64_t k, const int8_t *w,
                                                      const float *wscale, float *out, int64_t ldo, const int R, const int C) {
    int64_t total[4][2] = {{0}};  // exact: a row's products summed whole
    for (int64_t k0 = 0; k0 < k; k0 += CHUNK) {
        const int64_t k1 = k0 + CHUNK < k ? k0 + CHUNK : k;
        __m256i acc[4][2];
        for (int i = 0; i < R; i++)
            for (int j = 0; j < C; j++) acc[i][j] = _mm256_setzero_si256();
        int64_t t = k0;
        for (; t + 16 <= k1; t += 16) {
            __m256i wv[2];
            for (int j = 0; j < C; j++) _mm_prefetch((const char *)(w + j * k + t + PREFETCH), _MM_HINT_T0);
            for (int j = 0; j < C; j++) wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j * k + t)));
            for (int i = 0; i < R; i++) {
                const __m256i qv = _mm256_loadu_si256((const __m256i *)(q + i * k + t));
                for (int j = 0; j < C; j++) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(qv, wv[j]));
            }
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < C; j++) {
                int64_t sum = sum_lanes(acc[i][j]);
                for (int64_t u = t; u < k1; u++) sum += (int32_t)q[i * k + u] * (int32_t)w[j * k + u];  // a width not a multiple of 16
                total[i][j] += sum;
            }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < C; j++) out[i * ldo + j] = (float)((double)total[i][j] * step[i] * wscale[j]);
}

// out [rows, n] = (q * step) @ (w * wscale[:, None]).T for the output columns [n0, n1), rows grouped by expert: rows
// offsets[e] to offsets[e + 1] use the matrix w + e * n * k and its scales wscale + e * n (one matrix: experts = 1).
// Threads split the columns: each call writes only its own.
void moee_int8_matmul(const int16_t *q, const float *step, const int64_t *offsets, int64_t experts, int64_t k,
                      const int8_t *w, const float *wscale, int64_t n, int64_t n0, int64_t n1, float *out) {
    for (int64_t e = 0; e < experts; e++) {
        const int8_t *we = w + e * n * k;
        const float *se = wscale + e * n;
        for (int64_t r0 = offsets[e]; r0 < offsets[e + 1]; r0 += ROW_BLOCK) {
            const int64_t r1 = r0 + ROW_BLOCK < offsets[e + 1] ? r0 + ROW_BLOCK : offsets[e + 1];
            int64_t c = n0;
            if (r1 - r0 < 4) {
                // Fewer rows than a tile (an expert's few tokens at batch 1): a column at a time with all of them, so
                // the matrix is read in order, one stream, which ran 2.5x faster from memory than two at once.
                for (; c < n1; c++) {
                    float *o = out + r0 * n + c;
                    if (r1 - r0 == 1) tile(q + r0 * k, step + r0, k, we + c * k, se + c, o, n, 1, 1);
                    else if (r1 - r0 == 2) tile(q + r0 * k, step + r0, k, we + c * k, se + c, o, n, 2, 1);
                    else tile(q + r0 * k, step + r0, k, we + c * k, se + c, o, n, 3, 1);
                }
                continue;
            }
            for (; c + 2 <= n1; c += 2) {
                int64_t r = r0;
                for (; r + 4 <= r1; r += 4) tile(q + r * k, step + r, k, we + c * k, se + c, out + r * n + c, n, 4, 2);
                for (; r < r1; r++) tile(q + r * k, step + r, k, we + c * k, se + c, out + r * n + c, n, 1, 2);
            }
            for (; c < n1; c++)
                for (int64_t r = r0; r < r1; r++) tile(q + r * k, step + r, k, we + c * k, se + c, out + r * n + c, n, 1, 1);
        }
    }
}
