// A layer's elementwise steps in one pass each, with transformers' roundings (own_engine/native.py loads it).
// torch runs each as several whole-tensor ops in its dtype (RMSNorm alone: a float32 copy, pow, mean, rsqrt, two
// products, two roundings), ~2.8 ms for 2,048 rows of 1,024 bf16 on 2 threads, against ~0.2 ms to read and write
// them once. Each function rounds where transformers' Llama rounds, so outputs match its to the last bit except
// where a float32 sum's order or exp's last bit moves a rounding (the kernel's tests bound that).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <immintrin.h>

#include "simd.h"

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "needs avx512_bf16 and avx512bw (built with -march=native on such a CPU)"
#endif

namespace {

// 16 values of T (uint16_t: bf16, or float) as float32 lanes, n <= 16 of them (the rest 0), and back (bf16:
// rounded to nearest even, as torch rounds).
template <typename T>
inline __m512 load(const T* p, int n = 16) {
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
  if constexpr (sizeof(T) == 2)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  else
    return _mm512_maskz_loadu_ps(m, p);
}

template <typename T>
inline void store(T* p, __m512 x, int n = 16) {
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
  if constexpr (sizeof(T) == 2)
    _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
  else
    _mm512_mask_storeu_ps(p, m, x);
}

// x rounded to T and back: the value torch holds after an op in T.
template <typename T>
inline __m512 round_to(__m512 x) {
  if constexpr (sizeof(T) == 2)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x))), 16));
  else
    return x;
}

// Rows in parallel where there are enough to pay for waking the threads.
template <typename F>
inline void each_row(int64_t rows, int64_t work, int threads, F f) {
#pragma omp parallel for num_threads(threads) if (rows > 1 && rows * work >= 65536)
  for (int64_t r = 0; r < rows; ++r) f(r);
}

// LlamaRMSNorm: y = w * T(x * rsqrt(mean(x^2) + eps)), x in float32 (for float32, T is the identity and the product
// is torch.rms_norm's). With Add, of the residual sum s = T(x + sum) instead, written over sum (a product's output,
// the caller's to overwrite): the bits of torch's add and then this norm, in one pass where the two wrote s and read
// it back (2,048 rows of 1,024 bf16: 0.84 ms torch's add, 0.42 ms the norm).
template <typename T, bool Add>
void rms_norm(const T* x, int64_t x_stride, T* sum, const T* w, T* y, int64_t rows, int64_t cols, float eps,
              int threads) {
  each_row(rows, cols, threads, [&](int64_t r) {
    const T* xr = x + r * x_stride;
    T* sr = Add ? sum + r * cols : nullptr;
    const T* in = Add ? sr : xr;  // the normed row, as the second loop reads it
    const auto value = [&](int64_t c, int n) {
      if constexpr (Add) {
        const __m512 v = round_to<T>(_mm512_add_ps(load(xr + c, n), load(sr + c, n)));
        store(sr + c, v, n);
        return v;
      } else {
        return load(xr + c, n);
      }
    };
    T* yr = y + r * cols;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {
      const __m512 a = value(c, 16), b = value(c + 16, 16);
      s0 = _mm512_fmadd_ps(a, a, s0);
      s1 = _mm512_fmadd_ps(b, b, s1);
    }
    for (; c < cols; c += 16) {
      const __m512 a = value(c, static_cast<int>(std::min<int64_t>(16, cols - c)));
      s0 = _mm512_fmadd_ps(a, a, s0);
    }
    const float mean = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / static_cast<float>(cols);
    const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(mean + eps));
    for (c = 0; c < cols; c += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, cols - c));
      store(yr + c, _mm512_mul_ps(load(w + c, n), round_to<T>(_mm512_mul_ps(load(in + c, n), inv))), n);
    }
  });
}

// The SwiGLU's middle: y = T(silu(gate)) * up, silu(g) = g / (1 + exp(-g)) in float32 as torch computes it (the
// quotient from a refined reciprocal: within an ulp of it), 0 where exp(-g) overflows float32 (g below about -88.7)
// as torch gives -0 there, not NaN.
// In bf16 exp(-g) is 2^(-g log2 e) by exp2_<5> (within 1.6e-7; bits as torch's on 5.8M random values): 7 operations
// where exp_ps takes 17, in a pass that is compute-bound (2,048 x 2,816 on 2 threads: 1.60 -> 1.18 ms).
template <typename T>
void silu_mul(const T* gate, const T* up, int64_t in_stride, T* y, int64_t rows, int64_t cols, int threads) {
  each_row(rows, cols, threads, [&](int64_t r) {
    const T *g = gate + r * in_stride, *u = up + r * in_stride;
    T* yr = y + r * cols;
    for (int64_t c = 0; c < cols; c += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, cols - c));
      const __m512 a = load(g + c, n);
      __m512 e;
      __mmask16 over;
      if constexpr (sizeof(T) == 2) {
        const __m512 x = _mm512_mul_ps(a, _mm512_set1_ps(-1.44269504088896341f));
        over = _mm512_cmp_ps_mask(x, _mm512_set1_ps(128.0f), _CMP_GE_OQ);
        e = exp2_<5>(_mm512_min_ps(x, _mm512_set1_ps(127.99f)));  // 2^x finite below 128
      } else {
        const __m512 x = _mm512_sub_ps(_mm512_setzero_ps(), a);
        over = _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.7f), _CMP_GT_OQ);  // where exp_ps gives inf
        e = exp_ps(x);
      }
      const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
      __m512 r = _mm512_rcp14_ps(d);  // 1/d, refined once (a division is ~30% of the pass on 2,048 rows)
      r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r);
      const __m512 s = _mm512_maskz_mov_ps(static_cast<__mmask16>(~over), _mm512_mul_ps(a, r));
      store(yr + c, _mm512_mul_ps(round_to<T>(s), load(u + c, n)), n);
    }
  });
}

