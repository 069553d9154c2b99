// The activation-offload arena: one host slab holding every decoder layer's checkpoint
// (pinned with CUDA, plain aligned memory otherwise), a side stream and two events a slot.
// Python plans the sizes and offsets (fastqlora/offload_plan.py); this class moves bytes and
// orders the copies against the caller's compute stream with events, never with a
// device-wide synchronize.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#ifdef FASTQLORA_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fq {

class OffloadArena {
 public:
  // use_cuda=false gives the host build of the same object: copies are synchronous
  // memcpy between host buffers, events are no-ops, so planning and ordering run in CI.
  OffloadArena(bool use_cuda, int device);
  ~OffloadArena();
  OffloadArena(const OffloadArena&) = delete;
  OffloadArena& operator=(const OffloadArena&) = delete;

  // Grow the slab to at least nbytes; never shrinks. Returns true when it (re)allocated.
  // Growing drops the old contents and the slot table (the caller re-plans).
  bool reserve(std::size_t nbytes);
  // Place the slots: slot i is [offsets[i], offsets[i] + sizes[i]) inside the slab.
  void set_slots(const std::vector<std::size_t>& offsets, const std::vector<std::size_t>& sizes);

  // device -> host on the side stream, after the work already queued on compute_stream.
  void offload(int slot, std::uintptr_t device_ptr, std::size_t nbytes, std::uintptr_t compute_stream);
  // host -> device on the side stream, after the work already queued on compute_stream
  // (so the destination's earlier users are done); records the slot's ready event.
  void prefetch(int slot, std::uintptr_t device_ptr, std::size_t nbytes, std::uintptr_t compute_stream);
  void wait_ready(int slot, std::uintptr_t compute_stream);  // compute waits for the prefetch
  void wait_done(int slot, std::uintptr_t compute_stream);   // compute waits for the offload
  bool is_done(int slot) const;                               // offload finished (non-blocking)
  bool is_ready(int slot) const;                              // prefetch finished (non-blocking)
  void synchronize();  // block the host until the side stream is idle (tests, teardown)

  bool use_cuda() const { return use_cuda_; }
  int device() const { return device_; }
  std::size_t capacity() const { return capacity_; }
  std::uintptr_t host_ptr() const { return reinterpret_cast<std::uintptr_t>(slab_); }
  std::uintptr_t side_stream() const;
  int num_slots() const { return static_cast<int>(slots_.size()); }
  std::size_t slot_offset(int slot) const { return at(slot).offset; }
  std::size_t slot_size(int slot) const { return at(slot).size; }
  std::size_t slot_filled(int slot) const { return at(slot).filled; }
  std::int64_t allocations() const { return allocations_; }
  std::int64_t offloads() const { return offloads_; }
  std::int64_t prefetches() const { return prefetches_; }
  std::int64_t events_created() const { return events_created_; }

 private:
  struct Slot {
    std::size_t offset = 0;
    std::size_t size = 0;
    std::size_t filled = 0;  // bytes written by the last offload (0: nothing to prefetch)
  };
  const Slot& at(int slot) const;
  Slot& at(int slot);
  void free_slab();

  bool use_cuda_;
  int device_;
  unsigned char* slab_ = nullptr;
  std::size_t capacity_ = 0;
  std::vector<Slot> slots_;
  std::int64_t allocations_ = 0;
  std::int64_t offloads_ = 0;
  std::int64_t prefetches_ = 0;
  std::int64_t events_created_ = 0;
#ifdef FASTQLORA_WITH_CUDA
  cudaStream_t side_ = nullptr;
  cudaEvent_t fence_ = nullptr;  // marks "compute work so far" for the side stream to wait on
  // Slot i's events; kept when the slot table is re-planned, created only for new slots.
  std::vector<cudaEvent_t> done_, ready_;
#endif
};

}  // namespace fq
