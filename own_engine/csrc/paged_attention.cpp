// Decode attention over the paged KV cache on a CPU with bf16 instructions (own_engine/native.py loads it): one new
// token per sequence attends to its keys where they lie in the pool (no gather), each key and value row read once.
// Work items are (sequence, part of PART keys), merged by log-sum-exp. Within an item, bf16: the scores of every KV
// head from whole key rows (read in order, each value row asked for into the L2 cache beside it), then the values
// KV head by KV head while the next item's key rows are asked for; float32: KV head by KV head, the head's query rows
// in registers across its keys. Scores and value sums accumulate in float32: from bf16 dot instructions for a bf16
// cache (the softmax weights rounded to bf16 for the value sums, as torch's flash kernel rounds them), from float32
// FMAs for a float32 one.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "needs avx512_bf16 and avx512bw (built with -march=native on such a CPU)"
#endif

namespace {

constexpr int64_t PART = 256;    // keys per work item: a long sequence spreads over threads
constexpr int GROUP = 4;         // query heads per KV head (sum4 reduces four rows)
constexpr int64_t PREFETCH = 16;  // keys ahead: rows lie in blocks anywhere in the pool
// Lines of the next work item's key rows asked for per pair of value rows summed (Ahead): 2 asks for half of a part's
// key rows of the 201M benchmark model (4 KV heads of 64) during its value sums. 4 (all of them) and 8 came slower.
constexpr int AHEAD_LINES = 2;

inline uint16_t to_bf16(float x) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // a quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Keys [start, stop) of a sequence as runs of consecutive pool rows (one per block): f(first row, key - start, n).
template <typename F>
inline void runs(const int32_t* table, int64_t block_size, int64_t start, int64_t stop, F f) {
  for (int64_t j = start; j < stop;) {
    const int64_t off = j % block_size, n = std::min(stop - j, block_size - off);
    f(static_cast<int64_t>(table[j / block_size]) * block_size + off, j - start, n);
    j += n;
  }
}

// The pool row of a sequence's key j, through its block table: the next block of a sequence is anywhere in the pool.
inline int64_t row_of(const int32_t* table, int64_t block_size, int64_t j) {
  return static_cast<int64_t>(table[j / block_size]) * block_size + j % block_size;
}

// The key rows of a thread's next work item, asked for into the L2 cache a few lines at a time while the current item
// sums its values (from rows its scores pass asked for: no memory read of its own). Without it memory idled through
// every item's value sums: the 201M benchmark model's decode attention at 8,192 keys read its KV at 16.4-17.1 GB/s,
// with it 17.6-17.8 (12 layers, a layer's weights streamed between them, 2 threads).
struct Ahead {
  const char* base = nullptr;  // the pool
  const int32_t* table = nullptr;
  int64_t block_size = 0, row_bytes = 0, key = 0, stop = 0, line = 0;
  const char* row = nullptr;

