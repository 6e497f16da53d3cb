// Matrix products for XLA:CPU as XLA FFI handlers: Matvec, a decoding step's projections of a
// few rows, bf16 or fp32 (bf16 ones with a bf16 or an fp32 output; cpu_matvec.py calls it);
// F32Matmul, training's fp32 products (cpu_matmul.py); Matmul, training's bf16 products with
// fp32 sums on AMX, fp32 or bf16 outputs (it shares Matvec's AMX tiles; cpu_matmul.py). They
// are built into one library with cpu_attention.cc, whose vectors (cpu_vectors.h) and threads
// (cpu_threads.h) they share.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>  // sysconf: the L2's size

#include "xla/ffi/api/ffi.h"
#include "cpu_threads.h"
#include "cpu_vectors.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>  // PackF32Columns' gathers, and AMX's tiles
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__)
#include <sys/syscall.h>
#endif

namespace ffi = xla::ffi;

namespace t5lite {
namespace {

// ---- Matrix-vector products: a decoding step's projections of a few rows ----
//
// y [m, n] = x [m, k] . W, with W stored [k, n] (kn) or [n, k] (nk, the [vocab, embed] output
// head), for the few rows (m <= kMaxRows) of a decoding step. Such a product reads every weight
// once for a few multiply-adds each: bound by the bytes of W read. XLA:CPU runs a one-row bf16
// product with its own dot emitter after widening W to fp32 (every weight of the model, once per
// decode call, and then reads twice the bytes each step), and YNNPACK runs 2-4 rows at ~10 GB/s.
// Here W is read as stored, widened a vector at a time, at 14-35 GB/s on 2 cores of an Intel
// Xeon; products and sums are fp32, y narrowed (round to nearest even) as it is written.
constexpr int64_t kMaxRows = 4;
constexpr int64_t kMaxFmaRowsTransposed = 2;  // nk beyond 2 rows: AMX's, or XLA's product
constexpr int kAccumulators = kWide ? 16 : 8;  // vector registers holding sums
constexpr int64_t kRowsPerItem = 64;           // rows of W per work item

// kn: part [kM, n] = x[:, e0:e1] . W[e0:e1, :] for kM rows of x (fp32, row stride k). W is
// read in its memory order, four rows at a time (a walk down the columns instead, a vector's
// width at a time, ran at half the bandwidth: strided reads from memory), the sums kept in
// `part` between groups of rows.
template <int kM, typename T>
void KnRows(const float* x, int64_t k, const T* w, int64_t n, int64_t e0, int64_t e1,
            float* part) {
  constexpr int kVecs = kAccumulators / kM;
  constexpr int64_t kStep = kVecs * kLanes;
  std::fill(part, part + kM * n, 0.0f);
  for (int64_t e = e0; e < e1; e += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, e1 - e));
    int64_t c = 0;
    for (; c + kStep <= n; c += kStep) {
      V acc[kM][kVecs];
      for (int r = 0; r < kM; ++r)
        for (int j = 0; j < kVecs; ++j) acc[r][j] = Load(part + r * n + c + j * kLanes);
      for (int i = 0; i < rows; ++i) {
        V xv[kM];
        for (int r = 0; r < kM; ++r) xv[r] = Splat(x[r * k + e + i]);
        for (int j = 0; j < kVecs; ++j) {
          V wv = LoadWide(w + (e + i) * n + c + j * kLanes);
          for (int r = 0; r < kM; ++r) acc[r][j] += xv[r] * wv;
        }
      }
      for (int r = 0; r < kM; ++r)
        for (int j = 0; j < kVecs; ++j) Store(part + r * n + c + j * kLanes, acc[r][j]);
    }
    for (; c < n; ++c)  // a tail of columns narrower than the vectors
      for (int i = 0; i < rows; ++i)
        for (int r = 0; r < kM; ++r)
          part[r * n + c] += x[r * k + e + i] * Widen(w[(e + i) * n + c]);
  }
}

// nk: y[:, r0:r1] (rows r0..r1 of W) for kM rows of x, kW rows of W at a time.
template <int kM, typename T>
void NkRows(const float* x, int64_t k, const T* w, int64_t n, int64_t r0, int64_t r1, float* y) {
  constexpr int kW = kAccumulators / kM;
  const int64_t whole = k - k % kLanes;
  for (int64_t i = r0; i < r1; i += kW) {
    const int rows = static_cast<int>(std::min<int64_t>(kW, r1 - i));
    V acc[kM][kW] = {};
    for (int64_t e = 0; e < whole; e += kLanes) {
      V xv[kM];
      for (int r = 0; r < kM; ++r) xv[r] = Load(x + r * k + e);
      for (int j = 0; j < kW; ++j) {
        if (j >= rows) break;
        V wv = LoadWide(w + (i + j) * k + e);
        for (int r = 0; r < kM; ++r) acc[r][j] += xv[r] * wv;
      }
    }
    for (int j = 0; j < rows; ++j)
      for (int r = 0; r < kM; ++r) {
        float sum = Sum(acc[r][j]);
        for (int64_t e = whole; e < k; ++e) sum += x[r * k + e] * Widen(w[(i + j) * k + e]);
        y[r * n + i + j] = sum;
      }
  }
}

template <int kM, typename T>
void MatvecItem(bool nk, const float* x, int64_t k, const T* w, int64_t n, int64_t item,
                float* y, float* parts) {
  if (nk) {
    NkRows<kM>(x, k, w, n, item * kRowsPerItem, std::min(n, (item + 1) * kRowsPerItem), y);
  } else {
    KnRows<kM>(x, k, w, n, item * kRowsPerItem, std::min(k, (item + 1) * kRowsPerItem),
               parts + item * kM * n);
  }
}

// ---- fp32 products of more rows (5..kMaxF32Rows: a decoding step at batch 8-32), kn ----
//
// YNNPACK ran them at 40-60% of the fp32 FMA peak from cache, less with the weights from memory
// (decoder-125m's fp32 decode step at batch 32: ~75 GFLOP/s). Here each work item is a panel of
// kF32Panel columns of W, a sub-panel of kTileVecs vectors at a time, multiplied with kTileRows
// rows of x at a time, a tile's sums kept in registers over all of k. The first tile reads the
// sub-panel from W (the rows kAhead on prefetched) and copies it into a buffer, which the other
// tiles read: W's rows lie a power-of-two stride apart, and read in place again they missed in
// cache.
constexpr int64_t kMaxF32Rows = 32;
constexpr int kTileRows = kWide ? 6 : 2;  // 6 x 4 AVX-512 (2 x 4 AVX2) accumulators
constexpr int kTileVecs = 4;
constexpr int64_t kF32Panel = 8 * kLanes;  // W's columns per work item
constexpr int64_t kAhead = 8;              // W's rows prefetched ahead by the first tile

