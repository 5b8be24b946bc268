// Helpers of the fused sampler kernel (row_sampler.body), in the dialect both
// backends read: Metal's built-in names, mapped for CUDA by cuda_prelude.h.
// No address-space qualifiers: values pass by value, so one text serves both.

// What a lane, a SIMD group and finally the threadgroup know of a row of
// processed logits z: the running maximum m, s = sum exp(z - m),
// t = sum exp(z - m) * (z - m) (so entropy = log s - t / s), and the first
// index of the largest z.
struct RowStats {
  float m;
  float s;
  float t;
  float best;
  uint best_i;
};

// tanh from one exponential and one fast division, exact at +-inf: cheaper
// than a precise tanh on both backends, and within a few 1e-7 of it.
DEVICE_FN float tanh_from_exp(float y) {
  const float t = 1.0f - fdiv(2.0f, fexp(2.0f * (y < 0.0f ? -y : y)) + 1.0f);
  return y < 0.0f ? -t : t;
}

// z = logits / temperature (after the softcap cap * tanh(x / cap) when x is
// the raw lm_head output), with the divisions folded into two precomputed
// factors: within a few float32 ulps of the MLX path's z.
DEVICE_FN float processed_logit(float x, bool softcap, float inv_cap, float scale) {
  return softcap ? tanh_from_exp(x * inv_cap) * scale : x * scale;
}

// exp(z - top), exactly 0 for a -inf z (whatever the other is).
DEVICE_FN float weight_of(float z, float top) { return z == NEG_INF ? 0.0f : fexp(z - top); }

// Commutative to the bit (a + b == b + a, max and the tie rule are
// symmetric), so an xor butterfly leaves every lane the same result.
DEVICE_FN RowStats merge_stats(RowStats a, RowStats b) {
  RowStats out;
  out.m = a.m > b.m ? a.m : b.m;
  const float ra = weight_of(a.m, out.m);
  const float rb = weight_of(b.m, out.m);
  out.s = a.s * ra + b.s * rb;
  const float ta = a.m == NEG_INF ? 0.0f : ra * (a.t + (a.m - out.m) * a.s);
  const float tb = b.m == NEG_INF ? 0.0f : rb * (b.t + (b.m - out.m) * b.s);
  out.t = ta + tb;
  const bool take_b = b.best > a.best || (b.best == a.best && b.best_i < a.best_i);
  out.best = take_b ? b.best : a.best;
  out.best_i = take_b ? b.best_i : a.best_i;
  return out;
}

DEVICE_FN RowStats simd_merge_stats(RowStats x) {
  for (uint o = 16; o > 0; o >>= 1) {
    RowStats y;
    y.m = simd_shuffle_xor(x.m, o);
    y.s = simd_shuffle_xor(x.s, o);
    y.t = simd_shuffle_xor(x.t, o);
    y.best = simd_shuffle_xor(x.best, o);
    y.best_i = simd_shuffle_xor(x.best_i, o);
    x = merge_stats(x, y);
  }
  return x;
}

// Wellons' lowbias32 integer hash; sampling.py computes the same with mlx ops.
DEVICE_FN uint hash32(uint x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

// One uniform in (0, 1] per position and step key: counter-based, so
// nothing V-sized is drawn and the key reproduces it.
DEVICE_FN float row_uniform(uint key0, uint key1, uint position) {
  const uint bits = hash32(hash32(position ^ key0) + key1);
  return float((bits >> 8) + 1u) * 5.9604644775390625e-8f;  // 2^-24
}

// Among 32 consecutive pieces (one per lane, in index order) with sums
// `piece`, the first whose inclusive prefix sum reaches `target`, and the
// sum before it; past the end by rounding, the last piece with any weight.
// A piece without weight is never picked (a -inf logit is never drawn).
struct Pick {
  uint index;
  float before;
};

DEVICE_FN Pick pick_piece(float piece, float target, uint lane) {
  const float inclusive = simd_prefix_inclusive_sum(piece);
  const float exclusive = simd_prefix_exclusive_sum(piece);
  const uint first = simd_min(inclusive >= target && piece > 0.0f ? lane : 32u);
  const uint last = simd_max(piece > 0.0f ? lane : 0u);
  Pick out;
  out.index = first < 32u ? first : last;
  out.before = simd_shuffle(exclusive, out.index);
  return out;
}

// A SIMD group's k largest (value, index) pairs, k <= 64: slot j lives in lane
// j % 32 as its (j / 32)-th entry; slots past k hold +inf and are never the
// smallest. Every lane knows tau, the smallest kept value, and where it lives.
struct TopList {
  float v0;
  float v1;
  uint i0;
  uint i1;
  float tau;
  uint min_lane;
  uint min_which;
};

DEVICE_FN TopList top_list_refresh(TopList l, uint lane) {
  const bool second = l.v1 < l.v0;
  const float mine = second ? l.v1 : l.v0;
  l.tau = simd_min(mine);
  l.min_lane = simd_min(mine == l.tau ? lane : 32u);
  l.min_which = simd_shuffle(second ? 1u : 0u, l.min_lane);
  return l;
}

DEVICE_FN TopList top_list_new(uint k, uint lane) {
  TopList l;
  l.v0 = lane < k ? NEG_INF : POS_INF;
  l.v1 = lane + 32u < k ? NEG_INF : POS_INF;
  l.i0 = lane;
  l.i1 = lane + 32u;
  return top_list_refresh(l, lane);
}

// Each lane offers (value, index): every value above tau goes in, in lane
// order, each pushing out the smallest kept one (ties stay out).
DEVICE_FN TopList top_list_offer(TopList l, float value, uint index, uint lane) {
  bool want = value > l.tau;
  while (simd_max(want ? 1u : 0u) != 0u) {
    const uint first = simd_min(want ? lane : 32u);
    const float v = simd_shuffle(value, first);
    const uint vi = simd_shuffle(index, first);
    if (lane == l.min_lane) {
      if (l.min_which == 0u) {
        l.v0 = v;
        l.i0 = vi;
      } else {
        l.v1 = v;
        l.i1 = vi;
      }
    }
    l = top_list_refresh(l, lane);
    want = want && lane != first && value > l.tau;
  }
  return l;
}
