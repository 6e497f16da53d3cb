// Softmax attention for XLA:CPU as XLA FFI handlers (forward and backward), for fp32 operands
// and for bf16 ones (widened to fp32 a block at a time, as they are read: the products and the
// softmax are fp32 either way; the outputs narrowed, round to nearest even, as they are written).
//
// XLA:CPU runs attention as separate ops, each one pass over the [queries, keys] scores in
// memory, and its batched [rows x head_dim] x [head_dim x keys] matmuls run far below the
// CPU's peak at head_dim 32-64. Here, for one (batch row, KV head) at a time and in blocks of
// kRows queries, the scores of a block stay in cache from the QK^T product through the softmax
// to the PV product, as in flash attention. The backward recomputes the probabilities from the
// saved log-sum-exp. The (batch row, KV head) items are spread over XLA's intra-op threads.
//
// Layouts (row-major): q [B, Lq, H, D]; k, v [B, Lk, K, D] with H a multiple of K (grouped
// queries); lengths int32 [B] (keys at or past a row's length are hidden); bias
// [Bb, H, Lq, Lk] with Bb 1 or B (read only when has_bias); q_segments int32 [B, Lq] and
// k_segments int32 [B, Lk] (read only when has_segments: packed rows, where query i sees key j
// only if both are in the same segment, and segment 0, the padding, sees nothing); out
// [B, Lq, H, D]; lse float32 [B, H, Lq]. Causal: key j is hidden from query i when j > i,
// unless has_prefix and both are prefix tokens (prefix int32 [B, Lq], nonzero on them; a prefix
// LM, where Lq = Lk). A query that sees no key gets zeros (and passes no gradient). D must be a
// multiple of 16. q, k, v, out, d_out and dq, dk, dv are all fp32 or all bf16; bias, lse and
// dbias are fp32.
//
// A third handler, CacheAttention, is a decoding step's attention over a heads-major KV cache
// (see CacheItem). The library these are built into holds cpu_matmul.cc's handlers too.

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_threads.h"
#include "cpu_vectors.h"

namespace ffi = xla::ffi;

namespace t5lite {
namespace {

constexpr int kRows = 32;  // queries per block
constexpr float kHidden = -INFINITY;

// e^x, vectorized: x = n ln2 + f with n = round(x / ln2) (Cody-Waite, ln2 in two parts),
// e^f by Cephes' degree-6 polynomial on [-ln2/2, ln2/2] (~1 ulp), times 2^n built in the
// exponent bits. x below -87.3 (and -inf) gives 0. Arguments here are <= 0 (scores minus
// their max).
inline V Exp(V x) {
  const V lo = Splat(-87.3365f);
  I under = x < lo;
  x = under ? lo : x;
  // Adding 1.5 * 2^23 rounds x / ln2 to an integer held in the low mantissa bits (+127: the
  // exponent bias, so those bits shifted up are 2^n's exponent field; n >= -126 here).
  constexpr float kRound = 12582912.0f + 127.0f;
  V t = x * 1.44269504088896341f + kRound;
  V n = t - kRound;
  V f = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = Splat(1.9875691500e-4f);
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  V y = p * f * f + f + 1.0f;
  I bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits <<= 23;
  V two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return under ? V{} : y * two_n;
}

// `rows` rows of d values from x (row stride `stride`) as fp32 rows: fp32 ones where they are
// (*ld = stride), bf16 ones widened into buf (*ld = d).
inline const float* AsFloat(const float* x, int64_t stride, int64_t rows, int d, float* buf,
                            int64_t* ld) {
  (void)rows, (void)d, (void)buf;
  *ld = stride;
  return x;
}
inline const float* AsFloat(const Bf16* x, int64_t stride, int64_t rows, int d, float* buf,
                            int64_t* ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int e = 0; e < d; e += kLanes) Store(buf + r * d + e, LoadWide(x + r * stride + e));
  *ld = d;
  return buf;
}

// Writes `rows` fp32 rows of d values (src, row stride ls) into dst (row stride ld), narrowed.
template <typename T>
inline void PutRows(const float* src, int64_t ls, int64_t rows, int d, T* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int e = 0; e < d; ++e) Narrow(src[r * ls + e], dst + r * ld + e);
}

template <typename T>
constexpr bool kFloat = std::is_same_v<T, float>;

// row[j] = exp(row[j] - shift) for j < cols (a multiple of kLanes; -inf entries give 0);
// returns the sum.
inline float ExpRow(float* row, int cols, float shift) {
  V sum = {};
  for (int j = 0; j < cols; j += kLanes) {
    V e = Exp(Load(row + j) - shift);
    Store(row + j, e);
    sum += e;
  }
  return Sum(sum);
}

struct Shape {
  int64_t b, lq, lk, h, kv, d, bias_b;
  bool causal, has_bias, has_segments, has_prefix;
  float scale;
};

// q, k, v, out and d_out are float or Bf16 (the handler's type); the rest fp32 or int32.
struct Operands {
  const void *q, *k, *v;
  const float* bias;
  const void* out;
  const float* lse;
  const void* d_out;
  const int32_t *lengths, *q_segments, *k_segments, *prefix;
};

// The matrix products, all of one form: C[i][:width] (=, or += with kAdd) alpha * sum_{e < n}
// a[i * ai + e * ae] * b[e * ldb + :width] for i < rows. QK^T and dO V^T read the rows of q / dO
// against keys packed transposed (ae = 1); PV, dS K read score rows against rows of v / k; dK
// and dV read the scores down their columns (ai = 1, ae = the scores' row stride).

