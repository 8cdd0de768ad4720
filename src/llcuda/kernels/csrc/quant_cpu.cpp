// CPU quantized matmul: y = x @ W.T with W in its GGUF blocks, decoded in registers.
//
// Every weight type is written as w = scale * u + offset per 16 elements, u a small integer in
// int8: Q5_0's d (q - 16) is u * d with u = q - 16, Q6_K's d sc (q - 32) likewise, Q8_0's is
// u * d, and Q4_K's d sc q - dmin m is u * (d sc) + offset with offset = -dmin m. Q2_K is Q4_K's
// form with 2-bit u, Q3_K Q6_K's with u = q - 4 (q the 2 low bits and the high-mask bit), and
// IQ4_NL / IQ4_XS take u from their code book (one byte shuffle per 32 indices); the IQ1 / IQ2
// / IQ3 types look their 4- or 8-value grid entries up in tables (iq_group: u is the signed grid
// value, IQ1's 8 grid + delta with the scale / 8). A block's 32 bytes of u come from a few AVX2
// byte ops, are widened to 4 x 8 floats and multiplied with fp32 x by FMAs;
// the offset term is offset * sum(x) over the 16, read from sums made once per call. With fp32
// x (XF) the result is the reference's x @ dequantize(W).T up to fp32 summation order. With
// int8 x (XQ: quantized per 32 as q8_activations.quantize_q8_ref, as llama.cpp does; a decode
// step's blocks) the same u meet the int8 values in integer dot products (maddubs + madd), and
// the result is quantize_q8_ref(x) @ dequantize(W).T up to the order of its float sums.
//
// Rows are split in chunks that the calling thread and the pool's workers (Pool, below) take
// from one atomic counter; each walks its rows and, for every row, the tokens in tiles of up to
// 4 so a decoded weight block is used 4 times (prefill) while the row stays in L1. Without AVX2
// (another architecture, an old x86) the same math runs as scalar loops.
#include <torch/extension.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// GGML type ids (llcuda.gguf.constants.GGMLType)
constexpr int Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12,
              Q5_K = 13, Q6_K = 14, IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19,
              IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23, IQ1_M = 29, TQ1_0 = 34,
              TQ2_0 = 35, MXFP4 = 39;
constexpr int MAX_TILE = 4;  // tokens per weight-block decode

// IQ4_NL / IQ4_XS code book, from llcuda.kernels.iq_tables.IQ4_KVALUES (quant_cpu_native passes it
// as a compile definition, so the table has one source)
#ifndef LLCUDA_IQ4_KVALUES
#error "LLCUDA_IQ4_KVALUES (the IQ4 code book) must be defined by the build"
#endif
alignas(16) constexpr int8_t kIQ4Values[16] = {LLCUDA_IQ4_KVALUES};
#ifndef LLCUDA_MXFP4_KVALUES
#error "LLCUDA_MXFP4_KVALUES (MXFP4's code book, iq_tables.MXFP4_KVALUES) must be defined"
#endif
alignas(16) constexpr int8_t kMXFP4Values[16] = {LLCUDA_MXFP4_KVALUES};

// The grids of the IQ1 / IQ2 / IQ3 types (iq_tables.grid, their one source: set_iq_grids copies
// them in when the extension is loaded), each entry's values as the bytes of one word, and the
// sign masks: sign8[i] has byte j = 0xFF where bit j of i is set, else 0; ksigns is
// iq_tables.ksigns (7 stored sign bits -> 8).
// Plain arrays in a constant-initialized global: a function-local static's guard check in the
// inner loop made the compiler keep the accumulators in memory (IQ2_XS ran at 1.3 GB/s).
struct IQGrids {
  uint64_t iq2xxs[256], iq2xs[512], iq2s[1024], iq1s[2048];  // 8 values an entry
  uint32_t iq3xxs[256], iq3s[512];                           // 4 values an entry
  uint64_t sign8[256];
  uint8_t ksigns[128];
  bool ready;
};

IQGrids g_iq_grids{};

inline const IQGrids& iq_grids() { return g_iq_grids; }

constexpr bool is_iq_grid(int t) {
  return t == IQ2_XXS || t == IQ2_XS || t == IQ2_S || t == IQ3_XXS || t == IQ3_S || t == IQ1_S ||
         t == IQ1_M;
}

