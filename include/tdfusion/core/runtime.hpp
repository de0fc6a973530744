#pragma once
// Process-wide settings for programs that run the networks: CPU threads and the reuse of freed memory.

#include <torch/torch.h>

#include <algorithm>
#include <thread>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace tdfusion {

/// Sets LibTorch's intra-op threads, which also run tdfusion's CPU kernels: `threads`, or all cores for 0
/// (some LibTorch builds, Debian's among them, start with one).
inline void use_cpu_threads(int threads = 0) {
  torch::set_num_threads(threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

/// Keeps the memory of freed tensors in the process for reuse. glibc serves every allocation above 32 MB with
/// fresh pages from mmap and unmaps them on free, so each large intermediate of a forward pass (one 48-channel
/// 640 x 480 map is 59 MB) pays page faults and the kernel's zeroing of its pages: about half the time of a
/// ReFusion fusion at that size on two cores. After this call large blocks come from the heap and are reused;
/// the price is memory the process holds until it exits. Threads other than the main one allocate from their
/// own arenas, whose heaps hold at most 64 MB, so their larger blocks are still mapped and unmapped: this is
/// why fusion::TiledFusionOptions::parallel_tiles suits small tiles only. (Making every thread share the main
/// heap instead fragments it: an untiled 2048 x 2048 ReFusion fusion went from 7 s to 11-23 s.) Call once at
/// program start. No effect without glibc.
inline void reuse_freed_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_MAX, 0);         // no mmap-backed allocations: freed blocks return to the heap
  mallopt(M_TRIM_THRESHOLD, -1);  // and the heap is never trimmed (glibc: -1 disables trimming)
#endif
}

}  // namespace tdfusion