// y[0:kR, 0:kV vectors] (row stride n) = x[0:kR, :] (row stride k) . W's sub-panel, read from
// w (row stride ld), and with kCopy also copied into p [k, kV vectors].
template <int kR, int kV, bool kCopy>
void F32Tile(const float* x, int64_t k, const float* w, int64_t ld, float* p, float* y,
             int64_t n) {
  V acc[kR][kV] = {};
  for (int64_t e = 0; e < k; ++e) {
    const float* wr = w + e * ld;
    if (kCopy && e + kAhead < k)
      for (int j = 0; j < kV * kLanes; j += 16) __builtin_prefetch(wr + kAhead * ld + j);
    V wv[kV];
    for (int j = 0; j < kV; ++j) {
      wv[j] = Load(wr + j * kLanes);
      if (kCopy) Store(p + (e * kV + j) * kLanes, wv[j]);
    }
    for (int r = 0; r < kR; ++r) {
      const V xv = Splat(x[r * k + e]);
      for (int j = 0; j < kV; ++j) acc[r][j] += xv * wv[j];
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int j = 0; j < kV; ++j) Store(y + r * n + j * kLanes, acc[r][j]);
}

template <int kR, bool kCopy>
void F32TileRows(int vecs, const float* x, int64_t k, const float* w, int64_t ld, float* p,
                 float* y, int64_t n) {
  switch (vecs) {
    case 1: return F32Tile<kR, 1, kCopy>(x, k, w, ld, p, y, n);
    case 2: return F32Tile<kR, 2, kCopy>(x, k, w, ld, p, y, n);
    case 3: return F32Tile<kR, 3, kCopy>(x, k, w, ld, p, y, n);
    default: return F32Tile<kR, 4, kCopy>(x, k, w, ld, p, y, n);
  }
}

template <bool kCopy>
void F32Rows(int rows, int vecs, const float* x, int64_t k, const float* w, int64_t ld,
             float* p, float* y, int64_t n) {
  switch (rows) {
    case 1: return F32TileRows<1, kCopy>(vecs, x, k, w, ld, p, y, n);
#if defined(__AVX512F__)
    case 2: return F32TileRows<2, kCopy>(vecs, x, k, w, ld, p, y, n);
    case 3: return F32TileRows<3, kCopy>(vecs, x, k, w, ld, p, y, n);
    case 4: return F32TileRows<4, kCopy>(vecs, x, k, w, ld, p, y, n);
    case 5: return F32TileRows<5, kCopy>(vecs, x, k, w, ld, p, y, n);
    default: return F32TileRows<6, kCopy>(vecs, x, k, w, ld, p, y, n);
#else
    default: return F32TileRows<2, kCopy>(vecs, x, k, w, ld, p, y, n);
#endif
  }
}

// y[:, c0:c1] = x W[:, c0:c1] for all m rows of x (c1 - c0 a multiple of kLanes).
void F32KnPanel(const float* x, int64_t m, int64_t k, const float* w, int64_t n, int64_t c0,
                int64_t c1, float* y, std::vector<float>& buffer) {
  buffer.resize(k * kTileVecs * kLanes);
  float* p = buffer.data();
  for (int64_t c = c0; c < c1; c += kTileVecs * kLanes) {
    const int vecs = static_cast<int>(std::min<int64_t>(kTileVecs, (c1 - c) / kLanes));
    for (int64_t r = 0; r < m; r += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - r));
      if (r == 0)
        F32Rows<true>(rows, vecs, x, k, w + c, n, p, y + c, n);
      else
        F32Rows<false>(rows, vecs, x + r * k, k, p, vecs * kLanes, nullptr, y + r * n + c, n);
    }
  }
}

// ---- Training's fp32 products: c [m, n] = a [m, k] . b [k, n] (or b stored [n, k]) ----
//
// XLA:CPU's fp32 matmuls ran decoder-125m's products at 0.33-0.38 TFLOP/s on 2 cores of an
// Intel Xeon, where torch's reach 0.39-0.45. Here the tiles above, for any number of rows: each
// work item packs a sub-panel of kGemmVecs vectors of b's columns (depth rows of it, at most
// kF32Depth: 320 KB; or a group of them, below) and multiplies it with kGemmRows rows of a at a
// time, sums in registers over the depth, added into c after the first block of k: 1.1-1.25x
// XLA's speed. b may be stored transposed ([n, k]: the head's [vocab, embed] kernel, a layer's
// kernel in its input gradient), packed as it stands (PackF32Columns). (a stored transposed, a
// weight gradient's activations, read kGemmRows values of a strided row per step: 0.75-0.85x
// XLA's speed; the weight gradient transposes them first, t5lite/kernels/cpu_transpose.cc.)
// 1280 rows deep rather than 1024: a weight gradient over 2560 tokens in two blocks, not three
// (c written once less; [768, 2560] x [2560, 4096] 44.3 -> 42.6 ms, [768, 2560] x [2560, 32000]
// 354 -> 339).
// A shallow product (k = 128: T5-tiny's layers and head) writes c for few products a value:
// an item packs a group of sub-panels (up to F32GroupBytes() of them) and runs each row tile
// across the group, so that c's rows are written F32GroupBytes() / (4 depth) floats at a time,
// not 64 (a new page every row at n = 32128): 0.22-0.25 -> 0.27-0.30 TFLOP/s at k = 128,
// [2048, 512] x [512, 1024] 0.30 -> 0.31, deeper products unchanged.
// A tile is kGemmRows rows of a by kGemmVecs vectors of b's columns: 6 x 4 vectors on AVX-512
// (24 of its 32 registers hold sums), 6 x 2 on AVX2 (12 of 16; 2 vectors of b and a broadcast
// of a, AVX2's FMA taking no broadcast operand).
constexpr int kGemmRows = 6;
constexpr int kGemmVecs = kWide ? 4 : 2;
constexpr int64_t kF32Depth = 1280;
constexpr int64_t kF32ItemsPerThread = 4;
// A group is at most a quarter of a core's L2, and at most kF32GroupBytes (F32GroupBytes: 512 KB
// of an Intel Xeon's 2 MB; 128 KB of AMD Zen 3's 512 KB, where a 512 KB group fills the L2 that
// also holds a's rows and c's tiles: against XLA's speed in the same runs, [2048, 512] x
// [512, 2048] 1.02-1.04x -> 1.18-1.25x, [2048, 512] x [512, 384] 1.11-1.29x -> 1.32-1.36x; a
// host whose timings drift by a third, so alternated runs and their best).
constexpr int64_t kF32GroupBytes = 512 << 10;  // also where the L2's size is not known
int64_t F32GroupBytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 >= (128 << 10)) return std::min<int64_t>(l2 / 4, kF32GroupBytes);
#endif
    return kF32GroupBytes;
  }();
  return bytes;
}
// a stored transposed ([k, m], at: the head's weight gradient g^T x from g [tokens, vocab] as
// stored) is copied kF32ChunkRows rows at a time into [depth, 192] (one strided row of a per
// depth step, not kGemmRows of them per step of every tile) and multiplied from there; the
// copies are made once per group, so cpu_matmul.py uses it only where n is one group (T5-tiny's
// head: 0.15 -> 0.25 TFLOP/s against XLA's; a layer's weight gradient, in many groups, is faster
// from the transposed copy: [768, 2560] x [2560, 4096] 0.33 against 0.22 TFLOP/s).
constexpr int64_t kF32ChunkRows = 192;
// An item of at most kF32InPlaceRows rows reads b [k, n] where it is, not packed: the copy
// costs as much as its few tiles' products (a weight gradient of 128 outputs, [128, 2560] x
// [2560, 128]: 0.77 -> 0.96-1.0x torch's speed; 128 rows were slower at n = 512).
constexpr int64_t kF32InPlaceRows = 64;

