// OffloadArena: the host slab, the side stream and the per-slot events (see offload.h),
// and its Python binding fastqlora._C.OffloadArena.
#include "offload.h"

#include <pybind11/stl.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "registry.h"

#ifdef FASTQLORA_WITH_CUDA
#include "cuda_check.h"
#endif

namespace fq {
namespace {

constexpr std::size_t kHostAlign = 4096;  // page alignment: the fastest memcpy / DMA source

std::size_t round_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }

#ifdef FASTQLORA_WITH_CUDA
// Events and streams belong to the device that is current when they are created.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FQ_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      FQ_CUDA_CHECK(cudaSetDevice(device));
    } else {
      previous_ = -1;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
};

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
#endif

}  // namespace

OffloadArena::OffloadArena(bool use_cuda, int device) : use_cuda_(use_cuda), device_(device) {
  if (!use_cuda_) return;
#ifdef FASTQLORA_WITH_CUDA
  DeviceGuard guard(device_);
  // Non-blocking: the side stream must not serialize with the legacy default stream,
  // which is where torch computes unless told otherwise.
  FQ_CUDA_CHECK(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
  FQ_CUDA_CHECK(cudaEventCreateWithFlags(&fence_, cudaEventDisableTiming));
  events_created_ += 1;
#else
  throw std::runtime_error(
      "OffloadArena(use_cuda=True): fastqlora._C was built without CUDA; rebuild it with nvcc "
      "on the PATH or offload CPU tensors");
#endif
}

OffloadArena::~OffloadArena() {
  // Errors are ignored here: a destructor must not throw, and at interpreter exit the
  // CUDA runtime may already be unloading.
#ifdef FASTQLORA_WITH_CUDA
  if (use_cuda_) {
    if (side_) cudaStreamSynchronize(side_);
    for (cudaEvent_t e : done_) cudaEventDestroy(e);
    for (cudaEvent_t e : ready_) cudaEventDestroy(e);
    if (fence_) cudaEventDestroy(fence_);
    if (slab_) cudaFreeHost(slab_);
    slab_ = nullptr;
    if (side_) cudaStreamDestroy(side_);
    return;
  }
#endif
  std::free(slab_);
}

void OffloadArena::free_slab() {
  if (!slab_) return;
#ifdef FASTQLORA_WITH_CUDA
  if (use_cuda_) {
    // Copies still in flight may touch the old slab: wait for the side stream only.
    FQ_CUDA_CHECK(cudaStreamSynchronize(side_));
    FQ_CUDA_CHECK(cudaFreeHost(slab_));
    slab_ = nullptr;
    capacity_ = 0;
    return;
  }
#endif
  std::free(slab_);
  slab_ = nullptr;
  capacity_ = 0;
}

bool OffloadArena::reserve(std::size_t nbytes) {
  if (nbytes <= capacity_) return false;
  const std::size_t size = round_up(nbytes, kHostAlign);
  // Free before allocating: holding both would double the peak of pinned memory.
  free_slab();
  slots_.clear();
#ifdef FASTQLORA_WITH_CUDA
  if (use_cuda_) {
    DeviceGuard guard(device_);
    void* p = nullptr;
    FQ_CUDA_CHECK(cudaHostAlloc(&p, size, cudaHostAllocPortable));
    slab_ = static_cast<unsigned char*>(p);
    capacity_ = size;
    allocations_ += 1;
    return true;
  }
#endif
  void* p = std::aligned_alloc(kHostAlign, size);
  if (!p) {
    throw std::runtime_error("OffloadArena.reserve: std::aligned_alloc of " + std::to_string(size) +
                             " bytes of host memory failed");
  }
  slab_ = static_cast<unsigned char*>(p);
  capacity_ = size;
  allocations_ += 1;
  return true;
}

void OffloadArena::set_slots(const std::vector<std::size_t>& offsets,
                             const std::vector<std::size_t>& sizes) {
  if (offsets.size() != sizes.size()) {
    throw std::invalid_argument("OffloadArena.set_slots: " + std::to_string(offsets.size()) +
                                " offsets but " + std::to_string(sizes.size()) + " sizes");
  }
  std::vector<Slot> slots(offsets.size());
  for (std::size_t i = 0; i < offsets.size(); ++i) {
    if (offsets[i] + sizes[i] > capacity_ || offsets[i] + sizes[i] < offsets[i]) {
      throw std::invalid_argument("OffloadArena.set_slots: slot " + std::to_string(i) + " [" +
                                  std::to_string(offsets[i]) + ", +" + std::to_string(sizes[i]) +
                                  ") does not fit the slab of " + std::to_string(capacity_) +
                                  " bytes; call reserve() first");
    }
    slots[i].offset = offsets[i];
    slots[i].size = sizes[i];
  }
#ifdef FASTQLORA_WITH_CUDA
  if (use_cuda_) {
    DeviceGuard guard(device_);
    while (done_.size() < slots.size()) {
      cudaEvent_t d = nullptr, r = nullptr;
      FQ_CUDA_CHECK(cudaEventCreateWithFlags(&d, cudaEventDisableTiming));
      done_.push_back(d);
      FQ_CUDA_CHECK(cudaEventCreateWithFlags(&r, cudaEventDisableTiming));
      ready_.push_back(r);
      events_created_ += 2;
    }
  }
#endif
  slots_ = std::move(slots);
}

const OffloadArena::Slot& OffloadArena::at(int slot) const {
  if (slot < 0 || slot >= static_cast<int>(slots_.size())) {
    throw std::out_of_range("OffloadArena: slot " + std::to_string(slot) + " is out of range (" +
                            std::to_string(slots_.size()) + " slots planned)");
  }
  return slots_[static_cast<std::size_t>(slot)];
}

OffloadArena::Slot& OffloadArena::at(int slot) {
  return const_cast<Slot&>(static_cast<const OffloadArena*>(this)->at(slot));
}

void OffloadArena::offload(int slot, std::uintptr_t device_ptr, std::size_t nbytes,
                           std::uintptr_t compute_stream) {
  Slot& s = at(slot);
  if (nbytes > s.size) {
    throw std::invalid_argument("OffloadArena.offload: " + std::to_string(nbytes) +
                                " bytes do not fit slot " + std::to_string(slot) + " of " +
                                std::to_string(s.size) + " bytes");
  }
  if (nbytes > 0 && device_ptr == 0) {
    throw std::invalid_argument("OffloadArena.offload: null source pointer");
  }
  unsigned char* host = slab_ + s.offset;
#ifdef FASTQLORA_WITH_CUDA
  if (use_cuda_) {
    // The side stream starts the copy only once the compute stream has produced the data.
    FQ_CUDA_CHECK(cudaEventRecord(fence_, as_stream(compute_stream)));
    FQ_CUDA_CHECK(cudaStreamWaitEvent(side_, fence_, 0));
    FQ_CUDA_CHECK(cudaMemcpyAsync(host, reinterpret_cast<const void*>(device_ptr), nbytes,
                                  cudaMemcpyDeviceToHost, side_));
    FQ_CUDA_CHECK(cudaEventRecord(done_[static_cast<std::size_t>(slot)], side_));
    s.filled = nbytes;
    offloads_ += 1;
    return;
  }
#endif
  (void)compute_stream;
  if (nbytes) std::memcpy(host, reinterpret_cast<const void*>(device_ptr), nbytes);
  s.filled = nbytes;
  offloads_ += 1;
}

void OffloadArena::prefetch(int slot, std::uintptr_t device_ptr, std::size_t nbytes,
                            std::uintptr_t compute_stream) {
  Slot& s = at(slot);
  if (nbytes > s.filled) {
    throw std::invalid_argument("OffloadArena.prefetch: slot " + std::to_string(slot) + " holds " +
                                std::to_string(s.filled) + " offloaded bytes but " +
                                std::to_string(nbytes) +
                                " were asked for (prefetch before offload, or a larger tensor)");
  }
  if (nbytes > 0 && device_ptr == 0) {
    throw std::invalid_argument("OffloadArena.prefetch: null destination pointer");
  }
  const unsigned char* host = slab_ + s.offset;
#ifdef FASTQLORA_WITH_CUDA
  if (use_cuda_) {
    // The destination was just handed out by the compute stream's allocator: its earlier
    // users on that stream must finish before the side stream overwrites it.
    FQ_CUDA_CHECK(cudaEventRecord(fence_, as_stream(compute_stream)));
    FQ_CUDA_CHECK(cudaStreamWaitEvent(side_, fence_, 0));
    FQ_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(device_ptr), host, nbytes,
                                  cudaMemcpyHostToDevice, side_));
    FQ_CUDA_CHECK(cudaEventRecord(ready_[static_cast<std::size_t>(slot)], side_));
    prefetches_ += 1;
    return;
  }
