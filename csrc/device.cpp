// Whether this build has CUDA, and the error text used when it does not.
#include "registry.h"

#include <stdexcept>
#include <string>

#ifdef FASTQLORA_WITH_CUDA
#include "cuda_check.h"
#endif

namespace fq {

bool built_with_cuda() {
#ifdef FASTQLORA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_runtime_version() {
#ifdef FASTQLORA_WITH_CUDA
  int v = 0;
  FQ_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return v;
#else
  return 0;
#endif
}

void register_device(pybind11::module_& m) {
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA sources were compiled in");
  m.def("cuda_runtime_version", &cuda_runtime_version,
        "CUDA runtime version linked into the module (0 without CUDA)");
}

}  // namespace fq