float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else {
    float v = std::ldexp((float)man, -24);
    return sign ? -v : v;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

uint16_t rd16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Q4_K / Q5_K: 6-bit scale and min of sub-block j from the 12 packed bytes (get_scale_min_k4)
void scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K / Q5_K: all 8 scales and mins of a super-block (scale_min_k4 for j = 0..7) in a few
// 32-bit ops: bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; bytes 8-11
// the low 4 bits of scales 4-7 (low nibbles) and of mins 4-7 (high nibbles), whose top 2 bits
// are those of bytes 0-3 (scales) and 4-7 (mins)
void scales_mins_k4(const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  uint32_t u[3];
  std::memcpy(u, q, 12);
  const uint32_t sc_hi = (u[2] & 0x0F0F0F0Fu) | (((u[0] >> 6) & 0x03030303u) << 4);
  const uint32_t mn_hi = ((u[2] >> 4) & 0x0F0F0F0Fu) | (((u[1] >> 6) & 0x03030303u) << 4);
  const uint32_t sc_lo = u[0] & 0x3F3F3F3Fu, mn_lo = u[1] & 0x3F3F3F3Fu;
  std::memcpy(sc, &sc_lo, 4);
  std::memcpy(sc + 4, &sc_hi, 4);
  std::memcpy(mn, &mn_lo, 4);
  std::memcpy(mn + 4, &mn_hi, 4);
}

// Q3_K: its 16 six-bit scales (minus 32) from the 12 packed bytes: the low 4 bits are the
// nibbles of bytes 0-7 (scale s < 8 the low nibble of byte s, s >= 8 the high one of byte s - 8),
// the high 2 bits those of bytes 8-11 (bits 2 (s / 4) of byte 8 + s % 4)
void q3_k_scales(const uint8_t* q, int8_t* sc) {
  for (int s = 0; s < 16; ++s) {
    const int lo = (s < 8 ? q[s] : q[s - 8] >> 4) & 0xF;
    const int hi = (q[8 + s % 4] >> (2 * (s / 4))) & 3;
    sc[s] = (int8_t)((lo | (hi << 4)) - 32);
  }
}

// IQ4_XS: the six-bit scale (minus 32) of sub-block ib from scales_h (u16) and scales_l[4]
int iq4_xs_scale(const uint8_t* b, int ib) {
  const int lo = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF;
  const int hi = (rd16(b + 2) >> (2 * ib)) & 3;
  return (lo | (hi << 4)) - 32;
}

// Bytewise a + b on 8 bytes at once (no carry between bytes)
inline uint64_t add_bytes(uint64_t a, uint64_t b) {
  constexpr uint64_t H = 0x8080808080808080ull;
  return ((a & ~H) + (b & ~H)) ^ ((a ^ b) & H);
}

// Grid bytes g with the sign bits `bits` applied (byte j negated where bit j is set): the IQ2 /
// IQ3 grids hold values 4..62, so (g ^ 0xFF) + 1 negates a byte without a carry out of it
inline uint64_t signed_entry(uint64_t g, uint8_t bits) {
  const uint64_t neg = iq_grids().sign8[bits];
  return (g ^ neg) + (neg & 0x0101010101010101ull);
}

// IQ1: 8 * grid (values -1, 0, 1) + delta (+1, or -1 where `negative`), bytewise: the weight is
// d_l (grid + delta / 8), so u = 8 grid + delta with the scale d_l / 8, exactly
inline uint64_t iq1_entry(uint64_t g, bool negative) {
  const uint64_t eight = (g << 3) & 0xF8F8F8F8F8F8F8F8ull;
  return add_bytes(eight, negative ? 0xFFFFFFFFFFFFFFFFull : 0x0101010101010101ull);
}

// Group g (values 32g .. 32g+31) of an IQ1 / IQ2 / IQ3 super-block b: its values as 4 words of
// 8 signed bytes (in order) and the scale of each of its halves of 16, s[0] and s[1]
// (dequant_ref's _iq2_xxs .. _iq1_m restated per group; the IQ3 grids' entries are 4 values).
template <int TYPE>
__attribute__((always_inline)) inline void iq_group(const uint8_t* b, int g, uint64_t* u,
                                                    float* s) {
  const IQGrids& G = iq_grids();
  const float d = TYPE == IQ1_M ? 0.f : f16_to_f32(rd16(b));
  auto u32_at = [&](int off) {
    uint32_t v;
    std::memcpy(&v, b + off, 4);
    return v;
  };
  if constexpr (TYPE == IQ2_XXS) {
    const uint8_t* q = b + 2 + 8 * g;  // 4 grid indices, then a u32 of signs and the scale
    const uint32_t w1 = u32_at(2 + 8 * g + 4);
    for (int k = 0; k < 4; ++k)
      u[k] = signed_entry(G.iq2xxs[q[k]], G.ksigns[(w1 >> (7 * k)) & 127]);
    s[0] = s[1] = d * (0.5f + (float)(w1 >> 28)) * 0.25f;
  } else if constexpr (TYPE == IQ2_XS || TYPE == IQ2_S) {
    for (int k = 0; k < 4; ++k) {
      const int i = 4 * g + k;  // the 8-value entry
      if constexpr (TYPE == IQ2_XS) {
        const uint16_t v = rd16(b + 2 + 2 * i);  // 9-bit index, 7-bit sign index
        u[k] = signed_entry(G.iq2xs[v & 511], G.ksigns[v >> 9]);
      } else {  // qs[32], signs[32], qh[8]: the index's 2 high bits
        const int idx = b[2 + i] | (((b[66 + g] >> (2 * k)) & 3) << 8);
        u[k] = signed_entry(G.iq2s[idx], b[34 + i]);
      }
    }
    const uint8_t sc = b[TYPE == IQ2_XS ? 66 + g : 74 + g];
    s[0] = d * (0.5f + (float)(sc & 0xF)) * 0.25f;
    s[1] = d * (0.5f + (float)(sc >> 4)) * 0.25f;
  } else if constexpr (TYPE == IQ3_XXS || TYPE == IQ3_S) {
    uint32_t e[8];  // the group's 8 grid entries of 4 values
    for (int k = 0; k < 8; ++k) {
      const int i = 8 * g + k;
      e[k] = TYPE == IQ3_XXS ? G.iq3xxs[b[2 + i]]
                             : G.iq3s[b[2 + i] | (((b[66 + g] >> k) & 1) << 8)];
    }
    const uint32_t w = TYPE == IQ3_XXS ? u32_at(66 + 4 * g) : 0;
    for (int k = 0; k < 4; ++k) {
      const uint64_t pair = (uint64_t)e[2 * k] | ((uint64_t)e[2 * k + 1] << 32);
      const uint8_t bits = TYPE == IQ3_XXS ? G.ksigns[(w >> (7 * k)) & 127] : b[74 + 4 * g + k];
      u[k] = signed_entry(pair, bits);
    }
    if constexpr (TYPE == IQ3_XXS) {
      s[0] = s[1] = d * (0.5f + (float)(w >> 28)) * 0.5f;
    } else {
      const int sc = (b[106 + g / 2] >> (4 * (g % 2))) & 0xF;
      s[0] = s[1] = d * (float)(1 + 2 * sc);
    }
  } else if constexpr (TYPE == IQ1_S) {
    const uint16_t qh = rd16(b + 34 + 2 * g);  // 4 x 3 high index bits, scale, delta sign
    for (int k = 0; k < 4; ++k)
      u[k] = iq1_entry(G.iq1s[b[2 + 4 * g + k] | (((qh >> (3 * k)) & 7) << 8)], qh & 0x8000);
    s[0] = s[1] = d * (float)(2 * ((qh >> 12) & 7) + 1) * 0.125f;
  } else if constexpr (TYPE == IQ1_M) {
    uint16_t sc[4];
    for (int k = 0; k < 4; ++k) sc[k] = rd16(b + 48 + 2 * k);
    const uint16_t d_bits = (uint16_t)((sc[0] >> 12) | ((sc[1] >> 8) & 0xF0) |
                                       ((sc[2] >> 4) & 0xF00) | (sc[3] & 0xF000));
    const float dm = f16_to_f32(d_bits);
    for (int k = 0; k < 4; ++k) {
      const int i = 4 * g + k;
      const int nib = (b[32 + i / 2] >> (4 * (i % 2))) & 0xF;  // 3 high index bits, delta sign
      u[k] = iq1_entry(G.iq1s[b[i] | ((nib & 7) << 8)], nib & 8);
    }
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * g + h;
      s[h] = dm * (float)(2 * ((sc[j / 4] >> (3 * (j % 4))) & 7) + 1) * 0.125f;
    }
  }
}

// super-block bytes of the IQ1 / IQ2 / IQ3 types
constexpr int iq_bytes(int t) {
  return t == IQ2_XXS ? 66 : t == IQ2_XS ? 74 : t == IQ2_S ? 82 : t == IQ3_XXS ? 98
         : t == IQ3_S ? 110 : t == IQ1_S ? 50 : 56;
}

// MXFP4's scale from its e8m0 byte: 2^(e - 128) (ggml_e8m0_to_fp32_half), subnormal for e < 2
inline float mxfp4_scale(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
  float d;
  std::memcpy(&d, &bits, 4);
  return d;
}

// TQ1_0 group g (values 32g .. 32g+31) of a super-block b as 32 signed values in -1..1: base-3
// digits, digit k of byte q at the top of q * 3^k (mod 256), read as (x * 3) >> 8 (dequant_ref's
// _tq1_0). Groups 0-4 are digit g of bytes 0-31; 5 and 6 digits 0-1 and 2-3 of bytes 32-47; 7
// digit 4 of bytes 32-47, then digits 0-3 of bytes 48-51.
inline void tq1_group(const uint8_t* b, int g, int8_t* v) {
  static constexpr uint8_t pow3[5] = {1, 3, 9, 27, 81};
  auto digit = [](uint8_t q, int k) {
    const uint8_t x = (uint8_t)(q * pow3[k]);
    return (int8_t)(((uint16_t)x * 3 >> 8) - 1);
  };
  if (g < 5) {
    for (int l = 0; l < 32; ++l) v[l] = digit(b[l], g);
  } else if (g < 7) {
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 16; ++l) v[16 * h + l] = digit(b[32 + l], 2 * (g - 5) + h);
  } else {
    for (int l = 0; l < 16; ++l) v[l] = digit(b[32 + l], 4);
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < 4; ++l) v[16 + 4 * k + l] = digit(b[48 + l], k);
  }
}

// The activations: x fp32 [M, K] and the sum of each 16 of its elements, s16 [M, K/16] (what a
// block's offset multiplies).
struct XF {
  const float* x;
  const float* s16;
  int64_t K;
  const float* row(int64_t m) const { return x + m * K; }
  const float* srow(int64_t m) const { return s16 + m * (K / 16); }
};

void sums16(const float* x, int64_t M, int64_t K, float* s16) {
  for (int64_t i = 0; i < M * K / 16; ++i) {
    float s = 0.f;
    for (int j = 0; j < 16; ++j) s += x[i * 16 + j];
    s16[i] = s;
  }
}

// The activations quantized as q8_activations.quantize_q8_ref (the GPU decode GEMV's int8 spec):
// q int8 [M, K], dx [M, K/32] per group of 32, and the sum of each 16 of q, s16 [M, K/16]
// (exact integers, as floats: what a block's offset multiplies).
struct XQ {
  const int8_t* q;
  const float* dx;
  const float* s16;
  const float* s32;  // [M, K/32]: the sum of each group's 32 q
  int64_t K;
  const int8_t* row(int64_t m) const { return q + m * K; }
  const float* drow(int64_t m) const { return dx + m * (K / 32); }
  const float* srow(int64_t m) const { return s16 + m * (K / 16); }
  const float* s32row(int64_t m) const { return s32 + m * (K / 32); }
};

