// Metal's side of the names the sampler kernel body uses (row_sampler.body).
// The body is written with Metal's own built-ins (simd_*, threadgroup_barrier,
// thread_index_in_simdgroup, ...); Metal needs only these few helpers.
#define DEVICE_FN inline
#define NEG_INF (-INFINITY)
#define POS_INF INFINITY
// The exponential and division per logit are the fast ones (a few ulps); the
// logarithms, a few per row, are precise.
DEVICE_FN float fexp(float x) { return metal::fast::exp(x); }
DEVICE_FN float fdiv(float x, float y) { return metal::fast::divide(x, y); }
DEVICE_FN float flog(float x) { return metal::precise::log(x); }
