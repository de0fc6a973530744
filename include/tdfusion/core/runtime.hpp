#pragma once
// Process-wide settings for programs that run the networks: CPU threads and the reuse of freed memory.

#include <c10/core/CPUAllocator.h>
#include <torch/torch.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <utility>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace tdfusion {

/// Sets LibTorch's intra-op threads, which also run tdfusion's CPU kernels: `threads`, or all cores for 0
/// (some LibTorch builds, Debian's among them, start with one), unless the count is that already (as the
/// environment, e.g. OMP_NUM_THREADS, can make it). Each setting recreates LibTorch's pthreadpool, whose fresh
/// worker busy-waits for tens of milliseconds on a core the first forward pass needs. So the calling thread's
/// one-off thread setup runs first: done later, by its first parallel loop, it would set the count once more
/// (measured: 12 ms instead of 4 ms for a tiny first ReFusion pass on two cores).
inline void use_cpu_threads(int threads = 0) {
  at::internal::lazy_init_num_threads();
  const int wanted = threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (at::get_num_threads() != wanted) torch::set_num_threads(wanted);
}

namespace detail {

/// Blocks of at least kMinBytes carved from one span of address space reserved for them: best fit, a freed
/// block coalesced with its free neighbours and kept, pages and all, for the next request. Thread-safe.
class BlockRegion {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;
  static constexpr size_t kGranule = 4096;

  /// Reserves `capacity` bytes of address space (no memory until touched); an empty region if that fails.
  explicit BlockRegion(size_t capacity) {
    void* base = mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base != MAP_FAILED) {
      base_ = static_cast<char*>(base);
      capacity_ = capacity;
    }
  }
  BlockRegion(const BlockRegion&) = delete;
  BlockRegion& operator=(const BlockRegion&) = delete;
  ~BlockRegion() {
    if (base_ != nullptr) munmap(base_, capacity_);
  }

  /// A block of at least `bytes` (64-byte aligned), or nullptr when the region cannot hold it. Pages that no
  /// block held before are made resident at once (populate).
  void* allocate(size_t bytes) {
    if (bytes > capacity_) return nullptr;
    const size_t size = (bytes + kGranule - 1) / kGranule * kGranule;
    size_t offset = 0, fresh = 0;  // fresh: the block's last bytes, beyond the region's old top
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      offset = top_;
      const auto best = by_size_.lower_bound({size, 0});
      if (best != by_size_.end()) {
        const auto [free_size, free_offset] = *best;
        offset = free_offset;
        erase_free(free_offset, free_size);
        if (free_size > size) insert_free(offset + size, free_size - size);
      } else {
        // Beyond the top; a free block ending there is extended rather than left behind.
        const auto last = by_offset_.empty() ? by_offset_.end() : std::prev(by_offset_.end());
        const bool extend = last != by_offset_.end() && last->first + last->second == top_;
        if (extend) offset = last->first;
        if (capacity_ - offset < size) return nullptr;
        if (extend) erase_free(last->first, last->second);
        fresh = offset + size - top_;
        top_ = offset + size;
      }
      used_.emplace(offset, size);
    }
    populate(base_ + offset + size - fresh, fresh);
    return base_ + offset;
  }

  /// Takes a block back; false when `data` is not one of the region's blocks.
  bool release(void* data) {
    char* const block = static_cast<char*>(data);
    if (base_ == nullptr || block < base_ || block >= base_ + capacity_) return false;
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto used = used_.find(static_cast<size_t>(block - base_));
    if (used == used_.end()) return false;
    size_t offset = used->first, size = used->second;
    used_.erase(used);
    if (const auto next = by_offset_.find(offset + size); next != by_offset_.end()) {
      size += next->second;
      erase_free(next->first, next->second);
    }
    if (const auto after = by_offset_.lower_bound(offset); after != by_offset_.begin()) {
      const auto before = std::prev(after);
      if (before->first + before->second == offset) {
        offset = before->first;
        size += before->second;
        erase_free(before->first, before->second);
      }
    }
    insert_free(offset, size);
    return true;
  }

  /// Bytes of the region ever handed out: what its blocks add to the process's memory at most.
  size_t high_water() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return top_;
  }

 private:
  void insert_free(size_t offset, size_t size) {
    by_offset_.emplace(offset, size);
    by_size_.emplace(size, offset);
  }
  void erase_free(size_t offset, size_t size) {
    by_offset_.erase(offset);
    by_size_.erase({size, offset});
  }
  /// Makes fresh pages resident in one system call rather than one page fault per 4 KB page as the block is
  /// first written. Where faults are costly (virtual machines that trap each one to the hypervisor) they are
  /// most of a first forward pass's extra time: on a 2-core AMD EPYC (Zen 5) VM, where a fault costs about
  /// 7 us, a 640 x 480 ReFusion fusion in a fresh process takes 0.35 s instead of 0.42 s (warm passes
  /// 0.26-0.28 s); where faults are cheap, no change. The kernel may decline (before Linux 5.14, or short of
  /// memory): the pages then fault in as they are written. Called outside the lock: no one else holds a
  /// fresh block yet.
  static void populate(char* begin, size_t bytes) {
#ifdef MADV_POPULATE_WRITE
    if (bytes > 0) madvise(begin, bytes, MADV_POPULATE_WRITE);
#else
    (void)begin, (void)bytes;
#endif
  }

  std::mutex mutex_;
  char* base_ = nullptr;
  size_t capacity_ = 0, top_ = 0;
  std::map<size_t, size_t> by_offset_;                // free blocks: offset -> size
  std::set<std::pair<size_t, size_t>> by_size_;       // free blocks: (size, offset)
  std::unordered_map<size_t, size_t> used_;           // blocks handed out: offset -> size
};