#endif
  (void)compute_stream;
  if (nbytes) std::memcpy(reinterpret_cast<void*>(device_ptr), host, nbytes);
  prefetches_ += 1;
}

void OffloadArena::wait_ready(int slot, std::uintptr_t compute_stream) {
  at(slot);
#ifdef FASTQLORA_WITH_CUDA
  if (use_cuda_) {
    FQ_CUDA_CHECK(cudaStreamWaitEvent(as_stream(compute_stream), ready_[static_cast<std::size_t>(slot)], 0));
  }
#endif
  (void)compute_stream;
}

void OffloadArena::wait_done(int slot, std::uintptr_t compute_stream) {
  at(slot);
#ifdef FASTQLORA_WITH_CUDA
  if (use_cuda_) {
    FQ_CUDA_CHECK(cudaStreamWaitEvent(as_stream(compute_stream), done_[static_cast<std::size_t>(slot)], 0));
  }
#endif
  (void)compute_stream;
}

#ifdef FASTQLORA_WITH_CUDA
namespace {
bool query(cudaEvent_t e) {
  cudaError_t err = cudaEventQuery(e);
  if (err == cudaSuccess) return true;
  if (err == cudaErrorNotReady) return false;
  FQ_CUDA_CHECK(err);  // throws, naming the failed query
  return false;
}
}  // namespace
#endif

