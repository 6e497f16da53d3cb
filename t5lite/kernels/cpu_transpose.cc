// Transposes a row-major bf16 or fp32 matrix [rows, cols] into [cols, rows], as XLA FFI handlers
// (one per element size), in 64 x 64 tiles (8 KB in and out for bf16, 16 KB for fp32) spread
// over XLA's intra-op threads. XLA:CPU's own transpose reads one element per strided load, 1-2
// GB/s on the machine it was written on, against 8-15 GB/s here ([2560, 2048] on 2 cores: bf16
// 18.3 -> 2.1 ms, fp32 20.5 -> 3.4 ms). Plain C++ (and SSE2, which every x86-64 CPU has),
// built without -march, for any CPU of the host's architecture.
// t5lite/models/projection.py uses it for the transposed activations of the weight gradient.
#include <algorithm>
#include <cstdint>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "cpu_threads.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 64;
constexpr int64_t kTilesPerItem = 8;

// in[r0:r1, c0:c1] transposed into out, one element at a time.
template <typename T>
void TransposeScalar(const T* in, T* out, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                     int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    T* dst = out + c * rows;
    for (int64_t r = r0; r < r1; ++r) dst[r] = in[r * cols + c];
  }
}

#if defined(__SSE2__)
// 4-byte elements (fp32) on x86-64: a 16 x 16 block whose 16 rows in are read whole (a 64-byte
// line each, 4 x 4 pieces transposed in registers) into a 1 KB buffer, and whose 16 rows out are
// then written whole from it. The element-at-a-time loop read 64 rows of a tile down a column:
// at a power-of-two row stride those rows share a few of L1's sets and evict each other (AMD Zen
// 3, 32 KB of L1 a core, 2 cores: [2048, 512] at 7 GB/s, [2048, 1024] at 4, against 17 for
// [2048, 384]).
void TransposeBlock16(const uint32_t* in, int64_t cols, uint32_t* out, int64_t rows) {
  alignas(64) uint32_t buf[16][16];  // buf[c][r] = in[r][c]
  for (int r = 0; r < 16; r += 4)
    for (int c = 0; c < 16; c += 4) {
      __m128i a[4];
      for (int i = 0; i < 4; ++i)
        a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + (r + i) * cols + c));
      const __m128i t0 = _mm_unpacklo_epi32(a[0], a[1]), t1 = _mm_unpacklo_epi32(a[2], a[3]);
      const __m128i t2 = _mm_unpackhi_epi32(a[0], a[1]), t3 = _mm_unpackhi_epi32(a[2], a[3]);
      _mm_store_si128(reinterpret_cast<__m128i*>(&buf[c][r]), _mm_unpacklo_epi64(t0, t1));
      _mm_store_si128(reinterpret_cast<__m128i*>(&buf[c + 1][r]), _mm_unpackhi_epi64(t0, t1));
      _mm_store_si128(reinterpret_cast<__m128i*>(&buf[c + 2][r]), _mm_unpacklo_epi64(t2, t3));
      _mm_store_si128(reinterpret_cast<__m128i*>(&buf[c + 3][r]), _mm_unpackhi_epi64(t2, t3));
    }
  for (int c = 0; c < 16; ++c)
    for (int r = 0; r < 16; r += 4)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c * rows + r),
                       _mm_load_si128(reinterpret_cast<const __m128i*>(&buf[c][r])));
}
#endif

template <typename T>
void TransposeTiles(const T* in, T* out, int64_t rows, int64_t cols, int64_t first,
                    int64_t last) {
  const int64_t col_tiles = (cols + kTile - 1) / kTile;
  for (int64_t t = first; t < last; ++t) {
    const int64_t r0 = (t / col_tiles) * kTile, c0 = (t % col_tiles) * kTile;
    const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
#if defined(__SSE2__)
    if constexpr (sizeof(T) == 4) {
      // Whole 16 x 16 blocks, then the tile's last rows and columns one element at a time.
      const int64_t rb = r0 + (r1 - r0) / 16 * 16, cb = c0 + (c1 - c0) / 16 * 16;
      for (int64_t r = r0; r < rb; r += 16)
        for (int64_t c = c0; c < cb; c += 16)
          TransposeBlock16(in + r * cols + c, cols, out + c * rows + r, rows);
      TransposeScalar(in, out, rows, cols, r0, r1, cb, c1);
      TransposeScalar(in, out, rows, cols, rb, r1, c0, cb);
      continue;
    }
#endif
    TransposeScalar(in, out, rows, cols, r0, r1, c0, c1);
  }
}

// out = in^T for elements of type T (moved as raw bits: bf16 as uint16_t, fp32 as uint32_t).
template <typename T, ffi::DataType kType>
ffi::Error TransposeImpl(ffi::Buffer<kType> in, ffi::ResultBuffer<kType> out,
                         ffi::ThreadPool pool) {
  static_assert(sizeof(T) == sizeof(ffi::NativeType<kType>));
  auto dims = in.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("cpu transpose: a matrix only");
  const int64_t rows = dims[0], cols = dims[1];
  const auto* src = reinterpret_cast<const T*>(in.typed_data());
  auto* dst = reinterpret_cast<T*>(out->typed_data());
  const int64_t tiles = ((rows + kTile - 1) / kTile) * ((cols + kTile - 1) / kTile);
  const int64_t items = (tiles + kTilesPerItem - 1) / kTilesPerItem;
  auto item = [tiles, src, dst, rows, cols](int, int64_t i) {
    TransposeTiles(src, dst, rows, cols, i * kTilesPerItem,
                   std::min(tiles, (i + 1) * kTilesPerItem));
  };
  t5lite::ParallelFor(pool, items, t5lite::Threads(pool, items), item);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuTranspose, (TransposeImpl<uint16_t, ffi::BF16>),
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ctx<ffi::ThreadPool>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuTransposeF32, (TransposeImpl<uint32_t, ffi::F32>),
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());
