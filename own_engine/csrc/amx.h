// AMX pieces the tile kernels share (prefill_attention.cpp, tile_matmul.cpp).
#pragma once
#include <cstdint>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define OWN_ENGINE_AMX 1

struct TileConfig {  // the LDTILECFG operand: palette 1, eight tiles of 16 rows of 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Configures this thread's tiles. The operand is a constant in memory: g++ 12 does not count LDTILECFG as a read
// of its operand, and dropped the stores of a local one's fields at -O2 (a crash on loading the configuration).
inline void configure_tiles() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}

// Linux hands AMX's tile state to a process that asks once (oneDNN asks too, so a second ask is harmless).
inline bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}
#endif
