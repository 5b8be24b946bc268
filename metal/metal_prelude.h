// Metal's side of the names the sampler kernel body uses (row_sampler.body).
// The body is written with Metal's own built-ins (simd_*, threadgroup_barrier,
// thread_index_in_simdgroup, ...); Metal needs only these few helpers.
#define DEVICE_FN inline
#define NEG_INF (-INFINITY)
// precise: the sampler's exponentials and logarithms are compared with the
// MLX path's, whatever math mode the kernel is compiled in
DEVICE_FN float fexp(float x) { return metal::precise::exp(x); }
DEVICE_FN float flog(float x) { return metal::precise::log(x); }
DEVICE_FN float ftanh(float x) { return metal::precise::tanh(x); }