// One tile: kR rows by kC vectors, the kR x kC sums in registers, each a[..] broadcast once.
template <int kR, int kC, bool kAdd>
inline void Tile(const float* a, int64_t ai, int64_t ae, const float* b, int64_t ldb, int n,
                 float alpha, float* c, int64_t ldc) {
  // The sums zeroed one by one, unrolled: "= {}" (or a loop GCC turns into memset) also zeroed
  // a copy on the stack, as long as a tile's products at head_dim 32 on AVX2.
  V acc[kR][kC];
#pragma GCC unroll 8
  for (int i = 0; i < kR; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < kC; ++u) acc[i][u] = V{};
  for (int e = 0; e < n; ++e) {
    V bv[kC];
    for (int u = 0; u < kC; ++u) bv[u] = Load(b + e * ldb + u * kLanes);
    for (int i = 0; i < kR; ++i) {
      V x = Splat(a[i * ai + e * ae]);
      for (int u = 0; u < kC; ++u) acc[i][u] += x * bv[u];
    }
  }
  for (int i = 0; i < kR; ++i)
    for (int u = 0; u < kC; ++u) {
      float* o = c + i * ldc + u * kLanes;
      Store(o, kAdd ? Load(o) + acc[i][u] * alpha : acc[i][u] * alpha);
    }
}

// The last `rows` (< kR + 1) rows as one tile of exactly that height (a tile height known at
// compile time keeps its sums in registers).
template <int kR, int kC, bool kAdd>
inline void LastTile(int rows, const float* a, int64_t ai, int64_t ae, const float* b,
                     int64_t ldb, int n, float alpha, float* c, int64_t ldc) {
  if constexpr (kR > 0) {
    if (rows == kR) return Tile<kR, kC, kAdd>(a, ai, ae, b, ldb, n, alpha, c, ldc);
    LastTile<kR - 1, kC, kAdd>(rows, a, ai, ae, b, ldb, n, alpha, c, ldc);
  }
}

template <int kR, int kC, bool kAdd>
void TileRows(int rows, const float* a, int64_t ai, int64_t ae, const float* b, int64_t ldb,
              int n, float alpha, float* c, int64_t ldc) {
  int i = 0;
  for (; i + kR <= rows; i += kR)
    Tile<kR, kC, kAdd>(a + i * ai, ai, ae, b, ldb, n, alpha, c + i * ldc, ldc);
  LastTile<kR - 1, kC, kAdd>(rows - i, a + i * ai, ai, ae, b, ldb, n, alpha, c + i * ldc, ldc);
}

// Strips of 4, 2 and 1 vectors with tiles of 6x4, 8x2 and 8x1 sums (AVX-512: 24 of its 32
// registers hold sums); with AVX2's 16 registers, strips of 2 and 1 vectors with 6x2 and 8x1
// tiles (12 sums, 2 vectors of b, 1 broadcast: AVX2's FMA takes no broadcast operand).
template <bool kAdd>
void Strips(int rows, int width, const float* a, int64_t ai, int64_t ae, const float* b,
            int64_t ldb, int n, float alpha, float* c, int64_t ldc) {
  int w = 0;
  if constexpr (kWide) {
    for (; w + 4 * kLanes <= width; w += 4 * kLanes)
      TileRows<6, 4, kAdd>(rows, a, ai, ae, b + w, ldb, n, alpha, c + w, ldc);
    for (; w + 2 * kLanes <= width; w += 2 * kLanes)
      TileRows<8, 2, kAdd>(rows, a, ai, ae, b + w, ldb, n, alpha, c + w, ldc);
  } else {
    for (; w + 2 * kLanes <= width; w += 2 * kLanes)
      TileRows<6, 2, kAdd>(rows, a, ai, ae, b + w, ldb, n, alpha, c + w, ldc);
  }
  for (; w < width; w += kLanes)
    TileRows<8, 1, kAdd>(rows, a, ai, ae, b + w, ldb, n, alpha, c + w, ldc);
}

// The product for `width` (a multiple of kLanes) columns, in Strips, the sum over e in chunks:
// every row tile of a strip reads the strip's rows of b again, and a chunk of them (24 KB)
// stays in L1 where all of PV's 256 keys x 64 values (64 KB) would not (PV at T5-small's
// shapes: 90 -> 120 GFLOP/s on one core).
template <bool kAdd>
void Product(int rows, int width, const float* a, int64_t ai, int64_t ae, const float* b,
             int64_t ldb, int n, float alpha, float* c, int64_t ldc) {
  constexpr int kStrip = (kWide ? 4 : 2) * kLanes;  // the widest strip's floats
  const int chunk = 6144 / std::min(width, kStrip);  // rows of b in 24 KB
  Strips<kAdd>(rows, width, a, ai, ae, b, ldb, std::min(n, chunk), alpha, c, ldc);
  for (int e = chunk; e < n; e += chunk)
    Strips<true>(rows, width, a + e * ae, ai, ae, b + e * ldb, ldb, std::min(n - e, chunk),
                 alpha, c, ldc);
}

// Packs x[b, :, head, :] (rows of stride `stride`) transposed into xt[D][ld] as fp32 (zero
// padded; ld a multiple of kLanes), kLanes rows at a time so each store is a whole vector
// (storing one float at a time to D rows far apart took 8x as long).
template <typename T>
void PackTransposed(const T* x, int64_t stride, int64_t rows, int d, float* xt, int64_t ld) {
  for (int64_t j0 = 0; j0 < ld; j0 += kLanes) {
    int64_t n = std::min<int64_t>(kLanes, rows - j0);
    for (int e = 0; e < d; ++e) {
      V column = {};
      for (int64_t j = 0; j < n; ++j) column[j] = Widen(x[(j0 + j) * stride + e]);
      Store(xt + e * ld + j0, column);
    }
  }
}

// Keys rounded up to whole score tiles (2 * kLanes columns): the scratch rows' length.
inline int64_t PaddedKeys(int64_t keys) {
  return (keys + 2 * kLanes - 1) / (2 * kLanes) * (2 * kLanes);
}

