// tokenloom's CPU kernels for x86 with AVX2:
// - tl_q4_gemm / tl_q8_gemm: products with quantized weights (below);
// - tl_q8_argmax: the argmax of each row's products (a greedy step's head);
// - tl_f32_gemm: float32 products whose rows do not depend on the row count;
// - tl_rope_attention: rotary, the KV-cache write and attention for a step's tokens;
// - tl_llama_block: a whole Llama-style block (norms, products, attention, SwiGLU) in one call;
// - tl_llama_layers: every block of a step in one call.
//
// Weights stay in blocks of 32 along the input, as GGUF's Q4_1 and Q8_0 store them; each row of
// activations is quantized to int8 in the same blocks (one scale per block), and a block's dot
// product is done in integers (pairs of uint8 x int8 products summed into int32), then scaled.
// That reads 4.5-5 bits per weight, where PyTorch's int4 kernel on AVX2 expands every weight to
// float; and without VNNI, maddubs does 32 multiply-adds per instruction, float FMA only 8.
//
// A row's result never depends on the other rows: every row goes through the same instructions
// in the same order whatever the row count (and whichever thread takes it), so a request gets
// the same numbers alone or in a batch.
//
// Built by tokenloom/kernels/__init__.py with the system's C++ compiler and called through
// ctypes; only plain pointers cross, no PyTorch headers (a build takes ~2 s, not ~60).

#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

// Built with AVX-512 VNNI (kernels/__init__.py adds the flags where the CPU has it), a block's
// dot products take one instruction per 4 multiply-adds per lane, and from PAIRED_ROWS rows on
// the products take rows two at a time (pairs_group below); their numbers are the AVX2 build's,
// bit for bit.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TL_VNNI 1
#else
#define TL_VNNI 0
#endif

namespace {

constexpr int QK = 32;  // weights and activations per block

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// e^x for 8 floats (Cephes' polynomial, within ~2 ulp of expf; 0 below -88.4, not denormals)
inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-88.3762626647949f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), lo);
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(n)));
}

// How a product's activation codes are laid out (Rows): one row after another in each block, or
// (VNNI, from PAIRED_ROWS rows) two rows' codes alternating 4 by 4 through 64 bytes, the extra
// row of an odd count all zeros; OFFSET: as unsigned bytes, code + 128 (pairs_group's Q8_0).
enum Layout { PLAIN, PAIRED, OFFSET };

inline void store_codes(int8_t* dst, __m256i codes, Layout layout, int half) {
#if TL_VNNI
    if (layout != PLAIN) {
        const __m512i spread = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        if (layout == OFFSET) codes = _mm256_xor_si256(codes, _mm256_set1_epi8((char)0x80));
        _mm512_mask_storeu_epi32(dst, half ? 0xAAAA : 0x5555, _mm512_permutexvar_epi32(spread, _mm512_castsi256_si512(codes)));
        return;
    }
#endif
    (void)layout, (void)half;
    _mm256_storeu_si256((__m256i*)dst, codes);
}

// One row of K floats -> K int8 codes, a scale and the scaled sum of the codes per block.
void quantize_row(const float* x, int64_t K, int8_t* q, int64_t qstride, float* d, float* s, Layout layout, int half) {
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
        store_codes(q + b * qstride, p, layout, half);
        // kept at fp16 precision, as GGUF's Q8_0 / Q8_1 blocks store them (and llama.cpp uses them)
        d[b] = _cvtsh_ss(_cvtss_sh(scale, 0));
        s[b] = _cvtsh_ss(_cvtss_sh(scale * (float)_mm_cvtsi128_si32(s4), 0));
        // a NaN would become a finite code (max_ps may drop it): the block's scale carries it
        // instead, so that the row's products are NaN, as float arithmetic would make them
        const __m256 nan = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(v0, v0, _CMP_UNORD_Q), _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q)),
                                        _mm256_or_ps(_mm256_cmp_ps(v2, v2, _CMP_UNORD_Q), _mm256_cmp_ps(v3, v3, _CMP_UNORD_Q)));
        if (_mm256_movemask_ps(nan)) d[b] = s[b] = NAN;
    }
}

// Activations quantized per block, block-major: codes (K / 32, S, 32), scales and sums (K / 32, S),
// S = M rows, or M rounded up to a pair (PAIRED, OFFSET; the extra row's scales 0). A product's
// row loop then reads a block's codes for consecutive rows from one run of memory (row-major,
// they were K bytes apart: 30 layers' products at 32 / 512 rows took 47 / 630 ms, block-major
// 37 / 516, A/B in one session).
struct Rows {
    int64_t M, S;
    Layout layout;
    int8_t* q;
    float* d;
    float* s;
    Rows(const float* x, int64_t M_, int64_t K, int threads, Layout layout_)
        : M(M_), S(layout_ == PLAIN ? M_ : (M_ + 1) / 2 * 2), layout(layout_) {
        const int64_t nb = K / QK;
        q = (int8_t*)aligned_alloc(64, ((S * K + 63) / 64) * 64);
        d = (float*)calloc(S * nb + 16, sizeof(float));
        s = (float*)calloc(S * nb + 16, sizeof(float));
        if (S != M) memset(q, 0, S * K);
        // block-major scales: a block's scales for consecutive rows lie together
#pragma omp parallel num_threads(M > 1 ? threads : 1)
        {
            float* dr = (float*)malloc(sizeof(float) * nb * 2);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < M; r++) {
                const int64_t at = layout == PLAIN ? r : r / 2 * 2;  // a pair's codes start at its first row
                quantize_row(x + r * K, K, q + at * QK, S * QK, dr, dr + nb, layout, (int)(r % 2));
                for (int64_t b = 0; b < nb; b++) { d[b * S + r] = dr[b]; s[b * S + r] = dr[nb + b]; }
            }
            free(dr);
        }
    }
    ~Rows() { free(q); free(d); free(s); }
};

