// Paged decode attention on the CPU, straight from the pool's blocks: no gathered copy, no decoded
// (dequantised) keys or values in memory. Built and loaded by kvshrink/engine/kernels.py.
//
// Every kernel handles one decode query per sequence: q [B, H, g, D] (g query heads per KV head),
// the sequence's blocks tables[b, 0:nb] (row stride tstride), and valid[b] stored tokens per row
// (positions >= valid[b] are never read: their logits are -inf, their weight 0).
//
// Pool layouts (per block; what the encoders' FieldLayouts give, see kvshrink/engine/pool.py):
//   plain:                     x [N, H, bs, D] in the model's dtype: float32, bfloat16 or float16
//   quantised, codes:          q [N, H, bs, D*bits/8] uint8, code k of byte i is channel i*per + k
//   per-channel groups (KIVI keys, groups of G tokens):  scale/zero [N, H, bs/G, D] float16
//   per-token groups (KIVI values, int8/int4, groups of C channels): scale/zero [N, H, bs, D/C] float16
// Asymmetric x' = code * s + z; symmetric (zero == nullptr) x' = (code - 2^(bits-1)) * s.
//
// Work is cut into tiles of rows (a block, or one key group): stored fp32 rows are used where they
// lie; codes are unpacked (or dequantised) into a tile buffer that stays in L1. Two micro-kernels
// run over a tile: scores (4 rows x 8 channels per step, independent FMA chains) and weighted sums
// (16 channels of up to 4 query heads held in registers over the tile). Codes are unpacked into
// "planes" (plane k holds channel i*per + k at index i, so every unpack loop runs over contiguous
// bytes and vectorises); the queries are permuted to that order once, and the outputs back.
// Scores are computed in the code domain (KIVI, "cuda_bmm_fA_qB_outer"):
//   per-channel groups:  q . k'_t = sum_d (q_d s_d) c_td + sum_d q_d z_d     (s, z of t's group)
// Per-token groups (int8/int4 keys, every quantised value) dequantise one row at a time into a
// D-float buffer that stays in L1, then dot it with the queries or add it into the accumulators:
// nothing of the size of the cache is written.
//
// A plain (fp32) read is bound by memory, not arithmetic: while one block is worked on, the next
// one's lines are prefetched, spread over the rows of the current tile (a burst of them at a block's
// start did less well, measured); the softmax's exponentials are 8 lanes at a time (exp8).
// Plain bf16/fp16 rows (blocks and residual rings of a half-precision model) are widened into an fp32
// tile in L1 first, a block at a time: half the bytes read, the same micro-kernels. Everything is
// computed in fp32, as the quantised paths are; a new token is stored back rounded to nearest even.

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using half = c10::Half;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct Shape {
  int64_t B, H, g, D, nb, bs;
};

// The element type of plain rows (blocks with bits == 0, residual rings): the model's dtype.
enum Elem : int32_t { F32 = 0, BF16 = 1, F16 = 2 };
struct bf16 {
  uint16_t bits;
};

// 8 floats: one AVX register with -march=native on x86, two NEON ones on ARM (GCC vector extension).
typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

typedef int32_t v8i __attribute__((vector_size(32)));

// e^x for 8 lanes (Cephes' expf: x = n ln2 + f, |f| <= ln2/2, a degree-7 polynomial for e^f, 2^n
// from the exponent bits; relative error under 8.4e-8 over [-87, 0], the softmax's range, checked
// every 64th float). Lanes below -87.3 (-inf included) give 0: std::exp would give a denormal
// there, which weighs nothing next to the row's maximum, e^0.
inline v8 exp8(v8 x) {
  const v8 zero = {}, lo = zero - 87.3f, hi = zero + 88.3f;
  const v8i under = x < lo;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const v8 n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const v8 f = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8 p = zero + 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.f;
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return under ? zero : p * scale;
}

inline float hsum(v8 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// Asks for the next block while this one is worked on: a block is a few KB that the hardware
// prefetcher, which follows one stream within a page, does not find at the jump between blocks.
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(static_cast<const char*>(p) + i, 0, 3);
}

