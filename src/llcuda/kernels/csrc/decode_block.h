// One decoder block's decode step (one new token per sequence) in one native call: the same
// math as models/decoder.py's DecoderBlock on the pure-torch reference ops (kernels/reference.py
// is the specification; tests/unit/test_decode_block_cpu.py compares the two), fp32 throughout
// except the GEMVs' inputs, quantized to int8 where int8_x is set (q8_activations' spec).
//
// Why: a decode step of a small model on the CPU spent more time between its matmuls than in
// them (~40 small torch ops a block, a few microseconds each, and the matmul pool's workers
// asleep again by the next matmul). Here a block is 4 pool jobs (q|k|v, o, gate|up, down) and a
// few loops over vectors of a few thousand floats.
//
// Included by quant_cpu.cpp after the GEMV kernels and the pool, which it uses.

namespace {

// A weight in its GGUF blocks: W [rows, cols], row-major rows of row_bytes.
struct Mat {
  torch::Tensor keep;  // the blocks (a view of the memory-mapped file): kept alive here
  const uint8_t* w = nullptr;
  int64_t row_bytes = 0, rows = 0, cols = 0;
  RowsFn<XF> fn = nullptr;   // against fp32 activations
  RowsFn<XQ> fnq = nullptr;  // against int8 ones
  RowsFn<XF> fn_for(const XF&) const { return fn; }
  RowsFn<XQ> fn_for(const XQ&) const { return fnq; }
};

Mat make_mat(const torch::Tensor& blocks, int64_t qtype, int64_t cols) {
  TORCH_CHECK(blocks.dtype() == torch::kUInt8 && blocks.dim() == 2 && blocks.stride(1) == 1,
              "a weight must be uint8 blocks [rows, row_bytes] with contiguous rows");
  Mat m;
  m.fn = rows_fn<XF>(qtype);
  m.fnq = rows_fn<XQ>(qtype);
  TORCH_CHECK(m.fn != nullptr, "decode block: unsupported GGML type ", qtype);
  check_runnable(qtype, "decode block");
  TORCH_CHECK(cols % block_elems(qtype) == 0, "a weight's ", cols,
              " columns are not whole blocks of its type");
  m.keep = blocks;
  m.w = blocks.data_ptr<uint8_t>();
  m.row_bytes = blocks.stride(0);
  m.rows = blocks.size(0);
  m.cols = cols;
  return m;
}

// out[m, off_j + n] = x[m] . W_j[n] for weights W_j that read the same x [M, K]: their output
// columns side by side in out [M, ld], all in one pool job (chunks of ~32 KiB of weights).
// int8_x: x quantized to int8 first (XQ, q8_activations' spec), else fp32 (XF).
void matmuls(const float* x, int64_t M, int64_t K, const std::vector<Mat>& mats, float* out,
             int64_t ld, bool int8_x) {
  struct Seg {
    const Mat* mat;
    int64_t n0, n1, col;
  };
  thread_local std::vector<Seg> segs;
  segs.clear();
  int64_t col = 0;
  for (const Mat& m : mats) {
    const int64_t chunk = std::max<int64_t>(1, (32768 / std::max<int64_t>(1, M)) / m.row_bytes);
    for (int64_t n0 = 0; n0 < m.rows; n0 += chunk)
      segs.push_back({&m, n0, std::min(m.rows, n0 + chunk), col});
    col += m.rows;
  }
  const Seg* sp = segs.data();
  auto run = [&](const auto& xv) {
    pool().parallel_for((int64_t)segs.size(), 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s)
        sp[s].mat->fn_for(xv)(sp[s].mat->w, sp[s].mat->row_bytes, xv, M, sp[s].n0, sp[s].n1,
                            out + sp[s].col, ld);
    });
  };
  if (int8_x) {
    thread_local XQBuffers buffers;
    run(buffers.quantize(x, M, K));
  } else {
    thread_local std::vector<float> s16;
    s16.resize(M * K / 16);
    sums16(x, M, K, s16.data());
    run(XF{x, s16.data(), K});
  }
}

