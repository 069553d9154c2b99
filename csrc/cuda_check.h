// Turn a failed CUDA runtime call into a C++ exception naming the call; pybind11
// turns it into a Python RuntimeError.
#pragma once
#ifdef FASTQLORA_WITH_CUDA
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define FQ_CUDA_CHECK(call)                                                        \
  do {                                                                             \
    cudaError_t fq_err_ = (call);                                                  \
    if (fq_err_ != cudaSuccess) {                                                  \
      throw std::runtime_error(std::string("CUDA error in ") + #call + " at " +    \
                               __FILE__ + ":" + std::to_string(__LINE__) + ": " +  \
                               cudaGetErrorString(fq_err_));                       \
    }                                                                              \
  } while (0)

// After a kernel launch: catches bad launch configurations without synchronizing.
#define FQ_CUDA_CHECK_LAUNCH(name)                                                 \
  do {                                                                             \
    cudaError_t fq_err_ = cudaGetLastError();                                      \
    if (fq_err_ != cudaSuccess) {                                                  \
      throw std::runtime_error(std::string("CUDA kernel launch failed: ") + name + \
                               ": " + cudaGetErrorString(fq_err_));                \
    }                                                                              \
  } while (0)
#endif