// The four sums of a0..a3's lanes into out[0..3]: a row's dot product ends in one of these, so it
// costs three horizontal adds for four rows, not a lane-by-lane sum for each.
inline void hsum4(v8 a0, v8 a1, v8 a2, v8 a3, float* out) {
#if defined(__AVX__)
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(reinterpret_cast<__m256>(a0), reinterpret_cast<__m256>(a1)),
                                  _mm256_hadd_ps(reinterpret_cast<__m256>(a2), reinterpret_cast<__m256>(a3)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
#else
  out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
#endif
}

// ---------------------------------------------------------------- micro-kernels over a tile of rows
// A tile: n rows of D floats (D % 8 == 0), row t at rows + t * D: a block's keys or values as stored,
// or a block's codes unpacked / dequantised into an L1 buffer.

// out[gi * W + t] = scaling * (Q[gi] . row_t + bias[gi]), four rows at a time (four independent
// FMA chains per query head: one chain waits on FMA latency).
void scores_tile(const float* Q, const float* bias, int64_t g, const float* rows, int64_t n, int64_t D,
                 float scaling, float* out, int64_t W, const float* next = nullptr) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const float* r = rows + t * D;
    if (next) prefetch(next + t * D, 4 * D * static_cast<int64_t>(sizeof(float)));
    for (int64_t gi = 0; gi < g; ++gi) {
      const float* q = Q + gi * D;
      v8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t d = 0; d < D; d += 8) {
        const v8 qv = load8(q + d);
        a0 += qv * load8(r + d);
        a1 += qv * load8(r + D + d);
        a2 += qv * load8(r + 2 * D + d);
        a3 += qv * load8(r + 3 * D + d);
      }
      const float b = bias ? bias[gi] : 0.f;
      float* o = out + gi * W + t;
      hsum4(a0, a1, a2, a3, o);
      for (int i = 0; i < 4; ++i) o[i] = (o[i] + b) * scaling;
    }
  }
  for (; t < n; ++t) {
    const float* r = rows + t * D;
    for (int64_t gi = 0; gi < g; ++gi) {
      v8 a = {};
      for (int64_t d = 0; d < D; d += 8) a += load8(Q + gi * D + d) * load8(r + d);
      out[gi * W + t] = (hsum(a) + (bias ? bias[gi] : 0.f)) * scaling;
    }
  }
}

// acc[gi] += sum_t P[gi * W + t] * row_t for M query heads at once, 16 channels at a time: the
// accumulators (2M registers) stay in registers over the whole tile.
template <int M>
void values_tile_m(const float* P, int64_t W, const float* rows, int64_t n, int64_t D, float* acc,
                   const float* next) {
  for (int64_t d = 0; d < D; d += 16) {
    v8 lo[M], hi[M];
    for (int m = 0; m < M; ++m) {
      lo[m] = load8(acc + m * D + d);
      hi[m] = D - d >= 16 ? load8(acc + m * D + d + 8) : v8{};
    }
    const bool two = D - d >= 16;
    for (int64_t t = 0; t < n; ++t) {
      if (next && d == 0) prefetch(next + t * D, D * static_cast<int64_t>(sizeof(float)));
      const float* r = rows + t * D + d;
      const v8 x0 = load8(r), x1 = two ? load8(r + 8) : v8{};
      for (int m = 0; m < M; ++m) {
        const float w = P[m * W + t];
        lo[m] += w * x0;
        hi[m] += w * x1;
      }
    }
    for (int m = 0; m < M; ++m) {
      store8(acc + m * D + d, lo[m]);
      if (two) store8(acc + m * D + d + 8, hi[m]);
    }
  }
}

// (next: the tile read after this one, prefetched during the first pass over this one's rows)
void values_tile(const float* P, int64_t W, int64_t g, const float* rows, int64_t n, int64_t D, float* acc,
                 const float* next = nullptr) {
  int64_t gi = 0;
  for (; gi + 4 <= g; gi += 4, next = nullptr) values_tile_m<4>(P + gi * W, W, rows, n, D, acc + gi * D, next);
  switch (g - gi) {
    case 3: values_tile_m<3>(P + gi * W, W, rows, n, D, acc + gi * D, next); break;
    case 2: values_tile_m<2>(P + gi * W, W, rows, n, D, acc + gi * D, next); break;
    case 1: values_tile_m<1>(P + gi * W, W, rows, n, D, acc + gi * D, next); break;
    default: break;
  }
}

// ------------------------------------------------------------------------------ code unpacking

template <int BITS>
inline float code(uint8_t byte, int k) {
  constexpr int mask = (1 << BITS) - 1;
  return static_cast<float>(BITS == 8 ? byte : (byte >> (k * BITS)) & mask);
}

// Codes k of 8 consecutive bytes as 8 floats: zero-extend, shift, mask, convert (AVX2: four
// instructions; GCC's generic __builtin_convertvector from bytes is a scalar sequence).
template <int BITS>
inline v8 codes8(const uint8_t* p, int k) {
#if defined(__AVX2__)
  __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  if (BITS < 8) w = _mm256_and_si256(_mm256_srli_epi32(w, k * BITS), _mm256_set1_epi32((1 << BITS) - 1));
  return reinterpret_cast<v8>(_mm256_cvtepi32_ps(w));
#else
  v8 out;
  for (int i = 0; i < 8; ++i) out[i] = code<BITS>(p[i], k);
  return out;
#endif
}

