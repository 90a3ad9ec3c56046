// Quantized matrix products for x86 CPUs with AVX2: the decode-time kernels of tokenloom.
//
// Weights stay in blocks of 32 along the input, as GGUF's Q4_1 and Q8_0 store them; each row of
// activations is quantized to int8 in the same blocks (one scale per block), and a block's dot
// product is done in integers (pairs of uint8 x int8 products summed into int32), then scaled.
// That reads 4.5-5 bits per weight and does ~5 vector instructions per 32 weights and row,
// where PyTorch's int4 kernel on AVX2 expands every weight to float.
//
// A row's result never depends on the other rows: every row goes through the same instructions
// in the same order whatever the row count (and whichever thread takes it), so a request gets
// the same numbers alone or in a batch.
//
// Built by tokenloom/kernels/__init__.py with the system's C++ compiler and called through
// ctypes; only plain pointers cross, no PyTorch headers (a build takes ~2 s, not ~60).

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

namespace {

constexpr int QK = 32;  // weights and activations per block

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// One row of K floats -> K int8 codes, a scale and the scaled sum of the codes per block.
void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / QK; b++) {
        const float* v = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
        __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float scale = amax / 127.0f;
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, inv), r));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, inv), r));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, inv), r));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, inv), r));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        // pack int32 -> int16 -> int8; packs works per 128-bit lane, the permute restores order
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)(q + b * QK), p);
        d[b] = scale;
        s[b] = scale * (float)_mm_cvtsi128_si32(s4);
    }
}

struct Rows {  // activations quantized per block: codes (M, K); scales and sums (K / 32, M)
    int64_t M;
    int8_t* q;
    float* d;
    float* s;
    explicit Rows(const float* x, int64_t M_, int64_t K) : M(M_) {
        const int64_t nb = K / QK;
        q = (int8_t*)aligned_alloc(64, ((M * K + 63) / 64) * 64);
        d = (float*)malloc(sizeof(float) * M * nb + 64);
        s = (float*)malloc(sizeof(float) * M * nb + 64);
        float* dr = (float*)malloc(sizeof(float) * nb * 2);
        for (int64_t r = 0; r < M; r++) {
            quantize_row(x + r * K, K, q + r * K, dr, dr + nb);
            // block-major, so that a block's scales for 4 consecutive rows are one load
            for (int64_t b = 0; b < nb; b++) { d[b * M + r] = dr[b]; s[b * M + r] = dr[nb + b]; }
        }
        free(dr);
    }
    ~Rows() { free(q); free(d); free(s); }
};

// 16 bytes of a Q4_1 block -> 32 unsigned codes: low nibbles are weights 0-15, high ones 16-31
inline __m256i unpack_nibbles(const uint8_t* p) {
    const __m128i t = _mm_loadu_si128((const __m128i*)p);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

inline __m256 block_dot_u8(__m256i w, const int8_t* x) {  // sum of w * x over 32, as 8 floats
    const __m256i p = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i*)x));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

inline __m256 block_dot_s8(__m256i w, const int8_t* x) {
    // maddubs needs one unsigned side: |x| times w with x's sign
    const __m256i xv = _mm256_loadu_si256((const __m256i*)x);
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(w, xv));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

constexpr int TILE = 4;  // rows of activations per pass over a weight row (accumulators in registers)

// Per row and block, acc += float(int dot) * (wd * xd) (one fused multiply-add), and for Q4_1
// mins += wm * xs (a multiply, then an add). Tiles of 4 rows do the scale products for the 4
// rows in one 128-bit operation, single rows in scalar ones: the same roundings either way, so
// a row gets the same bits in either (the tests check this).
inline __m256 lane(__m128 v, int r) {
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_set1_epi32(r));
}

// y (M, N) = x (M, K) times the Q4_1 weights (N, K): codes `qs` (N, K / 2), fp16 (scale, min)
// pairs `dm` (N, K / 32, 2), so that a weight is scale * code + min.
inline void q4_tile4(const Rows& a, int64_t r0, int64_t K, const uint8_t* qs, const uint16_t* dm, float* y, int64_t N, int64_t n) {
    const int64_t nb = K / QK;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    __m128 mins = _mm_setzero_ps();
    const int8_t* x = a.q + r0 * K;
    for (int64_t b = 0; b < nb; b++) {
        const __m256i w = unpack_nibbles(qs + (n * nb + b) * (QK / 2));
        const __m128 wdm = _mm_cvtph_ps(_mm_cvtsi32_si128(*(const int32_t*)(dm + 2 * (n * nb + b))));
        const __m128 sc = _mm_mul_ps(_mm_shuffle_ps(wdm, wdm, 0), _mm_loadu_ps(a.d + b * a.M + r0));
        mins = _mm_add_ps(mins, _mm_mul_ps(_mm_shuffle_ps(wdm, wdm, 0x55), _mm_loadu_ps(a.s + b * a.M + r0)));
        acc0 = _mm256_fmadd_ps(block_dot_u8(w, x + b * QK), lane(sc, 0), acc0);
        acc1 = _mm256_fmadd_ps(block_dot_u8(w, x + K + b * QK), lane(sc, 1), acc1);
        acc2 = _mm256_fmadd_ps(block_dot_u8(w, x + 2 * K + b * QK), lane(sc, 2), acc2);
        acc3 = _mm256_fmadd_ps(block_dot_u8(w, x + 3 * K + b * QK), lane(sc, 3), acc3);
    }
    float m[4];
    _mm_storeu_ps(m, mins);
    y[r0 * N + n] = hsum(acc0) + m[0];
    y[(r0 + 1) * N + n] = hsum(acc1) + m[1];
    y[(r0 + 2) * N + n] = hsum(acc2) + m[2];
    y[(r0 + 3) * N + n] = hsum(acc3) + m[3];
}