bool OffloadArena::is_done(int slot) const {
  at(slot);
#ifdef FASTQLORA_WITH_CUDA
  if (use_cuda_) return query(done_[static_cast<std::size_t>(slot)]);
#endif
  return true;
}

bool OffloadArena::is_ready(int slot) const {
  at(slot);
#ifdef FASTQLORA_WITH_CUDA
  if (use_cuda_) return query(ready_[static_cast<std::size_t>(slot)]);
#endif
  return true;
}

void OffloadArena::synchronize() {
#ifdef FASTQLORA_WITH_CUDA
  if (use_cuda_) FQ_CUDA_CHECK(cudaStreamSynchronize(side_));
#endif
}

std::uintptr_t OffloadArena::side_stream() const {
#ifdef FASTQLORA_WITH_CUDA
  return reinterpret_cast<std::uintptr_t>(side_);
#else
  return 0;
#endif
}

void register_offload(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<OffloadArena>(m, "OffloadArena",
                           "One host slab for every layer's checkpoint, a side stream and events "
                           "a slot. Pointers, sizes and streams are integers.")
      .def(py::init<bool, int>(), py::arg("use_cuda"), py::arg("device") = 0)
      .def("reserve", &OffloadArena::reserve, py::arg("nbytes"),
           "Grow the slab to at least nbytes (never shrinks); True when it (re)allocated. "
           "Growing forgets the slot table.")
      .def("set_slots", &OffloadArena::set_slots, py::arg("offsets"), py::arg("sizes"))
      .def("offload", &OffloadArena::offload, py::arg("slot"), py::arg("device_ptr"),
           py::arg("nbytes"), py::arg("compute_stream"))
      .def("prefetch", &OffloadArena::prefetch, py::arg("slot"), py::arg("device_ptr"),
           py::arg("nbytes"), py::arg("compute_stream"))
      .def("wait_ready", &OffloadArena::wait_ready, py::arg("slot"), py::arg("compute_stream"))
      .def("wait_done", &OffloadArena::wait_done, py::arg("slot"), py::arg("compute_stream"))
      .def("is_done", &OffloadArena::is_done, py::arg("slot"))
      .def("is_ready", &OffloadArena::is_ready, py::arg("slot"))
      .def("synchronize", &OffloadArena::synchronize)
      .def("slot_offset", &OffloadArena::slot_offset, py::arg("slot"))
      .def("slot_size", &OffloadArena::slot_size, py::arg("slot"))
      .def("slot_filled", &OffloadArena::slot_filled, py::arg("slot"))
      .def(
          "slot_memory",
          [](OffloadArena& a, int slot) {
            // A view of the slot's offloaded bytes, valid until the slab grows (tests, debugging).
            std::size_t off = a.slot_offset(slot);
            auto* p = reinterpret_cast<unsigned char*>(a.host_ptr()) + off;
            return py::memoryview::from_memory(p, static_cast<py::ssize_t>(a.slot_filled(slot)));
          },
          py::arg("slot"))
      .def_property_readonly("use_cuda", &OffloadArena::use_cuda)
      .def_property_readonly("device", &OffloadArena::device)
      .def_property_readonly("capacity", &OffloadArena::capacity)
      .def_property_readonly("host_ptr", &OffloadArena::host_ptr)
      .def_property_readonly("side_stream", &OffloadArena::side_stream)
      .def_property_readonly("num_slots", &OffloadArena::num_slots)
      .def_property_readonly("allocations", &OffloadArena::allocations)
      .def_property_readonly("offloads", &OffloadArena::offloads)
      .def_property_readonly("prefetches", &OffloadArena::prefetches)
      .def_property_readonly("events_created", &OffloadArena::events_created);
}

}  // namespace fq
