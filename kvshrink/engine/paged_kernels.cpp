// Paged decode attention on the CPU, straight from the pool's blocks: no gathered copy, no decoded
// (dequantised) keys or values in memory. Built and loaded by kvshrink/engine/kernels.py.
//
// Every kernel handles one decode query per sequence: q [B, H, g, D] (g query heads per KV head),
// the sequence's blocks tables[b, 0:nb] (row stride tstride), and valid[b] stored tokens per row
// (positions >= valid[b] are never read: their logits are -inf, their weight 0).
//
// Pool layouts (per block; what the encoders' FieldLayouts give, see kvshrink/engine/pool.py):
//   plain:                     x [N, H, bs, D] float32
//   quantised, codes:          q [N, H, bs, D*bits/8] uint8, code k of byte i is channel i*per + k
//   per-channel groups (KIVI keys, groups of G tokens):  scale/zero [N, H, bs/G, D] float16
//   per-token groups (KIVI values, int8/int4, groups of C channels): scale/zero [N, H, bs, D/C] float16
// Asymmetric x' = code * s + z; symmetric (zero == nullptr) x' = (code - 2^(bits-1)) * s.
//
// Codes are consumed in "planes": plane k holds channel i*per + k at index i, so every inner loop
// runs over contiguous bytes and vectorises (a byte-by-byte interleaved unpack does not).
// Scores are computed in the code domain (KIVI, "cuda_bmm_fA_qB_outer"):
//   per-channel groups:  q . k'_t = sum_d (q_d s_d) c_td + sum_d q_d z_d     (s, z of t's group)
// Per-token groups (int8/int4 keys, every quantised value) dequantise one row at a time into a
// D-float buffer that stays in L1, then dot it with the queries or add it into the accumulators:
// nothing of the size of the cache is written.

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace {

using half = c10::Half;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct Shape {
  int64_t B, H, g, D, nb, bs;
};

template <int BITS>
inline float code(uint8_t byte, int k) {
  constexpr int mask = (1 << BITS) - 1;
  return static_cast<float>(BITS == 8 ? byte : (byte >> (k * BITS)) & mask);
}

// Codes of one row into a planar float buffer: buf[k * R + i] = code k of byte i.
template <int BITS>
inline void unpack_planar(const uint8_t* row, float* buf, int64_t R) {
  constexpr int per = 8 / BITS;
  for (int k = 0; k < per; ++k) {
    float* dst = buf + k * R;
#pragma omp simd
    for (int64_t i = 0; i < R; ++i) dst[i] = code<BITS>(row[i], k);
  }
}

// A row dequantised with per-token groups of C channels into planar order (the group of planar
// index k * R + i is i / (C / per), the same in every plane).
template <int BITS>
inline void dequant_planar(const uint8_t* row, const float* s, const float* z, float* buf, int64_t R, int64_t span) {
  constexpr int per = 8 / BITS;
  for (int k = 0; k < per; ++k) {
    float* dst = buf + k * R;
    for (int64_t lo = 0, grp = 0; lo < R; lo += span, ++grp) {
      const float sg = s[grp], zg = z[grp];
#pragma omp simd
      for (int64_t i = lo; i < lo + span; ++i) dst[i] = code<BITS>(row[i], k) * sg + zg;
    }
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float* y, float w, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

inline float zero_of(const half* zero, const half* scale, int64_t at, float offset) {
  return zero ? static_cast<float>(zero[at]) : -offset * static_cast<float>(scale[at]);
}

// Calls body(bh, b, h, n) for every (sequence, KV head) pair, in parallel over torch's threads.
template <typename F>
void each_head(const Shape& s, const int64_t* valid, F body) {
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) body(bh, bh / s.H, bh % s.H, valid[bh / s.H]);
  });
}

inline void fill_masked(float* out, int64_t W, const Shape& s, int64_t from) {
  for (int64_t gi = 0; gi < s.g; ++gi)
    for (int64_t pos = from; pos < s.nb * s.bs; ++pos) out[gi * W + pos] = NEG_INF;
}

// ---------------------------------------------------------------------------------- plain fp32

void scores_plain(const float* q, const float* x, const int64_t* tables, int64_t tstride, const int64_t* valid,
                  float* out, int64_t W, float scaling, const Shape& s) {
  each_head(s, valid, [&](int64_t bh, int64_t b, int64_t h, int64_t n) {
    const float* qb = q + bh * s.g * s.D;
    float* ob = out + bh * s.g * W;
    const int64_t end = std::min(n, s.nb * s.bs);
    for (int64_t pos = 0; pos < end; ++pos) {
      const int64_t blk = tables[b * tstride + pos / s.bs];
      const float* k = x + ((blk * s.H + h) * s.bs + pos % s.bs) * s.D;
      for (int64_t gi = 0; gi < s.g; ++gi) {
        const float* qq = qb + gi * s.D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < s.D; ++d) acc += qq[d] * k[d];
        ob[gi * W + pos] = acc * scaling;
      }
    }
    fill_masked(ob, W, s, end);
  });
}

