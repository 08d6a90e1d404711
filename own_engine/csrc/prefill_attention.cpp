// Prefill attention in bf16 with AMX tiles (own_engine/native.py loads it): a chunk's queries over a chunk of keys,
// causal or not, returning the output and its log-sum-exp so chunks merge (attention.py), as torch's CPU flash
// kernel does. That kernel reached ~0.5 TFLOP/s on 2,048 tokens (17.5 ms a layer of the 201M benchmark model, 16
// heads of 64, 2 threads): its products go through a general GEMM call per block. Here both products are tile
// instructions on packed operands and the softmax is one AVX-512 pass per row block, in base 2 (a polynomial for
// 2^x, within 2.7e-6, where the weights are then rounded to bf16 for the value product, as torch rounds them).
//
// Work items are (KV head, its query heads or a share of them, 4 blocks of 32 query rows); each walks its keys 64 at
// a time, and per step each of its (row block, query head) in turn: S = Q K^T (four 16x16 tiles per 32 keys), the
// online softmax on S's rows, then O += P V with O's rows loaded into tiles and stored back. The step's K and V are
// read once for all of them: a layer of the 201M benchmark model, 2,048 queries over 8,192 keys, took 42.7-43.2 ms
// with one query head and row block an item, 39.8-40.9 ms with the 4 heads of a KV head, 37.4-38.1 with 4 row
// blocks of them too (in a prefill of 8,192 tokens, where other work evicts the K and V between reads, attention
// 1.21-1.24 s -> 1.04-1.10 -> 0.99-1.05).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <initializer_list>
#include <vector>

#include "amx.h"
#include "simd.h"

#ifdef OWN_ENGINE_AMX
namespace {

constexpr int64_t BM = 32;   // query rows per work item: two tiles of 16
constexpr int64_t BN = 64;   // keys per softmax step: two products of 32
constexpr int64_t MAX_D = 128;
constexpr int64_t SPANS = 4;  // row blocks an item walks its keys for

struct Args {
  const uint16_t *q, *k, *v;
  int64_t q_row, q_head, k_row, k_head, v_row, v_head;  // strides in elements
  int64_t tq, tk, heads, kv_heads, d;
  bool causal;  // query i sees keys up to i + tk - tq
  float scale;
  uint16_t* out;  // [tq, heads, d]
  float* lse;     // [tq, heads]
  uint32_t* kp;   // packed K: [kv_heads][tk_pad / 16][d / 2][16]: a 16-key block's pairs of dims, the B of Q K^T
  uint16_t* vp;   // packed V: [kv_heads][tk_pad / 32][d / 16][16][16][2]: 32 keys by 16 dims, the B of P V
  int64_t tk_pad;
};

// K and V into the tiles' layouts, 32 keys at a time per KV head, keys past tk zero: K's pairs of dims gathered
// across 16 keys, V's rows of two keys interleaved 16 dims at a time.
void pack(const Args& a, int threads) {
  const int64_t d = a.d, pairs = d / 2;
  const __m512i across = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(a.k_row)));
  alignas(64) int16_t order[32];  // lane 2i: the first key's dim i, lane 2i + 1: the second key's
  for (int i = 0; i < 16; ++i) order[2 * i] = static_cast<int16_t>(i), order[2 * i + 1] = static_cast<int16_t>(32 + i);
  const __m512i pairwise = _mm512_load_si512(order);
