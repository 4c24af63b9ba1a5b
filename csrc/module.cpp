// pyseg._C: the Python module that carries pyseg's ops (registered with TORCH_LIBRARY in the
// csrc/ops, csrc/cpu and csrc/cuda files) and reports what was compiled.
#include <torch/extension.h>

#include <string>

#ifdef PYSEG_WITH_CUDA
namespace pyseg {
std::string cuda_build_version();
std::string cuda_build_archs();
at::Tensor device_error_flag_tensor(int64_t device_index);
}  // namespace pyseg
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
  info["torch_version"] = std::string(PYSEG_TORCH_VERSION);
#ifdef PYSEG_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = pyseg::cuda_build_version();
  info["cuda_archs"] = pyseg::cuda_build_archs();
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = "";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyseg native ops (torch.ops.pyseg.*)";
  m.def("build_info", &build_info, "What this build of pyseg._C was compiled with.");
#ifdef PYSEG_WITH_CUDA
  m.def("device_error_flag", &pyseg::device_error_flag_tensor, pybind11::arg("device_index"),
        "int32 Tensor[1] on that CUDA device: bits of bad input values the CUDA kernels met (device_errors.h).");
#endif
}