// x [M, K] -> XQ's arrays: per group dx = max|x| / 127 and q = round(x * (127 / max|x|)), ties
// to even (the default rounding mode), each step one fp32 operation as in the spec, so q is
// the spec's bit for bit
void quantize_q8(const float* x, int64_t M, int64_t K, int8_t* q, float* dx, float* s16,
                 float* s32) {
  for (int64_t g = 0; g < M * K / 32; ++g) {
    const float* xg = x + g * 32;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xg[i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    dx[g] = amax * (1.f / 127.f);
    int sum[2] = {0, 0};
    for (int i = 0; i < 32; ++i) {
      const int v = (int)std::nearbyint(xg[i] * inv);
      q[g * 32 + i] = (int8_t)v;
      sum[i / 16] += v;
    }
    s16[2 * g] = (float)sum[0];
    s16[2 * g + 1] = (float)sum[1];
    s32[g] = (float)(sum[0] + sum[1]);
  }
}

// A dequantization sink instead of activations: the step functions write w = s u + o of block
// ib of one weight row to out[32 ib .. 32 ib + 31] (dequantize_rows: a prompt's weight tiles
// for MKL, decoded by the same per-type code as the matmuls)
struct XD {
  float* out;
  int64_t K;
};

// The int8 activations as XQ owns them: buffers reused by the calling thread
struct XQBuffers {
  std::vector<int8_t> q;
  std::vector<float> dx, s16, s32;
  XQ quantize(const float* x, int64_t M, int64_t K) {
    q.resize(M * K);
    dx.resize(M * K / 32);
    s16.resize(M * K / 16);
    s32.resize(M * K / 32);
    quantize_q8(x, M, K, q.data(), dx.data(), s16.data(), s32.data());
    return XQ{q.data(), dx.data(), s16.data(), s32.data(), K};
  }
};

#if defined(__AVX2__)

inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// 16 bytes of nibbles -> 32 bytes: the low nibbles, then the high ones (elements 0-15, 16-31)
inline __m256i nibbles_32(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128((const __m128i*)p);
  const __m256i b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
  return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}

// 32 bits -> 32 bytes, 0x10 where bit i is set (Q5_0 / Q5_1's fifth bits)
inline __m256i fifth_bits_32(const uint8_t* p) {
  uint32_t x;
  std::memcpy(&x, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                         0x0101010101010101, 0x0000000000000000);
  __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
  b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  b = _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
  return _mm256_and_si256(b, _mm256_set1_epi8(0x10));
}

// 16 bytes of 4-bit code-book indices (nibbles_32's order) -> their 32 signed values in `book`
// (IQ4_NL / IQ4_XS: kIQ4Values, MXFP4: kMXFP4Values), one byte shuffle
inline __m256i book_values_32(const int8_t* book, const uint8_t* p) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)book));
  return _mm256_shuffle_epi8(table, nibbles_32(p));
}

// 32 bytes, each shifted right by `bits` and masked to its low `mask` bits (2-bit fields)
inline __m256i bits_at(__m256i v, int bits, int mask) {
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(bits)), _mm256_set1_epi8(mask));
}

// out[0:N] = d * the first N (8 or 16) bytes of b, signed or unsigned: a block's integer scales
// as floats in vector conversions. Q2_K's scalar int-to-float ones merged into a register its
// int8 step's scalar chain held and serialized it (3x slower than with fp32 x); Q4_K and Q6_K
// gain a little too, while for Q3_K and IQ4_XS, whose scales are assembled byte by byte,
// reloading those bytes as a vector cost more than it saved (measured, one thread)
template <bool SIGNED, int N = 16>
inline void scales_times(__m128i b, float d, float* out) {
  const __m256 vd = _mm256_set1_ps(d);
  for (int h = 0; h < N / 8; ++h) {
    const __m128i part = h == 0 ? b : _mm_srli_si128(b, 8);
    const __m256i v = SIGNED ? _mm256_cvtepi8_epi32(part) : _mm256_cvtepu8_epi32(part);
    _mm256_storeu_ps(out + 8 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(v), vd));
  }
}

// int8 x: sum over a super-block's 16 halves of o[k] dx(k / 2) sum(q of half k), into acc (the
// offsets of Q2_K's per-16 mins, vectorized; dx per 32 duplicated to each of its halves)
inline __m256 offsets16(const float* o, const XQ& x, int64_t m, int64_t sb, __m256 acc) {
  const __m256 dx = _mm256_loadu_ps(x.drow(m) + sb * 8);
  const __m256 d0 = _mm256_permutevar8x32_ps(dx, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  const __m256 d1 = _mm256_permutevar8x32_ps(dx, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
  const float* q16 = x.srow(m) + sb * 16;
  acc = _mm256_fmadd_ps(_mm256_loadu_ps(o), _mm256_mul_ps(d0, _mm256_loadu_ps(q16)), acc);
  return _mm256_fmadd_ps(_mm256_loadu_ps(o + 8), _mm256_mul_ps(d1, _mm256_loadu_ps(q16 + 8)),
                         acc);
}

// 32 weight values of one block as 4 x 8 floats: bytes of u, unsigned (or signed for Q8_0)
template <bool SIGNED>
inline void widen(__m256i u, __m256* w) {
  const __m128i lo = _mm256_castsi256_si128(u), hi = _mm256_extracti128_si256(u, 1);
  if constexpr (SIGNED) {
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
  } else {
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
}

#if defined(__AVX512F__)
// AVX-512: a block's 32 values widen in 2 x 16 lanes (half the instructions of AVX2's 4 x 8,
// which bounds the one-token GEMVs; measured 1.6x on the Q5_0 layers of Gemma 3 270M)
using Acc = __m512;
inline Acc acc_zero() { return _mm512_setzero_ps(); }
inline float acc_sum(Acc v) { return _mm512_reduce_add_ps(v); }

template <bool SIGNED>
inline __m512 widen16(__m128i b) {
  return _mm512_cvtepi32_ps(SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
}

// acc[t] += s0 * (u[0:16] . x_t[0:16]) + s1 * (u[16:32] . x_t[16:32]) over block ib, and
// off[t] += o0 * sum(x_t[0:16]) + o1 * sum(x_t[16:32]); u unsigned bytes (signed for Q8_0)
template <int T, bool SIGNED = false>
inline void step(__m256i u, float s0, float s1, float o0, float o1, const XF& x, int64_t m0,
                 int64_t ib, Acc* acc, float* off) {
  const __m512 w0 = _mm512_mul_ps(widen16<SIGNED>(_mm256_castsi256_si128(u)), _mm512_set1_ps(s0));
  const __m512 w1 = _mm512_mul_ps(widen16<SIGNED>(_mm256_extracti128_si256(u, 1)),
                                  _mm512_set1_ps(s1));
  for (int t = 0; t < T; ++t) {
    const float* xb = x.row(m0 + t) + ib * 32;
    acc[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[t]);
    acc[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[t]);
    if (o0 != 0.f || o1 != 0.f) {
      const float* s = x.srow(m0 + t) + 2 * ib;
      off[t] += o0 * s[0] + o1 * s[1];
    }
  }
}
#else
using Acc = __m256;
inline Acc acc_zero() { return _mm256_setzero_ps(); }
inline float acc_sum(Acc v) { return hsum(v); }

// acc[t] += s0 * (u[0:16] . x_t[0:16]) + s1 * (u[16:32] . x_t[16:32]) over block ib, and
// off[t] += o0 * sum(x_t[0:16]) + o1 * sum(x_t[16:32]); u unsigned bytes (signed for Q8_0)
template <int T, bool SIGNED = false>
inline void step(__m256i u, float s0, float s1, float o0, float o1, const XF& x, int64_t m0,
                 int64_t ib, Acc* acc, float* off) {
  __m256 w[4];
  widen<SIGNED>(u, w);
  const __m256 vs0 = _mm256_set1_ps(s0), vs1 = _mm256_set1_ps(s1);
  // each half's dot product is scaled (6 vector ops a token), not the weights (4 multiplies,
  // then 4 FMAs a token): 1.15x on the one-token GEMVs, which these ops bound. The same order for
  // every tile size, so a token's sums do not depend on the batch it came in.
  for (int t = 0; t < T; ++t) {
    const float* xb = x.row(m0 + t) + ib * 32;
    const __m256 p0 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8),
                                      _mm256_mul_ps(w[0], _mm256_loadu_ps(xb)));
    const __m256 p1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24),
                                      _mm256_mul_ps(w[2], _mm256_loadu_ps(xb + 16)));
    acc[t] = _mm256_fmadd_ps(p1, vs1, _mm256_fmadd_ps(p0, vs0, acc[t]));
  }
  for (int t = 0; t < T; ++t) {
    if (o0 != 0.f || o1 != 0.f) {
      const float* s = x.srow(m0 + t) + 2 * ib;
      off[t] += o0 * s[0] + o1 * s[1];
    }
  }
}
#endif