// c[0:kR, 0:kV vectors] (row stride n) (+)= a's kR rows . the sub-panel p [depth, kV vectors]
// (row stride ldp). Row r's e-th value of a is a[r lda + e], or a[r + e lda] with kAt (a copied
// transposed; a template parameter, so that the usual layout's inner loop steps by a constant).
template <int kR, int kV, bool kAt>
void F32GemmTile(const float* a, int64_t lda, int64_t depth, const float* p, int64_t ldp,
                 float* c, int64_t n, bool accumulate) {
  V acc[kR][kV];
  for (int r = 0; r < kR; ++r)
    for (int j = 0; j < kV; ++j) acc[r][j] = accumulate ? Load(c + r * n + j * kLanes) : V{};
  for (int64_t e = 0; e < depth; ++e) {
    V wv[kV];
    for (int j = 0; j < kV; ++j) wv[j] = Load(p + e * ldp + j * kLanes);
    for (int r = 0; r < kR; ++r) {
      const V xv = Splat(kAt ? a[r + e * lda] : a[r * lda + e]);
      for (int j = 0; j < kV; ++j) acc[r][j] += xv * wv[j];
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int j = 0; j < kV; ++j) Store(c + r * n + j * kLanes, acc[r][j]);
}

template <int kR, bool kAt>
void F32GemmRows(int vecs, const float* a, int64_t lda, int64_t depth, const float* p,
                 int64_t ldp, float* c, int64_t n, bool accumulate) {
  switch (vecs) {
    case 1: return F32GemmTile<kR, 1, kAt>(a, lda, depth, p, ldp, c, n, accumulate);
#if defined(__AVX512F__)
    case 2: return F32GemmTile<kR, 2, kAt>(a, lda, depth, p, ldp, c, n, accumulate);
    case 3: return F32GemmTile<kR, 3, kAt>(a, lda, depth, p, ldp, c, n, accumulate);
    default: return F32GemmTile<kR, 4, kAt>(a, lda, depth, p, ldp, c, n, accumulate);
#else
    default: return F32GemmTile<kR, 2, kAt>(a, lda, depth, p, ldp, c, n, accumulate);
#endif
  }
}

template <bool kAt>
void F32GemmTileRows(int rows, int vecs, const float* a, int64_t lda, int64_t depth,
                     const float* p, int64_t ldp, float* c, int64_t n, bool accumulate) {
  switch (rows) {
    case 1: return F32GemmRows<1, kAt>(vecs, a, lda, depth, p, ldp, c, n, accumulate);
    case 2: return F32GemmRows<2, kAt>(vecs, a, lda, depth, p, ldp, c, n, accumulate);
    case 3: return F32GemmRows<3, kAt>(vecs, a, lda, depth, p, ldp, c, n, accumulate);
    case 4: return F32GemmRows<4, kAt>(vecs, a, lda, depth, p, ldp, c, n, accumulate);
    case 5: return F32GemmRows<5, kAt>(vecs, a, lda, depth, p, ldp, c, n, accumulate);
    default: return F32GemmRows<6, kAt>(vecs, a, lda, depth, p, ldp, c, n, accumulate);
  }
}

// The blocks of rows a product's work items of (panel, block of rows) split `groups` whole
// groups of rows into (kGemmRows-row tiles, AMX's 32-row stripes): as few as give every thread
// `per_thread` items of `panels` panels; with `even`, more until the threads divide the items
// evenly, where the groups allow (a product of few columns has few panels).
inline int64_t RowBlocks(ffi::ThreadPool& pool, int64_t panels, int64_t groups, int64_t per_thread,
                         bool even) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t fewest = (threads * per_thread + panels - 1) / panels;
  int64_t blocks = std::min(groups, std::max<int64_t>(1, fewest));
  while (even && (panels * blocks) % threads && blocks < groups) ++blocks;
  return blocks;
}

// p[e][j] = bt[j][e] for e < rows, j < cols (bt's rows k apart; cols a multiple of kLanes): a
// sub-panel of b stored [n, k], one vector of p per gather of a column of bt's rows (scalar
// copies, one strided load each, cost as much as the products at k = 128).
void PackF32Columns(const float* bt, int64_t k, int64_t rows, int64_t cols, float* p) {
#if defined(__AVX512F__)
  const __m512i apart = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int>(k)));
  for (int64_t j = 0; j < cols; j += 16)
    for (int64_t e = 0; e < rows; ++e)
      _mm512_storeu_ps(p + e * cols + j, _mm512_i32gather_ps(apart, bt + j * k + e, 4));