// Where a group's 8 outputs for row j go: into y (a product), or into the row's running argmax
// (Argmax below: a greedy step's head, which then never writes its (rows, vocabulary) logits).
struct Store {
    float* y;
    int64_t N;
    void operator()(int64_t j, int64_t g, __m256 v) const { _mm256_storeu_ps(y + j * N + g * 8, v); }
};

// Per row: the best value seen in each of 8 lanes and its channel, and whether a NaN was seen.
// Groups come in increasing order and only a strictly greater value replaces a lane's, so each
// lane keeps the first of equal values; merge() then takes the lowest channel among the lanes'
// best: the first maximum, as torch.argmax.
struct Argmax {
    __m256* best;
    __m256i* idx;
    __m256* nan;
    explicit Argmax(int64_t M) {
        best = (__m256*)aligned_alloc(32, sizeof(__m256) * M);
        idx = (__m256i*)aligned_alloc(32, sizeof(__m256i) * M);
        nan = (__m256*)aligned_alloc(32, sizeof(__m256) * M);
        for (int64_t j = 0; j < M; j++) {
            best[j] = _mm256_set1_ps(-INFINITY);
            idx[j] = _mm256_setzero_si256();
            nan[j] = _mm256_setzero_ps();
        }
    }
    ~Argmax() { free(best); free(idx); free(nan); }
    void operator()(int64_t j, int64_t g, __m256 v) {
        const __m256 gt = _mm256_cmp_ps(v, best[j], _CMP_GT_OQ);
        best[j] = _mm256_blendv_ps(best[j], v, gt);
        const __m256i ch = _mm256_add_epi32(_mm256_set1_epi32((int)(g * 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        idx[j] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(idx[j]), _mm256_castsi256_ps(ch), gt));
        nan[j] = _mm256_or_ps(nan[j], _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    // row j's lanes folded into a (value, channel) running over threads, and its NaN flag
    void merge(int64_t j, float& value, int64_t& channel, uint8_t& has_nan) const {
        alignas(32) float b[8];
        alignas(32) int32_t c[8];
        _mm256_store_ps(b, best[j]);
        _mm256_store_si256((__m256i*)c, idx[j]);
        for (int l = 0; l < 8; l++)
            if (b[l] > value || (b[l] == value && c[l] < channel)) {
                value = b[l];
                channel = c[l];
            }
        if (_mm256_movemask_ps(nan[j])) has_nan = 1;
    }
};

// Q4_1 weights, repacked by groups of 8 output channels so that one 256-bit register holds 4
// consecutive weights of each of the 8 (models/quant.py, q4_repack). For group g and block b
// (32 inputs): 128 bytes of codes, then 16 fp16 (the 8 channels' scales, then their mins).
// Byte 4r + t of chunk i (32 bytes) holds channel r's code for input 8i + t in its low nibble
// and for input 8i + 4 + t in its high one.
//
// Per row of activations, 4 of its int8 codes are broadcast against such a register (AVX2): maddubs
// gives, per channel, two sums of two products; 8 of those (the block's 32 inputs) add up in
// int16 (at most 8 * 2 * 15 * 127 = 30480: no overflow), one madd gives the 8 channels' block
// dot products in int32, and one fused multiply-add scales them. ~20 instructions per 256
// multiply-adds, against ~48 with one channel per register (and a horizontal sum per channel):
// 1.5x faster at one row, 2-2.8x from 8 rows up (benchmarks/bench_kernels.py), and faster than
// float32 GEMM at 512 rows. Per channel and row the arithmetic is the same whatever the row
// count: the integer sums are exact, then acc = fma(dot, w_scale * x_scale, acc), then
// acc = fma(w_min, x_sum, acc), block after block.
constexpr int Q4_GROUP_BYTES = 128;
constexpr int ROW_TILE = 64;  // rows of activations per pass over a group's weights
// blocks fetched ahead: a group's weights are read once per product, and the hardware prefetcher
// alone left 30 layers at 1 / 8 / 32 rows at 6.5 / 12.6 / 39.6 ms, against 5.5 / 10.9 / 33.5
constexpr int PREFETCH = 32;

// Q8_0 weights, repacked the same way (models/quant.py, q8_repack): for group g and block b,
// 256 bytes of signed codes, chunk c (32 bytes) holding at byte 4r + t channel r's code for
// input 4c + t, then the 8 channels' fp16 scales. maddubs needs one unsigned side, so the
// weights' magnitudes meet the activations carrying the weights' signs; a pair of such
// products can reach 2 * 128 * 127, so each chunk's pair sums widen to int32 (madd) before
// they add up. ~35 instructions per 256 multiply-adds, against ~64 one channel at a time.
constexpr int Q8_GROUP_BYTES = 256;

#if TL_VNNI
// From PAIRED_ROWS rows, with AVX-512 VNNI: vpdpbusd adds, per 32-bit lane, 4 products of
// unsigned with signed bytes to an int32, one instruction for a 512-bit register's 64
// multiply-adds. Rows come two at a time (the PAIRED / OFFSET layouts): a weight register holds
// each of the group's 8 channels' 4 weights twice (lanes 2r and 2r + 1) and meets one 64-bit
// broadcast holding 4 codes of each row, so lane 2r + h adds up channel r for row h of the pair
// and every multiply-add is useful. Q4_1's codes (0..15) are the unsigned side; Q8_0's are
// signed, so there the activations come offset by 128 and a block's sums start from -128 x the
// sum of each channel's weights. Either way the sums are exact, the AVX2 build's integers, and
// from there each lane does what q4_plain / q8_plain do for its (row, channel), in the same
// order: the same floats. 12 vector instructions for 2 rows x 256 multiply-adds, where q4_plain
// takes ~20 for 1 (AVX2) or ~13 (VNNI): 30 layers at 512 rows 1.2x, the Q8_0 head at 32 rows
// 1.7x faster than AVX2 (benchmarks/bench_kernels.py).
inline __m512i dup_lanes(__m256i v) {
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), _mm512_castsi256_si512(v));
}

inline __m512 dup_lanes(__m256 v) { return _mm512_castsi512_ps(dup_lanes(_mm256_castps_si256(v))); }

inline __m512i pair_codes(const int8_t* x) {  // 4 codes of each row of a pair, in every 64-bit lane
    int64_t v;
    memcpy(&v, x, 8);
    return _mm512_set1_epi64(v);
}

inline __m512 pair_floats(const float* x) {  // (x[0], x[1]) in every 64-bit lane
    double v;
    memcpy(&v, x, 8);
    return _mm512_castpd_ps(_mm512_set1_pd(v));
}

template <bool Q4, class Out>
void pairs_group(const Rows& a, int64_t K, const uint8_t* qs, const uint16_t* sc, int64_t g, Out& out) {
    const int64_t nb = K / QK, S = a.S, P = S / 2;
    alignas(64) float acc[ROW_TILE * 8];
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t p0 = 0; p0 < P; p0 += ROW_TILE / 2) {
        const int64_t p1 = p0 + ROW_TILE / 2 < P ? p0 + ROW_TILE / 2 : P;
        for (int64_t i = 0; i < (p1 - p0) * 16; i++) acc[i] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            __m512i w[8], start = _mm512_setzero_si512();
            __m512 wd, wm = _mm512_setzero_ps();
            if constexpr (Q4) {
                const uint8_t* q = qs + (g * nb + b) * Q4_GROUP_BYTES;
                const uint16_t* s = sc + (g * nb + b) * 16;
                _mm_prefetch((const char*)(q + PREFETCH * Q4_GROUP_BYTES), _MM_HINT_T0);
                _mm_prefetch((const char*)(q + PREFETCH * Q4_GROUP_BYTES + 64), _MM_HINT_T0);
                _mm_prefetch((const char*)(s + PREFETCH * 16), _MM_HINT_T0);
                for (int i = 0; i < 4; i++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(q + 32 * i));
                    w[2 * i] = dup_lanes(_mm256_and_si256(v, low));
                    w[2 * i + 1] = dup_lanes(_mm256_and_si256(_mm256_srli_epi16(v, 4), low));
                }
                wd = dup_lanes(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)s)));
                wm = dup_lanes(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + 8))));
            } else {
                const uint8_t* q = qs + (g * nb + b) * Q8_GROUP_BYTES;
                for (int l = 0; l < 4; l++) _mm_prefetch((const char*)(q + PREFETCH * Q8_GROUP_BYTES / 2 + 64 * l), _MM_HINT_T0);
                for (int c = 0; c < 8; c++) w[c] = dup_lanes(_mm256_loadu_si256((const __m256i*)(q + 32 * c)));
                wd = dup_lanes(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sc + (g * nb + b) * 8))));
                for (int c = 0; c < 8; c++) start = _mm512_dpbusd_epi32(start, _mm512_set1_epi8((char)0x80), w[c]);
                start = _mm512_sub_epi32(_mm512_setzero_si512(), start);
            }
            // the unsigned side first; two chains of 4, so that consecutive pairs' chains overlap
            auto dp = [&](__m512i sum, int c, const int8_t* x) {
                return Q4 ? _mm512_dpbusd_epi32(sum, w[c], pair_codes(x)) : _mm512_dpbusd_epi32(sum, pair_codes(x), w[c]);
            };
            for (int64_t p = p0; p < p1; p++) {
                const int8_t* x = a.q + (b * S + 2 * p) * QK;
                __m512i s0 = dp(start, 0, x), s1 = dp(_mm512_setzero_si512(), 1, x + 8);
                for (int c = 2; c < 8; c += 2) {
                    s0 = dp(s0, c, x + 8 * c);
                    s1 = dp(s1, c + 1, x + 8 * c + 8);
                }
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                float* o = acc + (p - p0) * 16;
                __m512 t = _mm512_fmadd_ps(dot, _mm512_mul_ps(wd, pair_floats(a.d + b * S + 2 * p)), _mm512_load_ps(o));
                if constexpr (Q4) t = _mm512_fmadd_ps(wm, pair_floats(a.s + b * S + 2 * p), t);
                _mm512_store_ps(o, t);
            }
        }
        const __m512i rows = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        for (int64_t p = p0; p < p1; p++) {
            const __m512 v = _mm512_permutexvar_ps(rows, _mm512_load_ps(acc + (p - p0) * 16));
            out(2 * p, g, _mm512_castps512_ps256(v));
            if (2 * p + 1 < a.M) out(2 * p + 1, g, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        }
    }
}
#endif  // TL_VNNI