// The same step against int8 activations (XQ): a block's 32 products in two integer ops,
// maddubs (u8 x s8, pairs summed to int16) and madd (to 8 int32 lanes, 0-3 the first 16
// elements, 4-7 the second), instead of widening the weights to floats. Signed u goes in as
// |u| against q with u's sign. No int16 can saturate: |u| <= 128 (Q8_0's -128) and |q| <= 127
// make a pair at most 32512. Per token: acc += float(dots) * (s0 | s1) * dx, and the offsets
// dx * (o0 sum(q[0:16]) + o1 sum(q[16:32])).
template <int T, bool SIGNED = false>
inline void step(__m256i u, float s0, float s1, float o0, float o1, const XQ& x, int64_t m0,
                 int64_t ib, __m256* acc, float* off) {
  const __m256i au = SIGNED ? _mm256_sign_epi8(u, u) : u;
  const __m256 vs = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int t = 0; t < T; ++t) {
    __m256i q = _mm256_loadu_si256((const __m256i*)(x.row(m0 + t) + ib * 32));
    if constexpr (SIGNED) q = _mm256_sign_epi8(q, u);
    const __m256i dots = _mm256_madd_epi16(_mm256_maddubs_epi16(au, q), ones);
    const __m256 scale = _mm256_mul_ps(vs, _mm256_set1_ps(x.drow(m0 + t)[ib]));
    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[t]);
  }
  if (o0 != 0.f || o1 != 0.f)
    for (int t = 0; t < T; ++t) {
      const float* s = x.srow(m0 + t) + 2 * ib;
      off[t] += x.drow(m0 + t)[ib] * (o0 * s[0] + o1 * s[1]);
    }
}

// step for a block whose two halves share their scale and offset (all types but Q2_K, Q3_K
// and Q6_K): the same sums, with the int8 step's per-token scale one broadcast of s * dx
template <int T, bool SIGNED = false, class X, class A>
inline void step1(__m256i u, float s, float o, const X& x, int64_t m0, int64_t ib, A* acc,
                  float* off) {
  step<T, SIGNED>(u, s, s, o, o, x, m0, ib, acc, off);
}

template <int T, bool SIGNED = false>
inline void step1(__m256i u, float s, float o, const XQ& x, int64_t m0, int64_t ib,
                  __m256* acc, float* off) {
  const __m256i au = SIGNED ? _mm256_sign_epi8(u, u) : u;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int t = 0; t < T; ++t) {
    __m256i q = _mm256_loadu_si256((const __m256i*)(x.row(m0 + t) + ib * 32));
    if constexpr (SIGNED) q = _mm256_sign_epi8(q, u);
    const __m256i dots = _mm256_madd_epi16(_mm256_maddubs_epi16(au, q), ones);
    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(s * x.drow(m0 + t)[ib]),
                             acc[t]);
  }
  if (o != 0.f)
    for (int t = 0; t < T; ++t) off[t] += o * x.drow(m0 + t)[ib] * x.s32row(m0 + t)[ib];
}

// The XD step: the block's weights as floats, w = s u + o per half of 16
template <int T, bool SIGNED = false>
inline void step(__m256i u, float s0, float s1, float o0, float o1, const XD& x, int64_t,
                 int64_t ib, __m256*, float*) {
  __m256 w[4];
  widen<SIGNED>(u, w);
  float* out = x.out + ib * 32;
  for (int k = 0; k < 4; ++k)
    _mm256_storeu_ps(out + 8 * k, _mm256_fmadd_ps(w[k], _mm256_set1_ps(k < 2 ? s0 : s1),
                                                  _mm256_set1_ps(k < 2 ? o0 : o1)));
}

// The accumulators of a row's dot products: Acc (the widest vectors) for fp32 activations,
// 8 floats for int8 ones (their integer ops are AVX2's)
template <class X>
struct Accum {
  using type = Acc;
  static type zero() { return acc_zero(); }
  static float sum(type v) { return acc_sum(v); }
};
template <>
struct Accum<XQ> {
  using type = __m256;
  static type zero() { return _mm256_setzero_ps(); }
  static float sum(type v) { return hsum(v); }
};
template <>
struct Accum<XD> {  // nothing to add up: the steps wrote the row
  using type = __m256;
  static type zero() { return _mm256_setzero_ps(); }
  static float sum(type) { return 0.f; }
};

// One weight row (K / block_elems blocks at w) against tokens m0..m0+T-1: out[t * ldo].
// X: XF (fp32 activations), XQ (int8), or XD (no activations: the row's weights written out).
template <int TYPE, int T, class X>
void row_dot(const uint8_t* w, const X& x, int64_t m0, float* out, int64_t ldo) {
  constexpr bool FP32 = std::is_same_v<X, XF>;  // XF-only code: x.row(m) is fp32
  constexpr bool INT8 = std::is_same_v<X, XQ>;  // XQ-only code: the offsets summed as vectors
  typename Accum<X>::type acc[T];
  float off[T];
  for (int t = 0; t < T; ++t) {
    acc[t] = Accum<X>::zero();
    off[t] = 0.f;
  }
  const int64_t K = x.K;
  if constexpr (TYPE == Q8_0) {
    for (int64_t ib = 0; ib < K / 32; ++ib, w += 34) {
      const float d = f16_to_f32(rd16(w));
      if constexpr (!FP32) {
        step1<T, true>(_mm256_loadu_si256((const __m256i*)(w + 2)), d, 0.f, x, m0, ib, acc, off);
      } else {
#if defined(__AVX512F__)
        // the LM head's type: the int8 quants widen straight from memory, d scales the block's
        // sum (3 vector ops a token and block instead of step's 4)
        const __m128i b0 = _mm_loadu_si128((const __m128i*)(w + 2));
        const __m128i b1 = _mm_loadu_si128((const __m128i*)(w + 18));
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b0));
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b1));
        const __m512 vd = _mm512_set1_ps(d);
        for (int t = 0; t < T; ++t) {
          const float* xb = x.row(m0 + t) + ib * 32;
          const __m512 p = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + 16),
                                           _mm512_mul_ps(q0, _mm512_loadu_ps(xb)));
          acc[t] = _mm512_fmadd_ps(p, vd, acc[t]);
        }
#else
        // the int8 quants widen straight from memory (one load-and-convert per 8), d scales the
        // block's dot product, as in the AVX-512 branch
        __m256 q[4];
        for (int k = 0; k < 4; ++k)
          q[k] = _mm256_cvtepi32_ps(
              _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + 2 + 8 * k))));
        const __m256 vd = _mm256_set1_ps(d);
        for (int t = 0; t < T; ++t) {
          const float* xb = x.row(m0 + t) + ib * 32;
          __m256 p = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
          for (int k = 1; k < 4; ++k) p = _mm256_fmadd_ps(q[k], _mm256_loadu_ps(xb + 8 * k), p);
          acc[t] = _mm256_fmadd_ps(p, vd, acc[t]);
        }
#endif
      }
    }
  } else if constexpr (TYPE == Q4_0 || TYPE == Q4_1 || TYPE == Q5_0 || TYPE == Q5_1) {
    constexpr bool has_min = TYPE == Q4_1 || TYPE == Q5_1;
    constexpr bool has_qh = TYPE == Q5_0 || TYPE == Q5_1;
    constexpr int bytes = 2 + (has_min ? 2 : 0) + (has_qh ? 4 : 0) + 16;
    for (int64_t ib = 0; ib < K / 32; ++ib, w += bytes) {
      const float d = f16_to_f32(rd16(w));
      const uint8_t* qs = w + bytes - 16;
#if defined(__AVX512F__)
      if constexpr (FP32) {
        // 16 bytes -> 16 int32 lanes; the low nibbles are elements 0-15, the high ones 16-31;
        // the fifth bits OR in under a mask; w = u * d + (m, or -16 d / -8 d) in one FMA
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));
        __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F));
        __m512i hi = _mm512_srli_epi32(v, 4);
        if constexpr (has_qh) {
          uint32_t qh;
          std::memcpy(&qh, qs - 4, 4);
          const __m512i bit = _mm512_set1_epi32(0x10);
          lo = _mm512_mask_or_epi32(lo, (__mmask16)(qh & 0xFFFF), lo, bit);
          hi = _mm512_mask_or_epi32(hi, (__mmask16)(qh >> 16), hi, bit);
        }
        const float o = has_min ? f16_to_f32(rd16(w + 2)) : (has_qh ? -16.f : -8.f) * d;
        const __m512 vd = _mm512_set1_ps(d), vo = _mm512_set1_ps(o);
        const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), vd, vo);
        const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), vd, vo);
        for (int t = 0; t < T; ++t) {
          const float* xb = x.row(m0 + t) + ib * 32;
          acc[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[t]);
          acc[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[t]);
        }
        continue;
      }