// One row's codes into planar order: buf[k * R + i] = code k of byte i (channel i * per + k). Planar
// loops run over contiguous bytes and vectorise; queries are permuted to match once per call.
template <int BITS>
inline void unpack_planar(const uint8_t* row, float* buf, int64_t R) {
  constexpr int per = 8 / BITS;
  for (int k = 0; k < per; ++k) {
    float* dst = buf + k * R;
    int64_t i = 0;
    for (; i + 8 <= R; i += 8) store8(dst + i, codes8<BITS>(row + i, k));
    for (; i < R; ++i) dst[i] = code<BITS>(row[i], k);
  }
}

// A row with per-token groups of C channels, dequantised into planar order (the group of planar
// index k * R + i is i / span, span = C / per, the same in every plane).
template <int BITS>
inline void dequant_planar(const uint8_t* row, const float* s, const float* z, float* buf, int64_t R, int64_t span) {
  constexpr int per = 8 / BITS;
  for (int k = 0; k < per; ++k) {
    float* dst = buf + k * R;
    for (int64_t lo = 0, grp = 0; lo < R; lo += span, ++grp) {
      const float sg = s[grp], zg = z[grp];
      int64_t i = lo;
      for (; i + 8 <= lo + span; i += 8) store8(dst + i, codes8<BITS>(row + i, k) * sg + zg);
      for (; i < lo + span; ++i) dst[i] = code<BITS>(row[i], k) * sg + zg;
    }
  }
}

inline int64_t planar(int64_t d, int per, int64_t R) { return (d % per) * R + d / per; }

// float16 -> float32 in hardware (F16C on x86, native on ARM) through the compiler's _Float16.
inline float f32(half h) {
  _Float16 x;
  std::memcpy(&x, &h, sizeof x);
  return static_cast<float>(x);
}

inline half to_half(float f) {
  const _Float16 x = static_cast<_Float16>(f);
  half h;
  std::memcpy(&h, &x, sizeof h);
  return h;
}

// n elements of a half-precision row into fp32 (exact), and fp32 into a plain row (rounded to nearest
// even, as torch's .to() rounds).
inline void widen(const half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32(src[i]);
}
inline void widen(const bf16* src, float* dst, int64_t n) {
  auto out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(src[i].bits) << 16;  // vectorises
}
inline void narrow(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void narrow(const float* src, half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_half(src[i]);
}
inline void narrow(const float* src, bf16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof u);
    dst[i].bits = std::isnan(src[i]) ? static_cast<uint16_t>((u >> 16) | 0x40)
                                     : static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
  }
}

// f(T{}) with T the C++ type of element type `elem`.
template <typename F>
void with_elem(int32_t elem, F f) {
  switch (elem) {
    case BF16: f(bf16{}); break;
    case F16: f(half{}); break;
    default: f(float{}); break;
  }
}

// Rows [0, n) of D elements as fp32: where they lie (fp32), or widened into this thread's tile.
template <typename T>
const float* as_f32(const T* rows, int64_t n, int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    return rows;
  } else {
    thread_local std::vector<float> tile;
    if (static_cast<int64_t>(tile.size()) < n * D) tile.resize(n * D);
    widen(rows, tile.data(), n * D);
    return tile.data();
  }
}

inline float zero_of(const half* zero, const half* scale, int64_t at, float offset) {
  return zero ? f32(zero[at]) : -offset * f32(scale[at]);
}

// Calls body(bh, b, h, end) for every (sequence, KV head) pair, in parallel over torch's threads;
// end: the positions of the row that are read (valid tokens, at most the blocks given).
template <typename F>
void each_head(const Shape& s, const int64_t* valid, F body) {
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) body(bh, bh / s.H, bh % s.H, std::min(valid[bh / s.H], s.nb * s.bs));
  });
}

inline void fill_masked(float* out, int64_t W, const Shape& s, int64_t from) {
  for (int64_t gi = 0; gi < s.g; ++gi)
    for (int64_t pos = from; pos < s.nb * s.bs; ++pos) out[gi * W + pos] = NEG_INF;
}

// Rows quantised in per-token groups of C channels: dequantises a block's first n rows into a tile
// (one per thread: it owns its buffer).
template <int BITS>
struct TokenTiles {
  static constexpr int per = 8 / BITS;
  const uint8_t* codes;
  const half *scale, *zero;
  int64_t H, bs, D, R, ng, span;
  float offset;
  std::vector<float> tile, sf, zf;

  TokenTiles(const uint8_t* codes, const half* scale, const half* zero, const Shape& s, int64_t C)
      : codes(codes), scale(scale), zero(zero), H(s.H), bs(s.bs), D(s.D), R(s.D / per), ng(s.D / C),
        span(C / per), offset(static_cast<float>(1 << (BITS - 1))), tile(s.bs * s.D), sf(s.D / C), zf(s.D / C) {}

  void prefetch_block(int64_t blk, int64_t h) const {
    const int64_t tok = (blk * H + h) * bs;
    prefetch(codes + tok * R, bs * R);
    prefetch(scale + tok * ng, bs * ng * static_cast<int64_t>(sizeof(half)));
    if (zero) prefetch(zero + tok * ng, bs * ng * static_cast<int64_t>(sizeof(half)));
  }