inline __m256i bcast4(const int8_t* x) {  // 4 codes in every 32-bit lane
    int32_t v;
    memcpy(&v, x, 4);
    return _mm256_set1_epi32(v);
}

// A block's 8 dot products with one row (the PLAIN layout): Q4_1 codes w[8] (unsigned) ...
inline __m256i q4_dots(const __m256i* w, const int8_t* x) {
#if TL_VNNI
    // 4 chains of 2: at one row a chain of 8 (5 cycles each) made the layers 1.3x slower than AVX2
    __m256i sum[4];
    for (int c = 0; c < 4; c++) sum[c] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[c], bcast4(x + 4 * c));
    for (int c = 4; c < 8; c++) sum[c - 4] = _mm256_dpbusd_epi32(sum[c - 4], w[c], bcast4(x + 4 * c));
    return _mm256_add_epi32(_mm256_add_epi32(sum[0], sum[1]), _mm256_add_epi32(sum[2], sum[3]));
#else
    __m256i p = _mm256_maddubs_epi16(w[0], bcast4(x));
    for (int c = 1; c < 8; c++) p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w[c], bcast4(x + 4 * c)));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

// ... or Q8_0 codes w[8] and their magnitudes mag[8] (the unsigned side, the activations taking
// the weights' signs)
inline __m256i q8_dots(const __m256i* w, const __m256i* mag, const int8_t* x) {
#if TL_VNNI
    __m256i sum[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int c = 0; c < 8; c++) sum[c % 4] = _mm256_dpbusd_epi32(sum[c % 4], mag[c], _mm256_sign_epi8(bcast4(x + 4 * c), w[c]));
    return _mm256_add_epi32(_mm256_add_epi32(sum[0], sum[1]), _mm256_add_epi32(sum[2], sum[3]));
#else
    __m256i sum = _mm256_setzero_si256();
    for (int c = 0; c < 8; c++) {
        const __m256i xs = _mm256_sign_epi8(bcast4(x + 4 * c), w[c]);
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(mag[c], xs), _mm256_set1_epi16(1)));
    }
    return sum;
