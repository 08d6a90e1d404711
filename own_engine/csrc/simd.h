// AVX-512 pieces the kernels share.
#pragma once
#include <immintrin.h>

// The lane sums (or maxima: reduce4<_mm512_max_ps, ...>) of a0..a3 as one 4-lane vector, in 13 instructions where
// four separate reductions take 32.
template <__m512 (*op512)(__m512, __m512), __m256 (*op256)(__m256, __m256), __m128 (*op128)(__m128, __m128)>
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = op512(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = op512(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 u = op512(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
  const __m256 x = op256(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
  return op128(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
}

inline __m512 add512(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline __m256 add256(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m128 add128(__m128 a, __m128 b) { return _mm_add_ps(a, b); }
inline __m512 max512(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
inline __m256 max256(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
inline __m128 max128(__m128 a, __m128 b) { return _mm_max_ps(a, b); }

inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  return reduce4<add512, add256, add128>(a0, a1, a2, a3);
}
inline __m128 max4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  return reduce4<max512, max256, max128>(a0, a1, a2, a3);
}