  void start(const void* pool, const int32_t* t, int64_t bs, int64_t rb, int64_t from, int64_t to) {
    base = static_cast<const char*>(pool), table = t, block_size = bs, row_bytes = rb, key = from, stop = to, line = 0;
    if (key < stop) row = base + row_of(table, block_size, key) * row_bytes;
  }
  // Ask for the next `lines` cache lines (nothing once the item's rows are all asked for).
  void step(int lines) {
    for (; lines > 0 && key < stop; --lines) {
      _mm_prefetch(row + line, _MM_HINT_T1);
      if ((line += 64) == row_bytes) {
        line = 0;
        if (++key < stop) row = key % block_size ? row + row_bytes : base + row_of(table, block_size, key) * row_bytes;
      }
    }
  }
};

// Ask for `bytes` of key j's row from element `offset` on, PREFETCH keys ahead, into L1 or (l2) L2.
template <typename T>
inline void prefetch(const T* pool, const int32_t* table, int64_t block_size, int64_t width, int64_t offset,
                     int64_t bytes, int64_t j, int64_t stop, bool l2 = false) {
  if (j + PREFETCH >= stop) return;
  const char* p = reinterpret_cast<const char*>(pool + row_of(table, block_size, j + PREFETCH) * width + offset);
  for (int64_t b = 0; b < bytes; b += 64) {
    if (l2)
      _mm_prefetch(p + b, _MM_HINT_T1);
    else
      _mm_prefetch(p + b, _MM_HINT_T0);
  }
}

// f(head h's row of key j, j - start) for keys [start, stop) of a sequence.
template <typename T, typename F>
inline void rows_of(const T* pool, const int32_t* table, int64_t block_size, int64_t width, int64_t dim, int64_t h,
                    int64_t start, int64_t stop, F f) {
  runs(table, block_size, start, stop, [&](int64_t row, int64_t j, int64_t n) {
    const T* p = pool + row * width + h * dim;
    for (int64_t i = 0; i < n; ++i, p += width) f(p, j + i);
  });
}

// rows_of, asking for head h's part of the row PREFETCH keys ahead (a head reads 128 of a row's 512 bytes for 4 KV
// heads of 64: too sparse for the hardware's prefetcher).
template <typename T, typename F>
inline void each_row(const T* pool, const int32_t* table, int64_t block_size, int64_t width, int64_t dim, int64_t h,
                     int64_t start, int64_t stop, F f) {
  rows_of(pool, table, block_size, width, dim, h, start, stop, [&](const T* p, int64_t key) {
    prefetch(pool, table, block_size, width, h * dim, dim * static_cast<int64_t>(sizeof(T)), start + key, stop);
    f(p, key);
  });
}

// Softmax numerators over s[key][G] (G dividing 16: 16 / G keys a vector), in place: each query row's max m and
// sum of exp l. The keys padding the last vector are -inf, so they add nothing (~1e-38) to l.
template <int G>
inline void softmax(float* s, int64_t count, float* m, float* l) {
  constexpr int64_t PER = 16 / G;
  const int64_t padded = (count + PER - 1) / PER * PER;
  std::fill(s + count * G, s + padded * G, -INFINITY);
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < padded * G; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + i));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, mv);
  for (int g = 0; g < G; ++g) {
    m[g] = lanes[g];
    for (int k = g + G; k < 16; k += G) m[g] = std::max(m[g], lanes[k]);
  }
  for (int k = 0; k < 16; ++k) lanes[k] = m[k % G];
  const __m512 mx = _mm512_load_ps(lanes);
  __m512 sv = _mm512_setzero_ps();
  for (int64_t i = 0; i < padded * G; i += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + i), mx));
    _mm512_storeu_ps(s + i, e);
    sv = _mm512_add_ps(sv, e);
  }
  _mm512_store_ps(lanes, sv);
  for (int g = 0; g < G; ++g) {
    l[g] = 0.0f;
    for (int k = g; k < 16; k += G) l[g] += lanes[k];
  }
}

// float32, one KV head h over keys [start, stop): its G query rows' max score m, sum of exp l and exp-weighted
// values acc [G][DIM], the rows in registers, a float32 FMA per element, one horizontal sum per row. s: room for
// (PART + 16) x G floats.
template <int DIM, int G>
void head_f32(const float* q, const float* kpool, const float* vpool, int64_t width, int64_t h, const int32_t* table,
              int64_t block_size, int64_t start, int64_t stop, float scale, float* s, float* m, float* l,
              float* acc) {
  constexpr int C = DIM / 16;
  __m512 qv[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = _mm512_loadu_ps(q + g * DIM + c * 16);
  each_row(kpool, table, block_size, width, DIM, h, start, stop, [&](const float* k, int64_t key) {
    __m512 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = _mm512_loadu_ps(k + c * 16);
    for (int g = 0; g < G; ++g) {
      __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(qv[g][c], kv[c], a);
      s[key * G + g] = _mm512_reduce_add_ps(a) * scale;
    }
  });
  softmax<G>(s, stop - start, m, l);
  __m512 av[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) av[g][c] = _mm512_setzero_ps();
  each_row(vpool, table, block_size, width, DIM, h, start, stop, [&](const float* v, int64_t key) {
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = _mm512_loadu_ps(v + c * 16);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(s[key * G + g]);
      for (int c = 0; c < C; ++c) av[g][c] = _mm512_fmadd_ps(w, vv[c], av[g][c]);
    }
  });
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + g * DIM + c * 16, av[g][c]);
}