// The keys [first, end) that a block of queries [start, start + rows) of row b may see: all up
// to the last query's, or with a prefix query in the block up to the row's last prefix token,
// and with segments, from the first to the last key whose segment is within the range of the
// queries' (packed rows: the block's segments' keys). `first` is a multiple of 2 * kLanes, so
// that first + PaddedKeys(end - first) stays within the packed keys' PaddedKeys(Lk) columns.
// `prefix_end`: 1 + the row's last prefix key (has_prefix; else 0).
struct KeyRange {
  int64_t first, end, prefix_end;
  int64_t size() const { return end - first; }
};

inline bool InPrefix(const Shape& s, const Operands& x, int64_t b, int64_t i) {
  return s.has_prefix && x.prefix[b * s.lq + i] != 0;
}

// Query i of row b, whose keys end at `length`, sees keys [0, VisibleKeys(...)) but the hidden
// ones among them (other segments; under a prefix, keys past i that are not prefix tokens); a
// negative length hides every key.
inline int64_t VisibleKeys(const Shape& s, const Operands& x, int64_t b, int64_t length,
                           int64_t i, int64_t prefix_end) {
  int64_t n = std::max<int64_t>(0, std::min(s.lk, length));
  if (!s.causal) return n;
  return std::min(n, InPrefix(s, x, b, i) ? std::max(i + 1, prefix_end) : i + 1);
}

KeyRange BlockKeys(const Shape& s, const Operands& x, int64_t b, int64_t start, int rows,
                   int64_t length) {
  KeyRange keys{0, 0, 0};
  bool any_prefix = false;
  for (int r = 0; r < rows && !any_prefix; ++r) any_prefix = InPrefix(s, x, b, start + r);
  if (any_prefix)
    for (keys.prefix_end = s.lk; keys.prefix_end > 0; --keys.prefix_end)
      if (InPrefix(s, x, b, keys.prefix_end - 1)) break;
  for (int r = 0; r < rows; ++r)
    keys.end = std::max(keys.end, VisibleKeys(s, x, b, length, start + r, keys.prefix_end));
  if (!s.has_segments) return keys;
  const int32_t* qs = x.q_segments + b * s.lq + start;
  const int32_t* ks = x.k_segments + b * s.lk;
  int32_t lo = INT32_MAX, hi = 0;
  for (int r = 0; r < rows; ++r)
    if (qs[r] > 0) lo = std::min(lo, qs[r]), hi = std::max(hi, qs[r]);
  auto in_range = [&](int64_t j) { return ks[j] >= lo && ks[j] <= hi; };
  while (keys.end > 0 && !in_range(keys.end - 1)) --keys.end;
  while (keys.first < keys.end && !in_range(keys.first)) ++keys.first;
  keys.first = keys.first / (2 * kLanes) * (2 * kLanes);
  if (keys.end == 0) keys.first = 0;
  return keys;
}

// The columns of a block's scores (keys from keys.first on) that VisibleKeys leaves to query i.
inline int64_t VisibleInBlock(const Shape& s, const Operands& x, int64_t b, int64_t length,
                              int64_t i, KeyRange keys) {
  return std::max<int64_t>(
      0, std::min(VisibleKeys(s, x, b, length, i, keys.prefix_end), keys.end) - keys.first);
}

// Scores of queries [start, start + rows) of (b, h) (their fp32 rows qrow, row stride ldq)
// against the keys `keys` (BlockKeys): scale * q k^T + bias, hidden -> -inf; column c holds key
// keys.first + c. Returns the number of columns computed (keys.size() rounded up to a multiple
// of 2 * kLanes).
int BlockScores(const Shape& s, const Operands& x, const float* qrow, int64_t ldq,
                const float* kt, int64_t ldk, int64_t b, int64_t h, int64_t start, int rows,
                int64_t length, KeyRange keys, float* sc, int64_t ldc) {
  int cols = static_cast<int>(PaddedKeys(keys.size()));
  if (cols == 0) return 0;
  Product<false>(rows, cols, qrow, ldq, 1, kt + keys.first, ldk, static_cast<int>(s.d), s.scale,
                 sc, ldc);
  const float* brow = nullptr;
  if (s.has_bias)
    brow = x.bias + (((s.bias_b == 1 ? 0 : b) * s.h + h) * s.lq + start) * s.lk + keys.first;
  const int32_t* ks = s.has_segments ? x.k_segments + b * s.lk + keys.first : nullptr;
  for (int r = 0; r < rows; ++r) {
    int64_t seen = VisibleInBlock(s, x, b, length, start + r, keys);
    float* row = sc + r * ldc;
    if (brow)
      for (int64_t j = 0; j < seen; ++j) row[j] += brow[r * s.lk + j];
    if (ks) {
      const int32_t mine = x.q_segments[b * s.lq + start + r];
      if (mine == 0) seen = 0;
      for (int64_t j = 0; j < seen; ++j)
        if (ks[j] != mine) row[j] = kHidden;
    }
    if (InPrefix(s, x, b, start + r))  // keys past the query: prefix tokens only
      for (int64_t j = std::max<int64_t>(0, start + r + 1 - keys.first); j < seen; ++j)
        if (!InPrefix(s, x, b, keys.first + j)) row[j] = kHidden;
    for (int64_t j = seen; j < cols; ++j) row[j] = kHidden;
  }
  return cols;
}

ffi::Error CheckShapes(const Shape& s, ffi::Buffer<ffi::S32>& q_segments,
                       ffi::Buffer<ffi::S32>& k_segments, ffi::Buffer<ffi::S32>& prefix) {
  if (s.has_segments) {
    auto qd = q_segments.dimensions(), kd = k_segments.dimensions();
    if (qd.size() != 2 || kd.size() != 2 || qd[0] != s.b || qd[1] != s.lq || kd[0] != s.b ||
        kd[1] != s.lk)
      return ffi::Error::InvalidArgument(
          "cpu attention: segment ids must be [batch, q_len] and [batch, k_len]");
  }
  if (s.has_prefix) {
    auto pd = prefix.dimensions();
    if (pd.size() != 2 || pd[0] != s.b || pd[1] != s.lq || s.lq != s.lk || !s.causal)
      return ffi::Error::InvalidArgument(
          "cpu attention: a prefix must be [batch, q_len], causal, with q_len = k_len");
  }
  if (s.d % 16 != 0)  // a whole number of vectors, AVX-512's or AVX2's
    return ffi::Error::InvalidArgument("cpu attention: head_dim must be a multiple of 16");
  if (s.kv <= 0 || s.h % s.kv != 0)
    return ffi::Error::InvalidArgument("cpu attention: query heads must be a multiple of KV heads");
  return ffi::Error::Success();
}