// reference.rms_norm_ref: y = x / sqrt(mean(x^2) + eps) * w (GGUF norm weights hold 1 + w)
void rms_norm_row(const float* x, const float* w, int64_t n, float eps, float* y) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

// reference.rope_at_ref + rope_neox_ref / rope_norm_ref on one head, in place: cos/sin at the
// position from the factored tables (row pos % F and row F + pos / F, angle-sum identity)
constexpr int64_t ROPE_FINE_STEPS = 256;  // reference.ROPE_FINE_STEPS

void rope_head(float* v, const float* cos_t, const float* sin_t, int64_t half, int64_t pos,
               bool neox) {
  const float* cf = cos_t + (pos % ROPE_FINE_STEPS) * half;
  const float* sf = sin_t + (pos % ROPE_FINE_STEPS) * half;
  const float* cc = cos_t + (ROPE_FINE_STEPS + pos / ROPE_FINE_STEPS) * half;
  const float* sc = sin_t + (ROPE_FINE_STEPS + pos / ROPE_FINE_STEPS) * half;
  for (int64_t i = 0; i < half; ++i) {
    const float c = cc[i] * cf[i] - sc[i] * sf[i], s = sc[i] * cf[i] + cc[i] * sf[i];
    float* a = neox ? v + i : v + 2 * i;
    float* b = neox ? v + half + i : v + 2 * i + 1;
    const float x1 = *a, x2 = *b;
    *a = x1 * c - x2 * s;
    *b = x1 * s + x2 * c;
  }
}

// reference.gelu_tanh_ref / silu_ref times up (gated_act_ref)
enum Act { GELU_TANH = 0, SILU = 1 };

