// Metal's kernel built-ins for g++ (C++20), so that the source the package
// hands to mx.fast.metal_kernel runs on this CPU (metal_emulation.py).
//
// A threadgroup is emulated by one fiber per Metal thread; groups run one
// after another, so `threadgroup` arrays become function statics, shared by the
// group's threads. threadgroup_barrier is a barrier over the group, and each
// SIMD-group function an exchange through 32 slots between two barriers of the
// SIMD group's 32 threads. What this cannot show: Metal's compiler, its
// math library's rounding, and timing.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
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
inline float log(float x) { return std::log(x); }
}  // namespace precise
namespace fast {  // as precise here: the shim does not model Metal's approximations
inline float exp(float x) { return std::exp(x); }
inline float divide(float x, float y) { return x / y; }
}  // namespace fast
}  // namespace metal
using namespace metal;

// The emulated threads are fibers (ucontext) taking turns on one OS thread:
// a barrier is a yield until every participant has arrived, far cheaper than
// waking OS threads on a 2-core machine.
struct ShimBarrier {
  uint count;
  uint arrived = 0;
  uint64_t generation = 0;
};
struct ShimFiber {
  ucontext_t context;  // to enter the fiber the first time
  jmp_buf resume;      // then _setjmp / _longjmp, which make no system call
  std::vector<char> stack;
  uint index = 0;
  bool started = false;
  bool done = false;
};
struct ShimGroup {
  ShimBarrier all;
  std::vector<ShimBarrier> simd;
  std::vector<uint64_t> slots;  // 32 per SIMD group
  explicit ShimGroup(uint threads) : all{threads}, simd(threads / 32, ShimBarrier{32}), slots(threads) {}
};
inline ShimGroup* shim_group = nullptr;
inline ShimFiber* shim_fiber = nullptr;
inline jmp_buf shim_scheduler;
inline uint shim_lane = 0;
inline uint shim_simd = 0;
inline std::function<void(uint)> shim_body;  // runs one thread's kernels for every group

inline void shim_yield() {
  if (!_setjmp(shim_fiber->resume)) {
    _longjmp(shim_scheduler, 1);
  }
}

inline void shim_arrive_and_wait(ShimBarrier& b) {
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  const uint64_t generation = b.generation;
  while (b.generation == generation) {
    shim_yield();
  }
}

inline void threadgroup_barrier(mem_flags) { shim_arrive_and_wait(shim_group->all); }

// Every lane publishes x; f(values of lanes 0..31, lane) gives its result.
template <typename U, typename F>
U shim_simd_exchange(U x, F f) {
  static_assert(sizeof(U) <= 8);
  uint64_t* slots = shim_group->slots.data() + 32 * shim_simd;
  std::memcpy(&slots[shim_lane], &x, sizeof(U));
  shim_arrive_and_wait(shim_group->simd[shim_simd]);
  U values[32];
  for (int i = 0; i < 32; ++i) {
    std::memcpy(&values[i], &slots[i], sizeof(U));
  }
  const uint lane = shim_lane;
  shim_arrive_and_wait(shim_group->simd[shim_simd]);
  return f(values, lane);
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

inline void shim_fiber_main() {
  shim_body(shim_fiber->index);
  shim_fiber->done = true;
  _longjmp(shim_scheduler, 1);
}

// Runs `groups` threadgroups of `threads` threads, one group at a time;
// body(thread index in group, group index) runs one thread's kernel.
template <typename Body>
void shim_launch(uint groups, uint threads, Body body) {
  ShimGroup group(threads);
  shim_group = &group;
  shim_body = [&](uint t) {
    for (uint g = 0; g < groups; ++g) {
      body(t, g);
      shim_arrive_and_wait(group.all);  // the next group reuses the statics
    }
  };
  std::vector<ShimFiber> fibers(threads);
  for (uint t = 0; t < threads; ++t) {
    ShimFiber& f = fibers[t];
    f.index = t;
    f.stack.resize(1 << 16);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = nullptr;
    makecontext(&f.context, shim_fiber_main, 0);
  }
  for (uint finished = 0; finished < threads;) {
    finished = 0;
    for (ShimFiber& f : fibers) {
      if (f.done) {
        ++finished;
        continue;
      }
      shim_fiber = &f;
      shim_lane = f.index % 32;
      shim_simd = f.index / 32;
      if (!_setjmp(shim_scheduler)) {
        if (f.started) {
          _longjmp(f.resume, 1);
        }
        f.started = true;
        setcontext(&f.context);
      }
    }
  }
  shim_group = nullptr;
}

// Metal's address spaces and attributes, last: the shim's own code above must
// not see them (`thread` is a word of C++ libraries too). [[kernel]] becomes [[]]; [[buffer(i)]] and the thread
// attributes are unknown attributes to g++ (-Wno-attributes).
#define device
#define constant
#define thread
#define threadgroup static
#define kernel