void values_plain(const float* p, int64_t W, const float* x, const int64_t* tables, int64_t tstride,
                  const int64_t* valid, float* out, const Shape& s) {
  each_head(s, valid, [&](int64_t bh, int64_t b, int64_t h, int64_t n) {
    std::vector<float> acc(s.g * s.D, 0.f);
    const float* pb = p + bh * s.g * W;
    const int64_t end = std::min(n, s.nb * s.bs);
    for (int64_t pos = 0; pos < end; ++pos) {
      const int64_t blk = tables[b * tstride + pos / s.bs];
      const float* v = x + ((blk * s.H + h) * s.bs + pos % s.bs) * s.D;
      for (int64_t gi = 0; gi < s.g; ++gi) {
        const float w = pb[gi * W + pos];
        float* a = acc.data() + gi * s.D;
#pragma omp simd
        for (int64_t d = 0; d < s.D; ++d) a[d] += w * v[d];
      }
    }
    std::copy(acc.begin(), acc.end(), out + bh * s.g * s.D);
  });
}

// ------------------------------------------------------------ per-channel groups (KIVI keys)

template <int BITS>
void scores_per_channel(const float* q, const uint8_t* codes, const half* scale, const half* zero,
                        const int64_t* tables, int64_t tstride, const int64_t* valid, float* out, int64_t W,
                        float scaling, const Shape& s, int64_t G) {
  constexpr int per = 8 / BITS;
  const int64_t R = s.D / per, nch = s.bs / G;
  const float offset = static_cast<float>(1 << (BITS - 1));
  each_head(s, valid, [&](int64_t bh, int64_t b, int64_t h, int64_t n) {
    std::vector<float> qs(s.g * s.D), qz(s.g), buf(s.D);  // qs planar: [(gi * per + k) * R + i]
    const float* qb = q + bh * s.g * s.D;
    float* ob = out + bh * s.g * W;
    const int64_t end = std::min(n, s.nb * s.bs);
    for (int64_t t0 = 0; t0 < end; t0 += G) {  // one key group: G tokens sharing scale/zero
      const int64_t blk = tables[b * tstride + t0 / s.bs], c = (t0 % s.bs) / G;
      const int64_t meta = ((blk * s.H + h) * nch + c) * s.D;
      for (int64_t gi = 0; gi < s.g; ++gi) {
        float z_acc = 0.f;
        for (int64_t d = 0; d < s.D; ++d) {
          const float sd = static_cast<float>(scale[meta + d]), qd = qb[gi * s.D + d];
          qs[(gi * per + d % per) * R + d / per] = qd * sd;
          z_acc += qd * zero_of(zero, scale, meta + d, offset);
        }
        qz[gi] = z_acc;
      }
      const int64_t t_end = std::min(t0 + G, end);
      for (int64_t pos = t0; pos < t_end; ++pos) {
        unpack_planar<BITS>(codes + ((blk * s.H + h) * s.bs + pos % s.bs) * R, buf.data(), R);
        for (int64_t gi = 0; gi < s.g; ++gi) ob[gi * W + pos] = (dot(&qs[gi * s.D], buf.data(), s.D) + qz[gi]) * scaling;
      }
    }
    fill_masked(ob, W, s, end);
  });
}

// ------------------------------------------- per-token groups (KIVI values, int8/int4 keys and values)

// Rows quantised in per-token groups of C channels, dequantised one at a time into a planar buffer
// (one reader per thread: it owns its buffers).
template <int BITS>
struct TokenRows {
  static constexpr int per = 8 / BITS;
  const uint8_t* codes;
  const half *scale, *zero;
  const int64_t* tables;
  int64_t tstride, H, bs, R, ng, span;
  float offset;
  std::vector<float> buf, sf, zf;

  TokenRows(const uint8_t* codes, const half* scale, const half* zero, const int64_t* tables, int64_t tstride,
            const Shape& s, int64_t C)
      : codes(codes), scale(scale), zero(zero), tables(tables), tstride(tstride), H(s.H), bs(s.bs),
        R(s.D / per), ng(s.D / C), span(C / per), offset(static_cast<float>(1 << (BITS - 1))),
        buf(s.D), sf(s.D / C), zf(s.D / C) {}

  const float* row(int64_t b, int64_t h, int64_t pos) {
    const int64_t tok = (tables[b * tstride + pos / bs] * H + h) * bs + pos % bs;
    for (int64_t grp = 0; grp < ng; ++grp) {
      sf[grp] = static_cast<float>(scale[tok * ng + grp]);
      zf[grp] = zero_of(zero, scale, tok * ng + grp, offset);
    }
    dequant_planar<BITS>(codes + tok * R, sf.data(), zf.data(), buf.data(), R, span);
    return buf.data();
  }

  int64_t planar(int64_t d) const { return (d % per) * R + d / per; }
};