void gated_row(const float* gate, const float* up, int64_t n, int act, float* out) {
  if (act == GELU_TANH) {
    const float c = std::sqrt(2.f / (float)M_PI);
    for (int64_t i = 0; i < n; ++i) {
      const float x = gate[i];
      out[i] = 0.5f * x * (1.f + std::tanh(c * (x + 0.044715f * x * x * x))) * up[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  }
}

struct DecodeBlock {
  std::vector<Mat> qkv, gate_up;  // [q | k | v] and [gate | up] rows, one or more weights each
  std::vector<Mat> o, down;
  torch::Tensor q_norm, k_norm, post_attn, ffn_norm, post_ffw, next_norm, bias;
  torch::Tensor cos_t, sin_t;
  int64_t hidden = 0, nh = 0, nkv = 0, hd = 0, ffn = 0, window = 0, half = 0;
  double eps = 0, scale = 1, softcap = 0;
  bool neox = true;
  bool int8_x = false;  // the GEMVs' activations quantized to int8 (XQ) instead of fp32
  int act = GELU_TANH;

  // x: the residual [T, hidden], h: its norm (the previous block's next_norm), one token of
  // each of T sequences; positions int64 [T], slot_mapping int64 [T], block_tables int32 [T, W],
  // seq_lens int32 or int64 [T] (context after this token), caches fp32 [blocks, block_size,
  // nkv, hd]. Returns (x', h') as DecoderBlock.__call__.
  std::tuple<torch::Tensor, torch::Tensor> forward(
      const torch::Tensor& x, const torch::Tensor& h, const torch::Tensor& positions,
      const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
      const torch::Tensor& seq_lens, torch::Tensor& k_cache, torch::Tensor& v_cache) const;
};

float* fptr(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

std::tuple<torch::Tensor, torch::Tensor> DecodeBlock::forward(
    const torch::Tensor& x, const torch::Tensor& h, const torch::Tensor& positions,
    const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
    const torch::Tensor& seq_lens, torch::Tensor& k_cache, torch::Tensor& v_cache) const {
  const int64_t T = x.size(0), H = hidden;
  auto f32 = [&](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.dim() == 2 && t.is_contiguous() &&
                    t.size(0) == T && t.size(1) == H,
                name, " must be contiguous float32 [", T, ", ", H, "]");
  };
  f32(x, "x");
  f32(h, "h");
  TORCH_CHECK(positions.dtype() == torch::kInt64 && positions.numel() == T &&
                  slot_mapping.dtype() == torch::kInt64 && slot_mapping.numel() == T &&
                  positions.is_contiguous() && slot_mapping.is_contiguous(),
              "positions and slot_mapping must be contiguous int64 [", T, "]");
  TORCH_CHECK(block_tables.dtype() == torch::kInt32 && block_tables.dim() == 2 &&
                  block_tables.size(0) == T && block_tables.is_contiguous(),
              "block_tables must be contiguous int32 [", T, ", max_blocks]");
  TORCH_CHECK((seq_lens.dtype() == torch::kInt32 || seq_lens.dtype() == torch::kInt64) &&
                  seq_lens.numel() == T && seq_lens.is_contiguous(),
              "seq_lens must be contiguous int32 or int64 [", T, "]");
  for (const torch::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->dtype() == torch::kFloat32 && c->dim() == 4 && c->is_contiguous() &&
                    c->size(2) == nkv && c->size(3) == hd && c->sizes() == k_cache.sizes(),
                "the KV cache must be contiguous float32 [blocks, block_size, ", nkv, ", ", hd,
                "]");
  const int64_t bs = k_cache.size(1), n_slots = k_cache.size(0) * bs, W = block_tables.size(1);
  const int64_t qs = nh * hd, kvs = nkv * hd, nqkv = qs + 2 * kvs;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  auto ctx_of = [&](int64_t t) -> int64_t {
    return seq_lens.dtype() == torch::kInt32 ? seq_lens.data_ptr<int32_t>()[t]
                                             : seq_lens.data_ptr<int64_t>()[t];
  };
  for (int64_t t = 0; t < T; ++t) {
    const int64_t ctx = ctx_of(t);
    TORCH_CHECK(ctx >= 1 && (ctx - 1) / bs < W, "sequence ", t, ": context ", ctx,
                " does not fit its block table of ", W, " blocks");
    TORCH_CHECK(slots[t] < n_slots, "slot ", slots[t], " is past the cache's ", n_slots);
    TORCH_CHECK(pos[t] >= 0 && ROPE_FINE_STEPS + pos[t] / ROPE_FINE_STEPS < cos_t.size(0),
                "position ", pos[t], " is past the RoPE table");
  }
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();

  thread_local std::vector<float> buf;
  buf.resize(T * (nqkv + qs + 3 * ffn + 2 * H));
  float* qkv_out = buf.data();          // [T, q | k | v]
  float* attn = qkv_out + T * nqkv;     // [T, q]
  float* gu = attn + T * qs;            // [T, gate | up]
  float* a = gu + T * 2 * ffn;          // [T, ffn]
  float* proj = a + T * ffn;            // [T, H]: o, then down
  float* normed = proj + T * H;         // [T, H]
  auto x_out = torch::empty({T, H}, torch::kFloat32);
  auto h_out = torch::empty({T, H}, torch::kFloat32);
  float* xo = x_out.data_ptr<float>();
  float* ho = h_out.data_ptr<float>();
  const float fe = (float)eps;

  // q | k | v, (+ bias), per-head norms, RoPE, q's scale; k and v into the cache
  matmuls(h.data_ptr<float>(), T, H, qkv, qkv_out, nqkv, int8_x);
  const float* qn = fptr(q_norm);
  const float* kn = fptr(k_norm);
  const float* bp = fptr(bias);
  const float* ct = fptr(cos_t);
  const float* st = fptr(sin_t);
  for (int64_t t = 0; t < T; ++t) {
    float* r = qkv_out + t * nqkv;
    if (bp != nullptr)
      for (int64_t i = 0; i < nqkv; ++i) r[i] += bp[i];
    for (int64_t j = 0; j < nh + nkv; ++j) {
      float* head = r + j * hd;
      const float* w = j < nh ? qn : kn;
      if (w != nullptr) rms_norm_row(head, w, hd, fe, head);
      rope_head(head, ct, st, half, pos[t], neox);
      if (j < nh)
        for (int64_t i = 0; i < hd; ++i) head[i] *= (float)scale;
    }
    if (slots[t] >= 0) {  // negative: a padding token, not stored
      std::memcpy(kc + slots[t] * kvs, r + qs, kvs * sizeof(float));
      std::memcpy(vc + slots[t] * kvs, r + qs + kvs, kvs * sizeof(float));
    }
  }

  // attention of each token's query heads over its sequence's cache (reference's
  // paged_attention_ref for one query at position ctx - 1), a (token, head) pair per chunk
  const int64_t group = nh / nkv;
  const float cap = (float)softcap;
  auto attend = [&](int64_t p0, int64_t p1) {
    thread_local std::vector<float> scores;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t t = p / nh, hh = p % nh, kvh = hh / group, ctx = ctx_of(t);
      const int64_t k0 = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      const float* q = qkv_out + t * nqkv + hh * hd;
      const int32_t* table = tables + t * W;
      scores.resize(ctx - k0);
      float mx = -INFINITY;
      for (int64_t kp = k0; kp < ctx; ++kp) {
        const float* k = kc + ((table[kp / bs] * bs + kp % bs) * nkv + kvh) * hd;
        float s = 0.f;
        for (int64_t i = 0; i < hd; ++i) s += q[i] * k[i];
        if (cap > 0.f) s = cap * std::tanh(s / cap);
        scores[kp - k0] = s;
        mx = std::max(mx, s);
      }
      float sum = 0.f;
      for (float& s : scores) sum += (s = std::exp(s - mx));
      float* o = attn + t * qs + hh * hd;
      std::fill(o, o + hd, 0.f);
      for (int64_t kp = k0; kp < ctx; ++kp) {
        const float pw = scores[kp - k0] / sum;
        const float* v = vc + ((table[kp / bs] * bs + kp % bs) * nkv + kvh) * hd;
        for (int64_t i = 0; i < hd; ++i) o[i] += pw * v[i];
      }
    }
  };
  int64_t keys = 0;
  for (int64_t t = 0; t < T; ++t) keys += ctx_of(t);
  if (keys * nh * hd < (1 << 17)) {
    attend(0, T * nh);  // a few microseconds: not worth waking the pool
  } else {
    pool().parallel_for(T * nh, 1, attend);
  }

  // o, post-attention norm + residual, the FFN's pre-norm
  const float* w_post_attn = fptr(post_attn);
  const float* w_ffn = fptr(ffn_norm);
  matmuls(attn, T, qs, o, proj, H, int8_x);
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x.data_ptr<float>() + t * H;
    float* pr = proj + t * H;
    if (w_post_attn != nullptr) rms_norm_row(pr, w_post_attn, H, fe, pr);
    for (int64_t i = 0; i < H; ++i) xo[t * H + i] = xr[i] + pr[i];
    rms_norm_row(xo + t * H, w_ffn, H, fe, normed + t * H);
  }

  // gate | up, the gated activation, down, post-FFN norm + residual, the next pre-norm
  matmuls(normed, T, H, gate_up, gu, 2 * ffn, int8_x);
  for (int64_t t = 0; t < T; ++t) gated_row(gu + t * 2 * ffn, gu + t * 2 * ffn + ffn, ffn, act,
                                            a + t * ffn);
  matmuls(a, T, ffn, down, proj, H, int8_x);
  const float* w_post_ffw = fptr(post_ffw);
  const float* w_next = fptr(next_norm);
  for (int64_t t = 0; t < T; ++t) {
    float* pr = proj + t * H;
    if (w_post_ffw != nullptr) rms_norm_row(pr, w_post_ffw, H, fe, pr);
    for (int64_t i = 0; i < H; ++i) xo[t * H + i] += pr[i];
    rms_norm_row(xo + t * H, w_next, H, fe, ho + t * H);
  }
  return {x_out, h_out};
}

