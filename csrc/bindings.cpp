// The pybind11 module fastqlora._C: one registration call per component.
#include "registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastqlora compiled core: NF4 quantization and the activation-offload arena";
  fq::register_device(m);
  fq::register_nf4(m);
  fq::register_offload(m);
}