template <typename Q>
Shape MakeShape(Q& q, Q& k, ffi::Buffer<ffi::F32>& bias, float scale, bool causal, bool has_bias,
                bool has_segments, bool has_prefix) {
  auto qd = q.dimensions(), kd = k.dimensions(), bd = bias.dimensions();
  return Shape{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], bd[0], causal, has_bias, has_segments,
               has_prefix, scale};
}

// Per-thread scratch of an item: the packed transposed keys (and values, in the backward), a
// block's scores (and dS), and for bf16 operands their widened rows and the fp32 outputs before
// they are narrowed.
// (fp32 operands are read and written where they are: their runs size none of the latter.)
struct Scratch {
  std::vector<float> kt, vt, sc, ds, k, v, q, g, o, dq, acc;
  void Size(const Shape& s, bool backward, bool widened) {
    if (!kt.empty()) return;
    const int64_t ldk = PaddedKeys(s.lk);
    kt.resize(s.d * ldk);
    sc.resize(kRows * ldk);
    if (backward) {
      vt.resize(s.d * ldk);
      ds.resize(kRows * ldk);
    }
    if (!widened) return;
    k.resize(s.lk * s.d);
    v.resize(s.lk * s.d);
    q.resize(kRows * s.d);
    o.resize(kRows * s.d);
    if (!backward) return;
    g.resize(kRows * s.d);
    dq.resize(kRows * s.d);
    acc.resize(2 * s.lk * s.d);
  }
};

// Forward of one (batch row b, KV head kh), or of its share `part` of `parts` (query blocks
// part, part + parts, ...: under a causal mask each share gets early and late blocks).
template <typename T>
void ForwardItem(const Shape& s, const Operands& x, int64_t b, int64_t kh, int64_t part,
                 int64_t parts, T* out, float* lse, Scratch& w) {
  const int64_t ldk = PaddedKeys(s.lk);
  const int64_t group = s.h / s.kv, kstride = s.kv * s.d, qstride = s.h * s.d;
  const int d = static_cast<int>(s.d);
  const int64_t length = x.lengths[b], koff = (b * s.lk * s.kv + kh) * s.d;
  const T* q = static_cast<const T*>(x.q);
  PackTransposed(static_cast<const T*>(x.k) + koff, kstride, s.lk, d, w.kt.data(), ldk);
  int64_t ldv;
  const float* vbase = AsFloat(static_cast<const T*>(x.v) + koff, kstride, s.lk, d, w.v.data(),
                               &ldv);
  for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
    for (int64_t start = part * kRows; start < s.lq; start += parts * kRows) {
      int rows = static_cast<int>(std::min<int64_t>(kRows, s.lq - start));
      const int64_t qoff = ((b * s.lq + start) * s.h + h) * s.d;
      int64_t ldq;
      const float* qrow = AsFloat(q + qoff, qstride, rows, d, w.q.data(), &ldq);
      const KeyRange keys = BlockKeys(s, x, b, start, rows, length);
      int cols = BlockScores(s, x, qrow, ldq, w.kt.data(), ldk, b, h, start, rows, length, keys,
                             w.sc.data(), ldk);
      // fp32 outputs in place; bf16 ones in fp32 rows first, narrowed below.
      float* orow = kFloat<T> ? reinterpret_cast<float*>(out + qoff) : w.o.data();
      const int64_t ldo = kFloat<T> ? qstride : d;
      float* lrow = lse + (b * s.h + h) * s.lq + start;
      float inv[kRows];  // 1 / each row's sum: the output rows are normalized, not the scores
      for (int r = 0; r < rows; ++r) {
        float* row = w.sc.data() + r * ldk;
        V mv = Splat(kHidden);
        for (int j = 0; j < cols; j += kLanes) mv = mv > Load(row + j) ? mv : Load(row + j);
        float m = Max(mv);
        if (m == kHidden) {  // sees nothing: zeros
          std::fill(row, row + cols, 0.0f);
          lrow[r] = inv[r] = 0.0f;
          continue;
        }
        float sum = ExpRow(row, cols, m);
        inv[r] = 1.0f / sum;
        lrow[r] = m + std::log(sum);
      }
      if (keys.size() == 0) {
        for (int r = 0; r < rows; ++r) std::fill(orow + r * ldo, orow + r * ldo + s.d, 0.0f);
      } else {
        Product<false>(rows, d, w.sc.data(), ldk, 1, vbase + keys.first * ldv, ldv,
                       static_cast<int>(keys.size()), 1.0f, orow, ldo);
        for (int r = 0; r < rows; ++r)
          for (int e = 0; e < d; e += kLanes)
            Store(orow + r * ldo + e, Load(orow + r * ldo + e) * inv[r]);
      }
      if constexpr (!kFloat<T>) PutRows(orow, ldo, rows, d, out + qoff, qstride);
    }
  }
}