#pragma omp parallel for collapse(2) num_threads(threads)
  for (int64_t h = 0; h < a.kv_heads; ++h)
    for (int64_t b = 0; b < a.tk_pad / 32; ++b) {
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t key = b * 32 + half * 16;
        const __mmask16 valid = static_cast<__mmask16>((1u << std::clamp<int64_t>(a.tk - key, 0, 16)) - 1);
        const uint16_t* kr = a.k + key * a.k_row + h * a.k_head;
        uint32_t* kb = a.kp + (h * (a.tk_pad / 16) + 2 * b + half) * pairs * 16;
        for (int64_t r = 0; r < pairs; ++r)  // a pair of dims of 16 keys: 16 loads 2 * k_row bytes apart
          _mm512_storeu_si512(kb + r * 16, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, across,
                                                                      kr + 2 * r, 2));
      }
      uint16_t* vb = a.vp + (h * (a.tk_pad / 32) + b) * 32 * d;
      for (int64_t p = 0; p < 16; ++p) {  // keys 2p and 2p + 1 of the 32
        const int64_t key = b * 32 + 2 * p;
        const uint16_t* v0 = a.v + key * a.v_row + h * a.v_head;
        for (int64_t c = 0; c < d; c += 16) {
          const __m256i x0 = key < a.tk ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + c))
                                        : _mm256_setzero_si256();
          const __m256i x1 = key + 1 < a.tk ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + a.v_row + c))
                                            : _mm256_setzero_si256();
          _mm512_storeu_si512(vb + (c / 16) * 512 + p * 32,
                             _mm512_permutex2var_epi16(_mm512_castsi256_si512(x0), pairwise,
                                                       _mm512_castsi256_si512(x1)));
        }
      }
    }
}

// A work item's state: its queries (zero rows past the chunk's end), the step's scores and weights, and per row
// the running max (base 2, scaled), the sum of weights and the unnormalised output.
struct Block {
  alignas(64) uint16_t q[BM * MAX_D];
  alignas(64) float s[BM * BN];
  alignas(64) uint16_t p[BM * BN];
  alignas(64) float o[BM * MAX_D];
  alignas(64) float mx[BM], l[BM];
};

// S = Q K^T over the step's keys, 32 at a time (four 16x16 tiles).
void scores(Block& b, const uint32_t* kt, int64_t d, int64_t halves) {
  for (int64_t half = 0; half < halves; ++half, kt += d * 16) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t step = 0; step < d / 32; ++step) {
      _tile_loadd(4, b.q + step * 32, d * 2);
      _tile_loadd(5, b.q + 16 * d + step * 32, d * 2);
      _tile_loadd(6, kt + step * 256, 64);
      _tile_loadd(7, kt + d * 8 + step * 256, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, b.s + half * 32, BN * 4);
    _tile_stored(1, b.s + half * 32 + 16, BN * 4);
    _tile_stored(2, b.s + 16 * BN + half * 32, BN * 4);
    _tile_stored(3, b.s + 16 * BN + half * 32 + 16, BN * 4);
  }
}

// The step's weights 2^(s * log2_scale - m) against the rows' maxima m, rounded to bf16 into b.p, and their sums
// per row in total.
template <bool Masked>
void weights(Block& b, int64_t chunks, const int64_t* seen, float log2_scale, const float* m_new, float* total) {
  const auto keep = [&](int64_t i, int64_t c) {
    return static_cast<__mmask16>((1u << std::clamp<int64_t>(seen[i] - c * 16, 0, 16)) - 1);
  };
  const __m512 sl = _mm512_set1_ps(log2_scale);
  for (int64_t i = 0; i < BM; i += 4) {
    __m512 sum[4];
    for (int64_t r = 0; r < 4; ++r) {
      const __m512 m = _mm512_set1_ps(m_new[i + r]);
      const float* sr = b.s + (i + r) * BN;
      uint16_t* pr = b.p + (i + r) * BN;
      sum[r] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; c += 2) {
        __m512 e0 = exp2_(_mm512_fmsub_ps(_mm512_load_ps(sr + c * 16), sl, m));
        __m512 e1 = exp2_(_mm512_fmsub_ps(_mm512_load_ps(sr + c * 16 + 16), sl, m));
        if constexpr (Masked) {
          e0 = _mm512_maskz_mov_ps(keep(i + r, c), e0);
          e1 = _mm512_maskz_mov_ps(keep(i + r, c + 1), e1);
        }
        sum[r] = _mm512_add_ps(sum[r], _mm512_add_ps(e0, e1));
        _mm512_store_si512(pr + c * 16, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
      }
    }
    _mm_store_ps(total + i, sum4(sum[0], sum[1], sum[2], sum[3]));
  }
}