inline void q4_tile1(const Rows& a, int64_t r0, int64_t K, const uint8_t* qs, const uint16_t* dm, float* y, int64_t N, int64_t n) {
    const int64_t nb = K / QK;
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    const int8_t* x = a.q + r0 * K;
    for (int64_t b = 0; b < nb; b++) {
        const __m256i w = unpack_nibbles(qs + (n * nb + b) * (QK / 2));
        const __m128 wdm = _mm_cvtph_ps(_mm_cvtsi32_si128(*(const int32_t*)(dm + 2 * (n * nb + b))));
        const float sc = _mm_cvtss_f32(wdm) * a.d[b * a.M + r0];
        mins = mins + _mm_cvtss_f32(_mm_shuffle_ps(wdm, wdm, 0x55)) * a.s[b * a.M + r0];
        acc = _mm256_fmadd_ps(block_dot_u8(w, x + b * QK), _mm256_set1_ps(sc), acc);
    }
    y[r0 * N + n] = hsum(acc) + mins;
}

// y (M, N) = x (M, K) times the Q8_0 weights (N, K): codes `qs` (N, K), fp16 scales `d` (N, K / 32).
inline void q8_tile4(const Rows& a, int64_t r0, int64_t K, const int8_t* qs, const uint16_t* d, float* y, int64_t N, int64_t n) {
    const int64_t nb = K / QK;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    const int8_t* x = a.q + r0 * K;
    for (int64_t b = 0; b < nb; b++) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)(qs + (n * nb + b) * QK));
        const __m128 sc = _mm_mul_ps(_mm_set1_ps(half_to_float(d[n * nb + b])), _mm_loadu_ps(a.d + b * a.M + r0));
        acc0 = _mm256_fmadd_ps(block_dot_s8(w, x + b * QK), lane(sc, 0), acc0);
        acc1 = _mm256_fmadd_ps(block_dot_s8(w, x + K + b * QK), lane(sc, 1), acc1);
        acc2 = _mm256_fmadd_ps(block_dot_s8(w, x + 2 * K + b * QK), lane(sc, 2), acc2);
        acc3 = _mm256_fmadd_ps(block_dot_s8(w, x + 3 * K + b * QK), lane(sc, 3), acc3);
    }
    y[r0 * N + n] = hsum(acc0);
    y[(r0 + 1) * N + n] = hsum(acc1);
    y[(r0 + 2) * N + n] = hsum(acc2);
    y[(r0 + 3) * N + n] = hsum(acc3);
}

inline void q8_tile1(const Rows& a, int64_t r0, int64_t K, const int8_t* qs, const uint16_t* d, float* y, int64_t N, int64_t n) {
    const int64_t nb = K / QK;
    __m256 acc = _mm256_setzero_ps();
    const int8_t* x = a.q + r0 * K;
    for (int64_t b = 0; b < nb; b++) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)(qs + (n * nb + b) * QK));
        const float sc = half_to_float(d[n * nb + b]) * a.d[b * a.M + r0];
        acc = _mm256_fmadd_ps(block_dot_s8(w, x + b * QK), _mm256_set1_ps(sc), acc);
    }
    y[r0 * N + n] = hsum(acc);
}

template <typename W, typename S, void (*T4)(const Rows&, int64_t, int64_t, const W*, const S*, float*, int64_t, int64_t),
          void (*T1)(const Rows&, int64_t, int64_t, const W*, const S*, float*, int64_t, int64_t)>
void gemm(const float* x, int64_t M, int64_t K, const W* qs, const S* sc, int64_t N, float* y, int threads) {
    const Rows a(x, M, K);
    // output channels split between threads; every thread runs all rows of its channels. The
    // thread count is passed in: OpenMP's is per calling thread, and PyTorch's may differ.
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        int64_t r = 0;
        for (; r + TILE <= M; r += TILE) T4(a, r, K, qs, sc, y, N, n);
        for (; r < M; r++) T1(a, r, K, qs, sc, y, N, n);
    }
}

}  // namespace

extern "C" {

int tl_abi_version() { return 1; }

void tl_q4_gemm(const float* x, int64_t M, int64_t K, const uint8_t* qs, const uint16_t* dm, int64_t N, float* y, int threads) {
    gemm<uint8_t, uint16_t, q4_tile4, q4_tile1>(x, M, K, qs, dm, N, y, threads);
}

void tl_q8_gemm(const float* x, int64_t M, int64_t K, const int8_t* qs, const uint16_t* d, int64_t N, float* y, int threads) {
    gemm<int8_t, uint16_t, q8_tile4, q8_tile1>(x, M, K, qs, d, N, y, threads);
}

}