// Backward of one (batch row b, KV head kh), or of its share `part` of `parts` (query blocks
// part, part + parts, ..., as in ForwardItem): dQ of its query heads (the share's blocks), dK and
// dV of its keys (added, in fp32, into dk and dv: key j's row at j * ldkv; each share has its
// own), and its share of dBias (added into d_bias, laid out as the bias: the share's query rows).
template <typename T>
void BackwardItem(const Shape& s, const Operands& x, int64_t b, int64_t kh, int64_t part,
                  int64_t parts, T* dq, float* dk, float* dv, int64_t ldkv, float* d_bias,
                  Scratch& w) {
  const int64_t ldk = PaddedKeys(s.lk);
  const int64_t group = s.h / s.kv, kstride = s.kv * s.d, qstride = s.h * s.d;
  const int d = static_cast<int>(s.d);
  const int64_t length = x.lengths[b], koff = (b * s.lk * s.kv + kh) * s.d;
  const T *q = static_cast<const T*>(x.q), *o = static_cast<const T*>(x.out);
  const T* d_out = static_cast<const T*>(x.d_out);
  float *kt = w.kt.data(), *vt = w.vt.data(), *pr = w.sc.data(), *ds = w.ds.data();
  float di[kRows];
  PackTransposed(static_cast<const T*>(x.k) + koff, kstride, s.lk, d, kt, ldk);
  PackTransposed(static_cast<const T*>(x.v) + koff, kstride, s.lk, d, vt, ldk);
  int64_t ldkr;
  const float* krows = AsFloat(static_cast<const T*>(x.k) + koff, kstride, s.lk, d, w.k.data(),
                               &ldkr);
  for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
    for (int64_t start = part * kRows; start < s.lq; start += parts * kRows) {
      int rows = static_cast<int>(std::min<int64_t>(kRows, s.lq - start));
      const int64_t qoff = ((b * s.lq + start) * s.h + h) * s.d;
      const KeyRange keys = BlockKeys(s, x, b, start, rows, length);
      int64_t ldq, ldg, ldo;
      const float* qrow = AsFloat(q + qoff, qstride, rows, d, w.q.data(), &ldq);
      float* dqrow = kFloat<T> ? reinterpret_cast<float*>(dq + qoff) : w.dq.data();
      const int64_t lddq = kFloat<T> ? qstride : d;
      int cols = BlockScores(s, x, qrow, ldq, kt, ldk, b, h, start, rows, length, keys, pr, ldk);
      if (cols == 0) {
        for (int r = 0; r < rows; ++r) std::fill(dqrow + r * lddq, dqrow + r * lddq + s.d, 0.0f);
        if constexpr (!kFloat<T>) PutRows(dqrow, lddq, rows, d, dq + qoff, qstride);
        continue;
      }
      const float* grow = AsFloat(d_out + qoff, qstride, rows, d, w.g.data(), &ldg);
      const float* orow = AsFloat(o + qoff, qstride, rows, d, w.o.data(), &ldo);
      // P from the saved log-sum-exp; D_i = dO_i . O_i.
      // (A row that sees no key has only hidden scores, and its saved log-sum-exp is 0: P = 0.)
      for (int r = 0; r < rows; ++r) {
        float* row = pr + r * ldk;
        ExpRow(row, cols, x.lse[(b * s.h + h) * s.lq + start + r]);
        V dot = {};
        for (int e = 0; e < d; e += kLanes)
          dot += Load(orow + r * ldo + e) * Load(grow + r * ldg + e);
        di[r] = Sum(dot);
      }
      // dP = dO V^T; dS = P * (dP - D) (zero where hidden), the gradient of the scaled scores.
      Product<false>(rows, cols, grow, ldg, 1, vt + keys.first, ldk, d, 1.0f, ds, ldk);
      float* dbrow = nullptr;
      if (s.has_bias)
        dbrow = d_bias + (((s.bias_b == 1 ? 0 : b) * s.h + h) * s.lq + start) * s.lk + keys.first;
      for (int r = 0; r < rows; ++r) {
        float *drow = ds + r * ldk, *prow = pr + r * ldk;
        // (hidden keys have P = 0, and so dS = 0)
        int64_t seen = VisibleInBlock(s, x, b, length, start + r, keys);
        for (int64_t j = 0; j < seen; ++j) drow[j] = prow[j] * (drow[j] - di[r]);
        for (int64_t j = seen; j < cols; ++j) drow[j] = 0.0f;
        if (dbrow)
          for (int64_t j = 0; j < seen; ++j) dbrow[r * s.lk + j] += drow[j];
      }
      // dQ = scale dS K; dK += scale dS^T Q; dV += P^T dO.
      const int n = static_cast<int>(keys.size());
      Product<false>(rows, d, ds, ldk, 1, krows + keys.first * ldkr, ldkr, n, s.scale, dqrow,
                     lddq);
      if constexpr (!kFloat<T>) PutRows(dqrow, lddq, rows, d, dq + qoff, qstride);
      Product<true>(n, d, ds, 1, ldk, qrow, ldq, rows, s.scale, dk + keys.first * ldkv, ldkv);
      Product<true>(n, d, pr, 1, ldk, grow, ldg, rows, 1.0f, dv + keys.first * ldkv, ldkv);
    }
  }
}

template <typename T>
ffi::Error ForwardImpl(const Shape& s, const Operands& x, T* op, float* lsep,
                       ffi::ThreadPool& pool) {
  // Fewer (row, KV head) pairs than twice the threads (a prompt of one row over few KV heads):
  // the pairs' query blocks are shared out too, each share packing its keys again.
  const int64_t pairs = s.b * s.kv, blocks = (s.lq + kRows - 1) / kRows;
  const int64_t parts = std::clamp<int64_t>((2 * pool.num_threads() + pairs - 1) / pairs, 1,
                                            std::max<int64_t>(blocks, 1));
  const int threads = Threads(pool, pairs * parts);
  std::vector<Scratch> scratch(threads);
  auto item = [&](int t, int64_t i) {
    scratch[t].Size(s, false, !kFloat<T>);
    int64_t pair = i / parts;
    // (batch row, KV head) in BackwardImpl's order (see there).
    ForwardItem(s, x, pair % s.b, pair / s.b, i % parts, parts, op, lsep, scratch[t]);
  };
  ParallelFor(pool, pairs * parts, threads, item);
  return ffi::Error::Success();
}