#elif defined(__AVX2__)
  // 8 x 8 blocks transposed in registers: AVX2's gathers (on AMD Zen 3) packed the head's
  // [32128, 512] kernel slower than XLA's whole product ran.
  int64_t e = 0;
  for (; e + 8 <= rows; e += 8)
    for (int64_t j = 0; j < cols; j += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(bt + (j + i) * k + e);  // column j + i
      for (int i = 0; i < 8; i += 2) {  // t[i]: (r[i][0], r[i+1][0], r[i][1], r[i+1][1] | [4, 5])
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // the same of [2, 3 | 6, 7]
      }
      for (int i = 0; i < 8; i += 4)  // r[i + d]: depth d | d + 4 of columns j + i .. j + i + 3
        for (int d = 0; d < 4; ++d)
          r[i + d] = d % 2 ? _mm256_shuffle_ps(t[i + d / 2], t[i + 2 + d / 2], 0xee)
                           : _mm256_shuffle_ps(t[i + d / 2], t[i + 2 + d / 2], 0x44);
      for (int d = 0; d < 4; ++d) {
        _mm256_storeu_ps(p + (e + d) * cols + j, _mm256_permute2f128_ps(r[d], r[d + 4], 0x20));
        _mm256_storeu_ps(p + (e + d + 4) * cols + j, _mm256_permute2f128_ps(r[d], r[d + 4], 0x31));
      }
    }
  for (; e < rows; ++e)
    for (int64_t j = 0; j < cols; ++j) p[e * cols + j] = bt[j * k + e];
#else
  for (int64_t e = 0; e < rows; ++e)
    for (int64_t j = 0; j < cols; ++j) p[e * cols + j] = bt[j * k + e];
#endif
}

// c = a . b (section comment above; at: a stored [k, m], bt: b stored [n, k]); n a multiple of
// kLanes.
void F32Gemm(const float* a, int64_t m, int64_t k, bool at, const float* b, int64_t n, bool bt,
             ffi::ThreadPool& pool, float* c) {
  const int64_t sub = kGemmVecs * kLanes, subs = (n + sub - 1) / sub;
  const int64_t depth_blocks = (k + kF32Depth - 1) / kF32Depth;
  const int64_t depth = (k + depth_blocks - 1) / depth_blocks;
  const int64_t group = std::clamp<int64_t>(F32GroupBytes() / (depth * sub * 4), 1, subs);
  const int64_t groups = (subs + group - 1) / group;
  const int64_t tiles = (m + kGemmRows - 1) / kGemmRows;
  const int64_t row_blocks = RowBlocks(pool, groups, tiles, kF32ItemsPerThread, false);
  const int64_t block_rows = (tiles + row_blocks - 1) / row_blocks * kGemmRows;
  const int64_t items = groups * row_blocks;
  auto item = [&](int, int64_t i) {
    thread_local std::vector<float> panel, chunk;  // kept across calls, as the AMX product's
    const int64_t c0 = (i / row_blocks) * group * sub, c1 = std::min(n, c0 + group * sub);
    const int64_t r0 = std::min(m, (i % row_blocks) * block_rows);
    const int64_t r1 = std::min(m, r0 + block_rows);
    if (r0 == r1) return;
    if (panel.size() < static_cast<size_t>(depth * group * sub)) panel.resize(depth * group * sub);
    if (at && chunk.size() < static_cast<size_t>(depth * kF32ChunkRows))
      chunk.resize(depth * kF32ChunkRows);
    const bool packed = bt || r1 - r0 > kF32InPlaceRows;  // else b [k, n] read where it is
    for (int64_t e0 = 0; e0 < k; e0 += depth) {
      const int64_t rows = std::min(depth, k - e0);
      if (packed) {
        for (int64_t s0 = c0; s0 < c1; s0 += sub) {  // sub-panel [rows, cols] at p
          const int64_t cols = std::min(c1, s0 + sub) - s0;
          float* p = panel.data() + (s0 - c0) * rows;
          if (bt) {
            PackF32Columns(b + s0 * k + e0, k, rows, cols, p);
          } else {
            for (int64_t e = 0; e < rows; ++e)
              std::memcpy(p + e * cols, b + (e0 + e) * n + s0, cols * sizeof(float));
          }
        }
      }
      // c's rows [q0, q1) from a's at x (row q0 + r's e-th value at x[r lda + e], with kAt at
      // x[r + e lda]).
      auto product = [&](auto transposed, int64_t q0, int64_t q1, const float* x, int64_t lda) {
        constexpr bool kAt = decltype(transposed)::value;
        for (int64_t r = q0; r < q1; r += kGemmRows)
          for (int64_t s0 = c0; s0 < c1; s0 += sub) {
            const int64_t cols = std::min(c1, s0 + sub) - s0;
            F32GemmTileRows<kAt>(
                static_cast<int>(std::min<int64_t>(kGemmRows, q1 - r)),
                static_cast<int>(cols / kLanes), x + (r - q0) * (kAt ? 1 : lda), lda, rows,
                packed ? panel.data() + (s0 - c0) * rows : b + e0 * n + s0, packed ? cols : n,
                c + r * n + s0, n, e0 > 0);
          }
      };
      if (!at) {
        product(std::false_type{}, r0, r1, a + r0 * k + e0, k);
        continue;
      }
      for (int64_t q0 = r0; q0 < r1; q0 += kF32ChunkRows) {  // a's rows copied: [rows, q]
        const int64_t q = std::min(kF32ChunkRows, r1 - q0);
        for (int64_t e = 0; e < rows; ++e)
          std::memcpy(chunk.data() + e * q, a + (e0 + e) * m + q0, q * sizeof(float));
        product(std::true_type{}, q0, q0 + q, chunk.data(), q);
      }
    }
  };
  ParallelFor(pool, items, Threads(pool, items), item);
}

// c [m, n] = a [m, k] . b [k, n] in fp32 (a stored [k, m] with a_transposed, b stored [n, k]
// with b_transposed): F32Gemm.
ffi::Error F32Matmul(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                     ffi::ResultBuffer<ffi::F32> c, ffi::ThreadPool pool, bool a_transposed,
                     bool b_transposed) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const int64_t m = ad.size() == 2 ? ad[a_transposed ? 1 : 0] : 0;
  const int64_t k = ad.size() == 2 ? ad[a_transposed ? 0 : 1] : 0;
  const int64_t n = bd.size() == 2 ? bd[b_transposed ? 0 : 1] : 0;
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2 || bd[b_transposed ? 1 : 0] != k ||
      cd[0] != m || cd[1] != n || n % kLanes)
    return ffi::Error::InvalidArgument("cpu matmul: a [m, k] (or [k, m]), b [k, n] (or [n, k]), "
                                       "c [m, n], n a multiple of the vector width");
  F32Gemm(a.typed_data(), m, k, a_transposed, b.typed_data(), n, b_transposed, pool,
          c->typed_data());
  return ffi::Error::Success();
}