  const float* block(int64_t blk, int64_t h, int64_t n) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t tok = (blk * H + h) * bs + t;
      for (int64_t grp = 0; grp < ng; ++grp) {
        sf[grp] = f32(scale[tok * ng + grp]);
        zf[grp] = zero_of(zero, scale, tok * ng + grp, offset);
      }
      dequant_planar<BITS>(codes + tok * R, sf.data(), zf.data(), tile.data() + t * D, R, span);
    }
    return tile.data();
  }
};

// Per-head bodies: one (sequence b, KV head h) pair's work, reading positions [0, end) of its blocks
// (table: the sequence's row of block ids). The batch entry points run them over every pair
// (each_head); the fused decode step runs them inside its own per-pair pipeline.

// ------------------------------------------------------------------------------------- plain rows

// The block after this one, prefetched while this one is worked on: fp32 rows spread the prefetch
// over the micro-kernel's rows (`next`); half-precision rows are widened first, so the next block is
// asked for whole before that.
template <typename T>
const float* plain_next(const T* next, int64_t bytes) {
  if constexpr (std::is_same_v<T, float>) {
    return next;
  } else {
    if (next) prefetch(next, bytes);
    return nullptr;
  }
}

template <typename T>
void scores_plain_head(const float* qh, const T* x, const int64_t* table, int64_t h, int64_t end,
                       float scaling, float* ob, int64_t W, const Shape& s) {
  for (int64_t t0 = 0; t0 < end; t0 += s.bs) {
    const int64_t n = std::min(s.bs, end - t0);
    const T* next = t0 + s.bs < end ? x + (table[t0 / s.bs + 1] * s.H + h) * s.bs * s.D : nullptr;
    const float* pf = plain_next(next, s.bs * s.D * static_cast<int64_t>(sizeof(T)));
    const float* rows = as_f32(x + (table[t0 / s.bs] * s.H + h) * s.bs * s.D, n, s.D);
    scores_tile(qh, nullptr, s.g, rows, n, s.D, scaling, ob + t0, W, pf);
  }
}

// acc[gi * D + d] += sum_t p[gi * W + t] x_t[d]
template <typename T>
void values_plain_head(const float* ph, int64_t W, const T* x, const int64_t* table, int64_t h, int64_t end,
                       float* acc, const Shape& s) {
  for (int64_t t0 = 0; t0 < end; t0 += s.bs) {
    const int64_t n = std::min(s.bs, end - t0);
    const T* next = t0 + s.bs < end ? x + (table[t0 / s.bs + 1] * s.H + h) * s.bs * s.D : nullptr;
    const float* pf = plain_next(next, s.bs * s.D * static_cast<int64_t>(sizeof(T)));
    const float* rows = as_f32(x + (table[t0 / s.bs] * s.H + h) * s.bs * s.D, n, s.D);
    values_tile(ph + t0, W, s.g, rows, n, s.D, acc, pf);
  }
}

// ------------------------------------------------------------ per-channel groups (KIVI keys)

template <int BITS>
void scores_per_channel_head(const float* qb, const uint8_t* codes, const half* scale, const half* zero,
                             const int64_t* table, int64_t h, int64_t end, float scaling, float* ob, int64_t W,
                             const Shape& s, int64_t G) {
  constexpr int per = 8 / BITS;
  const int64_t R = s.D / per, nch = s.bs / G;
  const float offset = static_cast<float>(1 << (BITS - 1));
  std::vector<float> qp(s.g * s.D), qs(s.g * s.D), qz(s.g), tile(G * s.D), sf(s.D), zf(s.D);
  // qp: q planar; qs: q * scale, planar; sf planar, zf not
  for (int64_t gi = 0; gi < s.g; ++gi)
    for (int64_t d = 0; d < s.D; ++d) qp[gi * s.D + planar(d, per, R)] = qb[gi * s.D + d];
  // where the group holding position t keeps its scale/zero (D each) and its first row of codes
  auto meta_at = [&](int64_t t) { return ((table[t / s.bs] * s.H + h) * nch + (t % s.bs) / G) * s.D; };
  auto codes_at = [&](int64_t t) { return codes + ((table[t / s.bs] * s.H + h) * s.bs + t % s.bs) * R; };
  for (int64_t t0 = 0; t0 < end; t0 += G) {  // one key group: G tokens sharing scale/zero
    const int64_t meta = meta_at(t0);
    if (t0 + G < end) {  // the next group's codes, scale and zero: small reads scattered over the pool
      prefetch(codes_at(t0 + G), G * R);
      prefetch(scale + meta_at(t0 + G), s.D * static_cast<int64_t>(sizeof(half)));
      if (zero) prefetch(zero + meta_at(t0 + G), s.D * static_cast<int64_t>(sizeof(half)));
    }
    for (int64_t d = 0; d < s.D; ++d) {
      sf[planar(d, per, R)] = f32(scale[meta + d]);
      zf[d] = zero_of(zero, scale, meta + d, offset);
    }
    for (int64_t gi = 0; gi < s.g; ++gi) {
      float* qsg = qs.data() + gi * s.D;
      const float* qg = qp.data() + gi * s.D;
      for (int64_t d = 0; d < s.D; ++d) qsg[d] = qg[d] * sf[d];
      qz[gi] = 0.f;
      for (int64_t d = 0; d < s.D; ++d) qz[gi] += qb[gi * s.D + d] * zf[d];
    }
    const int64_t n = std::min(G, end - t0);
    const uint8_t* rows = codes_at(t0);
    for (int64_t t = 0; t < n; ++t) unpack_planar<BITS>(rows + t * R, tile.data() + t * s.D, R);
    scores_tile(qs.data(), qz.data(), s.g, tile.data(), n, s.D, scaling, ob + t0, W);
  }
}