// bf16 scores of every KV head's GROUP query rows over keys [start, stop), whole key rows at a time, the row PREFETCH
// keys ahead asked for, and its value row into the L2 cache for head_bf16. Read head by head (a head's part of a row
// is 128 of its 512 bytes for 4 KV heads of 64) they came slower: 8,192 keys of the 201M model, 6.6 -> 6.1 ms a
// decode step. s: per head (PART + 16) x GROUP floats, s[h][key][g].
template <int DIM>
void scores_bf16(const uint16_t* q, const uint16_t* kpool, const uint16_t* vpool, int64_t width, int64_t kv_heads,
                 const int32_t* table, int64_t block_size, int64_t start, int64_t stop, float scale, float* s) {
  constexpr int C = DIM / 32;  // bf16 vectors per row of a head
  const __m128 sc = _mm_set1_ps(scale);
  rows_of(kpool, table, block_size, width, 0, 0, start, stop, [&](const uint16_t* k, int64_t key) {
    prefetch(kpool, table, block_size, width, 0, width * 2, start + key, stop);
    prefetch(vpool, table, block_size, width, 0, width * 2, start + key, stop, true);
    for (int64_t h = 0; h < kv_heads; ++h) {
      __m512 a[GROUP];
      for (int g = 0; g < GROUP; ++g) {
        a[g] = _mm512_setzero_ps();
        for (int c = 0; c < C; ++c)
          a[g] = _mm512_dpbf16_ps(a[g], (__m512bh)_mm512_loadu_si512(q + (h * GROUP + g) * DIM + c * 32),
                                  (__m512bh)_mm512_loadu_si512(k + h * DIM + c * 32));
      }
      _mm_storeu_ps(s + (h * (PART + 16) + key) * GROUP, _mm_mul_ps(sum4(a[0], a[1], a[2], a[3]), sc));
    }
  });
}

// bf16, one KV head h over keys [start, stop), its scores s [key][GROUP] from scores_bf16: its GROUP query rows' max
// score m, sum of exp l and exp-weighted values acc [GROUP][DIM] (as head_f32), by bf16 dot instructions.
template <int DIM>
void head_bf16(const uint16_t* vpool, int64_t width, int64_t h, const int32_t* table, int64_t block_size,
               int64_t start, int64_t stop, float* s, float* m, float* l, float* acc, Ahead& ahead) {
  constexpr int C = DIM / 32;  // bf16 vectors per row of a head
  const int64_t count = stop - start, padded = (count + 3) / 4 * 4;
  softmax<GROUP>(s, count, m, l);
  std::fill(s + count * GROUP, s + padded * GROUP, 0.0f);  // exactly nothing for the values
  // The weights rounded to bf16 (as torch rounds them) in pairs: wp[i * GROUP + g] holds query row g's weights of
  // keys 2i and 2i + 1, what one bf16 dot per lane multiplies two interleaved value rows by. Four keys a vector:
  // lanes (key, g) reordered to (key pair, g, key in pair).
  alignas(64) uint32_t wp[(PART + 16) / 2 * GROUP];
  const __m256i order = _mm256_setr_epi16(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
  for (int64_t i = 0; i < padded; i += 4)
    _mm256_store_si256(reinterpret_cast<__m256i*>(wp + i / 2 * GROUP),
                       _mm256_permutexvar_epi16(order, reinterpret_cast<__m256i>(
                                                           _mm512_cvtneps_pbh(_mm512_loadu_ps(s + i * GROUP)))));
  // Values two keys at a time: the two rows interleaved, so one bf16 dot per lane adds both keys' terms. Lanes
  // come out in unpack order (per 128-bit lane, elements 0-3 in the low vector, 4-7 in the high one), undone below.
  __m512 av[GROUP][2 * C];
  for (int g = 0; g < GROUP; ++g)
    for (int c = 0; c < 2 * C; ++c) av[g][c] = _mm512_setzero_ps();
  auto pair = [&](const uint16_t* v0, const uint16_t* v1, int64_t key) {
    __m512i x[2 * C];
    for (int c = 0; c < C; ++c) {
      const __m512i a = _mm512_loadu_si512(v0 + c * 32), b = _mm512_loadu_si512(v1 + c * 32);
      x[2 * c] = _mm512_unpacklo_epi16(a, b), x[2 * c + 1] = _mm512_unpackhi_epi16(a, b);
    }
    for (int g = 0; g < GROUP; ++g) {
      const __m512bh wv = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(wp[key / 2 * GROUP + g]));
      for (int c = 0; c < 2 * C; ++c) av[g][c] = _mm512_dpbf16_ps(av[g][c], wv, (__m512bh)x[c]);
    }
  };
  const uint16_t* held = nullptr;  // a row waiting for its pair
  int64_t held_key = 0;
  rows_of(vpool, table, block_size, width, DIM, h, start, stop, [&](const uint16_t* v, int64_t key) {
    if (held == nullptr) {
      held = v, held_key = key;
    } else {
      ahead.step(AHEAD_LINES);
      pair(held, v, held_key);
      held = nullptr;
    }
  });
  if (held != nullptr) pair(held, held, held_key);  // an odd count: the last row with a weight-0 partner
  for (int g = 0; g < GROUP; ++g) {
    alignas(64) float t[32];
    for (int c = 0; c < C; ++c) {
      _mm512_store_ps(t, av[g][2 * c]);
      _mm512_store_ps(t + 16, av[g][2 * c + 1]);
      for (int lane = 0; lane < 4; ++lane)
        for (int e = 0; e < 4; ++e) {
          acc[g * DIM + c * 32 + 8 * lane + e] = t[4 * lane + e];
          acc[g * DIM + c * 32 + 8 * lane + 4 + e] = t[16 + 4 * lane + e];
        }
    }
  }
}

