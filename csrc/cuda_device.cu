#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"

namespace r1fast {

int cuda_device_count_or_throw() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    throw std::runtime_error(std::string("r1fast._C: no usable CUDA device: ") + cudaGetErrorString(err));
  }
  return n;
}

void require_cuda(const char* op) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0) {
    cudaGetLastError();
    throw std::runtime_error(std::string("r1fast._C.") + op + ": called on a machine without a usable CUDA device (" +
                             (err != cudaSuccess ? cudaGetErrorString(err) : "no devices") + ")");
  }
}

void check_launch(const char* op) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + " launch failed: " + cudaGetErrorString(err));
}

}  // namespace r1fast
