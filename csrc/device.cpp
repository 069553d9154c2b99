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

// Programmatic dependent launch for the decode kernels (pdl.cuh): on unless turned off, and
// only where the device is sm_90 or newer (an older one has no griddepcontrol).
static bool g_programmatic = true;

bool programmatic_launch() {
#ifdef FASTQLORA_WITH_CUDA
  if (!g_programmatic) return false;
  static int major[64] = {};  // per device: 0 not asked yet, else the compute capability's major
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (major[dev] == 0 && cudaDeviceGetAttribute(&major[dev], cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    major[dev] = 0;
    return false;
  }
  return major[dev] >= 9;
#else
  return false;
#endif
}

void set_programmatic_launch(bool on) { g_programmatic = on; }

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
  m.def("set_programmatic_launch", &set_programmatic_launch, pybind11::arg("on"),
        "Whether the decode kernels ask for programmatic dependent launch (on by default; sm_90+ only)");
  m.def("programmatic_launch", &programmatic_launch,
        "True when the decode kernels' launches on the current device ask for programmatic dependent launch");
}

}  // namespace fq
