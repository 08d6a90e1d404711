// Products of a few rows by a layer's weights with AMX tiles (own_engine/native.py loads it): y = x w^T (+ b) in
// bf16, accumulating in float32, for the 1 to 64 rows of decode steps and short chunks. Those products are
// memory-bound: what matters is how fast the weights stream. torch's calls read the 201M benchmark model's layer
// weights at 17-23 GB/s there (torch.mv for one row, (w @ x.T).T, F.linear) on a 2-thread Intel Xeon whose memory
// sums read at ~24 GB/s. Here the weights are tile operands loaded straight from their rows (16 rows of 32 values
// a tile, no copy): C^T = w x^T, 16 weight rows by 16 rows of x a tile, with x^T packed once per call as the
// second operand. The same products read them at ~27 GB/s for one row and ~25 GB/s for 16 (matmul.py's forms
// micro-benchmark decides where it is used). Each output is one row of w times one row of x summed in one order
// over k, so a product over adjacent matrices (model.EXACT_FUSED) gives what their separate products give.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "amx.h"

#ifdef OWN_ENGINE_AMX
namespace {

// x^T as the product's second operand, one tile per (32 columns s of x, 16 rows t of x): [16 column pairs][16 rows]
// of bf16 pairs, rows past m zero.
void pack_x(const uint16_t* x, int64_t x_row, int64_t m, int64_t k, uint32_t* xp) {
  const int64_t tiles = (m + 15) / 16;
  const __m512i to = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(16));
  for (int64_t s = 0; s < k / 32; ++s)
    for (int64_t t = 0; t < tiles; ++t) {
      uint32_t* tile = xp + (s * tiles + t) * 256;
      const int64_t rows = std::min<int64_t>(16, m - t * 16);
      if (rows < 16) std::memset(tile, 0, 1024);
      for (int64_t r = 0; r < rows; ++r)
        _mm512_i32scatter_epi32(tile + r, to, _mm512_loadu_si512(x + (t * 16 + r) * x_row + s * 32), 4);
    }
}

// Row r of y (bf16) from column r of C^T tiles c (16 outputs each), plus the bias.
inline void store_row(const float* c, int64_t r, const uint16_t* bias, uint16_t* y) {
  const __m512i column = _mm512_add_epi32(
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(16)), _mm512_set1_epi32(static_cast<int>(r)));
  __m512 v = _mm512_i32gather_ps(column, c, 4);
  if (bias)
    v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias))), 16)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

}  // namespace

extern "C" {

// Whether this process may use the tiles (this kernel's and prefill_attention.cpp's).
int amx_ready() { return amx_permitted() ? 1 : 0; }

// y [m, n] (row stride y_row) = x [m, k] (row stride x_row) w [n, k]^T (+ bias [n], or null), all bf16, w's rows
// contiguous; xp scratch of k / 32 * ceil(m / 16) * 512 bf16. Returns 0, or 1 where it cannot run (no AMX, k not
// a multiple of 32, n not a multiple of 16).
int tile_matmul(const void* x_, int64_t x_row, const void* w_, const void* bias_, void* y_, int64_t y_row,
                int64_t m, int64_t n, int64_t k, void* xp_, int threads) {
  if (!amx_permitted() || k % 32 || n % 16) return 1;
  const auto *x = static_cast<const uint16_t*>(x_), *w = static_cast<const uint16_t*>(w_);
  const auto* bias = static_cast<const uint16_t*>(bias_);
  auto* y = static_cast<uint16_t*>(y_);
  auto* xp = static_cast<uint32_t*>(xp_);
  pack_x(x, x_row, m, k, xp);
  const int64_t tiles = (m + 15) / 16, steps = k / 32, groups = (n + 31) / 32;
#pragma omp parallel num_threads(groups > 1 ? threads : 1)
  {
    configure_tiles();
    alignas(64) float c[4][256];
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {  // 32 rows of w (16 in the last group where n ends there)
      const uint16_t* w0 = w + g * 32 * k;
      const bool two_n = g * 32 + 32 <= n;
      for (int64_t t = 0; t < tiles; t += 2) {  // 32 rows of x, w's rows read again from the L2 cache
        const bool two_m = t + 1 < tiles;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; ++s) {
          const uint32_t* b = xp + (s * tiles + t) * 256;
          _tile_loadd(4, w0 + s * 32, k * 2);
          _tile_loadd(6, b, 64);
          _tile_dpbf16ps(0, 4, 6);
          if (two_m) {
            _tile_loadd(7, b + 256, 64);
            _tile_dpbf16ps(2, 4, 7);
          }
          if (two_n) {
            _tile_loadd(5, w0 + 16 * k + s * 32, k * 2);
            _tile_dpbf16ps(1, 5, 6);
            if (two_m) _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        for (int64_t half = 0; half < (two_m ? 2 : 1); ++half)
          for (int64_t r = 0; r < std::min<int64_t>(16, m - (t + half) * 16); ++r)
            for (int64_t h = 0; h < (two_n ? 2 : 1); ++h) {
              const int64_t col = g * 32 + h * 16;
              store_row(c[2 * half + h], r, bias ? bias + col : nullptr, y + ((t + half) * 16 + r) * y_row + col);
            }
      }
    }
    _tile_release();
  }
  return 0;
}

}  // extern "C"

#else  // built for a CPU without AMX: nothing to run

extern "C" {
int amx_ready() { return 0; }
int tile_matmul(const void*, int64_t, const void*, const void*, void*, int64_t, int64_t, int64_t, int64_t, void*,
                int) {
  return 1;
}
}

#endif