#endif
}

template <class Out>
void q4_plain(const Rows& a, int64_t K, const uint8_t* qs, const uint16_t* dm, int64_t g, Out& out) {
    const int64_t nb = K / QK, M = a.M;
    alignas(32) float acc[ROW_TILE * 8];
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t j0 = 0; j0 < M; j0 += ROW_TILE) {
        const int64_t j1 = j0 + ROW_TILE < M ? j0 + ROW_TILE : M;
        for (int64_t i = 0; i < (j1 - j0) * 8; i++) acc[i] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t* q = qs + (g * nb + b) * Q4_GROUP_BYTES;
            const uint16_t* s = dm + (g * nb + b) * 16;
            _mm_prefetch((const char*)(q + PREFETCH * Q4_GROUP_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char*)(q + PREFETCH * Q4_GROUP_BYTES + 64), _MM_HINT_T0);
            _mm_prefetch((const char*)(s + PREFETCH * 16), _MM_HINT_T0);
            __m256i w[8];
            for (int i = 0; i < 4; i++) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(q + 32 * i));
                w[2 * i] = _mm256_and_si256(v, low);
                w[2 * i + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            }
            const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)s));
            const __m256 wm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + 8)));
            for (int64_t j = j0; j < j1; j++) {
                const __m256 dot = _mm256_cvtepi32_ps(q4_dots(w, a.q + (b * M + j) * QK));
                float* o = acc + (j - j0) * 8;
                const __m256 t = _mm256_fmadd_ps(dot, _mm256_mul_ps(wd, _mm256_set1_ps(a.d[b * M + j])), _mm256_load_ps(o));
                _mm256_store_ps(o, _mm256_fmadd_ps(wm, _mm256_set1_ps(a.s[b * M + j]), t));
            }
        }
        for (int64_t j = j0; j < j1; j++) out(j, g, _mm256_load_ps(acc + (j - j0) * 8));
    }
}

template <class Out>
void q8_plain(const Rows& a, int64_t K, const int8_t* qs, const uint16_t* dq, int64_t g, Out& out) {
    const int64_t nb = K / QK, M = a.M;
    alignas(32) float acc[ROW_TILE * 8];
    for (int64_t j0 = 0; j0 < M; j0 += ROW_TILE) {
        const int64_t j1 = j0 + ROW_TILE < M ? j0 + ROW_TILE : M;
        for (int64_t i = 0; i < (j1 - j0) * 8; i++) acc[i] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const int8_t* q = qs + (g * nb + b) * Q8_GROUP_BYTES;
            // 4 KB ahead, as q4_plain: the head at one row 1.58 -> 1.15 ms (A/B, median of 12)
            for (int l = 0; l < 4; l++) _mm_prefetch((const char*)(q + PREFETCH * Q8_GROUP_BYTES / 2 + 64 * l), _MM_HINT_T0);
            __m256i w[8], mag[8];
            for (int c = 0; c < 8; c++) {
                w[c] = _mm256_loadu_si256((const __m256i*)(q + 32 * c));
                mag[c] = _mm256_abs_epi8(w[c]);
            }
            const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dq + (g * nb + b) * 8)));
            for (int64_t j = j0; j < j1; j++) {
                const __m256 dot = _mm256_cvtepi32_ps(q8_dots(w, mag, a.q + (b * M + j) * QK));
                float* o = acc + (j - j0) * 8;
                _mm256_store_ps(o, _mm256_fmadd_ps(dot, _mm256_mul_ps(wd, _mm256_set1_ps(a.d[b * M + j])), _mm256_load_ps(o)));
            }
        }
        for (int64_t j = j0; j < j1; j++) out(j, g, _mm256_load_ps(acc + (j - j0) * 8));
    }
}

// With VNNI, from PAIRED_ROWS rows the products take rows two at a time (pairs_group). At one
// row, half of a pair's lanes would be wasted: 30 layers took 3.4 ms paired, 2.9 plain; at two
// rows 2.9 paired, 3.1 plain (the Q8_0 head 0.76 / 0.93 ms); A/B, median of 7.
constexpr int64_t PAIRED_ROWS = 2;