// ---- The same products for more rows (5..kMaxAmxRows: a decoding step at batch 32), on AMX ----
//
// On CPUs with AMX (Intel Sapphire Rapids on; a build with -march for one), products of up to
// 32 rows run on its tiles: 16 x 32 bf16 times 32 x 16 bf16 into 16 x 16 fp32 sums a step.
// XLA:CPU's YNNPACK ran them at the rate of fp32 FMAs (decoder-125m's [32, 768] x [768, 3072]:
// 0.53 ms on 2 cores; here 0.33 ms). kn: W is packed as AMX reads it (the values of pairs of
// consecutive rows side by side) a panel of 256 columns at a time; nk (the output head):
// y^T = W x^T, W's rows read as stored and x packed once. Sums are fp32, y narrowed as written.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__)
constexpr bool kAmx = true;
constexpr int64_t kMaxAmxRows = 32;

// Linux grants a process AMX's tile state on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA); once per process.
bool AmxPermitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return permitted;
}

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0-3 sums (16 x 16 fp32: two row tiles of `rows0` and `rows1` rows by two column tiles),
// tmm4-5 the left operands (rows0 / rows1 rows of 32 bf16), tmm6-7 the right operands (16 rows
// of 16 bf16 pairs). A tile of 0 rows is left unconfigured (and unused).
void ConfigureTiles(int rows0, int rows1) {
  TileConfig cfg{};
  cfg.palette = 1;
  const int rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 16, 16};
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t]);
    cfg.colsb[t] = rows[t] ? 64 : 0;
  }
  _tile_loadconfig(&cfg);
}

// 16 rows of `pairs` interleaved from rows r and r + 1 of a bf16 matrix (row stride ld), 16
// values from column c: out[p][2j + i] = a[(r + 2p + i) * ld + c + j].
inline void PackPairs(const uint16_t* a, int64_t ld, int64_t r, int64_t c, uint16_t* out) {
  const __m512i order = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                         8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  for (int p = 0; p < 16; ++p) {
    const uint16_t* row = a + (r + 2 * p) * ld + c;
    __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
    __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + ld));
    _mm512_storeu_si512(out + p * 32, _mm512_permutex2var_epi16(_mm512_castsi256_si512(lo), order,
                                                                _mm512_castsi256_si512(hi)));
  }
}

// The tile PackPairs packs, from the matrix stored transposed (at [n, k], row stride k):
// out[p][2j + i] = at[(c + j) * k + r + 2p + i], each 32-bit pair of one of 16 rows gathered.
inline void PackPairsTransposed(const uint16_t* at, int64_t k, int64_t r, int64_t c,
                                uint16_t* out) {
  const __m512i rows = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int>(k * 2)));
  const char* base = reinterpret_cast<const char*>(at + c * k + r);
  for (int p = 0; p < 16; ++p)
    _mm512_storeu_si512(out + p * 32, _mm512_i32gather_epi32(rows, base + 4 * p, 1));
}

// 16 floats rounded to bf16 as Narrow rounds them (to nearest even; NaN stays a quiet NaN).
inline __m256i NarrowSixteen(__m512 f) {
  const __m512i u = _mm512_castps_si512(f), top = _mm512_srli_epi32(u, 16);
  const __m512i odd = _mm512_and_si512(top, _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(
      _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(top, _mm512_set1_epi32(0x40))));
}

