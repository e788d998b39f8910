// The activation-side tables of the int8-activation affine product, shared by its AVX2 and
// AVX-512 kernels (see the affine section of lowbit/cpu_kernels.h).
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "lowbit/cpu_kernels.h"

namespace lowbit::cpu {

struct AffineQ8Prep {
  // The group (within a row) of each 32-element half chunk: group_size % 32 == 0, so a half chunk
  // never straddles two groups. [2 * chunks]
  std::vector<int32_t> half_group;
  // xsum[m][g] = sum over group g's half chunks of x_scale * sum x_q, from the offset sums of
  // quantize_activations_q8 (offsets[m][1 + half][c] = x_scale * 64 * sum over that half; the
  // division by 64 is exact). [M, K / group_size]
  std::vector<float> xsum;

  AffineQ8Prep(const float* offsets, int64_t M, int64_t K, int64_t group_size) {
    const int64_t chunks = K / kQ8Chunk, groups = K / group_size;
    half_group.resize(static_cast<size_t>(2 * chunks));
    for (int64_t h = 0; h < 2 * chunks; ++h) half_group[h] = int32_t(32 * h / group_size);
    xsum.assign(static_cast<size_t>(M * groups), 0.0f);
    for (int64_t m = 0; m < M; ++m) {
      const float* off = offsets + m * 3 * chunks;
      float* xs = xsum.data() + m * groups;
      for (int64_t h = 0; h < 2 * chunks; ++h)
        xs[half_group[h]] += off[(1 + (h & 1)) * chunks + (h >> 1)] / 64.0f;
    }
  }
};

// The order of work of both kernels over output features [n_begin, n_end): tile(RT, MT, rows, m0)
// (RT, MT as std::integral_constant) multiplies RT weight rows `rows` by MT activation rows from
// m0. M = 1: 2 weight rows half the range apart, so each thread keeps two independent DRAM streams
// (about twice the cache misses in flight of one: the codebook GEMV measured 30 vs 18 GB/s on
// 11008 x 4096 with 2 threads; adjacent rows look like one stream to the prefetchers). M > 1: each
// weight chunk is decoded once per group of up to 4 activation rows.
template <typename Tile>
void schedule_q8_rows(int64_t M, int64_t n_begin, int64_t n_end, Tile&& tile) {
  using One = std::integral_constant<int, 1>;
  if (M == 1) {
    const int64_t stride = (n_end - n_begin) / 2;
    for (int64_t j = n_begin; j < n_begin + stride; ++j) {
      const int64_t rows[2] = {j, j + stride};
      tile(std::integral_constant<int, 2>{}, One{}, rows, 0);
    }
    for (int64_t j = n_begin + 2 * stride; j < n_end; ++j) tile(One{}, One{}, &j, 0);
    return;
  }
  for (int64_t j = n_begin; j < n_end; ++j) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile(One{}, std::integral_constant<int, 4>{}, &j, m);
    for (; m + 2 <= M; m += 2) tile(One{}, std::integral_constant<int, 2>{}, &j, m);
    for (; m < M; ++m) tile(One{}, One{}, &j, m);
  }
}

// The 8-bit codes' order of work for M > 1: tiles of 4 weight rows (each activation block is loaded
// once per 4 weight rows) by up to kMaxMT activation rows (the ISA kernel's largest tile: 4 on
// AVX-512, 2 on AVX2), then the last (n_end - n_begin) % 4 weight rows one at a time.
template <int kMaxMT, typename Tile>
void schedule_q8_row_tiles(int64_t M, int64_t n_begin, int64_t n_end, Tile&& tile) {
  static_assert(kMaxMT == 2 || kMaxMT == 4, "activation-row tiles of 2 or 4");
  auto m_tiles = [&](auto rt, const int64_t* rows) {
    int64_t m = 0;
    if constexpr (kMaxMT == 4)
      for (; m + 4 <= M; m += 4) tile(rt, std::integral_constant<int, 4>{}, rows, m);
    for (; m + 2 <= M; m += 2) tile(rt, std::integral_constant<int, 2>{}, rows, m);
    for (; m < M; ++m) tile(rt, std::integral_constant<int, 1>{}, rows, m);
  };
  int64_t j = n_begin;
  for (; j + 4 <= n_end; j += 4) {
    const int64_t rows[4] = {j, j + 1, j + 2, j + 3};
    m_tiles(std::integral_constant<int, 4>{}, rows);
  }
  for (; j < n_end; ++j) m_tiles(std::integral_constant<int, 1>{}, &j);
}

}  // namespace lowbit::cpu
