// Programmatic dependent launch (Hopper, sm_90+) for the decode kernels.
//
// In a decode step each NF4 product is a few µs, and a good part of it is the time between
// one kernel's end and the next one's start. Launched with the programmatic-stream-
// serialization attribute, a kernel's blocks may be scheduled while the kernel before it on
// the stream is still running; each calls `pdl_wait` before it touches global memory, which
// returns once the earlier grids have finished and their writes are visible, so what overlaps
// is the launch and the block's setup, never a read of anything an earlier kernel writes.
// `pdl_allow_dependents` lets the next kernel start likewise. Without the attribute (an older
// GPU, or FASTQLORA_PDL=0) both are no-ops.
#pragma once
#include <cuda_runtime.h>

namespace fq {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether launches ask for programmatic dependent launch: on (the default) and the current
// device is sm_90 or newer (device.cpp, declared beside its registration in registry.h).
bool programmatic_launch();

// `kernel<<<grid, block, smem, stream>>>(args...)`, with the attribute when programmatic_launch().
template <typename... KArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic_launch() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

}  // namespace fq