// The online softmax over the step's `chunks` of 16 keys, in base 2: the rows' maxima four at a time, then the new
// maxima and their corrections for all rows at once, then the weights and their sums four rows at a time. A row's
// max moves only when it grows by more than 8 (a factor 256), so most steps rescale no row; most steps after the
// first skip this pass altogether (softmax_known_max): weights of any size round to bf16 alike, and float32 sums
// them alike. Masked: seen[i] is how many of the step's keys row i sees (a step on the diagonal or at the end);
// otherwise it sees them all.
template <bool Masked>
void softmax(Block& b, int64_t chunks, const int64_t* seen, float log2_scale, int64_t d) {
  alignas(64) float top[BM], m_new[BM], alpha[BM], total[BM];
  const auto keep = [&](int64_t i, int64_t c) {
    return static_cast<__mmask16>((1u << std::clamp<int64_t>(seen[i] - c * 16, 0, 16)) - 1);
  };
  for (int64_t i = 0; i < BM; i += 4) {
    __m512 t[4];
    for (int64_t r = 0; r < 4; ++r) {
      t[r] = _mm512_set1_ps(-INFINITY);
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 x = _mm512_load_ps(b.s + (i + r) * BN + c * 16);
        t[r] = Masked ? _mm512_mask_max_ps(t[r], keep(i + r, c), t[r], x) : _mm512_max_ps(t[r], x);
      }
    }
    _mm_store_ps(top + i, _mm_mul_ps(max4(t[0], t[1], t[2], t[3]), _mm_set1_ps(log2_scale)));
  }
  for (int64_t i = 0; i < BM; i += 16) {
    const __m512 m = _mm512_load_ps(b.mx + i), t = _mm512_load_ps(top + i);
    const __mmask16 grow = _mm512_cmp_ps_mask(t, _mm512_add_ps(m, _mm512_set1_ps(8.0f)), _CMP_GT_OQ);
    const __m512 n = _mm512_mask_mov_ps(m, grow, t);
    _mm512_store_ps(m_new + i, n);
    _mm512_store_ps(alpha + i, exp2_(_mm512_max_ps(_mm512_sub_ps(m, n), _mm512_set1_ps(-126.0f))));  // m: -inf
    for (unsigned bits = grow; bits; bits &= bits - 1) {
      const int64_t row = i + __builtin_ctz(bits);
      const __m512 by = _mm512_set1_ps(alpha[row]);
      for (int64_t c = 0; c < d; c += 16)
        _mm512_store_ps(b.o + row * d + c, _mm512_mul_ps(_mm512_load_ps(b.o + row * d + c), by));
    }
  }
  weights<Masked>(b, chunks, seen, log2_scale, m_new, total);
  for (int64_t i = 0; i < BM; i += 16) {
    const __m512 l = _mm512_fmadd_ps(_mm512_load_ps(b.l + i), _mm512_load_ps(alpha + i), _mm512_load_ps(total + i));
    _mm512_store_ps(b.l + i, l);
    _mm512_store_ps(b.mx + i, _mm512_load_ps(m_new + i));
  }
}

// A step after the first whose keys every row sees: weights against the rows' maxima so far, without a pass for this
// step's maxima. False, with nothing kept, where a row's weights summed past 2^16 (its scores grew past its max):
// softmax<false> then redoes the step.
bool softmax_known_max(Block& b, int64_t chunks, float log2_scale) {
  alignas(64) float total[BM];
  weights<false>(b, chunks, nullptr, log2_scale, b.mx, total);
  for (int64_t i = 0; i < BM; i += 16)
    if (_mm512_cmp_ps_mask(_mm512_load_ps(total + i), _mm512_set1_ps(65536.0f), _CMP_NLE_UQ)) return false;
  for (int64_t i = 0; i < BM; i += 16)
    _mm512_store_ps(b.l + i, _mm512_add_ps(_mm512_load_ps(b.l + i), _mm512_load_ps(total + i)));
  return true;
}