inline Layout layout_for(int64_t M, bool q8) {
    return TL_VNNI && M >= PAIRED_ROWS ? (q8 ? OFFSET : PAIRED) : PLAIN;
}

template <class Out>
void q4_group(const Rows& a, int64_t K, const uint8_t* qs, const uint16_t* dm, int64_t g, Out& out) {
#if TL_VNNI
    if (a.layout != PLAIN) return pairs_group<true>(a, K, qs, dm, g, out);
#endif
    q4_plain(a, K, qs, dm, g, out);
}

template <class Out>
void q8_group(const Rows& a, int64_t K, const int8_t* qs, const uint16_t* dq, int64_t g, Out& out) {
#if TL_VNNI
    if (a.layout != PLAIN) return pairs_group<false>(a, K, (const uint8_t*)qs, dq, g, out);
#endif
    q8_plain(a, K, qs, dq, g, out);
}

inline float dot(const float* a, const float* b, int64_t n) {  // n a multiple of 8
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum(acc);
}

// out[h][0, 8 NV) = sum over allowed columns s of p[h][s] * V[s][0, 8 NV), for N heads
template <int N, int NV>
inline void values(const float* p, int64_t stride, const float* V, const uint8_t* m, int64_t hi, bool dense,
                   int64_t d, float* out) {
    __m256 acc[N][NV];
    for (int h = 0; h < N; h++)
        for (int v = 0; v < NV; v++) acc[h][v] = _mm256_setzero_ps();
    for (int64_t s = 0; s < hi; s++) {
        if (!dense && !m[s]) continue;  // never read: a masked column may hold anything
        __m256 w[N];
        for (int h = 0; h < N; h++) w[h] = _mm256_set1_ps(p[h * stride + s]);
        for (int v = 0; v < NV; v++) {
            const __m256 vv = _mm256_loadu_ps(V + s * d + 8 * v);
            for (int h = 0; h < N; h++) acc[h][v] = _mm256_fmadd_ps(w[h], vv, acc[h][v]);
        }
    }
    for (int h = 0; h < N; h++)
        for (int v = 0; v < NV; v++) _mm256_storeu_ps(out + h * d + 8 * v, acc[h][v]);
}

// Attention of N query heads (q: N x d, rotated) over keys / values K, V (columns x d) where
// mask m allows, columns [0, hi) (none after; `dense`: all of them, as in a causal prompt
// chunk); p: N rows of `stride` scratch floats; out: N x d.
// Scores for 4 keys at a time against all N heads: 4N accumulators over the dimensions, each
// key load serving N heads, and one reduction tree per head for the 4 keys (no horizontal sum
// per key); then softmax (exp8); then values 32 dimensions at a time into 4N accumulators.
constexpr int HEADS = 3;

template <int N>
void heads_attend(const float* q, const float* K, const float* V, const uint8_t* m, int64_t hi, bool dense,
                  int64_t d, float scale, float* p, int64_t stride, float* out) {
    float mx[N];
    __m128 vmx[N];
    for (int h = 0; h < N; h++) vmx[h] = _mm_set1_ps(-INFINITY);
    int64_t s4 = 0;
    for (; s4 + 4 <= hi; s4 += 4) {
        __m256 a[N][4];
        for (int h = 0; h < N; h++)
            for (int k = 0; k < 4; k++) a[h][k] = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8) {
            __m256 qv[N];
            for (int h = 0; h < N; h++) qv[h] = _mm256_loadu_ps(q + h * d + i);
            for (int k = 0; k < 4; k++) {
                const __m256 kv = _mm256_loadu_ps(K + (s4 + k) * d + i);
                for (int h = 0; h < N; h++) a[h][k] = _mm256_fmadd_ps(qv[h], kv, a[h][k]);
            }
        }
        // masked keys' scores become -inf (4 mask bytes widened to a lane mask)
        const __m128 off = _mm_castsi128_ps(_mm_cmpeq_epi32(
            _mm_cvtepu8_epi32(_mm_cvtsi32_si128(*(const int32_t*)(m + s4))), _mm_setzero_si128()));
        for (int h = 0; h < N; h++) {
            const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[h][0], a[h][1]), _mm256_hadd_ps(a[h][2], a[h][3]));
            __m128 sc = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)), _mm_set1_ps(scale));
            sc = _mm_blendv_ps(sc, _mm_set1_ps(-INFINITY), off);
            _mm_storeu_ps(p + h * stride + s4, sc);
            vmx[h] = _mm_max_ps(vmx[h], sc);
        }
    }
    for (int h = 0; h < N; h++) {
        __m128 t = _mm_max_ps(vmx[h], _mm_movehl_ps(vmx[h], vmx[h]));
        mx[h] = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
    }
    for (int64_t s = s4; s < hi; s++)
        for (int h = 0; h < N; h++) {
            const float x = m[s] ? dot(q + h * d, K + s * d, d) * scale : -INFINITY;
            p[h * stride + s] = x;
            mx[h] = x > mx[h] ? x : mx[h];
        }
    for (int h = 0; h < N; h++) {  // softmax; masked scores are -inf, and exp8 gives them exactly 0
        float* ph = p + h * stride;
        const __m256 vmx = _mm256_set1_ps(mx[h]);
        __m256 vsum = _mm256_setzero_ps();
        int64_t s8 = 0;
        for (; s8 + 8 <= hi; s8 += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(ph + s8), vmx));
            _mm256_storeu_ps(ph + s8, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum(vsum);
        for (int64_t s = s8; s < hi; s++) {
            ph[s] = m[s] ? expf(ph[s] - mx[h]) : 0.0f;
            sum += ph[s];
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (s8 = 0; s8 + 8 <= hi; s8 += 8) _mm256_storeu_ps(ph + s8, _mm256_mul_ps(_mm256_loadu_ps(ph + s8), inv));
        for (int64_t s = s8; s < hi; s++) ph[s] *= 1.0f / sum;
    }
    for (int64_t i0 = 0; i0 < d; i0 += 32) {  // d is a multiple of 8
        if (d - i0 >= 32) values<N, 4>(p, stride, V + i0, m, hi, dense, d, out + i0);
        else if (d - i0 == 24) values<N, 3>(p, stride, V + i0, m, hi, dense, d, out + i0);
        else if (d - i0 == 16) values<N, 2>(p, stride, V + i0, m, hi, dense, d, out + i0);
        else values<N, 1>(p, stride, V + i0, m, hi, dense, d, out + i0);
    }
}