#endif
      __m256i u = nibbles_32(qs);
      if constexpr (has_qh) u = _mm256_or_si256(u, fifth_bits_32(qs - 4));
      if constexpr (has_min) {
        const float m = f16_to_f32(rd16(w + 2));
        step1<T>(u, d, m, x, m0, ib, acc, off);
      } else {  // q - 16 (q - 8) in int8: no offset term
        const __m256i q = _mm256_sub_epi8(u, _mm256_set1_epi8(has_qh ? 16 : 8));
        step1<T, true>(q, d, 0.f, x, m0, ib, acc, off);
      }
    }
  } else if constexpr (TYPE == Q4_K || TYPE == Q5_K) {
    constexpr int bytes = TYPE == Q4_K ? 144 : 176;
    const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    // int8 x: the offsets of a super-block's 8 sub-blocks in one vector, -dmin m_j dx_j sum(q_j)
    __m256 offv[T];
    for (int t = 0; t < T; ++t) offv[t] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; ++sb, w += bytes) {
      const float d = f16_to_f32(rd16(w)), dmin = f16_to_f32(rd16(w + 2));
      alignas(8) uint8_t sc8[8], mn8[8];
      scales_mins_k4(w + 4, sc8, mn8);
      alignas(32) float sv[8], ov[8];  // d sc_j and -dmin m_j
      scales_times<false, 8>(_mm_loadl_epi64((const __m128i*)sc8), d, sv);
      scales_times<false, 8>(_mm_loadl_epi64((const __m128i*)mn8), -dmin, ov);
      if constexpr (INT8)
        for (int t = 0; t < T; ++t)
          offv[t] = _mm256_fmadd_ps(
              _mm256_load_ps(ov),
              _mm256_mul_ps(_mm256_loadu_ps(x.drow(m0 + t) + sb * 8),
                            _mm256_loadu_ps(x.s32row(m0 + t) + sb * 8)),
              offv[t]);
      const uint8_t* qs = w + bytes - 128;
      const __m256i qh = TYPE == Q5_K ? _mm256_loadu_si256((const __m256i*)(w + 16))
                                      : _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        const __m256i q = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
        __m256i lo = _mm256_and_si256(q, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
        if constexpr (TYPE == Q5_K) {
          // bit 2j of qh[l] is the fifth bit of element 64j + l, bit 2j + 1 of 64j + 32 + l
          const __m256i b0 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j)), one);
          const __m256i b1 =
              _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j + 1)), one);
          lo = _mm256_or_si256(lo, _mm256_slli_epi16(b0, 4));
          hi = _mm256_or_si256(hi, _mm256_slli_epi16(b1, 4));
        }
        const int64_t ib = sb * 8 + 2 * j;
        // int8: offv has the offsets; otherwise each step adds its own
        step1<T>(lo, sv[2 * j], INT8 ? 0.f : ov[2 * j], x, m0, ib, acc, off);
        step1<T>(hi, sv[2 * j + 1], INT8 ? 0.f : ov[2 * j + 1], x, m0, ib + 1, acc, off);
      }
    }
    if constexpr (INT8)
      for (int t = 0; t < T; ++t) off[t] += hsum(offv[t]);
  } else if constexpr (TYPE == Q6_K) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x30);
    for (int64_t sb = 0; sb < K / 256; ++sb, w += 210) {
      float sc[16];  // d times the 16 signed scales
      scales_times<true>(_mm_loadu_si128((const __m128i*)(w + 192)), f16_to_f32(rd16(w + 208)),
                         sc);
      for (int h = 0; h < 2; ++h) {
        const __m256i ql0 = _mm256_loadu_si256((const __m256i*)(w + 64 * h));
        const __m256i ql1 = _mm256_loadu_si256((const __m256i*)(w + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i*)(w + 128 + 32 * h));
        __m256i u[4];  // groups of 32 elements 128h + 32g + l: unsigned 0..63 (q + 32)
        u[0] = _mm256_or_si256(_mm256_and_si256(ql0, low4),
                               _mm256_and_si256(_mm256_slli_epi16(qh, 4), two));
        u[1] = _mm256_or_si256(_mm256_and_si256(ql1, low4),
                               _mm256_and_si256(_mm256_slli_epi16(qh, 2), two));
        u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                               _mm256_and_si256(qh, two));
        u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                               _mm256_and_si256(_mm256_srli_epi16(qh, 2), two));
        for (int g = 0; g < 4; ++g) {
          const int k = 8 * h + 2 * g;  // the scales of the group's two halves of 16
          const __m256i q = _mm256_sub_epi8(u[g], _mm256_set1_epi8(32));  // -32..31
          step<T, true>(q, sc[k], sc[k + 1], 0.f, 0.f, x, m0, sb * 8 + 4 * h + g, acc, off);
        }
      }
    }
  } else if constexpr (TYPE == Q2_K || TYPE == Q3_K) {
    // 128-element half h, group j: element 128h + 32j + l is bits 2j, 2j+1 of qs[32h + l],
    // its scale the (8h + 2j + l / 16)-th; Q3_K's third bit is bit 4h + j of hmask[l]
    constexpr int bytes = TYPE == Q2_K ? 84 : 110;
    constexpr int qs_at = TYPE == Q2_K ? 16 : 32;
    __m256 offv[T];  // int8 x: Q2_K's offsets (offsets16)
    for (int t = 0; t < T; ++t) offv[t] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; ++sb, w += bytes) {
      float sv[16], ov[16];  // the halves' scales; Q2_K's offsets
      __m256i hmask = _mm256_setzero_si256();
      if constexpr (TYPE == Q2_K) {  // per 16: the scale in the low nibble, the min in the high
        const __m128i b = _mm_loadu_si128((const __m128i*)w), low4 = _mm_set1_epi8(0x0F);
        scales_times<false>(_mm_and_si128(b, low4), f16_to_f32(rd16(w + 80)), sv);
        scales_times<false>(_mm_and_si128(_mm_srli_epi16(b, 4), low4), -f16_to_f32(rd16(w + 82)),
                            ov);
        if constexpr (INT8)
          for (int t = 0; t < T; ++t) offv[t] = offsets16(ov, x, m0 + t, sb, offv[t]);
      } else {
        int8_t sc3[16];
        q3_k_scales(w + 96, sc3);
        const float d = f16_to_f32(rd16(w + 108));
        for (int k = 0; k < 16; ++k) sv[k] = d * sc3[k];
        hmask = _mm256_loadu_si256((const __m256i*)w);
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i qs = _mm256_loadu_si256((const __m256i*)(w + qs_at + 32 * h));
        for (int j = 0; j < 4; ++j) {
          const int k = 8 * h + 2 * j;
          const int64_t ib = sb * 8 + 4 * h + j;
          const __m256i low = bits_at(qs, 2 * j, 3);
          if constexpr (TYPE == Q2_K) {  // int8: offv has the offsets, else each step adds them
            step<T>(low, sv[k], sv[k + 1], INT8 ? 0.f : ov[k], INT8 ? 0.f : ov[k + 1], x, m0, ib,
                    acc, off);
          } else {  // q - 4 where the mask bit is clear: (low | bit << 2) - 4, in -4..3
            const __m256i bit = _mm256_slli_epi16(bits_at(hmask, 4 * h + j, 1), 2);
            const __m256i q = _mm256_sub_epi8(_mm256_or_si256(low, bit), _mm256_set1_epi8(4));
            step<T, true>(q, sv[k], sv[k + 1], 0.f, 0.f, x, m0, ib, acc, off);
          }
        }
      }
    }
    if constexpr (INT8)
      for (int t = 0; t < T; ++t) off[t] += hsum(offv[t]);
  } else if constexpr (is_iq_grid(TYPE)) {
    for (int64_t sb = 0; sb < K / 256; ++sb, w += iq_bytes(TYPE)) {
      for (int g = 0; g < 8; ++g) {
        uint64_t u[4];
        float sc[2];
        iq_group<TYPE>(w, g, u, sc);
        const __m256i v = _mm256_set_epi64x((int64_t)u[3], (int64_t)u[2], (int64_t)u[1],
                                            (int64_t)u[0]);
        if constexpr (TYPE == IQ2_XS || TYPE == IQ2_S || TYPE == IQ1_M)  // a scale per 16
          step<T, true>(v, sc[0], sc[1], 0.f, 0.f, x, m0, sb * 8 + g, acc, off);
        else
          step1<T, true>(v, sc[0], 0.f, x, m0, sb * 8 + g, acc, off);
      }
    }
  } else if constexpr (TYPE == MXFP4) {  // IQ4_NL's form: a code book, a power-of-two scale
    for (int64_t ib = 0; ib < K / 32; ++ib, w += 17)
      step1<T, true>(book_values_32(kMXFP4Values, w + 1), mxfp4_scale(w[0]), 0.f, x, m0, ib, acc,
                     off);
  } else if constexpr (TYPE == TQ2_0) {  // Q2_K's bit layout, values q - 1
    for (int64_t sb = 0; sb < K / 256; ++sb, w += 66) {
      const float d = f16_to_f32(rd16(w + 64));
      for (int h = 0; h < 2; ++h) {
        const __m256i qs = _mm256_loadu_si256((const __m256i*)(w + 32 * h));
        for (int j = 0; j < 4; ++j)
          step1<T, true>(_mm256_sub_epi8(bits_at(qs, 2 * j, 3), _mm256_set1_epi8(1)), d, 0.f, x,
                         m0, sb * 8 + 4 * h + j, acc, off);
      }
    }
  } else if constexpr (TYPE == TQ1_0) {
    for (int64_t sb = 0; sb < K / 256; ++sb, w += 54) {
      const float d = f16_to_f32(rd16(w + 52));
      for (int g = 0; g < 8; ++g) {
        alignas(32) int8_t v[32];
        tq1_group(w, g, v);
        step1<T, true>(_mm256_load_si256((const __m256i*)v), d, 0.f, x, m0, sb * 8 + g, acc, off);
      }
    }
  } else if constexpr (TYPE == IQ4_NL) {
    for (int64_t ib = 0; ib < K / 32; ++ib, w += 18) {
      const float d = f16_to_f32(rd16(w));
      step1<T, true>(book_values_32(kIQ4Values, w + 2), d, 0.f, x, m0, ib, acc, off);
    }
  } else if constexpr (TYPE == IQ4_XS) {
    for (int64_t sb = 0; sb < K / 256; ++sb, w += 136) {
      const float d = f16_to_f32(rd16(w));
      for (int ib = 0; ib < 8; ++ib) {
        const float dl = d * iq4_xs_scale(w, ib);
        step1<T, true>(book_values_32(kIQ4Values, w + 8 + 16 * ib), dl, 0.f, x, m0, sb * 8 + ib,
                       acc, off);
      }
    }
  }
  for (int t = 0; t < T; ++t) out[t * ldo] = Accum<X>::sum(acc[t]) + off[t];
}

