// CUDA's side of the Metal names the sampler kernel body uses
// (row_sampler.body): a SIMD group is a warp (both 32 lanes), a threadgroup a
// block, threadgroup memory shared memory. With this prelude the one body
// compiles for mx.fast.cuda_kernel.
#define DEVICE_FN __device__ inline
#define NEG_INF (-__int_as_float(0x7f800000))
#define POS_INF __int_as_float(0x7f800000)
typedef unsigned int uint;

#define threadgroup __shared__
#define threadgroup_barrier(flags) __syncthreads()
#define thread_index_in_simdgroup (threadIdx.x & 31u)
#define simdgroup_index_in_threadgroup (threadIdx.x >> 5)
#define thread_position_in_threadgroup threadIdx
#define threadgroup_position_in_grid blockIdx
#define threads_per_threadgroup blockDim

// The exponential and division per logit are the fast ones (ex2.approx and
// rcp.approx, a few ulps for the sampler's arguments; 0 for a divisor past
// 2^126, as tanh needs); the logarithms, a few per row, are precise.
DEVICE_FN float fexp(float x) { return __expf(x); }
DEVICE_FN float fdiv(float x, float y) { return __fdividef(x, y); }
DEVICE_FN float flog(float x) { return logf(x); }

template <typename U> DEVICE_FN U simd_shuffle(U x, uint lane) { return __shfl_sync(0xffffffffu, x, lane); }
template <typename U> DEVICE_FN U simd_shuffle_xor(U x, uint mask) { return __shfl_xor_sync(0xffffffffu, x, mask); }
template <typename U> DEVICE_FN U simd_sum(U x) {
  for (uint o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <typename U> DEVICE_FN U simd_min(U x) {
  for (uint o = 16; o > 0; o >>= 1) { U y = __shfl_xor_sync(0xffffffffu, x, o); x = y < x ? y : x; }
  return x;
}
template <typename U> DEVICE_FN U simd_max(U x) {
  for (uint o = 16; o > 0; o >>= 1) { U y = __shfl_xor_sync(0xffffffffu, x, o); x = y > x ? y : x; }
  return x;
}
template <typename U> DEVICE_FN U simd_prefix_inclusive_sum(U x) {
  const uint lane = threadIdx.x & 31u;
  for (uint o = 1; o < 32; o <<= 1) { U y = __shfl_up_sync(0xffffffffu, x, o); if (lane >= o) x += y; }
  return x;
}
template <typename U> DEVICE_FN U simd_prefix_exclusive_sum(U x) { return simd_prefix_inclusive_sum(x) - x; }