// ------------------------------------------- per-token groups (KIVI values, int8/int4 keys and values)

template <int BITS>
void scores_per_token_head(const float* qb, const uint8_t* codes, const half* scale, const half* zero,
                           const int64_t* table, int64_t h, int64_t end, float scaling, float* ob, int64_t W,
                           const Shape& s, int64_t C) {
  constexpr int per = 8 / BITS;
  const int64_t R = s.D / per;
  TokenTiles<BITS> tiles(codes, scale, zero, s, C);
  std::vector<float> qp(s.g * s.D);  // the queries in the tiles' planar order
  for (int64_t gi = 0; gi < s.g; ++gi)
    for (int64_t d = 0; d < s.D; ++d) qp[gi * s.D + planar(d, per, R)] = qb[gi * s.D + d];
  for (int64_t t0 = 0; t0 < end; t0 += s.bs) {
    const int64_t n = std::min(s.bs, end - t0);
    if (t0 + s.bs < end) tiles.prefetch_block(table[t0 / s.bs + 1], h);
    const float* rows = tiles.block(table[t0 / s.bs], h, n);
    scores_tile(qp.data(), nullptr, s.g, rows, n, s.D, scaling, ob + t0, W);
  }
}

// ob[gi * D + d] += sum_t p[gi * W + t] x'_t[d]  (natural channel order)
template <int BITS>
void values_per_token_head(const float* ph, int64_t W, const uint8_t* codes, const half* scale, const half* zero,
                           const int64_t* table, int64_t h, int64_t end, float* ob, const Shape& s, int64_t C) {
  constexpr int per = 8 / BITS;
  const int64_t R = s.D / per;
  TokenTiles<BITS> tiles(codes, scale, zero, s, C);
  std::vector<float> acc(s.g * s.D, 0.f);  // planar, as the tiles
  for (int64_t t0 = 0; t0 < end; t0 += s.bs) {
    const int64_t n = std::min(s.bs, end - t0);
    if (t0 + s.bs < end) tiles.prefetch_block(table[t0 / s.bs + 1], h);
    const float* rows = tiles.block(table[t0 / s.bs], h, n);
    values_tile(ph + t0, W, s.g, rows, n, s.D, acc.data());
  }
  for (int64_t gi = 0; gi < s.g; ++gi)
    for (int64_t d = 0; d < s.D; ++d) ob[gi * s.D + d] += acc[gi * s.D + planar(d, per, R)];
}

// ------------------------------------------------------------------------- one side's blocks
// A stream's payload as the pool lays it out (bits 0: plain rows of type `elem` in x; else codes +
// fp16 scale/zero, per_channel: KIVI-style token groups of `group`, else per-token channel groups).
struct Blocks {
  int32_t bits, per_channel;
  int64_t group;
  const void* data;  // x (elem) or codes (uint8)
  const void* scale;
  const void* zero;
  int32_t elem;
};

template <int BITS> struct ScoresHead {
  static void run(const Blocks& k, const float* qh, const int64_t* table, int64_t h, int64_t end, float scaling,
                  float* ob, int64_t W, const Shape& s) {
    auto codes = static_cast<const uint8_t*>(k.data);
    auto sc = static_cast<const half*>(k.scale), ze = static_cast<const half*>(k.zero);
    if (k.per_channel) scores_per_channel_head<BITS>(qh, codes, sc, ze, table, h, end, scaling, ob, W, s, k.group);
    else scores_per_token_head<BITS>(qh, codes, sc, ze, table, h, end, scaling, ob, W, s, k.group);
  }
};
template <int BITS> struct ValuesHead {
  static void run(const Blocks& v, const float* ph, int64_t W, const int64_t* table, int64_t h, int64_t end,
                  float* ob, const Shape& s) {
    values_per_token_head<BITS>(ph, W, static_cast<const uint8_t*>(v.data), static_cast<const half*>(v.scale),
                                static_cast<const half*>(v.zero), table, h, end, ob, s, v.group);
  }
};

