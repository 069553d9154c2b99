// Each component of fastqlora._C registers its functions through one of these.
// The bindings take integers for pointers, sizes and CUDA streams (never torch
// tensors), so one build of the module serves any torch version.
#pragma once
#include <pybind11/pybind11.h>

namespace fq {
void register_device(pybind11::module_& m);
void register_nf4(pybind11::module_& m);
void register_offload(pybind11::module_& m);
}  // namespace fq