// x * cos + roll(x, d / 2) * sin, elementwise as PyTorch does it (two products, then a sum)
inline void rotate(const float* x, const float* cos, const float* sin, int64_t d, float* out) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < d; i++) {
        const float a = x[i] * cos[i];
        const float b = x[i < h ? i + h : i - h] * sin[i];
        out[i] = a + b;
    }
}

// From this many rows a product is compute-bound and each group of 8 channels is long work, so
// groups are handed out as threads ask (a thread slowed by another process then does less of
// it); below, each thread takes one contiguous range, which the prefetcher streams best
// (dynamic at one row: 4.9 -> 7.4 ms for 30 layers' products).
constexpr int64_t DYNAMIC_ROWS = 64;

// Float32 products, (R rows) x (C output channels) at a time: each (row, channel) pair has its
// own vector accumulator that runs over the input in the same order, then is summed across
// lanes the same way, whatever R and C are: a row's numbers do not depend on the row count.
// (MKL's sgemm does not promise that: on AVX-512 it takes a small-row kernel below a row count
// that depends on the shape, 3 to 57 rows for this project's test models.) The AVX-512 build
// takes 16 lanes (the product is compute-bound from a few rows on), the AVX2 build 8.
#if TL_VNNI
using fvec = __m512;
constexpr int FL = 16;
inline fvec fzero() { return _mm512_setzero_ps(); }
inline fvec fload(const float* p) { return _mm512_loadu_ps(p); }
inline fvec ffma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
inline float fsum(fvec v) {
    return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
#else
using fvec = __m256;
constexpr int FL = 8;
inline fvec fzero() { return _mm256_setzero_ps(); }
inline fvec fload(const float* p) { return _mm256_loadu_ps(p); }
inline fvec ffma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
inline float fsum(fvec v) { return hsum(v); }
#endif

template <int R, int C>
inline void f32_tile(const float* x, int64_t K, const float* w, const float* bias, float* y, int64_t N) {
    fvec acc[R][C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = fzero();
    int64_t k = 0;
    for (; k + FL <= K; k += FL) {
        fvec wv[C];
        for (int c = 0; c < C; c++) wv[c] = fload(w + c * K + k);
        for (int r = 0; r < R; r++) {
            const fvec xv = fload(x + r * K + k);
            for (int c = 0; c < C; c++) acc[r][c] = ffma(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float s = fsum(acc[r][c]);
            for (int64_t j = k; j < K; j++) s += x[r * K + j] * w[c * K + j];
            y[r * N + c] = bias ? s + bias[c] : s;
        }
}

// 4 rows by F32_COLS channels: 4 x 4 accumulators and 4 weight vectors fit AVX-512's 32 vector
// registers; AVX2 has 16, so 3 channels there
constexpr int F32_COLS = TL_VNNI ? 4 : 3;

template <int C>
inline void f32_columns(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y, int64_t N) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) f32_tile<4, C>(x + m * K, K, w, bias, y + m * N, N);
    switch (M - m) {
        case 3: f32_tile<3, C>(x + m * K, K, w, bias, y + m * N, N); break;
        case 2: f32_tile<2, C>(x + m * K, K, w, bias, y + m * N, N); break;
        case 1: f32_tile<1, C>(x + m * K, K, w, bias, y + m * N, N); break;
    }
}

}  // namespace

extern "C" {

int tl_abi_version() { return 6; }

// y (M, N) = x (M, K) times Q4_1 weights (N, K) repacked as q4_group reads them; N a multiple of 8
void tl_q4_gemm(const float* x, int64_t M, int64_t K, const uint8_t* qs, const uint16_t* dm, int64_t N, float* y, int threads) {
    const Rows a(x, M, K, threads, layout_for(M, false));
    // groups of 8 output channels split between threads; each runs all rows of its groups. The
    // thread count is passed in: OpenMP's is per calling thread, and PyTorch's may differ
    Store out{y, N};
    if (M >= DYNAMIC_ROWS) {
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
        for (int64_t g = 0; g < N / 8; g++) q4_group(a, K, qs, dm, g, out);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < N / 8; g++) q4_group(a, K, qs, dm, g, out);
}

// y (M, N) = x (M, K) times Q8_0 weights (N, K) repacked as q8_group reads them; N a multiple of 8
void tl_q8_gemm(const float* x, int64_t M, int64_t K, const int8_t* qs, const uint16_t* d, int64_t N, float* y, int threads) {
    const Rows a(x, M, K, threads, layout_for(M, true));
    Store out{y, N};
    if (M >= DYNAMIC_ROWS) {
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
        for (int64_t g = 0; g < N / 8; g++) q8_group(a, K, qs, d, g, out);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < N / 8; g++) q8_group(a, K, qs, d, g, out);
}

// Per row of x (M, K) times Q8_0 weights (N, K) as tl_q8_gemm: the first channel of the largest
// product (idx) and that product (best; NaN if the row's products hold a NaN), without writing
// the (M, N) products: a greedy step's head at 32 rows would hold 6.3 MB of logits. The products
// are tl_q8_gemm's to the bit. Each thread keeps its own running argmax over its groups.
void tl_q8_argmax(const float* x, int64_t M, int64_t K, const int8_t* qs, const uint16_t* d, int64_t N,
                  int64_t* idx, float* best, int threads) {
    const Rows a(x, M, K, threads, layout_for(M, true));
    uint8_t* has_nan = (uint8_t*)calloc(M, 1);
    for (int64_t j = 0; j < M; j++) {
        best[j] = -INFINITY;
        idx[j] = 0;
    }
#pragma omp parallel num_threads(threads)
    {
        Argmax out(M);
#pragma omp for schedule(static)
        for (int64_t g = 0; g < N / 8; g++) q8_group(a, K, qs, d, g, out);
#pragma omp critical
        for (int64_t j = 0; j < M; j++) out.merge(j, best[j], idx[j], has_nan[j]);
    }
    for (int64_t j = 0; j < M; j++)
        if (has_nan[j]) best[j] = NAN;
    free(has_nan);
}


// y (M, N) = x (M, K) times float32 weights w (N, K) (+ bias (N) if not null), nn.Linear's
// layout; rows' numbers independent of M (f32_tile). Channels are split between threads in
// contiguous ranges; each thread runs all rows on a few channels at a time, so those channels'
// weights are read from memory once per call.
void tl_f32_gemm(const float* x, int64_t M, int64_t K, const float* w, const float* bias, int64_t N, float* y,
                 int threads) {
    constexpr int C = F32_COLS;
    const int64_t tiles = N / C;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles; t++)
        f32_columns<C>(x, M, K, w + t * C * K, bias ? bias + t * C : nullptr, y + t * C, N);
    for (int64_t n = tiles * C; n < N; n++)
        f32_columns<1>(x, M, K, w + n * K, bias ? bias + n : nullptr, y + n, N);
}

// Rotary self-attention for B tokens, each at its own cache row and column: a decode step (B
// rows, one token each: rows[b] = b) or a prompt chunk (one row, B tokens in a row). qkv
// (B, (H + 2 * Hkv) * d) as the fused projection gives it; cos / sin (B, d), sin carrying
// rotate_half's sign; caches (rows, Hkv, W, d), where token b's rotated key and value go to
// column cols[b] of row rows[b]; mask (B, mask_stride) bytes, nonzero where token b may attend
// to a column among the first `end`; out (B, H * d). Grouped-query heads: q heads
// [g * H / Hkv, (g + 1) * H / Hkv) read kv head g. Every key and value is written before any
// is read (a chunk's tokens read each other's); a (token, kv head) pair is then one task, so
// rows never share arithmetic.
void tl_rope_attention(const float* qkv, int64_t B, int64_t H, int64_t Hkv, int64_t d,
                       const float* cos, const float* sin, float* kc, float* vc, int64_t W,
                       const int64_t* rows, const int64_t* cols, int64_t end, const uint8_t* mask,
                       int64_t mask_stride, float scale, float* out, int threads) {
    const int64_t group = H / Hkv, width = (H + 2 * Hkv) * d;
#pragma omp parallel num_threads(threads)
    {
        float* q = (float*)malloc(sizeof(float) * d * HEADS);
        float* p = (float*)malloc(sizeof(float) * HEADS * (end > 0 ? end : 1));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < B * Hkv; t++) {
            const int64_t b = t / Hkv, g = t % Hkv;
            const float* row = qkv + b * width;
            float* K = kc + (rows[b] * Hkv + g) * W * d;
            float* V = vc + (rows[b] * Hkv + g) * W * d;
            rotate(row + (H + g) * d, cos + b * d, sin + b * d, d, K + cols[b] * d);
            for (int64_t i = 0; i < d; i++) V[cols[b] * d + i] = row[(H + Hkv + g) * d + i];
        }
        // kv head-major, so that both threads read the same head's keys and values (a 512-token
        // chunk's three heads hold 768 KB: more than a core's L2), tokens interleaved between the
        // threads (a chunk's later tokens see more keys)
#pragma omp for schedule(static, 1)
        for (int64_t t = 0; t < B * Hkv; t++) {
            const int64_t g = t / B, b = t % B;
            const float* K = kc + (rows[b] * Hkv + g) * W * d;
            const float* V = vc + (rows[b] * Hkv + g) * W * d;
            const uint8_t* m = mask + b * mask_stride;
            int64_t hi = end;  // keys past the last one this token may see are skipped
            while (hi > 0 && !m[hi - 1]) hi--;
            const bool dense = memchr(m, 0, hi) == nullptr;
            // the query heads sharing this kv head, up to HEADS at a time: each key and value
            // loaded serves them all
            for (int64_t j0 = g * group; j0 < (g + 1) * group; j0 += HEADS) {
                const int n = (int)((g + 1) * group - j0 < HEADS ? (g + 1) * group - j0 : HEADS);
                for (int h = 0; h < n; h++) rotate(qkv + b * width + (j0 + h) * d, cos + b * d, sin + b * d, d, q + h * d);
                if (n == 3) heads_attend<3>(q, K, V, m, hi, dense, d, scale, p, end, out + b * H * d + j0 * d);
                else if (n == 2) heads_attend<2>(q, K, V, m, hi, dense, d, scale, p, end, out + b * H * d + j0 * d);
                else heads_attend<1>(q, K, V, m, hi, dense, d, scale, p, end, out + b * H * d + j0 * d);
            }
        }
        free(q); free(p);
    }
}

}