template <typename T>
ffi::Error BackwardImpl(const Shape& s, const Operands& x, T* dqp, T* dkp, T* dvp, float* dbp,
                        int64_t bias_size, ffi::ThreadPool& pool) {
  const int64_t k_size = s.b * s.lk * s.kv * s.d, kstride = s.kv * s.d;
  if constexpr (kFloat<T>) {
    std::fill(dkp, dkp + k_size, 0.0f);
    std::fill(dvp, dvp + k_size, 0.0f);
  }
  std::fill(dbp, dbp + bias_size, 0.0f);
  // A bias shared by the batch rows: its gradient is a sum over the rows. They are cut into
  // `runs` runs of consecutive rows, each run with its own dBias (the first run's is d_bias),
  // an item adds one run's rows in order for one KV head, and the runs' sums are added in order
  // at the end. Items of different runs or KV heads never add into the same values, and every
  // value is the same sum in the same order whichever threads take the items: the gradient is
  // bit for bit the same from run to run (with one dBias per thread, as before, it varied in
  // its last bits with the threads' timing, and so did training). Otherwise a run is one row.
  const bool shared = s.has_bias && s.bias_b == 1;
  const int64_t pool_threads = std::max<int64_t>(pool.num_threads(), 1);
  int64_t per_run = 1, runs = s.b;
  if (shared) {
    per_run = (s.b + pool_threads - 1) / pool_threads;
    runs = (s.b + per_run - 1) / per_run;
  }
  // Fewer items than twice the threads (one long row over few KV heads, or a batch split over
  // many devices): each item's query blocks are shared out among `parts` items too, as in the
  // forward. The shares of an item write different rows of dQ and dBias, and each its own dK
  // and dV (fp32: share 0 into d_k and d_v, the others into buffers added in order at the end;
  // bf16: every share into a buffer of its own, added in order and narrowed at the end: again
  // the same sums in the same order from run to run). bf16 with one share: each item adds into
  // fp32 sums of its own keys and narrows them into d_k and d_v when done.
  const int64_t blocks = (s.lq + kRows - 1) / kRows;
  const int64_t parts = std::clamp<int64_t>((2 * pool_threads + runs * s.kv - 1) / (runs * s.kv),
                                            1, std::max<int64_t>(blocks, 1));
  const int threads = Threads(pool, runs * s.kv * parts);
  std::vector<Scratch> scratch(threads);
  std::vector<std::vector<float>> partial(shared ? runs - 1 : 0,
                                          std::vector<float>(bias_size, 0.0f));
  const int64_t own = kFloat<T> ? parts - 1 : (parts > 1 ? parts : 0);
  std::vector<std::vector<float>> share_dk(own, std::vector<float>(k_size, 0.0f));
  std::vector<std::vector<float>> share_dv(own, std::vector<float>(k_size, 0.0f));
  auto item = [&](int t, int64_t i) {
    // Item i is share i % parts of (run j % runs, KV head j / runs), j = i / parts: items
    // running at once on different threads then write different rows' gradients. In row-major
    // order the KV heads of one row ran on two threads at once, writing interleaved 128-byte
    // pieces of the same dK / dV rows: the backward took 30% longer on two cores (decoder-tiny's
    // shapes).
    const int64_t part = i % parts, j = i / parts, run = j % runs, kh = j / runs;
    Scratch& w = scratch[t];
    w.Size(s, true, !kFloat<T>);
    float* target = run == 0 || !shared ? dbp : partial[run - 1].data();
    for (int64_t b = run * per_run; b < std::min(s.b, (run + 1) * per_run); ++b) {
      const int64_t koff = (b * s.lk * s.kv + kh) * s.d;
      float *dk, *dv;
      int64_t ldkv = kstride;
      if constexpr (kFloat<T>) {
        dk = (part == 0 ? dkp : share_dk[part - 1].data()) + koff;
        dv = (part == 0 ? dvp : share_dv[part - 1].data()) + koff;
      } else if (parts > 1) {
        dk = share_dk[part].data() + koff;
        dv = share_dv[part].data() + koff;
      } else {
        dk = w.acc.data();
        dv = dk + s.lk * s.d;
        ldkv = s.d;
        std::fill(w.acc.begin(), w.acc.end(), 0.0f);
      }
      BackwardItem(s, x, b, kh, part, parts, dqp, dk, dv, ldkv, target, w);
      if constexpr (!kFloat<T>) {
        if (parts == 1) {
          PutRows(dk, s.d, s.lk, static_cast<int>(s.d), dkp + koff, kstride);
          PutRows(dv, s.d, s.lk, static_cast<int>(s.d), dvp + koff, kstride);
        }
      }
    }
  };
  ParallelFor(pool, runs * s.kv * parts, threads, item);
  for (const auto& p : partial)
    for (size_t i = 0; i < p.size(); ++i) dbp[i] += p[i];
  if constexpr (kFloat<T>) {
    for (int64_t p = 0; p < own; ++p)
      for (int64_t i = 0; i < k_size; ++i) dkp[i] += share_dk[p][i], dvp[i] += share_dv[p][i];
  } else if (own) {
    for (int64_t p = 1; p < own; ++p)
      for (int64_t i = 0; i < k_size; ++i)
        share_dk[0][i] += share_dk[p][i], share_dv[0][i] += share_dv[p][i];
    const int d = static_cast<int>(s.d);
    PutRows(share_dk[0].data(), d, k_size / d, d, dkp, d);
    PutRows(share_dv[0].data(), d, k_size / d, d, dvp, d);
  }
  return ffi::Error::Success();
}

template <ffi::DataType kType>
ffi::Error Forward(ffi::Buffer<kType> q, ffi::Buffer<kType> k, ffi::Buffer<kType> v,
                   ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::F32> bias,
                   ffi::Buffer<ffi::S32> q_segments, ffi::Buffer<ffi::S32> k_segments,
                   ffi::Buffer<ffi::S32> prefix, ffi::ResultBuffer<kType> out,
                   ffi::ResultBuffer<ffi::F32> lse, ffi::ThreadPool pool, float scale,
                   bool causal, bool has_bias, bool has_segments, bool has_prefix) {
  Shape s = MakeShape(q, k, bias, scale, causal, has_bias, has_segments, has_prefix);
  if (auto e = CheckShapes(s, q_segments, k_segments, prefix); e.failure()) return e;
  Operands x{Data(q), Data(k), Data(v), bias.typed_data(), nullptr, nullptr, nullptr,
             lengths.typed_data(), q_segments.typed_data(), k_segments.typed_data(),
             prefix.typed_data()};
  return ForwardImpl(s, x, Data(*out), lse->typed_data(), pool);
}

