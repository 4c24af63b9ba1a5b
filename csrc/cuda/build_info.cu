// What the CUDA part of pyseg._C was compiled for.
#include <cuda_runtime_api.h>

#include <string>

namespace pyseg {

// CUDA runtime version the kernels were built with, e.g. "13.0".
std::string cuda_build_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

// Comma-separated virtual architectures nvcc compiled this file for, e.g. "800,900".
std::string cuda_build_archs() {
#ifdef __CUDA_ARCH_LIST__
#define PYSEG_STRINGIFY2(...) #__VA_ARGS__
#define PYSEG_STRINGIFY(...) PYSEG_STRINGIFY2(__VA_ARGS__)
  return PYSEG_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace pyseg