#else  // scalar fallback: the same decomposition, one element at a time

// Block ib32 (32 elements) of a weight row as unsigned-or-signed values v[32] with per-16
// scales sc[2] and per-16 offsets of[2]: w_i = sc[i/16] * v_i + of[i/16].
template <int TYPE>
void decode32(const uint8_t* row, int64_t ib, int* v, float* sc, float* of) {
  if constexpr (TYPE == Q8_0) {
    const uint8_t* b = row + ib * 34;
    sc[0] = sc[1] = f16_to_f32(rd16(b));
    of[0] = of[1] = 0.f;
    for (int i = 0; i < 32; ++i) v[i] = (int8_t)b[2 + i];
  } else if constexpr (TYPE == Q4_0 || TYPE == Q4_1 || TYPE == Q5_0 || TYPE == Q5_1) {
    constexpr bool has_min = TYPE == Q4_1 || TYPE == Q5_1;
    constexpr bool has_qh = TYPE == Q5_0 || TYPE == Q5_1;
    constexpr int bytes = 2 + (has_min ? 2 : 0) + (has_qh ? 4 : 0) + 16;
    const uint8_t* b = row + ib * bytes;
    const float d = f16_to_f32(rd16(b));
    uint32_t qh = 0;
    if (has_qh) std::memcpy(&qh, b + bytes - 20, 4);
    const uint8_t* qs = b + bytes - 16;
    for (int i = 0; i < 16; ++i) {
      v[i] = (qs[i] & 0xF) | (has_qh ? ((qh >> i) & 1) << 4 : 0);
      v[i + 16] = (qs[i] >> 4) | (has_qh ? ((qh >> (i + 16)) & 1) << 4 : 0);
    }
    sc[0] = sc[1] = d;
    of[0] = of[1] = has_min ? f16_to_f32(rd16(b + 2)) : (has_qh ? -16.f : -8.f) * d;
  } else if constexpr (TYPE == Q4_K || TYPE == Q5_K) {
    constexpr int bytes = TYPE == Q4_K ? 144 : 176;
    const uint8_t* b = row + (ib / 8) * bytes;
    const int j = (int)(ib % 8);  // sub-block
    const float d = f16_to_f32(rd16(b)), dmin = f16_to_f32(rd16(b + 2));
    uint8_t s, m;
    scale_min_k4(j, b + 4, &s, &m);
    const uint8_t* q = b + bytes - 128 + 32 * (j / 2);
    for (int i = 0; i < 32; ++i) {
      v[i] = (j % 2 ? q[i] >> 4 : q[i] & 0xF);
      if (TYPE == Q5_K) v[i] |= ((b[16 + i] >> j) & 1) << 4;
    }
    sc[0] = sc[1] = d * s;
    of[0] = of[1] = -dmin * m;
  } else if constexpr (TYPE == Q6_K) {
    const uint8_t* b = row + (ib / 8) * 210;
    const int h = (int)(ib % 8) / 4, g = (int)(ib % 4);
    const float d = f16_to_f32(rd16(b + 208));
    const uint8_t* ql = b + 64 * h + 32 * (g % 2);
    const uint8_t* qh = b + 128 + 32 * h;
    for (int i = 0; i < 32; ++i)
      v[i] = ((g < 2 ? ql[i] & 0xF : ql[i] >> 4) | (((qh[i] >> (2 * g)) & 3) << 4)) - 32;
    const int8_t* s = (const int8_t*)(b + 192) + 8 * h + 2 * g;
    sc[0] = d * s[0];
    sc[1] = d * s[1];
    of[0] = of[1] = 0.f;
  } else if constexpr (TYPE == Q2_K || TYPE == Q3_K) {
    const uint8_t* b = row + (ib / 8) * (TYPE == Q2_K ? 84 : 110);
    const int h = (int)(ib % 8) / 4, j = (int)(ib % 4), k = 8 * h + 2 * j;
    const uint8_t* qs = b + (TYPE == Q2_K ? 16 : 32) + 32 * h;
    if constexpr (TYPE == Q2_K) {
      const float d = f16_to_f32(rd16(b + 80)), dmin = f16_to_f32(rd16(b + 82));
      for (int i = 0; i < 32; ++i) v[i] = (qs[i] >> (2 * j)) & 3;
      for (int e = 0; e < 2; ++e) {
        sc[e] = d * (b[k + e] & 0xF);
        of[e] = -dmin * (b[k + e] >> 4);
      }
    } else {
      const float d = f16_to_f32(rd16(b + 108));
      int8_t s3[16];
      q3_k_scales(b + 96, s3);
      for (int i = 0; i < 32; ++i)
        v[i] = (((qs[i] >> (2 * j)) & 3) | (((b[i] >> (4 * h + j)) & 1) << 2)) - 4;
      sc[0] = d * s3[k];
      sc[1] = d * s3[k + 1];
      of[0] = of[1] = 0.f;
    }
  } else if constexpr (is_iq_grid(TYPE)) {
    uint64_t u[4];
    iq_group<TYPE>(row + (ib / 8) * iq_bytes(TYPE), (int)(ib % 8), u, sc);
    int8_t bytes[32];
    std::memcpy(bytes, u, 32);
    for (int i = 0; i < 32; ++i) v[i] = bytes[i];
    of[0] = of[1] = 0.f;
  } else if constexpr (TYPE == MXFP4) {
    const uint8_t* b = row + ib * 17;
    for (int i = 0; i < 16; ++i) {
      v[i] = kMXFP4Values[b[1 + i] & 0xF];
      v[i + 16] = kMXFP4Values[b[1 + i] >> 4];
    }
    sc[0] = sc[1] = mxfp4_scale(b[0]);
    of[0] = of[1] = 0.f;
  } else if constexpr (TYPE == TQ1_0 || TYPE == TQ2_0) {
    const uint8_t* b = row + (ib / 8) * (TYPE == TQ1_0 ? 54 : 66);
    const int g = (int)(ib % 8);
    if constexpr (TYPE == TQ1_0) {
      int8_t t[32];
      tq1_group(b, g, t);
      for (int i = 0; i < 32; ++i) v[i] = t[i];
    } else {  // group g = 4h + j: bits 2j of qs[32h + l]
      for (int i = 0; i < 32; ++i) v[i] = ((b[32 * (g / 4) + i] >> (2 * (g % 4))) & 3) - 1;
    }
    sc[0] = sc[1] = f16_to_f32(rd16(b + (TYPE == TQ1_0 ? 52 : 64)));
    of[0] = of[1] = 0.f;
  } else if constexpr (TYPE == IQ4_NL || TYPE == IQ4_XS) {
    const uint8_t* b = TYPE == IQ4_NL ? row + ib * 18 : row + (ib / 8) * 136;
    const uint8_t* qs = TYPE == IQ4_NL ? b + 2 : b + 8 + 16 * (ib % 8);
    for (int i = 0; i < 16; ++i) {
      v[i] = kIQ4Values[qs[i] & 0xF];
      v[i + 16] = kIQ4Values[qs[i] >> 4];
    }
    const float d = f16_to_f32(rd16(b));
    sc[0] = sc[1] = TYPE == IQ4_NL ? d : d * iq4_xs_scale(b, (int)(ib % 8));
    of[0] = of[1] = 0.f;
  }
}