template <ffi::DataType kType>
ffi::Error Backward(ffi::Buffer<kType> q, ffi::Buffer<kType> k, ffi::Buffer<kType> v,
                    ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::F32> bias,
                    ffi::Buffer<ffi::S32> q_segments, ffi::Buffer<ffi::S32> k_segments,
                    ffi::Buffer<ffi::S32> prefix, ffi::Buffer<kType> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<kType> d_out,
                    ffi::ResultBuffer<kType> d_q, ffi::ResultBuffer<kType> d_k,
                    ffi::ResultBuffer<kType> d_v, ffi::ResultBuffer<ffi::F32> d_bias,
                    ffi::ThreadPool pool, float scale, bool causal, bool has_bias,
                    bool has_segments, bool has_prefix) {
  Shape s = MakeShape(q, k, bias, scale, causal, has_bias, has_segments, has_prefix);
  if (auto e = CheckShapes(s, q_segments, k_segments, prefix); e.failure()) return e;
  Operands x{Data(q), Data(k), Data(v), bias.typed_data(), Data(out), lse.typed_data(),
             Data(d_out), lengths.typed_data(), q_segments.typed_data(),
             k_segments.typed_data(), prefix.typed_data()};
  return BackwardImpl(s, x, Data(*d_q), Data(*d_k), Data(*d_v), d_bias->typed_data(),
                      d_bias->element_count(), pool);
}

// Attention of a decoding step's few queries over a heads-major KV cache (no gradient: decoding).
// q [B, Lq, H, D]; k, v [B, K, Lk, D] (heads-major: each KV head's keys contiguous); visible
// bool [B, Lq, Lk]; bias fp32 [Bb, H, Lq, Lk] with Bb 1 or B (read only when has_bias); out
// [B, Lq, H, D]. One item per (batch row, KV head): each key row is read once for all the
// group's query heads and queries, its dot products and the value rows' weighted sums in fp32
// (bf16 rows widened as they are loaded). A query that sees no key gets zeros.
template <typename T>
void CacheItem(const Shape& s, const T* q, const T* k, const T* v, const bool* visible,
               const float* bias, T* out, int64_t b, int64_t kh, std::vector<float>& w) {
  const int64_t group = s.h / s.kv, rows = s.lq * group, d = s.d, lk = s.lk;
  const int64_t ls = (lk + kLanes - 1) / kLanes * kLanes;  // score rows padded to vectors
  w.resize(rows * (d + ls + d + 1) + lk);
  float *qs = w.data(), *sc = qs + rows * d, *acc = sc + rows * ls, *inv = acc + rows * d;
  float* any = inv + rows;  // whether some query sees key j
  // Row r = (query i, head h = kh * group + g), i major; its scaled query widened.
  for (int64_t i = 0; i < s.lq; ++i)
    for (int64_t g = 0; g < group; ++g) {
      const T* src = q + ((b * s.lq + i) * s.h + kh * group + g) * d;
      for (int64_t e = 0; e < d; ++e) qs[(i * group + g) * d + e] = Widen(src[e]) * s.scale;
    }
  const T* kbase = k + (b * s.kv + kh) * lk * d;
  const T* vbase = v + (b * s.kv + kh) * lk * d;
  const bool* vis = visible + b * s.lq * lk;
  // Scores: each key row that some query sees (the cache's unwritten and padding slots are
  // skipped) dotted with every row's query, its vectors widened as they are loaded.
  for (int64_t j = 0; j < lk; ++j) {
    bool seen = false;
    for (int64_t i = 0; i < s.lq && !seen; ++i) seen = vis[i * lk + j];
    any[j] = seen;
    if (!seen) continue;
    const T* kr = kbase + j * d;
    for (int64_t r = 0; r < rows; ++r) {
      V dot = {};
      for (int64_t e = 0; e < d; e += kLanes) dot += Load(qs + r * d + e) * LoadWide(kr + e);
      sc[r * ls + j] = Sum(dot);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / group, h = kh * group + r % group;
    float* row = sc + r * ls;
    const bool* seen = vis + i * lk;
    const float* brow = s.has_bias
        ? bias + (((s.bias_b == 1 ? 0 : b) * s.h + h) * s.lq + i) * lk : nullptr;
    float m = kHidden;
    for (int64_t j = 0; j < lk; ++j) {
      row[j] = seen[j] ? row[j] + (brow ? brow[j] : 0.0f) : kHidden;
      m = std::max(m, row[j]);
    }
    std::fill(row + lk, row + ls, kHidden);
    if (m == kHidden) {
      std::fill(row, row + ls, 0.0f);
      inv[r] = 0.0f;
      continue;
    }
    inv[r] = 1.0f / ExpRow(row, static_cast<int>(ls), m);  // hidden keys: exp(-inf) = 0
  }
  // Outputs: each value row that some query sees added into every row's sum with its weight
  // (widened as loaded).
  std::fill(acc, acc + rows * d, 0.0f);
  for (int64_t j = 0; j < lk; ++j) {
    if (!any[j]) continue;
    const T* vr = vbase + j * d;
    for (int64_t r = 0; r < rows; ++r) {
      const float p = sc[r * ls + j];
      if (p == 0.0f) continue;
      const V pv = Splat(p);
      for (int64_t e = 0; e < d; e += kLanes)
        Store(acc + r * d + e, Load(acc + r * d + e) + pv * LoadWide(vr + e));
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / group, h = kh * group + r % group;
    T* dst = out + ((b * s.lq + i) * s.h + h) * d;
    for (int64_t e = 0; e < d; ++e) Narrow(acc[r * d + e] * inv[r], dst + e);
  }
}

template <ffi::DataType kType>
ffi::Error CacheAttention(ffi::Buffer<kType> q, ffi::Buffer<kType> k, ffi::Buffer<kType> v,
                          ffi::Buffer<ffi::PRED> visible, ffi::Buffer<ffi::F32> bias,
                          ffi::ResultBuffer<kType> out, ffi::ThreadPool pool, float scale,
                          bool has_bias) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = visible.dimensions();
  auto bd = bias.dimensions();
  Shape s{qd[0], qd[1], kd[2], qd[2], kd[1], qd[3], bd[0], false, has_bias, false, false, scale};
  if (s.d % 16 != 0 || s.kv <= 0 || s.h % s.kv != 0 || kd[0] != s.b || kd[3] != s.d ||
      vd.size() != 3 || vd[0] != s.b || vd[1] != s.lq || vd[2] != s.lk ||
      (has_bias && (bd.size() != 4 || (bd[0] != 1 && bd[0] != s.b) || bd[1] != s.h ||
                    bd[2] != s.lq || bd[3] != s.lk)))
    return ffi::Error::InvalidArgument(
        "cpu cache attention: q [b, q_len, heads, d], k and v [b, kv_heads, k_len, d], visible "
        "[b, q_len, k_len], bias [1 or b, heads, q_len, k_len]; d a multiple of 16, heads a "
        "multiple of kv_heads");
  const auto* qp = Data(q);
  const auto* kp = Data(k);
  const auto* vp = Data(v);
  auto* op = Data(*out);
  const bool* visp = visible.typed_data();
  const float* bp = bias.typed_data();
  const int64_t items = s.b * s.kv;
  const int threads = Threads(pool, items);
  std::vector<std::vector<float>> scratch(threads);
  auto item = [&](int t, int64_t i) {
    CacheItem(s, qp, kp, vp, visp, bp, op, i / s.kv, i % s.kv, scratch[t]);
  };
  ParallelFor(pool, items, threads, item);
  return ffi::Error::Success();
}

}  // namespace

