// A decoder layer's steps for a batch of decoding rows in two calls (own_engine/native.py loads it), around the KV
// write that stays in Python (kv_cache.py: tiers, their byte counts): the same kernels as the layer's Python path
// (layer_ops.cpp, tile_matmul.cpp, paged_attention.cpp), in the same order, so its outputs are those bits. A decode
// step of the 201M benchmark model made ~45 Python-level tensor operations a layer, and each ran with its caches
// flushed by the layer's weights streaming past: ~3.1 ms of an 18.4 ms step (2,048 tokens) went between the kernels.
// bf16 only: the tile kernel's dtype.
#include <cstdint>
#include <cstring>

extern "C" {
void layer_rms_norm(int dtype, const void* x, int64_t x_stride, const void* w, void* y, int64_t rows, int64_t cols,
                    float eps, int threads);
void layer_add_rms_norm(int dtype, const void* x, int64_t x_stride, void* sum, const void* w, void* y, int64_t rows,
                        int64_t cols, float eps, int threads);
void layer_silu_mul(int dtype, const void* gate, const void* up, int64_t in_stride, void* y, int64_t rows,
                    int64_t cols, int threads);
void layer_rope(int dtype, const void* x, int64_t x_stride, const void* cos, const void* sin, void* y, int64_t rows,
                int64_t heads, int64_t dim, int threads);
int tile_matmul(const void* x, int64_t x_row, const void* w, const void* bias, void* y, int64_t y_row, int64_t m,
                int64_t n, int64_t k, void* xp, int threads);
int paged_attention(int dtype, const void* q, const void* k, const void* v, const int32_t* tables,
                    int64_t table_stride, const int32_t* lengths, int64_t n, int64_t group, int64_t kv_heads,
                    int64_t dim, int64_t block_size, int64_t window, float scale, void* out, float* scratch,
                    int64_t parts, int threads);
void layer_add_bf16(const void* a, const void* b, void* y, int64_t n);

// Before the KV write: qkv [n, qkv_cols] = T(norm(x) * w_norm) w_qkv^T (+ b_qkv), and its first qk_heads heads
// rotated into qk [n, qk_heads, dim]. h: [n, hidden] scratch; xp: the tile kernel's, for k = hidden. Returns 0, or 1
// where the tile kernel does not take the shapes.
int decode_layer_head(const void* x, const void* w_norm, float eps, const void* w_qkv, const void* b_qkv, int64_t n,
                      int64_t hidden, int64_t qkv_cols, int64_t qk_heads, int64_t dim, const void* cos,
                      const void* sin, void* h, void* qkv, void* qk, void* xp, int threads) {
  layer_rms_norm(0, x, hidden, w_norm, h, n, hidden, eps, threads);
  if (tile_matmul(h, hidden, w_qkv, b_qkv, qkv, qkv_cols, n, qkv_cols, hidden, xp, threads)) return 1;
  layer_rope(0, qkv, qkv_cols, cos, sin, qk, n, qk_heads, dim, threads);
  return 0;
}

// After the KV write: attention of q (the first heads * dim of each qk row, [n, qk_heads, dim]) over the pool as
// paged_attention reads it, then x1 = T(x + attn w_o^T), y = T(x1 + mlp(T(norm(x1) * w_post))), mlp = down(T(silu(
// gate)) * up) with gate and up the two halves of one product by w_gate_up [2 * inter, hidden]. Scratch: bf16 `buf`
// of n * (2 * heads * dim + 3 * hidden + 3 * inter) values, float `scores` as paged_attention's, xp the tile
// kernel's for k = max(hidden, inter, heads * dim). Returns 0, or 1 where a kernel does not take the shapes.
int decode_layer_tail(const void* qk, int64_t qk_heads, const void* kpool, const void* vpool, const int32_t* tables,
                      int64_t table_stride, const int32_t* lengths, int64_t heads, int64_t kv_heads, int64_t dim,
                      int64_t block_size, int64_t window, float scale, int64_t parts, const void* x,
                      const void* w_o, const void* w_post, float eps, const void* w_gate_up, const void* w_down,
                      int64_t n, int64_t hidden, int64_t inter, void* y, void* buf, float* scores, void* xp,
                      int threads) {
  const int64_t width = heads * dim;
  uint16_t* q = static_cast<uint16_t*>(buf);
  uint16_t* attn = q + n * width;
  uint16_t* x1 = attn + n * width;
  uint16_t* h = x1 + n * hidden;
  uint16_t* mid = h + n * hidden;  // down_proj's output
  uint16_t* gate_up = mid + n * hidden;
  uint16_t* act = gate_up + n * 2 * inter;
  for (int64_t r = 0; r < n; ++r)  // the kernel takes q's rows contiguous
    std::memcpy(q + r * width, static_cast<const uint16_t*>(qk) + r * qk_heads * dim, width * 2);
  if (paged_attention(0, q, kpool, vpool, tables, table_stride, lengths, n, heads / kv_heads, kv_heads, dim,
                      block_size, window, scale, attn, scores, parts, threads))
    return 1;
  if (tile_matmul(attn, width, w_o, nullptr, x1, hidden, n, hidden, width, xp, threads)) return 1;
  layer_add_rms_norm(0, x, hidden, x1, w_post, h, n, hidden, eps, threads);  // x1 = T(x + x1), h its norm
  if (tile_matmul(h, hidden, w_gate_up, nullptr, gate_up, 2 * inter, n, 2 * inter, hidden, xp, threads)) return 1;
  layer_silu_mul(0, gate_up, gate_up + inter, 2 * inter, act, n, inter, threads);
  if (tile_matmul(act, inter, w_down, nullptr, mid, hidden, n, hidden, inter, xp, threads)) return 1;
  layer_add_bf16(x1, mid, y, n * hidden);
  return 0;
}

}  // extern "C"