template <int TYPE, int T, class X>
void row_dot(const uint8_t* w, const X& x, int64_t m0, float* out, int64_t ldo) {
  float acc[T] = {};
  int v[32];
  float sc[2], of[2];
  for (int64_t ib = 0; ib < x.K / 32; ++ib) {
    decode32<TYPE>(w, ib, v, sc, of);
    if constexpr (std::is_same_v<X, XD>) {
      for (int i = 0; i < 32; ++i) x.out[ib * 32 + i] = sc[i / 16] * v[i] + of[i / 16];
    } else {
      for (int t = 0; t < T; ++t) {
        const auto* xb = x.row(m0 + t) + ib * 32;
        const float* s = x.srow(m0 + t) + 2 * ib;
        if constexpr (std::is_same_v<X, XF>) {
          float p0 = 0.f, p1 = 0.f;
          for (int i = 0; i < 16; ++i) p0 += v[i] * xb[i];
          for (int i = 16; i < 32; ++i) p1 += v[i] * xb[i];
          acc[t] += sc[0] * p0 + sc[1] * p1 + of[0] * s[0] + of[1] * s[1];
        } else {  // int8: the integer dot products are exact
          int p0 = 0, p1 = 0;
          for (int i = 0; i < 16; ++i) p0 += v[i] * xb[i];
          for (int i = 16; i < 32; ++i) p1 += v[i] * xb[i];
          acc[t] += x.drow(m0 + t)[ib] * (sc[0] * p0 + sc[1] * p1 + of[0] * s[0] + of[1] * s[1]);
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) out[t * ldo] = (float)acc[t];
}

#endif

template <int TYPE, class X>
void rows_dot(const uint8_t* w, int64_t row_bytes, const X& x, int64_t M, int64_t n0,
              int64_t n1, float* out, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
    int64_t m = 0;
    for (; m + MAX_TILE <= M; m += MAX_TILE) row_dot<TYPE, 4>(wr, x, m, out + m * N + n, N);
    switch (M - m) {
      case 3: row_dot<TYPE, 3>(wr, x, m, out + m * N + n, N); break;
      case 2: row_dot<TYPE, 2>(wr, x, m, out + m * N + n, N); break;
      case 1: row_dot<TYPE, 1>(wr, x, m, out + m * N + n, N); break;
      default: break;
    }
  }
}

// rows n0..n1 of W (row_bytes apart) against the M rows of x: out[m * N + n]
template <class X>
using RowsFn = void (*)(const uint8_t*, int64_t, const X&, int64_t, int64_t, int64_t, float*,
                        int64_t);

template <class X>
RowsFn<X> rows_fn(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return rows_dot<Q4_0, X>;
    case Q4_1: return rows_dot<Q4_1, X>;
    case Q5_0: return rows_dot<Q5_0, X>;
    case Q5_1: return rows_dot<Q5_1, X>;
    case Q8_0: return rows_dot<Q8_0, X>;
    case Q2_K: return rows_dot<Q2_K, X>;
    case Q3_K: return rows_dot<Q3_K, X>;
    case Q4_K: return rows_dot<Q4_K, X>;
    case Q5_K: return rows_dot<Q5_K, X>;
    case Q6_K: return rows_dot<Q6_K, X>;
    case IQ4_NL: return rows_dot<IQ4_NL, X>;
    case IQ4_XS: return rows_dot<IQ4_XS, X>;
    case IQ2_XXS: return rows_dot<IQ2_XXS, X>;
    case IQ2_XS: return rows_dot<IQ2_XS, X>;
    case IQ2_S: return rows_dot<IQ2_S, X>;
    case IQ3_XXS: return rows_dot<IQ3_XXS, X>;
    case IQ3_S: return rows_dot<IQ3_S, X>;
    case IQ1_S: return rows_dot<IQ1_S, X>;
    case IQ1_M: return rows_dot<IQ1_M, X>;
    case TQ1_0: return rows_dot<TQ1_0, X>;
    case TQ2_0: return rows_dot<TQ2_0, X>;
    case MXFP4: return rows_dot<MXFP4, X>;
    default: return nullptr;
  }
}

// elements per block of a type rows_fn takes: 256 for the K-quants, the IQ types but IQ4_NL,
// and the TQ types; else 32
int64_t block_elems(int64_t qtype) {
  const bool super = (qtype >= Q2_K && qtype <= Q6_K) || qtype == IQ4_XS ||
                     is_iq_grid((int)qtype) || qtype == TQ1_0 || qtype == TQ2_0;
  return super ? 256 : 32;
}

// Whether rows_fn's kernel for qtype can run: the IQ1/IQ2/IQ3 types need their grids set
void check_runnable(int64_t qtype, const char* who) {
  TORCH_CHECK(!is_iq_grid((int)qtype) || iq_grids().ready, who, ": the grids of GGML type ",
              qtype, " were not set (set_iq_grids)");
}

// A thread pool made for a shared machine. OpenMP (torch's intra-op pool) hands each thread a
// fixed share and spins at every join: with another job on one of two cores, every matmul then
// waits a scheduler time slice for the descheduled thread, and the spinning threads take the
// core from the main one (measured: 4 tok/s with 2 OpenMP threads, 16 with 1, on the busy
// 2-core box). Here the chunks go to whoever asks first (the caller included), so a worker that
// wakes late finds the work done and costs nothing; workers spin ~30 us for the next job, then
// sleep on a condition variable.
class Pool {
 public:
  void set_threads(int n) {
    std::lock_guard<std::mutex> g(config_);
    n = std::max(1, n);
    if (n == threads_ && pid_ == getpid()) return;
    stop_workers();
    threads_ = n;
  }
  int threads() const { return threads_; }

  // fn(begin, end) over [0, n) in chunks of `chunk`; returns when every chunk is done.
  void parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t nchunks = (n + chunk - 1) / chunk;
    if (threads_ <= 1 || nchunks <= 1) {
      if (n > 0) fn(0, n);
      return;
    }
    start_workers();
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    job->chunk = chunk;
    job->nchunks = nchunks;
    {
      std::lock_guard<std::mutex> g(mu_);
      job_ = job;
      gen_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    run_chunks(*job);
    // what is left was claimed by a worker that is running it now
    while (job->done.load(std::memory_order_acquire) < nchunks) std::this_thread::yield();
  }

 private:
  struct Job {
    const std::function<void(int64_t, int64_t)>* fn = nullptr;  // valid while chunks remain
    int64_t n = 0, chunk = 1, nchunks = 0;
    std::atomic<int64_t> next{0}, done{0};
  };

  static void run_chunks(Job& job) {
    for (;;) {
      const int64_t c = job.next.fetch_add(1, std::memory_order_acq_rel);
      if (c >= job.nchunks) return;
      (*job.fn)(c * job.chunk, std::min(job.n, (c + 1) * job.chunk));
      job.done.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void start_workers() {
    if (pid_ == getpid() && !workers_.empty()) return;
    std::lock_guard<std::mutex> g(config_);
    if (pid_ != getpid()) {  // a forked child: the parent's workers do not exist here
      for (auto& w : workers_) w.detach();
      workers_.clear();
      pid_ = getpid();
    }
    stop_ = false;
    while ((int)workers_.size() < threads_ - 1) workers_.emplace_back([this] { work(); });
  }

  void stop_workers() {
    if (pid_ != getpid()) {
      for (auto& w : workers_) w.detach();
    } else {
      {
        std::lock_guard<std::mutex> g(mu_);
        stop_ = true;
      }
      cv_.notify_all();
      for (auto& w : workers_) w.join();
    }
    workers_.clear();
    pid_ = getpid();
    stop_ = false;
  }

  // ~30 us of pause loops: catches the next matmul of a decode step (q, k, v come back to back)
  // without taking a core from torch's own threads for long when the gaps are longer
  static constexpr int kSpins = 2000;

  void work() {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      for (int spin = 0; spin < kSpins && gen_.load(std::memory_order_acquire) == seen; ++spin) {
#if defined(__AVX2__)
        _mm_pause();
#endif
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        if (gen_.load(std::memory_order_acquire) == seen && !stop_) {
          sleeping_.fetch_add(1, std::memory_order_acq_rel);
          cv_.wait(lk, [&] { return stop_ || gen_.load(std::memory_order_acquire) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        }
        if (stop_) return;
        seen = gen_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job) run_chunks(*job);
    }
  }

  std::mutex config_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleeping_{0};
  bool stop_ = false;
  int threads_ = 1;
  pid_t pid_ = getpid();
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers may outlive static destructors
  return *p;
}

}  // namespace

#include "decode_block.h"

// x float32 [M, K] contiguous, w uint8 [N, row_bytes] (rows contiguous) -> out float32 [M, N].
// int8_x: x quantized as q8_activations.quantize_q8_ref first (XQ), else fp32 (XF).
void quant_matmul(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype,
                  torch::Tensor& out, bool int8_x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be contiguous float32 [M, K]");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.stride(1) == 1,
              "w must be uint8 [N, row_bytes] with contiguous rows");
  TORCH_CHECK(rows_fn<XF>(qtype) != nullptr, "quant_matmul: unsupported GGML type ", qtype);
  check_runnable(qtype, "quant_matmul");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % block_elems(qtype) == 0, "K=", K, " is not a multiple of the block size");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.size(0) == M &&
                  out.size(1) == N,
              "out must be contiguous float32 [M, N]");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.stride(0);
  float* op = out.data_ptr<float>();
  // ~32 KiB of weights (x M tokens of work) a chunk: a 640-row GEMV is ~10 chunks to share,
  // and a chunk's work (microseconds) dwarfs taking it
  const int64_t chunk = std::max<int64_t>(1, (32768 / std::max<int64_t>(1, M)) / row_bytes);
  auto run = [&](const auto& xv) {
    const auto fn = rows_fn<std::decay_t<decltype(xv)>>(qtype);
    pool().parallel_for(N, chunk, [&](int64_t n0, int64_t n1) {
      fn(wp, row_bytes, xv, M, n0, n1, op, N);
    });
  };
  if (int8_x) {
    XQBuffers buffers;
    run(buffers.quantize(x.data_ptr<float>(), M, K));
  } else {
    auto xs = torch::empty({M, K / 16}, torch::kFloat32);
    sums16(x.data_ptr<float>(), M, K, xs.data_ptr<float>());
    run(XF{x.data_ptr<float>(), xs.data_ptr<float>(), K});
  }
}