template <template <int> class K, typename... A>
int by_bits(int bits, A&&... args) {
  switch (bits) {
    case 1: K<1>::run(args...); return 0;
    case 2: K<2>::run(args...); return 0;
    case 4: K<4>::run(args...); return 0;
    case 8: K<8>::run(args...); return 0;
    default: return 1;
  }
}

// Supported layouts: plain, any bit width of 1/2/4/8 (values: per-token groups only).
bool readable(const Blocks& b, bool weights) {
  if (b.bits == 0) return true;
  if (b.bits != 1 && b.bits != 2 && b.bits != 4 && b.bits != 8) return false;
  return !(weights && b.per_channel);
}

void block_scores(const Blocks& k, const float* qh, const int64_t* table, int64_t h, int64_t end, float scaling,
                  float* ob, int64_t W, const Shape& s) {
  if (k.bits) {
    by_bits<ScoresHead>(k.bits, k, qh, table, h, end, scaling, ob, W, s);
    return;
  }
  with_elem(k.elem, [&](auto tag) {
    using T = decltype(tag);
    scores_plain_head(qh, static_cast<const T*>(k.data), table, h, end, scaling, ob, W, s);
  });
}

void block_values(const Blocks& v, const float* ph, int64_t W, const int64_t* table, int64_t h, int64_t end,
                  float* ob, const Shape& s) {
  if (v.bits) {
    by_bits<ValuesHead>(v.bits, v, ph, W, table, h, end, ob, s);
    return;
  }
  with_elem(v.elem, [&](auto tag) {
    using T = decltype(tag);
    values_plain_head(ph, W, static_cast<const T*>(v.data), table, h, end, ob, s);
  });
}

// --------------------------------------------------------------------- the fused decode step
// One side (keys or values) of one layer for a decode batch: its blocks, its residual ring ([S, H, R,
// D] of type ring_elem, R = 0: none) and the per-sequence counters (stride cstride, one layer's column
// of the step's [B, L] counters): tokens in blocks, ring start and length.
struct Side {
  Blocks blocks;
  const int64_t* encoded;
  void* ring;
  int64_t R;
  const int64_t* ring_start;
  const int64_t* ring_len;
  int32_t write_new;        // store the new token: into the ring (R > 0), else into the blocks (encoded)
  int32_t ring_elem;
  const int64_t* leaving;   // per row, ring rows encoded into the blocks this step (chunk-1 streams), or null
};

// ------------------------------------------------------------------ encoding a token into blocks
// What GroupQuantEncoder.encode (kvshrink/methods/quant.py) stores for one token of one head, bit for
// bit: per group of C channels, asymmetric z = half(min), s = half((max - min) / (2^b - 1)), codes
// round-half-even((x - z) / max(s, 1e-8)) in [0, 2^b - 1]; symmetric s = half(max|x| / qmax), codes
// round((x / s)) in [-qmax, qmax] offset by 2^(b-1); packed 8/b per byte, channel i*per + k in bits
// k*b of byte i. Quantising against the rounded scale keeps |x - x'| <= s/2 for what is stored.
template <int BITS> struct EncodeRow {
  static void run(const Blocks& bl, const float* x, int64_t tok, int64_t D) {
    constexpr int per = 8 / BITS;
    constexpr float qmax_asym = static_cast<float>((1 << BITS) - 1);
    constexpr float qmax_sym = static_cast<float>((1 << (BITS - 1)) - 1);
    const int64_t C = bl.group, ng = D / C;
    uint8_t* codes = const_cast<uint8_t*>(static_cast<const uint8_t*>(bl.data)) + tok * (D / per);
    half* scale = const_cast<half*>(static_cast<const half*>(bl.scale)) + tok * ng;
    half* zero = bl.zero ? const_cast<half*>(static_cast<const half*>(bl.zero)) + tok * ng : nullptr;
    std::fill(codes, codes + D / per, uint8_t{0});
    for (int64_t grp = 0; grp < ng; ++grp) {
      const float* xg = x + grp * C;
      float lo = xg[0], hi = xg[0], amax = std::fabs(xg[0]);
      for (int64_t c = 1; c < C; ++c) {
        lo = std::min(lo, xg[c]);
        hi = std::max(hi, xg[c]);
        amax = std::max(amax, std::fabs(xg[c]));
      }
      const half hs = to_half(zero ? (hi - lo) / qmax_asym : amax / qmax_sym);
      scale[grp] = hs;
      const float s = std::max(f32(hs), 1e-8f);
      float z = 0.f;
      if (zero) {
        zero[grp] = to_half(lo);
        z = f32(zero[grp]);
      }
      for (int64_t c = 0; c < C; ++c) {
        float q = std::nearbyint((xg[c] - z) / s);
        q = zero ? std::min(std::max(q, 0.f), qmax_asym) : std::min(std::max(q, -qmax_sym), qmax_sym) + qmax_sym + 1.f;
        const int64_t d = grp * C + c;
        codes[d / per] |= static_cast<uint8_t>(static_cast<int>(q) << ((d % per) * BITS));
      }
    }
  }
};