// O += P V over the step's keys: 16 rows by 64 dims at a time, O's rows loaded into tiles and stored back.
void accumulate(Block& b, const uint16_t* vb, int64_t d, int64_t halves) {
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t dh = 0; dh < d / 64; ++dh) {
      float* ot = b.o + r * 16 * d + dh * 64;
      _tile_loadd(0, ot, d * 4);
      _tile_loadd(1, ot + 16, d * 4);
      _tile_loadd(2, ot + 32, d * 4);
      _tile_loadd(3, ot + 48, d * 4);
      for (int64_t half = 0; half < halves; ++half) {
        const uint16_t* vt = vb + half * 32 * d + dh * 4 * 512;
        _tile_loadd(4, b.p + r * 16 * BN + half * 32, BN * 2);
        _tile_loadd(6, vt, 64);
        _tile_loadd(7, vt + 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(6, vt + 1024, 64);
        _tile_loadd(7, vt + 1536, 64);
        _tile_dpbf16ps(2, 4, 6);
        _tile_dpbf16ps(3, 4, 7);
      }
      _tile_stored(0, ot, d * 4);
      _tile_stored(1, ot + 16, d * 4);
      _tile_stored(2, ot + 32, d * 4);
      _tile_stored(3, ot + 48, d * 4);
    }
}

// One work item: query heads [hq, hq + count) of KV head h over row blocks m0, m0 - BM, ... (`spans` of them, those
// below 0 skipped), their states in bs (count per row block).
void attend(const Args& a, Block* bs, int64_t h, int64_t hq, int64_t count, int64_t m0, int64_t spans) {
  const int64_t d = a.d, off = a.tk - a.tq;
  struct Span {
    int64_t m0, rows, end, first_sees;
  };
  Span sp[SPANS];
  int64_t n = 0, end = 0;
  for (int64_t r = 0; r < spans && m0 - r * BM >= 0; ++r, ++n) {
    const int64_t m = m0 - r * BM;
    sp[r] = {m, std::min(BM, a.tq - m), a.causal ? std::min(a.tk, m + BM + off) : a.tk,  // rows see keys [0, end)
             a.causal ? std::min(m + off, a.tk - 1) : a.tk - 1};  // the last key row 0 sees
    end = std::max(end, sp[r].end);
  }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t g = 0; g < count; ++g) {
      Block& b = bs[r * count + g];
      for (int64_t i = 0; i < BM; ++i) {
        if (i < sp[r].rows)
          std::memcpy(b.q + i * d, a.q + (sp[r].m0 + i) * a.q_row + (hq + g) * a.q_head, d * 2);
        else
          std::memset(b.q + i * d, 0, d * 2);
        b.mx[i] = i < sp[r].rows ? -INFINITY : 0.0f;  // a padding row sees no key: its max stays finite
        b.l[i] = 0.0f;
      }
      std::memset(b.o, 0, sizeof(float) * BM * d);
    }
  const float log2_scale = a.scale * 1.4426950408889634f;
  const uint32_t* kh = a.kp + h * a.tk_pad * d / 2;
  const uint16_t* vh = a.vp + h * a.tk_pad * d;
  int64_t seen[BM];
  for (int64_t n0 = 0; n0 < end; n0 += BN)
    for (int64_t r = 0; r < n; ++r) {
      const Span& q = sp[r];
      if (n0 >= q.end) continue;
      const int64_t halves = (std::min(q.end - n0, BN) + 31) / 32, width = halves * 32;
      const bool masked = q.rows < BM || q.first_sees < n0 + width - 1;  // a row does not see every key of the step
      if (masked)
        for (int64_t i = 0; i < BM; ++i) {
          const int64_t last = a.causal ? std::min(q.m0 + i + off, a.tk - 1) : a.tk - 1;
          seen[i] = i < q.rows ? std::clamp<int64_t>(last - n0 + 1, 0, width) : 0;
        }
      for (int64_t g = 0; g < count; ++g) {
        Block& b = bs[r * count + g];
        scores(b, kh + n0 * d / 2, d, halves);
        if (masked)
          softmax<true>(b, width / 16, seen, log2_scale, d);
        else if (n0 == 0 || !softmax_known_max(b, width / 16, log2_scale))
          softmax<false>(b, width / 16, seen, log2_scale, d);
        accumulate(b, vh + n0 * d, d, halves);
      }
    }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t g = 0; g < count; ++g) {
      const Block& b = bs[r * count + g];
      for (int64_t i = 0; i < sp[r].rows; ++i) {
        const __m512 inv = _mm512_set1_ps(1.0f / b.l[i]);
        uint16_t* out = a.out + ((sp[r].m0 + i) * a.heads + hq + g) * d;
        for (int64_t c = 0; c < d; c += 16) {
          const __m512 x = _mm512_mul_ps(_mm512_load_ps(b.o + i * d + c), inv);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
        }
        a.lse[(sp[r].m0 + i) * a.heads + hq + g] = (b.mx[i] + std::log2(b.l[i])) * 0.6931471805599453f;
      }
    }
}

}  // namespace

