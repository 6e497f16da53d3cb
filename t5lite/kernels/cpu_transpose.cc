// Transposes a row-major bf16 matrix [rows, cols] into [cols, rows], as one XLA FFI handler, in
// 64 x 64 tiles (8 KB in, 8 KB out) spread over XLA's intra-op threads. XLA:CPU's own transpose
// reads one element per strided load, ~1 GB/s on the machine it was written on, against 8-10
// GB/s here ([2560, 2048]: 18.3 -> 2.1 ms on 2 cores). Plain C++, built without -march, for any
// CPU of the host's architecture. t5lite/models/projection.py uses it for the transposed
// activations of the bf16 weight gradient.
#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"
#include "cpu_threads.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 64;  // 64 x 64 x 2 bytes: 8 KB in, 8 KB out
constexpr int64_t kTilesPerItem = 8;

void TransposeTiles(const uint16_t* in, uint16_t* out, int64_t rows, int64_t cols, int64_t first,
                    int64_t last) {
  const int64_t col_tiles = (cols + kTile - 1) / kTile;
  for (int64_t t = first; t < last; ++t) {
    const int64_t r0 = (t / col_tiles) * kTile, c0 = (t % col_tiles) * kTile;
    const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
    for (int64_t c = c0; c < c1; ++c) {
      uint16_t* dst = out + c * rows;
      for (int64_t r = r0; r < r1; ++r) dst[r] = in[r * cols + c];
    }
  }
}

ffi::Error TransposeImpl(ffi::Buffer<ffi::BF16> in, ffi::ResultBuffer<ffi::BF16> out,
                         ffi::ThreadPool pool) {
  auto dims = in.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("cpu transpose: a matrix only");
  const int64_t rows = dims[0], cols = dims[1];
  const auto* src = reinterpret_cast<const uint16_t*>(in.typed_data());
  auto* dst = reinterpret_cast<uint16_t*>(out->typed_data());
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuTranspose, TransposeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ctx<ffi::ThreadPool>());
