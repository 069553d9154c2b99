// Python bindings of the NF4 functions: addresses, sizes, dtype codes and streams as
// integers. Validation of shapes and dtypes lives in fastqlora/quant.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "nf4.h"
#include "registry.h"

namespace py = pybind11;

namespace fq {
namespace {

template <typename T> T* as_ptr(int64_t p) { return reinterpret_cast<T*>(static_cast<uintptr_t>(p)); }

}  // namespace

void register_nf4(py::module_& m) {
  m.def("nf4_quantize_cpu", [](int64_t src, int64_t n, int dtype, int64_t blocksize, int64_t packed, int64_t absmax) {
    py::gil_scoped_release nogil;
    nf4_quantize_cpu(as_ptr<const void>(src), n, dtype, blocksize, as_ptr<uint8_t>(packed), as_ptr<float>(absmax));
  }, py::arg("src"), py::arg("n"), py::arg("dtype"), py::arg("blocksize"), py::arg("packed"), py::arg("absmax"));
  m.def("nf4_dequantize_cpu", [](int64_t packed, int64_t absmax, int64_t qabsmax, int64_t code2, int64_t absmax2,
                                 float offset, int64_t blocksize2, int64_t n, int64_t blocksize, int64_t out,
                                 int dtype) {
    py::gil_scoped_release nogil;
    nf4_dequantize_cpu(as_ptr<const uint8_t>(packed), as_ptr<const float>(absmax), as_ptr<const uint8_t>(qabsmax),
                       as_ptr<const float>(code2), as_ptr<const float>(absmax2), offset, blocksize2, n, blocksize,
                       as_ptr<void>(out), dtype);
  });
  m.def("quantize_blockwise8_cpu", [](int64_t src, int64_t n, int64_t code, int64_t blocksize, int64_t out,
                                      int64_t absmax) {
    py::gil_scoped_release nogil;
    quantize_blockwise8_cpu(as_ptr<const float>(src), n, as_ptr<const float>(code), blocksize, as_ptr<uint8_t>(out),
                            as_ptr<float>(absmax));
  });
#ifdef FASTQLORA_WITH_CUDA
  m.def("nf4_quantize_cuda", [](int64_t src, int64_t n, int dtype, int64_t blocksize, int64_t packed, int64_t absmax,
                                int64_t stream) {
    nf4_quantize_cuda(as_ptr<const void>(src), n, dtype, blocksize, as_ptr<uint8_t>(packed), as_ptr<float>(absmax),
                      stream);
  });
  m.def("nf4_dequantize_cuda", [](int64_t packed, int64_t absmax, int64_t qabsmax, int64_t code2, int64_t absmax2,
                                  float offset, int64_t blocksize2, int64_t n, int64_t blocksize, int64_t out,
                                  int dtype, int64_t stream) {
    nf4_dequantize_cuda(as_ptr<const uint8_t>(packed), as_ptr<const float>(absmax), as_ptr<const uint8_t>(qabsmax),
                        as_ptr<const float>(code2), as_ptr<const float>(absmax2), offset, blocksize2, n, blocksize,
                        as_ptr<void>(out), dtype, stream);
  });
  m.def("quantize_blockwise8_cuda", [](int64_t src, int64_t n, int64_t code, int64_t blocksize, int64_t out,
                                       int64_t absmax, int64_t stream) {
    quantize_blockwise8_cuda(as_ptr<const float>(src), n, as_ptr<const float>(code), blocksize, as_ptr<uint8_t>(out),
                             as_ptr<float>(absmax), stream);
  });
  m.def("nf4_dequantize_config", &nf4_dequantize_config, py::arg("bytes"), py::arg("unroll"),
        py::arg("blocks_per_sm"), py::arg("streaming"));
  m.def("nf4_dequantize_get_config", &nf4_dequantize_get_config);
  m.def("nf4_gemv_cuda", [](int64_t x, int64_t M, int64_t K, int64_t packed, int64_t code, int64_t absmax, int64_t qabsmax,
                            int64_t code2, int64_t absmax2, float offset, int64_t blocksize2, int64_t N, int64_t xa,
                            int64_t lora_b, int rank, float scale, int64_t bias, int64_t y, int dtype, int rows,
                            int warps, int split, int64_t stream) {
    nf4_gemv_cuda(as_ptr<const void>(x), M, K, as_ptr<const uint8_t>(packed), as_ptr<const float>(code),
                  as_ptr<const float>(absmax), as_ptr<const uint8_t>(qabsmax), as_ptr<const float>(code2),
                  as_ptr<const float>(absmax2), offset, blocksize2, N, as_ptr<const void>(xa),
                  as_ptr<const void>(lora_b), rank, scale, as_ptr<const void>(bias), as_ptr<void>(y), dtype, rows,
                  warps, split, stream);
  });
  m.def("nf4_decode_mma_cuda", [](int64_t x, int64_t M, int64_t K, int64_t packed, int64_t code, int64_t absmax,
                                  int64_t qabsmax, int64_t code2, int64_t absmax2, float offset, int64_t blocksize2,
                                  int64_t N, int64_t xa, int64_t xa_stride, int64_t lora_b, int rank, float scale,
                                  int64_t bias, int64_t y, int dtype, int split, int kb, bool cols, int groups,
                                  int rows, int64_t ws, int64_t counters, int64_t stream) {
    nf4_decode_mma_cuda(as_ptr<const void>(x), M, K, as_ptr<const uint8_t>(packed), as_ptr<const float>(code),
                        as_ptr<const float>(absmax), as_ptr<const uint8_t>(qabsmax), as_ptr<const float>(code2),
                        as_ptr<const float>(absmax2), offset, blocksize2, N, as_ptr<const void>(xa), xa_stride,
                        as_ptr<const void>(lora_b), rank, scale, as_ptr<const void>(bias), as_ptr<void>(y), dtype,
                        split, kb, cols, groups, rows, as_ptr<float>(ws), as_ptr<int>(counters), stream);
  });
  // parts: (packed, code, absmax, qabsmax, code2, absmax2, offset, blocksize2, N, xa, lora_b, rank, scale, bias, y)
  // for each weight of one launch
  using PartTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, int64_t, int64_t, int64_t,
                               int64_t, int, float, int64_t, int64_t>;
  m.def("nf4_decode_mma_parts_cuda", [](int64_t x, int64_t M, int64_t K, const std::vector<PartTuple>& parts,
                                        int64_t xa_stride, int dtype, int split, int kb, bool cols, int groups, int rows,
                                        int64_t ws, int64_t counters, int64_t stream) {
    std::vector<DecodeMmaPart> ps;
    for (const auto& t : parts) {
      ps.push_back(DecodeMmaPart{as_ptr<const uint8_t>(std::get<0>(t)), as_ptr<const float>(std::get<1>(t)),
                                 as_ptr<const float>(std::get<2>(t)), as_ptr<const uint8_t>(std::get<3>(t)),
                                 as_ptr<const float>(std::get<4>(t)), as_ptr<const float>(std::get<5>(t)), std::get<6>(t),
                                 std::get<7>(t), std::get<8>(t), as_ptr<const void>(std::get<9>(t)),
                                 as_ptr<const void>(std::get<10>(t)), std::get<11>(t), std::get<12>(t),
                                 as_ptr<const void>(std::get<13>(t)), as_ptr<void>(std::get<14>(t))});
    }
    nf4_decode_mma_cuda_parts(as_ptr<const void>(x), M, K, ps.data(), static_cast<int>(ps.size()), xa_stride, dtype,
                              split, kb, cols, groups, rows, as_ptr<float>(ws), as_ptr<int>(counters), stream);
  });
#endif
}

}  // namespace fq