// The floats per vector this build is tuned for: 16 (AVX-512) or 8 (AVX2 with FMA); 0 where
// it is tuned for neither (cpu_attention.py then uses XLA's attention: built without them, the
// wide vectors are split and the kernel runs far below XLA).
extern "C" int T5liteCpuAttentionLanes() { return kTuned ? kLanes : 0; }

// The handlers: T5liteCpuAttention{Forward,Backward} and T5liteCpuCacheAttention (a decoding
// step over a heads-major cache) for fp32 operands, ...Bf16 for bf16 ones.
// q, k, v, lengths, bias, q_segments, k_segments, prefix: the operands both passes take.
#define T5LITE_OPERANDS(kType)                   \
  ffi::Ffi::Bind()                               \
      .Arg<ffi::Buffer<kType>>()                 \
      .Arg<ffi::Buffer<kType>>()                 \
      .Arg<ffi::Buffer<kType>>()                 \
      .Arg<ffi::Buffer<ffi::S32>>()              \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Arg<ffi::Buffer<ffi::S32>>()              \
      .Arg<ffi::Buffer<ffi::S32>>()              \
      .Arg<ffi::Buffer<ffi::S32>>()

#define T5LITE_MASK_ATTRS                        \
  Ctx<ffi::ThreadPool>()                         \
      .Attr<float>("scale")                      \
      .Attr<bool>("causal")                      \
      .Attr<bool>("has_bias")                    \
      .Attr<bool>("has_segments")                \
      .Attr<bool>("has_prefix")

// Forward: out, lse.
#define T5LITE_FORWARD(kType)                    \
  T5LITE_OPERANDS(kType)                         \
      .Ret<ffi::Buffer<kType>>()                 \
      .Ret<ffi::Buffer<ffi::F32>>()              \
      .T5LITE_MASK_ATTRS

// Backward: out, lse, d_out -> d_q, d_k, d_v, d_bias.
#define T5LITE_BACKWARD(kType)                   \
  T5LITE_OPERANDS(kType)                         \
      .Arg<ffi::Buffer<kType>>()                 \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Arg<ffi::Buffer<kType>>()                 \
      .Ret<ffi::Buffer<kType>>()                 \
      .Ret<ffi::Buffer<kType>>()                 \
      .Ret<ffi::Buffer<kType>>()                 \
      .Ret<ffi::Buffer<ffi::F32>>()              \
      .T5LITE_MASK_ATTRS

#define T5LITE_CACHE(kType)                      \
  ffi::Ffi::Bind()                               \
      .Arg<ffi::Buffer<kType>>()                 \
      .Arg<ffi::Buffer<kType>>()                 \
      .Arg<ffi::Buffer<kType>>()                 \
      .Arg<ffi::Buffer<ffi::PRED>>()             \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Ret<ffi::Buffer<kType>>()                 \
      .Ctx<ffi::ThreadPool>()                    \
      .Attr<float>("scale")                      \
      .Attr<bool>("has_bias")

XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuCacheAttention, CacheAttention<ffi::DataType::F32>,
                              T5LITE_CACHE(ffi::DataType::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuCacheAttentionBf16, CacheAttention<ffi::DataType::BF16>,
                              T5LITE_CACHE(ffi::DataType::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuAttentionForward, Forward<ffi::DataType::F32>,
                              T5LITE_FORWARD(ffi::DataType::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuAttentionBackward, Backward<ffi::DataType::F32>,
                              T5LITE_BACKWARD(ffi::DataType::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuAttentionForwardBf16, Forward<ffi::DataType::BF16>,
                              T5LITE_FORWARD(ffi::DataType::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(T5liteCpuAttentionBackwardBf16, Backward<ffi::DataType::BF16>,
                              T5LITE_BACKWARD(ffi::DataType::BF16));


}  // namespace t5lite