template <int BITS>
void scores_per_token(const float* q, const uint8_t* codes, const half* scale, const half* zero,
                      const int64_t* tables, int64_t tstride, const int64_t* valid, float* out, int64_t W,
                      float scaling, const Shape& s, int64_t C) {
  each_head(s, valid, [&](int64_t bh, int64_t b, int64_t h, int64_t n) {
    TokenRows<BITS> rows(codes, scale, zero, tables, tstride, s, C);
    std::vector<float> qp(s.g * s.D);  // the queries in the rows' planar order
    const float* qb = q + bh * s.g * s.D;
    for (int64_t gi = 0; gi < s.g; ++gi)
      for (int64_t d = 0; d < s.D; ++d) qp[gi * s.D + rows.planar(d)] = qb[gi * s.D + d];
    float* ob = out + bh * s.g * W;
    const int64_t end = std::min(n, s.nb * s.bs);
    for (int64_t pos = 0; pos < end; ++pos) {
      const float* k = rows.row(b, h, pos);
      for (int64_t gi = 0; gi < s.g; ++gi) ob[gi * W + pos] = dot(&qp[gi * s.D], k, s.D) * scaling;
    }
    fill_masked(ob, W, s, end);
  });
}

template <int BITS>
void values_per_token(const float* p, int64_t W, const uint8_t* codes, const half* scale, const half* zero,
                      const int64_t* tables, int64_t tstride, const int64_t* valid, float* out, const Shape& s,
                      int64_t C) {
  each_head(s, valid, [&](int64_t bh, int64_t b, int64_t h, int64_t n) {
    TokenRows<BITS> rows(codes, scale, zero, tables, tstride, s, C);
    std::vector<float> acc(s.g * s.D, 0.f);  // planar, as the rows
    const float* pb = p + bh * s.g * W;
    const int64_t end = std::min(n, s.nb * s.bs);
    for (int64_t pos = 0; pos < end; ++pos) {
      const float* v = rows.row(b, h, pos);
      for (int64_t gi = 0; gi < s.g; ++gi) axpy(&acc[gi * s.D], pb[gi * W + pos], v, s.D);
    }
    float* ob = out + bh * s.g * s.D;
    for (int64_t gi = 0; gi < s.g; ++gi)
      for (int64_t d = 0; d < s.D; ++d) ob[gi * s.D + d] = acc[gi * s.D + rows.planar(d)];
  });
}

template <template <int> class K, typename... A>
int by_bits(int bits, A... args) {
  switch (bits) {
    case 1: K<1>::run(args...); return 0;
    case 2: K<2>::run(args...); return 0;
    case 4: K<4>::run(args...); return 0;
    case 8: K<8>::run(args...); return 0;
    default: return 1;
  }
}

template <int BITS> struct ScoresPerChannel {
  template <typename... A> static void run(A... a) { scores_per_channel<BITS>(a...); }
};
template <int BITS> struct ScoresPerToken {
  template <typename... A> static void run(A... a) { scores_per_token<BITS>(a...); }
};
template <int BITS> struct ValuesPerToken {
  template <typename... A> static void run(A... a) { values_per_token<BITS>(a...); }
};

}  // namespace

// C entry points (ctypes). Return 0 on success, 1 for an unsupported bit width.
extern "C" {

int kvs_scores_plain(const float* q, const float* x, const int64_t* tables, int64_t tstride,
                     const int64_t* valid, float* out, int64_t W, float scaling, int64_t B, int64_t H,
                     int64_t g, int64_t D, int64_t nb, int64_t bs) {
  scores_plain(q, x, tables, tstride, valid, out, W, scaling, Shape{B, H, g, D, nb, bs});
  return 0;
}

int kvs_values_plain(const float* p, int64_t W, const float* x, const int64_t* tables, int64_t tstride,
                     const int64_t* valid, float* out, int64_t B, int64_t H, int64_t g, int64_t D, int64_t nb,
                     int64_t bs) {
  values_plain(p, W, x, tables, tstride, valid, out, Shape{B, H, g, D, nb, bs});
  return 0;
}

int kvs_scores_quant(int per_channel, int bits, int64_t group, const float* q, const uint8_t* codes,
                     const void* scale, const void* zero, const int64_t* tables, int64_t tstride,
                     const int64_t* valid, float* out, int64_t W, float scaling, int64_t B, int64_t H, int64_t g,
                     int64_t D, int64_t nb, int64_t bs) {
  const Shape s{B, H, g, D, nb, bs};
  auto sc = static_cast<const half*>(scale), ze = static_cast<const half*>(zero);
  if (per_channel)
    return by_bits<ScoresPerChannel>(bits, q, codes, sc, ze, tables, tstride, valid, out, W, scaling, s, group);
  return by_bits<ScoresPerToken>(bits, q, codes, sc, ze, tables, tstride, valid, out, W, scaling, s, group);
}

int kvs_values_quant(int bits, int64_t group, const float* p, int64_t W, const uint8_t* codes, const void* scale,
                     const void* zero, const int64_t* tables, int64_t tstride, const int64_t* valid, float* out,
                     int64_t B, int64_t H, int64_t g, int64_t D, int64_t nb, int64_t bs) {
  const Shape s{B, H, g, D, nb, bs};
  auto sc = static_cast<const half*>(scale), ze = static_cast<const half*>(zero);
  return by_bits<ValuesPerToken>(bits, p, W, codes, sc, ze, tables, tstride, valid, out, s, group);
}
}