extern "C" {

// q [tq, heads, d], k and v [tk, kv_heads, d] (bf16, strides in elements, each head's d contiguous); kp, vp scratch
// of kv_heads * tk_pad * d bf16 each, tk_pad = tk rounded up to 32. Returns 0, or 1 where it cannot run (no AMX, a
// head size other than 64 or 128).
int prefill_attention(const void* q, int64_t q_row, int64_t q_head, const void* k, int64_t k_row, int64_t k_head,
                      const void* v, int64_t v_row, int64_t v_head, int64_t tq, int64_t tk, int64_t heads,
                      int64_t kv_heads, int64_t d, int causal, float scale, void* out, float* lse, void* kp, void* vp,
                      int threads) {
  if (!amx_permitted() || (d != 64 && d != 128) || heads % kv_heads) return 1;
  const Args a{static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v),
               q_row, q_head, k_row, k_head, v_row, v_head, tq, tk, heads, kv_heads, d, causal != 0, scale,
               static_cast<uint16_t*>(out), lse, static_cast<uint32_t*>(kp), static_cast<uint16_t*>(vp),
               (tk + 31) / 32 * 32};
  pack(a, threads);
  const int64_t blocks = (tq + BM - 1) / BM;
  // A KV head's query heads over SPANS row blocks an item; fewer blocks, then an even share of the heads, where that
  // leaves under 4 items a thread (a short chunk: a question after a cached document).
  int64_t count = heads / kv_heads, spans = SPANS;
  const auto items = [&] { return heads / count * ((blocks + spans - 1) / spans); };
  while (spans > 1 && items() < 4 * threads) --spans;
  while (count % 2 == 0 && items() < 4 * threads) count /= 2;
  const int64_t shares = heads / count, groups = (blocks + spans - 1) / spans;
#pragma omp parallel num_threads(threads)
  {
    configure_tiles();
    std::vector<Block> b(count * spans);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < shares * groups; ++item) {  // the last (longest, if causal) row blocks first
      const int64_t hq = item % shares * count;
      attend(a, b.data(), hq / (heads / kv_heads), hq, count, (blocks - 1 - item / shares * spans) * BM, spans);
    }
    _tile_release();
  }
  return 0;
}

}  // extern "C"

#else  // built for a CPU without AMX: nothing to run

extern "C" {
int prefill_attention(const void*, int64_t, int64_t, const void*, int64_t, int64_t, const void*, int64_t, int64_t,
                      int64_t, int64_t, int64_t, int64_t, int64_t, int, float, void*, float*, void*, void*, int) {
  return 1;
}
}

#endif