inline void store(uint16_t* dst, float x) { *dst = to_bf16(x); }
inline void store(float* dst, float x) { *dst = x; }

struct Args {  // one call's inputs: paged_attention's, below
  const void *q, *k, *v;
  const int32_t* tables;
  int64_t table_stride;
  const int32_t* lengths;
  int64_t n, kv_heads, block_size, window;
  float scale;
  void* out;
  float* scratch;
  int64_t parts;
  int threads;
};

template <typename T, int DIM, int G>
void attend(const Args& a) {
  const T *q = static_cast<const T*>(a.q), *kpool = static_cast<const T*>(a.k), *vpool = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);
  const int64_t n = a.n, parts = a.parts, kv_heads = a.kv_heads;
  const int64_t heads = kv_heads * G, width = kv_heads * DIM, item = heads * (DIM + 2);
  // Pass 1, per (sequence, part of its keys): each query head's max score, sum of exp and weighted values. Scores
  // in one buffer per thread, made once per call: (PART + 16) x G floats per KV head (bf16: all heads' at once).
  // Items are taken in order, each thread taking its next before it works on one: it knows which rows come next.
  std::atomic<int64_t> claimed{0};
  const int64_t items = n * parts;
#pragma omp parallel num_threads(a.threads)
  {
    std::vector<float> scores((std::is_same_v<T, uint16_t> ? kv_heads : 1) * (PART + 16) * G);
    float* s = scores.data();
    const auto keys = [&](int64_t i) {  // item i's keys [start, stop) of its sequence
      const int64_t len = a.lengths[i / parts], first = a.window > 0 ? std::max<int64_t>(0, len - a.window) : 0;
      const int64_t start = first + i % parts * PART;
      return std::pair<int64_t, int64_t>{start, std::min(start + PART, len)};
    };
    Ahead ahead;
    for (int64_t i = claimed++, next; i < items; i = next) {
      next = claimed++;
      const int64_t b = i / parts, p = i % parts;
      const auto [start, stop] = keys(i);
      float* m = a.scratch + (b * parts + p) * item;  // [heads] max, [heads] sum, [heads][DIM] values
      float* l = m + heads;
      if (start >= stop) {  // a shorter sequence than the longest: no part here
        std::fill(m, m + heads, -INFINITY);
        std::fill(l, l + heads, 0.0f);
        continue;
      }
      const int32_t* table = a.tables + b * a.table_stride;
      if constexpr (std::is_same_v<T, uint16_t>) {
        if (next < items) {
          const auto [from, to] = keys(next);
          ahead.start(kpool, a.tables + next / parts * a.table_stride, a.block_size, width * 2, from, to);
        } else {
          ahead = Ahead{};  // nothing to ask for
        }
        scores_bf16<DIM>(q + b * heads * DIM, kpool, vpool, width, kv_heads, table, a.block_size, start, stop,
                         a.scale, s);
        for (int64_t h = 0; h < kv_heads; ++h)
          head_bf16<DIM>(vpool, width, h, table, a.block_size, start, stop, s + h * (PART + 16) * G, m + h * G,
                         l + h * G, l + heads + h * G * DIM, ahead);
      } else {
        for (int64_t h = 0; h < kv_heads; ++h)
          head_f32<DIM, G>(q + (b * heads + h * G) * DIM, kpool, vpool, width, h, table, a.block_size, start,
                           stop, a.scale, s, m + h * G, l + h * G, l + heads + h * G * DIM);
      }
    }
  }
  // Pass 2, per (sequence, query head): the parts merged.