// Token `pos` of head h (its block from `table`): a copy (plain) or the encoder's codes (per-token groups).
void store_token(const Blocks& bl, const float* x, const int64_t* table, int64_t h, int64_t pos, const Shape& s) {
  const int64_t tok = (table[pos / s.bs] * s.H + h) * s.bs + pos % s.bs;
  if (bl.bits) {
    by_bits<EncodeRow>(bl.bits, bl, x, tok, s.D);
    return;
  }
  with_elem(bl.elem, [&](auto tag) {
    using T = decltype(tag);
    narrow(x, const_cast<T*>(static_cast<const T*>(bl.data)) + tok * s.D, s.D);
  });
}

// Which layouts the kernel can store a token into: plain, or per-token groups (not KIVI's key groups).
bool storable(const Blocks& b) { return b.bits == 0 || (readable(b, true) && !b.per_channel); }

// Ring rows [start, start + len) modulo R: at most two contiguous runs. f(first row, count, offset).
template <typename F>
void ring_runs(int64_t start, int64_t len, int64_t R, F f) {
  const int64_t first = std::min(len, R - start);
  if (first > 0) f(start, first, int64_t{0});
  if (len > first) f(int64_t{0}, len - first, first);
}

struct Step {
  const float *q, *knew, *vnew;  // [B, H, g, D], [B, H, D], [B, H, D]
  const int64_t *tables, *slots, *stored;
  int64_t tstride, cstride;
  float scaling, softcap;
  int64_t window;        // 0: full attention
  const float* sinks;    // [H * g] or null
  float* out;            // [B, H, g, D]
  float* probs;          // [B, H, g, probs_w] in stored order, or null
  int64_t probs_w;
};

void decode_head(const Side& K, const Side& V, const Step& st, const Shape& s, int64_t b, int64_t h,
                 std::vector<float>& lg) {
  const int64_t bh = b * s.H + h, cs = st.cstride;
  const int64_t n = st.stored[b * cs], slot = st.slots[b];
  const int64_t W = n + 2;  // stored columns, the new token, a sink column
  lg.assign(s.g * W, NEG_INF);
  const float* qh = st.q + bh * s.g * s.D;
  const int64_t* table = st.tables + b * st.tstride;
  const int64_t enc_k = std::min(K.encoded[b * cs], s.nb * s.bs);
  block_scores(K.blocks, qh, table, h, enc_k, st.scaling, lg.data(), W, s);
  if (K.R) {
    with_elem(K.ring_elem, [&](auto tag) {
      using T = decltype(tag);
      const T* ring = static_cast<const T*>(K.ring) + (slot * s.H + h) * K.R * s.D;
      ring_runs(K.ring_start[b * cs], K.ring_len[b * cs], K.R, [&](int64_t r0, int64_t cnt, int64_t off) {
        scores_tile(qh, nullptr, s.g, as_f32(ring + r0 * s.D, cnt, s.D), cnt, s.D, st.scaling,
                    lg.data() + enc_k + off, W);
      });
    });
  }
  const float* kn = st.knew + bh * s.D;
  scores_tile(qh, nullptr, s.g, kn, 1, s.D, st.scaling, lg.data() + n, W);
  const int64_t first = st.window ? std::max<int64_t>(0, n - (st.window - 1)) : 0;
  for (int64_t gi = 0; gi < s.g; ++gi) {  // soft-cap, window, sink, softmax, in place
    float* row = lg.data() + gi * W;
    for (int64_t c = 0; c < first; ++c) row[c] = NEG_INF;
    if (st.softcap > 0.f)
      for (int64_t c = first; c <= n; ++c) row[c] = st.softcap * std::tanh(row[c] / st.softcap);
    int64_t last = n;
    if (st.sinks) row[++last] = st.sinks[h * s.g + gi];
    float mx = NEG_INF;
    for (int64_t c = first; c <= last; ++c) mx = std::max(mx, row[c]);
    std::fill(row, row + first, 0.f);
    v8 acc = {};
    int64_t c = first;
    for (; c + 8 <= last + 1; c += 8) {
      const v8 e = exp8(load8(row + c) - mx);
      store8(row + c, e);
      acc += e;
    }
    float sum = hsum(acc);
    for (; c <= last; ++c) {
      row[c] = std::exp(row[c] - mx);
      sum += row[c];
    }
    const float inv = 1.f / sum;
    for (int64_t c = 0; c <= last; ++c) row[c] *= inv;
    if (st.probs) {
      float* pr = st.probs + (bh * s.g + gi) * st.probs_w;
      const int64_t m = std::min(n + 1, st.probs_w);
      std::copy(row, row + m, pr);
      std::fill(pr + m, pr + st.probs_w, 0.f);
    }
  }
  float* ob = st.out + bh * s.g * s.D;
  std::fill(ob, ob + s.g * s.D, 0.f);
  const int64_t enc_v = std::min(V.encoded[b * cs], s.nb * s.bs);
  block_values(V.blocks, lg.data(), W, table, h, enc_v, ob, s);
  if (V.R) {
    with_elem(V.ring_elem, [&](auto tag) {
      using T = decltype(tag);
      const T* ring = static_cast<const T*>(V.ring) + (slot * s.H + h) * V.R * s.D;
      ring_runs(V.ring_start[b * cs], V.ring_len[b * cs], V.R, [&](int64_t r0, int64_t cnt, int64_t off) {
        values_tile(lg.data() + enc_v + off, W, s.g, as_f32(ring + r0 * s.D, cnt, s.D), cnt, s.D, ob);
      });
    });
  }
  const float* vn = st.vnew + bh * s.D;
  values_tile(lg.data() + n, W, s.g, vn, 1, s.D, ob);
  // The stores, after every read of this (sequence, head): nothing else reads these rows. First the
  // ring's oldest rows that leave it (into the blocks, after the encoded ones), then the new token
  // (into the ring's next free row, which a ring of R = residual + 1 rows never shares with them).
  for (const Side* side : {&K, &V}) {
    const int64_t e = side->encoded[b * cs];
    const float* src = side == &K ? kn : vn;
    if (!side->R) {
      if (side->write_new) store_token(side->blocks, src, table, h, e, s);
      continue;
    }
    with_elem(side->ring_elem, [&](auto tag) {
      using T = decltype(tag);
      T* ring = static_cast<T*>(side->ring) + (slot * s.H + h) * side->R * s.D;
      const int64_t start = side->ring_start[b * cs];
      const int64_t n_out = side->leaving ? side->leaving[b * cs] : 0;
      for (int64_t i = 0; i < n_out; ++i)
        store_token(side->blocks, as_f32(ring + ((start + i) % side->R) * s.D, 1, s.D), table, h, e + i, s);
      if (side->write_new) narrow(src, ring + ((start + side->ring_len[b * cs]) % side->R) * s.D, s.D);
    });
  }
}

}  // namespace