// kn: y[:, c0:c1] (c1 - c0 <= kAmxPanel, a multiple of 32) for m <= 32 rows of x [m, k] (bf16,
// k a multiple of 32); y bf16 (narrowed) or fp32 (Out). W's columns c0..c1 are first packed
// whole (read a row at a time: a tile's 32 x 32 blocks read straight from W were strided reads
// at half the bandwidth), then multiplied 32 columns at a time from the packed panel (in L2).
constexpr int64_t kAmxPanel = 256;
template <typename Out>
void AmxKnColumns(const uint16_t* x, int64_t m, int64_t k, const uint16_t* w, int64_t n,
                  int64_t c0, int64_t c1, Out* y, std::vector<uint16_t>& panel) {
  const int64_t width = c1 - c0, blocks = width / 16;
  panel.resize(k * width);  // [k / 32][blocks][16 x 32]: B tiles in the order they are used
  for (int64_t e = 0; e < k; e += 32)
    for (int64_t j = 0; j < blocks; ++j)
      PackPairs(w, n, e, c0 + 16 * j, panel.data() + ((e / 32) * blocks + j) * 16 * 32);
  const int rows0 = static_cast<int>(std::min<int64_t>(16, m)), rows1 = static_cast<int>(m - rows0);
  ConfigureTiles(rows0, rows1);
  for (int64_t j = 0; j < blocks; j += 2) {
    _tile_zero(0);
    _tile_zero(1);
    if (rows1) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t e = 0; e < k; e += 32) {
      const uint16_t* b = panel.data() + ((e / 32) * blocks + j) * 16 * 32;
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + 16 * 32, 64);
      _tile_loadd(4, x + e, k * 2);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (rows1) {
        _tile_loadd(5, x + 16 * k + e, k * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    alignas(64) float sums[32 * 32];  // [x's row][32 columns]
    _tile_stored(0, sums, 128);
    _tile_stored(1, sums + 16, 128);
    if (rows1) {
      _tile_stored(2, sums + 16 * 32, 128);
      _tile_stored(3, sums + 16 * 32 + 16, 128);
    }
    const int64_t c = c0 + 16 * j;
    for (int64_t i = 0; i < m; ++i)
      for (int q = 0; q < 32; ++q) Narrow(sums[i * 32 + q], y + i * n + c + q);
  }
  _tile_release();
}

// nk: y[:, r0:r1] (W's rows r0..r1, 32 a step; r1 - r0 a multiple of 32) as y^T = W x^T, with
// xp the pairs of x packed for every 32 values of k (PackPairs of x^T: [k / 32][2][16 x 32]).
template <typename Out>
void AmxNkRows(const uint16_t* xp, int64_t m, int64_t k, const uint16_t* w, int64_t n,
               int64_t r0, int64_t r1, Out* y) {
  const int cols1 = static_cast<int>(m - std::min<int64_t>(16, m));
  ConfigureTiles(16, 16);
  alignas(64) float sums[4][16 * 16];
  for (int64_t r = r0; r < r1; r += 32) {
    // The 32 rows (contiguous) touched in memory order first: the tiles' loads below read
    // 64 bytes of each row in turn, strided reads from memory at half the bandwidth.
    const char* block = reinterpret_cast<const char*>(w + r * k);
    for (int64_t b = 0; b < 32 * k * 2; b += 64) _mm_prefetch(block + b, _MM_HINT_T1);
    _tile_zero(0);  // tile numbers are immediates: no loops over them
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t e = 0; e < k; e += 32) {
      const uint16_t* b = xp + (e / 32) * 2 * 16 * 32;
      _tile_loadd(6, b, 64);
      _tile_loadd(4, w + r * k + e, k * 2);
      _tile_loadd(5, w + (r + 16) * k + e, k * 2);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (cols1) {
        _tile_loadd(7, b + 16 * 32, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
    for (int64_t i = 0; i < m; ++i)  // sums[half of W's rows + x's row tile][W's row][x's row]
      for (int j = 0; j < 32; ++j)
        Narrow(sums[(j / 16) * 2 + i / 16][(j % 16) * 16 + i % 16], y + i * n + r + j);
  }
  _tile_release();
}

// y [m, n] = x . W on AMX, narrowed to bf16 as written (or fp32, Out float), or false where it
// does not take them.
template <typename Out>
bool AmxMatvec(const uint16_t* x, int64_t m, int64_t k, const uint16_t* w, int64_t n, bool nk,
               ffi::ThreadPool& pool, Out* y) {
  if (m > kMaxAmxRows || k % 32 || n % 32 || !AmxPermitted()) return false;
  const int64_t items = nk ? n / 32 : (n + kAmxPanel - 1) / kAmxPanel;
  std::vector<std::vector<uint16_t>> panels(Threads(pool, items));
  std::vector<uint16_t> xp;
  if (nk) {  // x^T's pairs: x [m, k] -> per 32 values of k, two 16-row tiles of 16 x-rows' pairs
    xp.assign((k / 32) * 2 * 16 * 32, 0);
    for (int64_t e = 0; e < k; e += 2)
      for (int64_t i = 0; i < m; ++i) {
        uint16_t* t = xp.data() + (e / 32) * 2 * 16 * 32 + (i / 16) * 16 * 32;
        t[((e % 32) / 2) * 32 + (i % 16) * 2] = x[i * k + e];
        t[((e % 32) / 2) * 32 + (i % 16) * 2 + 1] = x[i * k + e + 1];
      }
  }
  auto item = [&](int t, int64_t i) {
    if (nk) {
      AmxNkRows(xp.data(), m, k, w, n, i * 32, (i + 1) * 32, y);
    } else {
      AmxKnColumns(x, m, k, w, n, i * kAmxPanel, std::min(n, (i + 1) * kAmxPanel), y, panels[t]);
    }
  };
  ParallelFor(pool, items, Threads(pool, items), item);
  return true;
}

// ---- Training's bf16 products with fp32 sums, on AMX: c [m, n] = a [m, k] . b [k, n] ----
//
// XLA:CPU hands such a product to YNNPACK's AMX kernels, which ran decoder-125m's output head
// ([2560, 768] x [768, 32000] and its gradients) at 0.9-1.1 TFLOP/s on 2 cores of an Intel
// Xeon, its layers' products at 1.3-1.8. Here, as in BLAS libraries: b is packed as AMX reads
// it (PackPairs) in panels of about kGemmPanelBytes (every row of b, up to kGemmMaxDepth, by
// kGemmPanel columns or fewer), held in L2 while each 32-row stripe of a's block is multiplied
// into 2 x 2 tiles of c's 16 x 16 sums, the stripe reused across the panel's columns. c's tiles
// are written once, summed over all of k (for k past kGemmMaxDepth, a block of it at a time,
// the tiles loaded back: every pass reads and writes c, 327 MB for the head's logits). Work
// items are (panel, block of rows) pairs. b stored [n, k] (the head's [vocab, embed] kernel in
// its forward, the layers' [in, out] kernels in their input gradients) is packed by gathering
// its rows' pairs, with no transposed copy. A bf16 c is rounded as the sums leave the tiles,
// without an fp32 c in memory. k and n multiples of 32, any m.
constexpr int64_t kGemmPanel = 256, kGemmPanelBytes = 1 << 20, kGemmMaxDepth = 2048;
constexpr int64_t kGemmItemsPerThread = 4, kGemmCopiedDepth = 2048;

// c[r0:r1, c0:c0 + 16 * blocks] (+)= a[r0:r1, e0:e0 + depth] . (b's block packed in `panel`).
// For k >= kGemmCopiedDepth each 32-row stripe of a is first copied into `stripe`, its tiles'
// rows 64 bytes apart: read from a as stored, a deep stripe's tile rows lie 4 KB or more apart
// (at k = 2048 all in one set of L1), and [2560, 2048] x [2048, 768] ran at 0.8x XLA's speed;
// at k = 768 the copy cost more than it saved.
// A bf16 c (Out = Bf16) is written from sums over all of k (depth == k, accumulate false).
template <typename Out>
void AmxGemmBlock(const uint16_t* a, int64_t k, const uint16_t* panel, int64_t depth,
                  int64_t blocks, Out* c, int64_t n, int64_t r0, int64_t r1, int64_t c0,
                  int64_t e0, bool accumulate, int& configured, std::vector<uint16_t>& stripe) {
  if (k >= kGemmCopiedDepth && stripe.size() < static_cast<size_t>(depth * 32))
    stripe.resize(depth * 32);  // [depth / 32][32 rows][32 values]
  for (int64_t r = r0; r < r1; r += 32) {
    const int rows0 = static_cast<int>(std::min<int64_t>(16, r1 - r));
    const int rows1 = static_cast<int>(std::min<int64_t>(16, r1 - r - rows0));
    if (configured != rows0 * 17 + rows1) {  // a tail stripe of fewer rows reconfigures
      ConfigureTiles(rows0, rows1);
      configured = rows0 * 17 + rows1;
    }
    const uint16_t *a0 = a + r * k + e0, *a1 = a0 + 16 * k;
    int64_t step = 32, stride = k * 2;  // a tile's next 32 values, its rows' distance
    if (k >= kGemmCopiedDepth) {
      for (int i = 0; i < rows0 + rows1; ++i)
        for (int64_t e = 0; e < depth; e += 32)
          _mm512_storeu_si512(stripe.data() + e * 32 + i * 32, _mm512_loadu_si512(a0 + i * k + e));
      a0 = stripe.data();
      a1 = a0 + 16 * 32;
      step = 32 * 32;
      stride = 64;
    }
    for (int64_t j = 0; j < blocks; j += 2) {
      Out* c00 = c + r * n + c0 + 16 * j;
      Out* c10 = c00 + 16 * n;
      if constexpr (std::is_same_v<Out, float>) {
        if (accumulate) {
          _tile_loadd(0, c00, n * 4);
          _tile_loadd(1, c00 + 16, n * 4);
          if (rows1) {
            _tile_loadd(2, c10, n * 4);
            _tile_loadd(3, c10 + 16, n * 4);
          }
        }
      }
      if (!accumulate) {
        _tile_zero(0);
        _tile_zero(1);
        if (rows1) {  // an unconfigured tile's use is an illegal instruction
          _tile_zero(2);
          _tile_zero(3);
        }
      }
      const uint16_t* b = panel + j * 16 * 32;
      for (int64_t e = 0; e < depth; e += 32, b += blocks * 16 * 32) {
        _tile_loadd(6, b, 64);
        _tile_loadd(7, b + 16 * 32, 64);
        _tile_loadd(4, a0 + e / 32 * step, stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (rows1) {
          _tile_loadd(5, a1 + e / 32 * step, stride);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      if constexpr (std::is_same_v<Out, float>) {
        _tile_stored(0, c00, n * 4);
        _tile_stored(1, c00 + 16, n * 4);
        if (rows1) {
          _tile_stored(2, c10, n * 4);
          _tile_stored(3, c10 + 16, n * 4);
        }
      } else {  // narrowed on the way from the tiles to c: no fp32 c in memory
        alignas(64) float sums[32 * 32];  // [row][32 columns]
        _tile_stored(0, sums, 128);
        _tile_stored(1, sums + 16, 128);
        if (rows1) {
          _tile_stored(2, sums + 16 * 32, 128);
          _tile_stored(3, sums + 16 * 32 + 16, 128);
        }
        for (int i = 0; i < rows0 + rows1; ++i)
          for (int h = 0; h < 2; ++h)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(c00 + i * n + 16 * h),
                                NarrowSixteen(_mm512_load_ps(sums + i * 32 + 16 * h)));
      }
    }
  }
}

// c = a . b (module comment above), b stored as [k, n] or (bt) as [n, k]; false where this
// build or process has no AMX, k or n is not a multiple of 32, or a bf16 c would need more than
// one block of k.
template <typename Out>
bool AmxGemm(const uint16_t* a, int64_t m, int64_t k, const uint16_t* b, int64_t n, bool bt,
             ffi::ThreadPool& pool, Out* c) {
  if (k % 32 || n % 32 || !AmxPermitted()) return false;
  if (!std::is_same_v<Out, float> && k > kGemmMaxDepth) return false;
  // Each item packs its panel; rows split by RowBlocks, evenly over the threads (a product of
  // few columns, [2560, 2048] x [2048, 768], has 3 panels).
  const int64_t depth_blocks = (k + kGemmMaxDepth - 1) / kGemmMaxDepth;
  const int64_t depth = (k / 32 + depth_blocks - 1) / depth_blocks * 32;  // even blocks of 32s
  const int64_t width =
      std::clamp<int64_t>(kGemmPanelBytes / (2 * depth) / 32 * 32, 32, kGemmPanel);
  const int64_t panels = (n + width - 1) / width, stripes = (m + 31) / 32;
  const int64_t row_blocks = RowBlocks(pool, panels, stripes, kGemmItemsPerThread, true);
  const int64_t block_rows = (stripes + row_blocks - 1) / row_blocks * 32;
  const int64_t items = panels * row_blocks;
  const int threads = Threads(pool, items);
  auto item = [&](int, int64_t i) {
    // Each thread's panel and stripe buffers, kept across calls (XLA's intra-op threads live
    // as long as the process): 1-2 MB a thread, allocated and zeroed once, not per product.
    thread_local std::vector<uint16_t> panel, stripe;
    const int64_t c0 = (i / row_blocks) * width, cols = std::min(n, c0 + width) - c0;
    const int64_t r0 = std::min(m, (i % row_blocks) * block_rows);
    const int64_t r1 = std::min(m, r0 + block_rows);
    if (r0 == r1) return;  // the rows ran out before the last blocks
    const int64_t blocks = cols / 16;
    if (panel.size() < static_cast<size_t>(depth * cols)) panel.resize(depth * cols);
    int configured = -1;
    for (int64_t e0 = 0; e0 < k; e0 += depth) {
      const int64_t rows = std::min(depth, k - e0);
      for (int64_t e = 0; e < rows; e += 32)  // [rows / 32][blocks][16 x 32]
        for (int64_t j = 0; j < blocks; ++j)
          if (bt) {
            PackPairsTransposed(b, k, e0 + e, c0 + 16 * j,
                                panel.data() + ((e / 32) * blocks + j) * 16 * 32);
          } else {
            PackPairs(b, n, e0 + e, c0 + 16 * j, panel.data() + ((e / 32) * blocks + j) * 16 * 32);
          }
      AmxGemmBlock(a, k, panel.data(), rows, blocks, c, n, r0, r1, c0, e0, e0 > 0, configured,
                   stripe);
    }
    _tile_release();
  };
  ParallelFor(pool, items, threads, item);
  return true;
}
#else
constexpr bool kAmx = false;
constexpr int64_t kMaxAmxRows = 0;
bool AmxPermitted() { return false; }
template <typename Out>
bool AmxMatvec(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, bool, ffi::ThreadPool&,
               Out*) {
  return false;
}
template <typename Out>
bool AmxGemm(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, bool, ffi::ThreadPool&,
             Out*) {
  return false;
}
#endif

// c [m, n] (fp32 or bf16) = a [m, k] . b [k, n] (bf16; b_transposed: b stored [n, k]) on AMX:
// AmxGemm.
template <ffi::DataType kOut>
ffi::Error Matmul(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, ffi::ResultBuffer<kOut> c,
                  ffi::ThreadPool pool, bool b_transposed) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const int64_t n = bd.size() == 2 ? bd[b_transposed ? 0 : 1] : 0;
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2 || bd[b_transposed ? 1 : 0] != ad[1] ||
      cd[0] != ad[0] || cd[1] != n)
    return ffi::Error::InvalidArgument("cpu matmul: a [m, k], b [k, n] (or [n, k]), c [m, n]");
  const auto* ap = reinterpret_cast<const uint16_t*>(a.typed_data());
  const auto* bp = reinterpret_cast<const uint16_t*>(b.typed_data());
  bool done;
  if constexpr (kOut == ffi::DataType::F32) {
    done = AmxGemm(ap, ad[0], ad[1], bp, n, b_transposed, pool, c->typed_data());
  } else {
    done = AmxGemm(ap, ad[0], ad[1], bp, n, b_transposed, pool,
                   reinterpret_cast<Bf16*>(c->typed_data()));
  }
  if (!done)
    return ffi::Error::InvalidArgument(
        "cpu matmul: needs AMX, k and n multiples of 32 (and k <= 2048 for a bf16 c)");
  return ffi::Error::Success();
}

// y [m, n] = x . W: y in x's type, or fp32 for bf16 x and W (kOut F32: the output head's logits,
// never rounded to bf16).
template <ffi::DataType kType, ffi::DataType kOut = kType>
ffi::Error Matvec(ffi::Buffer<kType> x, ffi::Buffer<kType> w, ffi::ResultBuffer<kOut> y,
                  ffi::ThreadPool pool, bool nk) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const int64_t m = xd.size() == 2 ? xd[0] : 0, k = xd.size() == 2 ? xd[1] : 0;
  const int64_t n = wd.size() == 2 ? wd[nk ? 0 : 1] : 0;
  const int64_t most = kType == ffi::DataType::F32 ? kMaxF32Rows : std::max(kMaxRows, kMaxAmxRows);
  if (m < 1 || m > most || wd.size() != 2 || wd[nk ? 1 : 0] != k ||
      yd.size() != 2 || yd[0] != m || yd[1] != n)
    return ffi::Error::InvalidArgument(
        "cpu matvec: x [m, k] with 1 <= m <= 4 (32 with AMX, or fp32), w [k, n] (or [n, k] with "
        "nk), y [m, n]");
  const auto* xp = Data(x);
  const auto* wp = Data(w);
  auto* yp = Data(*y);
  if constexpr (kType == ffi::DataType::F32) {
    if (m > kMaxRows) {
      if (nk || n % kLanes)
        return ffi::Error::InvalidArgument(
            "cpu matvec: fp32 products of more than 4 rows need w [k, n], n a multiple of 16");
      const int64_t items = (n + kF32Panel - 1) / kF32Panel;
      const int threads = Threads(pool, items);
      std::vector<std::vector<float>> panels(threads);
      auto item = [&](int slot, int64_t i) {
        F32KnPanel(xp, m, k, wp, n, i * kF32Panel, std::min(n, (i + 1) * kF32Panel), yp,
                   panels[slot]);
      };
      ParallelFor(pool, items, threads, item);
      return ffi::Error::Success();
    }
  } else if (m > (nk ? kMaxFmaRowsTransposed : kMaxRows)) {
    if (!AmxMatvec(reinterpret_cast<const uint16_t*>(xp), m, k,
                   reinterpret_cast<const uint16_t*>(wp), n, nk, pool, yp))
      return ffi::Error::InvalidArgument(
          "cpu matvec: more rows than 4 (2 with nk) need AMX, k and n multiples of 32");
    return ffi::Error::Success();
  }
  std::vector<float> xf(m * k), yf(m * n);
  for (int64_t i = 0; i < m * k; ++i) xf[i] = Widen(xp[i]);
  // nk: items of W's rows, each writing its own outputs. kn: items of W's rows, each summing its
  // rows' share of every output into parts of its own, added up in order after (the same sums
  // however the items fall to threads).
  const int64_t items = ((nk ? n : k) + kRowsPerItem - 1) / kRowsPerItem;
  std::vector<float> parts(nk ? 0 : items * m * n);
  auto item = [&](int, int64_t i) {
    switch (m) {
      case 1: return MatvecItem<1>(nk, xf.data(), k, wp, n, i, yf.data(), parts.data());
      case 2: return MatvecItem<2>(nk, xf.data(), k, wp, n, i, yf.data(), parts.data());
      case 3: return MatvecItem<3>(nk, xf.data(), k, wp, n, i, yf.data(), parts.data());
      default: return MatvecItem<4>(nk, xf.data(), k, wp, n, i, yf.data(), parts.data());
    }
  };
  ParallelFor(pool, items, Threads(pool, items), item);
  if (!nk)
    for (int64_t i = 0; i < items; ++i)
      for (int64_t j = 0; j < m * n; ++j) yf[j] = i ? yf[j] + parts[i * m * n + j] : parts[j];
  for (int64_t i = 0; i < m * n; ++i) Narrow(yf[i], yp + i);
  return ffi::Error::Success();
}

}  // namespace

// The columns of b a float32 product's tile spans (F32Gemm's sub-panel: kGemmVecs vectors), for
// cpu_matmul.transposed_a_pays.
extern "C" int T5liteCpuMatmulF32SubPanel() { return kGemmVecs * kLanes; }

// The bytes of b's sub-panels a float32 product's work item packs at most (F32GroupBytes), for
// cpu_matmul.transposed_a_pays.
extern "C" int T5liteCpuMatmulF32GroupBytes() { return static_cast<int>(F32GroupBytes()); }

// The rows Matvec takes on AMX (0 where this build or this process has no AMX).
extern "C" int T5liteCpuMatvecAmxRows() { return kAmx && AmxPermitted() ? kMaxAmxRows : 0; }

// A decoding step's projections of a few rows (bf16 ones with a bf16 or an fp32 output).
#define T5LITE_MATVEC(kType, kOut)               \
  ffi::Ffi::Bind()                               \
      .Arg<ffi::Buffer<kType>>()                 \
      .Arg<ffi::Buffer<kType>>()                 \
      .Ret<ffi::Buffer<kOut>>()                  \
      .Ctx<ffi::ThreadPool>()                    \
      .Attr<bool>("nk")

XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuMatvecBf16, Matvec<ffi::DataType::BF16>,
                              T5LITE_MATVEC(ffi::DataType::BF16, ffi::DataType::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuMatvecBf16F32,
                              (Matvec<ffi::DataType::BF16, ffi::DataType::F32>),
                              T5LITE_MATVEC(ffi::DataType::BF16, ffi::DataType::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuMatvecF32, Matvec<ffi::DataType::F32>,
                              T5LITE_MATVEC(ffi::DataType::F32, ffi::DataType::F32));
// Training's bf16 matmuls, with an fp32 or a bf16 output.
#define T5LITE_MATMUL(kOut)                      \
  ffi::Ffi::Bind()                               \
      .Arg<ffi::Buffer<ffi::BF16>>()             \
      .Arg<ffi::Buffer<ffi::BF16>>()             \
      .Ret<ffi::Buffer<kOut>>()                  \
      .Ctx<ffi::ThreadPool>()                    \
      .Attr<bool>("b_transposed")

XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuMatmulF32F32, F32Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<bool>("a_transposed")
                                  .Attr<bool>("b_transposed"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuMatmulF32, Matmul<ffi::DataType::F32>,
                              T5LITE_MATMUL(ffi::DataType::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuMatmulBf16, Matmul<ffi::DataType::BF16>,
                              T5LITE_MATMUL(ffi::DataType::BF16));

}  // namespace t5lite