torch::Tensor f32_vector(const c10::optional<torch::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return torch::Tensor();
  TORCH_CHECK(t->dtype() == torch::kFloat32 && t->dim() == 1 && t->numel() == n &&
                  t->is_contiguous(),
              name, " must be contiguous float32 [", n, "]");
  return *t;
}

std::vector<Mat> make_mats(const std::vector<torch::Tensor>& blocks,
                           const std::vector<int64_t>& qtypes, int64_t cols, int64_t rows,
                           const char* name) {
  TORCH_CHECK(blocks.size() == qtypes.size() && !blocks.empty(), name,
              ": one GGML type per weight");
  std::vector<Mat> mats;
  int64_t total = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    mats.push_back(make_mat(blocks[i], qtypes[i], cols));
    total += mats.back().rows;
  }
  TORCH_CHECK(total == rows, name, ": the weights have ", total, " rows, expected ", rows);
  return mats;
}

// The block's weights and settings, checked once (DecodeBlock's fields say what each is).
std::shared_ptr<DecodeBlock> make_decode_block(
    const std::vector<torch::Tensor>& qkv, const std::vector<int64_t>& qkv_types,
    const torch::Tensor& o, int64_t o_type, const std::vector<torch::Tensor>& gate_up,
    const std::vector<int64_t>& gate_up_types, const torch::Tensor& down, int64_t down_type,
    const c10::optional<torch::Tensor>& q_norm, const c10::optional<torch::Tensor>& k_norm,
    const c10::optional<torch::Tensor>& post_attn, const torch::Tensor& ffn_norm,
    const c10::optional<torch::Tensor>& post_ffw, const torch::Tensor& next_norm,
    const c10::optional<torch::Tensor>& bias, const torch::Tensor& cos_t,
    const torch::Tensor& sin_t, int64_t hidden, int64_t nh, int64_t nkv, int64_t hd,
    int64_t ffn, int64_t window, double eps, double scale, double softcap, bool neox,
    int64_t act, bool int8_x) {
  TORCH_CHECK(nh > 0 && nkv > 0 && nh % nkv == 0, "num_heads ", nh,
              " must be a multiple of num_kv_heads ", nkv);
  TORCH_CHECK(act == GELU_TANH || act == SILU, "unknown activation id ", act);
  auto b = std::make_shared<DecodeBlock>();
  const int64_t nqkv = (nh + 2 * nkv) * hd;
  b->qkv = make_mats(qkv, qkv_types, hidden, nqkv, "attn q|k|v");
  b->o = make_mats({o}, {o_type}, nh * hd, hidden, "attn_output");
  b->gate_up = make_mats(gate_up, gate_up_types, hidden, 2 * ffn, "ffn gate|up");
  b->down = make_mats({down}, {down_type}, ffn, hidden, "ffn_down");
  b->q_norm = f32_vector(q_norm, hd, "attn_q_norm");
  b->k_norm = f32_vector(k_norm, hd, "attn_k_norm");
  TORCH_CHECK(b->q_norm.defined() == b->k_norm.defined(), "q and k norms: both or neither");
  b->post_attn = f32_vector(post_attn, hidden, "post_attention_norm");
  b->ffn_norm = f32_vector(ffn_norm, hidden, "ffn_norm");
  b->post_ffw = f32_vector(post_ffw, hidden, "post_ffw_norm");
  b->next_norm = f32_vector(next_norm, hidden, "the next block's norm");
  b->bias = f32_vector(bias, nqkv, "the q|k|v bias");
  TORCH_CHECK(cos_t.dtype() == torch::kFloat32 && cos_t.dim() == 2 && cos_t.is_contiguous() &&
                  sin_t.sizes() == cos_t.sizes() && sin_t.dtype() == torch::kFloat32 &&
                  sin_t.is_contiguous() && 2 * cos_t.size(1) <= hd &&
                  cos_t.size(0) > ROPE_FINE_STEPS,
              "cos/sin must be the factored fp32 RoPE tables [", ROPE_FINE_STEPS,
              " + n, rope_dim / 2] with rope_dim <= head_dim");
  b->cos_t = cos_t;
  b->sin_t = sin_t;
  b->half = cos_t.size(1);
  b->hidden = hidden;
  b->nh = nh;
  b->nkv = nkv;
  b->hd = hd;
  b->ffn = ffn;
  b->window = window;
  b->eps = eps;
  b->scale = scale;
  b->softcap = softcap;
  b->neox = neox;
  b->act = (int)act;
  b->int8_x = int8_x;
  return b;
}

}  // namespace