#pragma omp parallel for collapse(2) num_threads(a.threads)
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* res = a.scratch + b * parts * item;
      float mx = -INFINITY, total = 0.0f, o[DIM] = {};
      for (int64_t p = 0; p < parts; ++p) mx = std::max(mx, res[p * item + h]);
      for (int64_t p = 0; p < parts; ++p) {
        const float* r = res + p * item;
        if (r[heads + h] == 0.0f) continue;
        const float c = std::exp(r[h] - mx);
        total += c * r[heads + h];
        for (int64_t d = 0; d < DIM; ++d) o[d] += c * r[2 * heads + h * DIM + d];
      }
      for (int64_t d = 0; d < DIM; ++d) store(out + (b * heads + h) * DIM + d, o[d] / total);
    }
  }
}

// The shapes it is built for: bf16 GROUP query heads per KV head of 64 or 128; float32 1, 2, 4 or 8 of 16 to 128.
template <typename T, int DIM>
bool with_group(int64_t group, const Args& a) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (DIM < 64 || group != GROUP) return false;
    if constexpr (DIM >= 64) attend<T, DIM, GROUP>(a);
    return true;
  } else {
    switch (group) {
      case 1: attend<T, DIM, 1>(a); return true;
      case 2: attend<T, DIM, 2>(a); return true;
      case 4: attend<T, DIM, 4>(a); return true;
      case 8: attend<T, DIM, 8>(a); return true;
      default: return false;
    }
  }
}

template <typename T>
bool with_shape(int64_t dim, int64_t group, const Args& a) {
  switch (dim) {
    case 16: return with_group<T, 16>(group, a);
    case 32: return with_group<T, 32>(group, a);
    case 64: return with_group<T, 64>(group, a);
    case 128: return with_group<T, 128>(group, a);
    default: return false;
  }
}

}  // namespace

extern "C" {
int64_t paged_attention_part() { return PART; }

// q [n, kv_heads * group, dim] and out alike; k, v: the pool's rows [rows, kv_heads, dim], all in the dtype
// (0 bf16, 1 float32); tables [n, table_stride] the block ids of each sequence's keys in order, lengths [n] (> 0) its
// key count (key j at position j, the new token's own key last); window 0 or the sliding window; scratch:
// n * parts * heads * (dim + 2) floats, parts = ceil(longest visible keys / PART). Returns 0, or 1 for a shape it
// was not built for.
int paged_attention(int dtype, const void* q, const void* k, const void* v, const int32_t* tables,
                    int64_t table_stride, const int32_t* lengths, int64_t n, int64_t group, int64_t kv_heads,
                    int64_t dim, int64_t block_size, int64_t window, float scale, void* out, float* scratch,
                    int64_t parts, int threads) {
  const Args a{q, k, v, tables, table_stride, lengths, n, kv_heads, block_size, window, scale, out, scratch, parts,
               threads};
  const bool done = dtype == 0 ? with_shape<uint16_t>(dim, group, a) : with_shape<float>(dim, group, a);
  return done ? 0 : 1;
}
}