// Rotary embedding of `heads` heads of `dim` per row: y = T(x * cos) + T(swap_halves(x) * sin) (sin's first half
// negated: Rope.tables), as transformers' rotate_half computes it in T.
template <typename T>
void rope(const T* x, int64_t x_stride, const T* cos, const T* sin, T* y, int64_t rows, int64_t heads, int64_t dim,
          int threads) {
  const int64_t half = dim / 2;
  each_row(rows, heads * dim, threads, [&](int64_t r) {
    const T *cr = cos + r * dim, *sr = sin + r * dim;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xr = x + r * x_stride + h * dim;
      T* yr = y + (r * heads + h) * dim;
      for (int64_t c = 0; c < dim; c += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, dim - c));
        const int64_t other = c < half ? c + half : c - half;
        const __m512 a = round_to<T>(_mm512_mul_ps(load(xr + c, n), load(cr + c, n)));
        const __m512 b = round_to<T>(_mm512_mul_ps(load(xr + other, n), load(sr + c, n)));
        store(yr + c, _mm512_add_ps(a, b), n);
      }
    }
  });
}

}  // namespace

// dtype: 0 bf16, 1 float32. Every tensor's rows are contiguous; y is [rows, cols] (rope: [rows, heads, dim]).
extern "C" {

void layer_rms_norm(int dtype, const void* x, int64_t x_stride, const void* w, void* y, int64_t rows, int64_t cols,
                    float eps, int threads) {
  if (dtype == 0)
    rms_norm<uint16_t, false>(static_cast<const uint16_t*>(x), x_stride, nullptr, static_cast<const uint16_t*>(w),
                              static_cast<uint16_t*>(y), rows, cols, eps, threads);
  else
    rms_norm<float, false>(static_cast<const float*>(x), x_stride, nullptr, static_cast<const float*>(w),
                           static_cast<float*>(y), rows, cols, eps, threads);
}

void layer_add_rms_norm(int dtype, const void* x, int64_t x_stride, void* sum, const void* w, void* y, int64_t rows,
                        int64_t cols, float eps, int threads) {
  if (dtype == 0)
    rms_norm<uint16_t, true>(static_cast<const uint16_t*>(x), x_stride, static_cast<uint16_t*>(sum),
                             static_cast<const uint16_t*>(w), static_cast<uint16_t*>(y), rows, cols, eps, threads);
  else
    rms_norm<float, true>(static_cast<const float*>(x), x_stride, static_cast<float*>(sum),
                          static_cast<const float*>(w), static_cast<float*>(y), rows, cols, eps, threads);
}

void layer_silu_mul(int dtype, const void* gate, const void* up, int64_t in_stride, void* y, int64_t rows,
                    int64_t cols, int threads) {
  if (dtype == 0)
    silu_mul(static_cast<const uint16_t*>(gate), static_cast<const uint16_t*>(up), in_stride,
             static_cast<uint16_t*>(y), rows, cols, threads);
  else
    silu_mul(static_cast<const float*>(gate), static_cast<const float*>(up), in_stride, static_cast<float*>(y), rows,
             cols, threads);
}

void layer_rope(int dtype, const void* x, int64_t x_stride, const void* cos, const void* sin, void* y, int64_t rows,
                int64_t heads, int64_t dim, int threads) {
  if (dtype == 0)
    rope(static_cast<const uint16_t*>(x), x_stride, static_cast<const uint16_t*>(cos),
         static_cast<const uint16_t*>(sin), static_cast<uint16_t*>(y), rows, heads, dim, threads);
  else
    rope(static_cast<const float*>(x), x_stride, static_cast<const float*>(cos), static_cast<const float*>(sin),
         static_cast<float*>(y), rows, heads, dim, threads);
}

// y = T(a + b) over n bf16 values, as torch adds two bf16 tensors: in float32, rounded to nearest even (the
// residual adds of decode_layer.cpp).
void layer_add_bf16(const void* a, const void* b, void* y, int64_t n) {
  const auto *x0 = static_cast<const uint16_t*>(a), *x1 = static_cast<const uint16_t*>(b);
  auto* out = static_cast<uint16_t*>(y);
  for (int64_t i = 0; i < n; i += 16) {
    const int m = static_cast<int>(std::min<int64_t>(16, n - i));
    store(out + i, _mm512_add_ps(load(x0 + i, m), load(x1 + i, m)), m);
  }
}

}  // extern "C"