namespace {

// Row-wise steps of a block are split between threads only for prompt chunks: at a decode
// step's few rows a parallel region costs more than it saves. A row's arithmetic is the same.
constexpr int64_t PARALLEL_ROWS = 16;

void rms_norm_rows(const float* x, int64_t B, int64_t D, const float* w, float eps, float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(B >= PARALLEL_ROWS ? threads : 1)
    for (int64_t b = 0; b < B; b++) {
        const float* v = x + b * D;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(v + i), _mm256_loadu_ps(v + i), acc);
        const float r = 1.0f / sqrtf(hsum(acc) / (float)D + eps);
        for (int64_t i = 0; i < D; i++) out[b * D + i] = v[i] * r * w[i];
    }
}

inline void add_bias(float* y, int64_t B, int64_t N, const float* bias) {
    if (!bias) return;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < N; i++) y[b * N + i] += bias[i];
}

}  // namespace

extern "C" {

// One decode step of a Llama-style block (pre-norm RMSNorm, rotary GQA attention, SwiGLU MLP)
// with every projection in Q4_1 blocks: x (B, D) is updated in place. The same products as the
// layer-by-layer path (tl_q4_gemm, tl_rope_attention) in one call, so a step costs ~30 calls
// instead of ~800 PyTorch ops. Biases may be null. gu is the fused gate/up projection (2I rows:
// gate first), dn the down projection.
void tl_llama_block(float* x, int64_t B, int64_t D, const float* n1, const float* n2, float eps,
                    const uint8_t* qkv_qs, const uint16_t* qkv_dm, const float* qkv_b,
                    const uint8_t* o_qs, const uint16_t* o_dm, const float* o_b,
                    const uint8_t* gu_qs, const uint16_t* gu_dm, const float* gu_b, int64_t I,
                    const uint8_t* dn_qs, const uint16_t* dn_dm, const float* dn_b,
                    int64_t H, int64_t Hkv, int64_t d, const float* cos, const float* sin,
                    float* kc, float* vc, int64_t W, const int64_t* rows, const int64_t* cols, int64_t end,
                    const uint8_t* mask, float scale, int threads) {
    const int64_t nqkv = (H + 2 * Hkv) * d;
    float* h = (float*)malloc(sizeof(float) * B * (D > I ? D : I));
    float* qkv = (float*)malloc(sizeof(float) * B * nqkv);
    float* att = (float*)malloc(sizeof(float) * B * H * d);
    float* gu = (float*)malloc(sizeof(float) * B * 2 * I);
    float* y = (float*)malloc(sizeof(float) * B * D);
    rms_norm_rows(x, B, D, n1, eps, h, threads);
    tl_q4_gemm(h, B, D, qkv_qs, qkv_dm, nqkv, qkv, threads);
    add_bias(qkv, B, nqkv, qkv_b);
    tl_rope_attention(qkv, B, H, Hkv, d, cos, sin, kc, vc, W, rows, cols, end, mask, end, scale, att, threads);
    tl_q4_gemm(att, B, H * d, o_qs, o_dm, D, y, threads);
    add_bias(y, B, D, o_b);
    for (int64_t i = 0; i < B * D; i++) x[i] += y[i];
    rms_norm_rows(x, B, D, n2, eps, h, threads);
    tl_q4_gemm(h, B, D, gu_qs, gu_dm, 2 * I, gu, threads);
    add_bias(gu, B, 2 * I, gu_b);
#pragma omp parallel for schedule(static) num_threads(B >= PARALLEL_ROWS ? threads : 1)
    for (int64_t b = 0; b < B; b++)  // silu(gate) * up; I is a multiple of 32 (a Q4_1 input)
        for (int64_t i = 0; i < I; i += 8) {
            const __m256 g = _mm256_loadu_ps(gu + b * 2 * I + i), u = _mm256_loadu_ps(gu + b * 2 * I + I + i);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            _mm256_storeu_ps(h + b * I + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u));
        }
    tl_q4_gemm(h, B, I, dn_qs, dn_dm, D, y, threads);
    add_bias(y, B, D, dn_b);
    for (int64_t i = 0; i < B * D; i++) x[i] += y[i];
    free(h); free(qkv); free(att); free(gu); free(y);
}

}