/// LibTorch's CPU allocator with blocks of 1 MiB and more from one BlockRegion as large as the machine's
/// memory, smaller ones (and any the region cannot hold) from LibTorch's default allocator.
class ReusingCpuAllocator final : public c10::Allocator {
 public:
  // No `override`: LibTorch 2.x made allocate non-const and added copy_data; each version's Allocator finds
  // the functions it declares.
  c10::DataPtr allocate(size_t bytes) const { return allocate_block(bytes); }
  c10::DataPtr allocate(size_t bytes) { return allocate_block(bytes); }
  void copy_data(void* dest, const void* src, size_t count) const { std::memcpy(dest, src, count); }
  c10::DeleterFnPtr raw_deleter() const { return &release; }

  /// The region, created on first use and never destroyed (tensors may be freed during static destruction).
  static BlockRegion& region() {
    static BlockRegion* const region =
        new BlockRegion(static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGESIZE)));
    return *region;
  }

 private:
  static c10::DataPtr allocate_block(size_t bytes) {
    if (bytes >= BlockRegion::kMinBytes) {
      if (void* data = region().allocate(bytes)) return {data, data, &release, c10::Device(c10::kCPU)};
    }
    return c10::GetDefaultCPUAllocator()->allocate(bytes);
  }
  static void release(void* data) {
    if (!region().release(data)) c10::GetDefaultCPUAllocator()->raw_deleter()(data);
  }
};

}  // namespace detail

/// Keeps the memory of freed tensors in the process for reuse; call once at program start. Tensors of 1 MiB
/// and more (feature maps) come from a region of their own, best fit with freed blocks coalesced and kept
/// (detail::ReusingCpuAllocator, installed as LibTorch's CPU allocator), whose new pages are made resident in
/// one system call as the region grows (BlockRegion::populate); other allocations from glibc's heap,
/// with mmap-backed blocks turned off and trimming too, so freed memory returns to the heap. Without this,
/// glibc maps every block above its mmap threshold afresh and unmaps it on free, so each large
/// intermediate of a forward pass pays page faults and the kernel's zeroing of its pages (about half the time
/// of a 640 x 480 ReFusion fusion on two cores); and with feature maps in the heap instead, the small
/// allocations between them fragment it: that fusion, whose feature maps take at most 115 MB at a time,
/// grew the heap by 240-300 MB, depending on where a few small blocks happened to land. The price is memory
/// the process holds until it exits.
inline void reuse_freed_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_MAX, 0);         // no mmap-backed allocations: freed blocks return to the heap
  mallopt(M_TRIM_THRESHOLD, -1);  // and the heap is never trimmed (glibc: -1 disables trimming)
#endif
  static detail::ReusingCpuAllocator* const allocator = new detail::ReusingCpuAllocator();  // outlives every tensor
  c10::SetCPUAllocator(allocator, /*priority=*/1);
}

}  // namespace tdfusion
