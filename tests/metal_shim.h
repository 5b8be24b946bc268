// Metal's kernel built-ins for g++ (C++20), so that the source the package
// hands to mx.fast.metal_kernel runs on this CPU (metal_emulation.py).
//
// A threadgroup is emulated by one OS thread per Metal thread; groups run one
// after another, so `threadgroup` arrays become function statics, shared by the
// group's threads. threadgroup_barrier is a std::barrier over the group, and
// each SIMD-group function an exchange through 32 slots between two barriers of
// the SIMD group's 32 threads. What this cannot show: Metal's compiler, its
// math library's rounding, and timing.
#pragma once
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

typedef unsigned int uint;
struct uint3 {
  uint x, y, z;
};

// bfloat16 as Metal's: the upper half of a float32, rounded to nearest even
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) {
      bits = 0x7fc0;
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef _Float16 float16_t;
typedef _Float16 half;

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

namespace metal {
using std::max;
using std::min;
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float tanh(float x) { return std::tanh(x); }
}  // namespace precise
}  // namespace metal
using namespace metal;

// The group being run and the calling thread's place in it.
struct ShimGroup {
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> simd;
  std::vector<uint64_t> slots;  // 32 per SIMD group
  explicit ShimGroup(uint threads) : all(threads), slots(threads) {
    for (uint i = 0; i < threads / 32; ++i) {
      simd.push_back(std::make_unique<std::barrier<>>(32));
    }
  }
};
inline ShimGroup* shim_group = nullptr;
inline thread_local uint shim_lane = 0;
inline thread_local uint shim_simd = 0;

inline void threadgroup_barrier(mem_flags) { shim_group->all.arrive_and_wait(); }

// Every lane publishes x; f(values of lanes 0..31, lane) gives its result.
template <typename U, typename F>
U shim_simd_exchange(U x, F f) {
  static_assert(sizeof(U) <= 8);
  uint64_t* slots = shim_group->slots.data() + 32 * shim_simd;
  std::memcpy(&slots[shim_lane], &x, sizeof(U));
  shim_group->simd[shim_simd]->arrive_and_wait();
  U values[32];
  for (int i = 0; i < 32; ++i) {
    std::memcpy(&values[i], &slots[i], sizeof(U));
  }
  shim_group->simd[shim_simd]->arrive_and_wait();
  return f(values, shim_lane);
}

template <typename U>
U simd_shuffle(U x, uint source) {
  return shim_simd_exchange(x, [source](const U* v, uint) { return v[source & 31u]; });
}
template <typename U>
U simd_shuffle_xor(U x, uint mask) {
  return shim_simd_exchange(x, [mask](const U* v, uint lane) { return v[(lane ^ mask) & 31u]; });
}
template <typename U>
U simd_sum(U x) {
  return shim_simd_exchange(x, [](const U* v, uint) {
    U s = v[0];
    for (int i = 1; i < 32; ++i) s += v[i];
    return s;
  });
}
template <typename U>
U simd_min(U x) {
  return shim_simd_exchange(x, [](const U* v, uint) {
    U s = v[0];
    for (int i = 1; i < 32; ++i) s = v[i] < s ? v[i] : s;
    return s;
  });
}
template <typename U>
U simd_max(U x) {
  return shim_simd_exchange(x, [](const U* v, uint) {
    U s = v[0];
    for (int i = 1; i < 32; ++i) s = v[i] > s ? v[i] : s;
    return s;
  });
}
template <typename U>
U simd_prefix_inclusive_sum(U x) {
  return shim_simd_exchange(x, [](const U* v, uint lane) {
    U s = v[0];
    for (uint i = 1; i <= lane; ++i) s += v[i];
    return s;
  });
}
template <typename U>
U simd_prefix_exclusive_sum(U x) {
  return shim_simd_exchange(x, [](const U* v, uint lane) {
    U s = U(0);
    for (uint i = 0; i < lane; ++i) s += v[i];
    return s;
  });
}

// Runs `groups` threadgroups of `threads` threads, one group at a time;
// body(thread index in group, group index) runs one thread's kernel.
template <typename Body>
void shim_launch(uint groups, uint threads, Body body) {
  ShimGroup group(threads);
  shim_group = &group;
  std::vector<std::thread> pool;
  for (uint t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      shim_lane = t % 32;
      shim_simd = t / 32;
      for (uint g = 0; g < groups; ++g) {
        body(t, g);
        group.all.arrive_and_wait();  // the next group reuses the statics
      }
    });
  }
  for (auto& p : pool) p.join();
  shim_group = nullptr;
}

// Metal's address spaces and attributes, last: the shim's own code above uses
// `std::thread`. [[kernel]] becomes [[]]; [[buffer(i)]] and the thread
// attributes are unknown attributes to g++ (-Wno-attributes).
#define device
#define constant
#define thread
#define threadgroup static
#define kernel