// w uint8 [N, row_bytes] (rows contiguous) -> out float32 [N, K]: dequantize(w), each block
// decoded by the matmuls' code (XD); the values are dequantize_ref's up to the rounding of
// scale * u + offset in one fused multiply-add.
void dequantize(const torch::Tensor& w, int64_t qtype, torch::Tensor& out) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.stride(1) == 1,
              "w must be uint8 [N, row_bytes] with contiguous rows");
  const RowsFn<XD> fn = rows_fn<XD>(qtype);
  TORCH_CHECK(fn != nullptr, "dequantize: unsupported GGML type ", qtype);
  check_runnable(qtype, "dequantize");
  const int64_t N = w.size(0), K = out.size(1);
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.dim() == 2 && out.is_contiguous() &&
                  out.size(0) == N && K % block_elems(qtype) == 0,
              "out must be contiguous float32 [", N, ", whole blocks]");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.stride(0);
  float* op = out.data_ptr<float>();
  const int64_t chunk = std::max<int64_t>(1, 32768 / row_bytes);
  pool().parallel_for(N, chunk, [&](int64_t n0, int64_t n1) {
    float unused;
    for (int64_t n = n0; n < n1; ++n)
      fn(wp + n * row_bytes, row_bytes, XD{op + n * K, K}, 1, 0, 1, &unused, 1);
  });
}

bool has_avx2() {
#if defined(__AVX2__)
  return true;
#else
  return false;
#endif
}

bool has_avx512() {
#if defined(__AVX2__) && defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// The IQ grids from iq_tables.grid (int8 [entries, 8] or [entries, 4], contiguous) and ksigns
// (uint8 [128]); called once by quant_cpu_native when it loads the extension.
void set_iq_grids(const torch::Tensor& iq2xxs, const torch::Tensor& iq2xs,
                  const torch::Tensor& iq2s, const torch::Tensor& iq3xxs,
                  const torch::Tensor& iq3s, const torch::Tensor& iq1s,
                  const torch::Tensor& ksigns) {
  IQGrids& G = g_iq_grids;
  auto words = [](const torch::Tensor& t, int64_t entries, int64_t width, void* out,
                  const char* name) {
    TORCH_CHECK(t.dtype() == torch::kInt8 && t.dim() == 2 && t.size(0) == entries &&
                    t.size(1) == width && t.is_contiguous(),
                name, " must be contiguous int8 [", entries, ", ", width, "]");
    std::memcpy(out, t.data_ptr<int8_t>(), entries * width);
  };
  words(iq2xxs, 256, 8, G.iq2xxs, "iq2xxs");
  words(iq2xs, 512, 8, G.iq2xs, "iq2xs");
  words(iq2s, 1024, 8, G.iq2s, "iq2s");
  words(iq3xxs, 256, 4, G.iq3xxs, "iq3xxs");
  words(iq3s, 512, 4, G.iq3s, "iq3s");
  words(iq1s, 2048, 8, G.iq1s, "iq1s");
  TORCH_CHECK(ksigns.dtype() == torch::kUInt8 && ksigns.numel() == 128 && ksigns.is_contiguous(),
              "ksigns must be contiguous uint8 [128]");
  std::memcpy(G.ksigns, ksigns.data_ptr<uint8_t>(), 128);
  for (int i = 0; i < 256; ++i) {
    uint64_t m = 0;
    for (int j = 0; j < 8; ++j)
      if (i >> j & 1) m |= 0xFFull << (8 * j);
    G.sign8[i] = m;
  }
  G.ready = true;
}

void set_num_threads(int64_t n) { pool().set_threads((int)n); }
int64_t get_num_threads() { return pool().threads(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_num_threads", &set_num_threads, "threads of the matmuls (the caller + workers)");
  m.def("get_num_threads", &get_num_threads);
  m.def("quant_matmul", &quant_matmul,
        "out = x @ dequantize(w).T; int8_x: x quantized to int8 per 32 first",
        py::arg("x"), py::arg("w"), py::arg("qtype"), py::arg("out"), py::arg("int8_x") = false,
        py::call_guard<py::gil_scoped_release>());
  py::class_<DecodeBlock, std::shared_ptr<DecodeBlock>>(m, "DecodeBlock")
      .def("forward", &DecodeBlock::forward, "one decode token per sequence through the block",
           py::call_guard<py::gil_scoped_release>());
  m.def("make_decode_block", &make_decode_block, "a DecodeBlock (decode_block.h)");
  m.def("dequantize", &dequantize, "out = dequantize(w) as float32 [N, K]",
        py::call_guard<py::gil_scoped_release>());
  m.def("set_iq_grids", &set_iq_grids, "the IQ1/IQ2/IQ3 grids and ksigns (iq_tables)");
  m.def("has_avx2", &has_avx2);
  m.def("has_avx512", &has_avx512);
}