// C entry points (ctypes). Return 0 on success, 1 for an unsupported layout.
extern "C" {

int kvs_scores(const Blocks* k, const float* q, const int64_t* tables, int64_t tstride, const int64_t* valid,
               float* out, int64_t W, float scaling, int64_t B, int64_t H, int64_t g, int64_t D, int64_t nb,
               int64_t bs) {
  if (!readable(*k, false)) return 1;
  const Shape s{B, H, g, D, nb, bs};
  each_head(s, valid, [&](int64_t bh, int64_t b, int64_t h, int64_t end) {
    float* ob = out + bh * s.g * W;
    block_scores(*k, q + bh * s.g * s.D, tables + b * tstride, h, end, scaling, ob, W, s);
    fill_masked(ob, W, s, end);
  });
  return 0;
}

int kvs_values(const Blocks* v, const float* p, int64_t W, const int64_t* tables, int64_t tstride,
               const int64_t* valid, float* out, int64_t B, int64_t H, int64_t g, int64_t D, int64_t nb,
               int64_t bs) {
  if (!readable(*v, true)) return 1;
  const Shape s{B, H, g, D, nb, bs};
  each_head(s, valid, [&](int64_t bh, int64_t b, int64_t h, int64_t end) {
    float* ob = out + bh * s.g * s.D;
    std::fill(ob, ob + s.g * s.D, 0.f);
    block_values(*v, p + bh * s.g * W, W, tables + b * tstride, h, end, ob, s);
  });
  return 0;
}

// One layer's decode attention for the whole batch, one (sequence, KV head) pair per task: block,
// ring and new-token scores, soft-cap, window, sink, softmax, weighted values, then the new token's
// store where the side asks for it. The probabilities, in stored order, go to `probs` if given.
int kvs_decode(const Side* k, const Side* v, const Step* st, int64_t B, int64_t H, int64_t g, int64_t D,
               int64_t nb, int64_t bs) {
  if (!readable(k->blocks, false) || !readable(v->blocks, true)) return 1;
  for (const Side* side : {k, v})
    if ((side->leaving || (side->write_new && !side->R)) && !storable(side->blocks)) return 1;
  const Shape s{B, H, g, D, nb, bs};
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> lg;
    for (int64_t bh = lo; bh < hi; ++bh) decode_head(*k, *v, *st, s, bh / H, bh % H, lg);
  });
  return 0;
}
}