extern "C" {

// All L blocks of a Llama-style model for one step, in one call: layer i's arguments to
// tl_llama_block come from ptrs[16 i ..]: norm1, norm2, then (codes, scales, bias or null) of
// qkv, o, gate/up and down, then its key and value caches. One call instead of L from Python
// saves ~1 ms a decode step (~30 us of argument handling per layer).
void tl_llama_layers(float* x, int64_t B, int64_t L, void* const* ptrs, int64_t D, float eps, int64_t I,
                     int64_t H, int64_t Hkv, int64_t d, const float* cos, const float* sin, int64_t W,
                     const int64_t* rows, const int64_t* cols, int64_t end, const uint8_t* mask, float scale,
                     int threads) {
    for (int64_t l = 0; l < L; l++) {
        void* const* p = ptrs + 16 * l;
        tl_llama_block(x, B, D, (const float*)p[0], (const float*)p[1], eps,
                       (const uint8_t*)p[2], (const uint16_t*)p[3], (const float*)p[4],
                       (const uint8_t*)p[5], (const uint16_t*)p[6], (const float*)p[7],
                       (const uint8_t*)p[8], (const uint16_t*)p[9], (const float*)p[10], I,
                       (const uint8_t*)p[11], (const uint16_t*)p[12], (const float*)p[13],
                       H, Hkv, d, cos, sin, (float*)p[14], (float*)p[15], W, rows, cols, end, mask, scale, threads);
    }
}

}
