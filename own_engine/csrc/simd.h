// AVX-512 pieces the kernels share.
#pragma once
#include <cmath>
#include <immintrin.h>
#include <initializer_list>

// exp of 16 lanes (Cephes' expf: 2^n times a degree-6 polynomial, within 2 ulp of the exact value). Below -87 it
// gives e^-87 (~1e-38, a normal float: no slow denormal arithmetic after it; -inf included), above 88.7 inf.
inline __m512 exp_ps(__m512 x) {
  const __m512 big = _mm512_set1_ps(88.7f);
  const __mmask16 over = _mm512_cmp_ps_mask(x, big, _CMP_GT_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, big), _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_mask_mov_ps(_mm512_scalef_ps(p, n), over, _mm512_set1_ps(INFINITY));
}

// 2^x for finite x (inf past 128): 2^floor(x) times 2^f, f = x - floor(x) in [0, 1) in one instruction, by a
// polynomial: degree 4 within 2.7e-6 (the softmax of prefill attention, whose weights are then rounded to bf16),
// degree 5 within 1.6e-7. The AVX-512 operations issue at about one a cycle here, so each one counts: this is 6 or 7
// of them where exp_ps takes 17.
template <int Degree = 4>
inline __m512 exp2_(__m512 x) {
  static_assert(Degree == 4 || Degree == 5);
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // x - floor(x)
  __m512 p;
  if constexpr (Degree == 4) {
    p = _mm512_set1_ps(1.3520620553e-02f);
    for (const float c : {5.2037454187e-02f, 2.4142743011e-01f, 6.9300664870e-01f, 1.0000025155e+00f})
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  } else {
    p = _mm512_set1_ps(1.8775766395e-03f);
    for (const float c : {8.9893404707e-03f, 5.5826317419e-02f, 2.4015361742e-01f, 6.9315307312e-01f,
                          9.9999992507e-01f})
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, x);  // p * 2^floor(x)
}

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
