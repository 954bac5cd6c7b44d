// RMSNorm forward and backward in CUDA C++, exposed to Python through pybind11 (no libtorch needed).
//
// y = x * rsqrt(mean(x^2) + eps) * w over rows of a contiguous (rows, cols) tensor; fp32, fp16 or bf16 (x, w and y
// of one dtype), fp32 arithmetic. One warp per row, eight rows per block, 128-bit loads where the row allows.
// Rows of up to 32 * 16 vectors (4096 bf16; 32 * 4 = 1024 bf16 in the backward) are held in registers: each lane
// loads its NV vectors of the row once (a 384-wide bf16 row is 48 vectors: two per lane), so x is read once.
// Backward: dx = rstd * (w*dy - xhat * mean(w*dy*xhat)); dweight = sum over rows of dy*xhat. A lane always owns the
// same columns, so it keeps its dweight sums in registers over every row its warp takes (grid-stride); the block's
// warps add theirs in shared memory once at the end, and a column-sum kernel with 32 x 32 threads per 32 columns
// adds the blocks' partial rows. Wider or unaligned rows take the generic loop kernels.
//
// Python passes raw device pointers (tensor.data_ptr()) and the CUDA stream; kernels/rmsnorm_cuda/rmsnorm_cuda.py
// owns allocation, dtype checks and autograd.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

constexpr int kWarpSize = 32;
constexpr int kRowsPerBlock = 8;          // warps per block; one row each
constexpr int kVecBytes = 16;             // 128-bit loads and stores
constexpr int kMaxBackwardCols = 12288;   // a block's dweight row (fp32) fits 48 KiB of shared memory
constexpr int kColumnSumCols = 32;        // column-sum block: 32 columns x 32 partial rows at a time
constexpr int kColumnSumRows = 32;
constexpr int kMaxRegisterVecs = 16;      // vectors per lane a row may take to stay in registers

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements moved as one aligned load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T, int VEC>
__global__ void rmsnorm_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                       float* __restrict__ rstd, int64_t rows, int cols, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const int n_vec = cols / VEC;
  const auto* xr = reinterpret_cast<const Vec<T, VEC>*>(x + row * cols);
  const auto* wr = reinterpret_cast<const Vec<T, VEC>*>(w);
  auto* yr = reinterpret_cast<Vec<T, VEC>*>(y + row * cols);

  float sum_sq = 0.f;
  for (int i = lane; i < n_vec; i += kWarpSize) {
    const Vec<T, VEC> a = xr[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float f = to_float(a.v[k]);
      sum_sq += f * f;
    }
  }
  const float r = rsqrtf(warp_sum(sum_sq) / cols + eps);
  if (lane == 0) rstd[row] = r;
  for (int i = lane; i < n_vec; i += kWarpSize) {
    const Vec<T, VEC> a = xr[i];
    const Vec<T, VEC> b = wr[i];
    Vec<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = from_float<T>(to_float(a.v[k]) * r * to_float(b.v[k]));
    yr[i] = out;
  }
}

// The row in registers: lane holds vectors lane, lane + 32, ... (NV of them, the last ones may lie past the row).
template <typename T, int VEC, int NV>
__global__ void rmsnorm_forward_reg_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                           float* __restrict__ rstd, int64_t rows, int cols, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const int n_vec = cols / VEC;
  const auto* xr = reinterpret_cast<const Vec<T, VEC>*>(x + row * cols);
  const auto* wr = reinterpret_cast<const Vec<T, VEC>*>(w);
  auto* yr = reinterpret_cast<Vec<T, VEC>*>(y + row * cols);

  Vec<T, VEC> a[NV];
  float sum_sq = 0.f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int i = lane + j * kWarpSize;
    if (i < n_vec) {
      a[j] = xr[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float f = to_float(a[j].v[k]);
        sum_sq += f * f;
      }
    }
  }
  const float r = rsqrtf(warp_sum(sum_sq) / cols + eps);
  if (lane == 0) rstd[row] = r;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int i = lane + j * kWarpSize;
    if (i < n_vec) {
      const Vec<T, VEC> b = wr[i];
      Vec<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = from_float<T>(to_float(a[j].v[k]) * r * to_float(b.v[k]));
      yr[i] = out;
    }
  }
}

// Grid-stride over rows, a warp per row, the row and the lane's dweight sums in registers; each block leaves its
// dweight partial sums in dw_partial[blockIdx.x, :].
template <typename T, int VEC, int NV>
__global__ void rmsnorm_backward_reg_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                            const T* __restrict__ w, const float* __restrict__ rstd,
                                            T* __restrict__ dx, float* __restrict__ dw_partial, int64_t rows,
                                            int cols) {
  extern __shared__ float dw_block[];  // (cols,)
  const int tid = threadIdx.y * kWarpSize + threadIdx.x;
  for (int c = tid; c < cols; c += kWarpSize * kRowsPerBlock) dw_block[c] = 0.f;
  __syncthreads();

  const int lane = threadIdx.x;
  const int n_vec = cols / VEC;
  const auto* wr = reinterpret_cast<const Vec<T, VEC>*>(w);
  float wf[NV][VEC];
  float dw[NV][VEC];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int i = lane + j * kWarpSize;
    Vec<T, VEC> b;
    if (i < n_vec) b = wr[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      wf[j][k] = i < n_vec ? to_float(b.v[k]) : 0.f;
      dw[j][k] = 0.f;
    }
  }
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const auto* xr = reinterpret_cast<const Vec<T, VEC>*>(x + row * cols);
    const auto* dyr = reinterpret_cast<const Vec<T, VEC>*>(dy + row * cols);
    auto* dxr = reinterpret_cast<Vec<T, VEC>*>(dx + row * cols);
    const float r = rstd[row];
    Vec<T, VEC> a[NV], g[NV];
    float dot = 0.f;  // sum of w*dy*xhat over the row
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int i = lane + j * kWarpSize;
      if (i < n_vec) {
        a[j] = xr[i];
        g[j] = dyr[i];
#pragma unroll
        for (int k = 0; k < VEC; ++k) dot += wf[j][k] * to_float(g[j].v[k]) * to_float(a[j].v[k]) * r;
      }
    }
    const float mean_dot = warp_sum(dot) / cols;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int i = lane + j * kWarpSize;
      if (i < n_vec) {
        Vec<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float xhat = to_float(a[j].v[k]) * r;
          const float gy = to_float(g[j].v[k]);
          out.v[k] = from_float<T>(r * (wf[j][k] * gy - xhat * mean_dot));
          dw[j][k] += gy * xhat;
        }
        dxr[i] = out;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int i = lane + j * kWarpSize;
    if (i < n_vec) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) atomicAdd(&dw_block[i * VEC + k], dw[j][k]);  // kRowsPerBlock-way, once
    }
  }
  __syncthreads();
  for (int c = tid; c < cols; c += kWarpSize * kRowsPerBlock) dw_partial[blockIdx.x * cols + c] = dw_block[c];
}

// Grid-stride over rows; each block leaves its dweight partial sums in dw_partial[blockIdx.x, :].
template <typename T, int VEC>
__global__ void rmsnorm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                        const float* __restrict__ rstd, T* __restrict__ dx,
                                        float* __restrict__ dw_partial, int64_t rows, int cols) {
  extern __shared__ float dw_block[];  // (cols,)
  const int tid = threadIdx.y * kWarpSize + threadIdx.x;
  for (int c = tid; c < cols; c += kWarpSize * kRowsPerBlock) dw_block[c] = 0.f;
  __syncthreads();

  const int lane = threadIdx.x;
  const int n_vec = cols / VEC;
  const auto* wr = reinterpret_cast<const Vec<T, VEC>*>(w);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const auto* xr = reinterpret_cast<const Vec<T, VEC>*>(x + row * cols);
    const auto* dyr = reinterpret_cast<const Vec<T, VEC>*>(dy + row * cols);
    auto* dxr = reinterpret_cast<Vec<T, VEC>*>(dx + row * cols);
    const float r = rstd[row];

    float dot = 0.f;  // sum of w*dy*xhat over the row
    for (int i = lane; i < n_vec; i += kWarpSize) {
      const Vec<T, VEC> a = xr[i], g = dyr[i], b = wr[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += to_float(b.v[k]) * to_float(g.v[k]) * to_float(a.v[k]) * r;
    }
    const float mean_dot = warp_sum(dot) / cols;

    for (int i = lane; i < n_vec; i += kWarpSize) {
      const Vec<T, VEC> a = xr[i], g = dyr[i], b = wr[i];
      Vec<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = to_float(a.v[k]) * r;
        const float gy = to_float(g.v[k]);
        out.v[k] = from_float<T>(r * (to_float(b.v[k]) * gy - xhat * mean_dot));
        atomicAdd(&dw_block[i * VEC + k], gy * xhat);
      }
      dxr[i] = out;
    }
  }
  __syncthreads();
  for (int c = tid; c < cols; c += kWarpSize * kRowsPerBlock) dw_partial[blockIdx.x * cols + c] = dw_block[c];
}

// Block (32, 32): 32 columns; thread (c, r) adds partial rows r, r + 32, ...; then the 32 sums of a column are
// added in shared memory.
template <typename T>
__global__ void column_sum_kernel(const float* __restrict__ partial, T* __restrict__ out, int n_partials, int cols) {
  __shared__ float sums[kColumnSumRows][kColumnSumCols + 1];
  const int c = blockIdx.x * kColumnSumCols + threadIdx.x;
  float s = 0.f;
  if (c < cols) {
    for (int p = threadIdx.y; p < n_partials; p += kColumnSumRows) s += partial[static_cast<int64_t>(p) * cols + c];
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.f;
#pragma unroll 8
    for (int r = 0; r < kColumnSumRows; ++r) total += sums[r][threadIdx.x];
    out[c] = from_float<T>(total);
  }
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

bool aligned(std::uintptr_t p) { return p % kVecBytes == 0; }

template <typename T>
void launch_forward(std::uintptr_t x, std::uintptr_t w, std::uintptr_t y, std::uintptr_t rstd, int64_t rows,
                    int cols, float eps, cudaStream_t stream) {
  constexpr int kVec = kVecBytes / sizeof(T);
  const dim3 block(kWarpSize, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
  auto args = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(w),
                                       reinterpret_cast<T*>(y), reinterpret_cast<float*>(rstd), rows, cols, eps);
  };
  const bool vec_ok = cols % kVec == 0 && aligned(x) && aligned(w) && aligned(y);
  const int per_lane = (cols / kVec + kWarpSize - 1) / kWarpSize;  // vectors per lane
  if (vec_ok && per_lane <= 1) {
    args(rmsnorm_forward_reg_kernel<T, kVec, 1>);
  } else if (vec_ok && per_lane <= 2) {
    args(rmsnorm_forward_reg_kernel<T, kVec, 2>);
  } else if (vec_ok && per_lane <= 4) {
    args(rmsnorm_forward_reg_kernel<T, kVec, 4>);
  } else if (vec_ok && per_lane <= 8) {
    args(rmsnorm_forward_reg_kernel<T, kVec, 8>);
  } else if (vec_ok && per_lane <= kMaxRegisterVecs) {
    args(rmsnorm_forward_reg_kernel<T, kVec, kMaxRegisterVecs>);
  } else if (vec_ok) {
    args(rmsnorm_forward_kernel<T, kVec>);
  } else {
    args(rmsnorm_forward_kernel<T, 1>);
  }
  check_cuda(cudaGetLastError(), "rmsnorm forward launch");
}

template <typename T>
void launch_backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t w, std::uintptr_t rstd, std::uintptr_t dx,
                     std::uintptr_t dw_partial, std::uintptr_t dw, int64_t rows, int cols, int n_blocks,
                     cudaStream_t stream) {
  constexpr int kVec = kVecBytes / sizeof(T);
  const dim3 block(kWarpSize, kRowsPerBlock);
  const size_t shared = static_cast<size_t>(cols) * sizeof(float);
  auto args = [&](auto kernel) {
    kernel<<<n_blocks, block, shared, stream>>>(
        reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(w),
        reinterpret_cast<const float*>(rstd), reinterpret_cast<T*>(dx), reinterpret_cast<float*>(dw_partial), rows,
        cols);
  };
  const bool vec_ok = cols % kVec == 0 && aligned(dy) && aligned(x) && aligned(w) && aligned(dx);
  const int per_lane = (cols / kVec + kWarpSize - 1) / kWarpSize;  // vectors per lane
  if (vec_ok && per_lane <= 1) {
    args(rmsnorm_backward_reg_kernel<T, kVec, 1>);
  } else if (vec_ok && per_lane <= 2) {
    args(rmsnorm_backward_reg_kernel<T, kVec, 2>);
  } else if (vec_ok && per_lane <= 4) {
    args(rmsnorm_backward_reg_kernel<T, kVec, 4>);
  } else if (vec_ok) {  // wider rows: 8 vectors per lane of x, dy, w and dweight spill (ptxas, sm_90, bf16)
    args(rmsnorm_backward_kernel<T, kVec>);
  } else {
    args(rmsnorm_backward_kernel<T, 1>);
  }
  check_cuda(cudaGetLastError(), "rmsnorm backward launch");
  column_sum_kernel<T><<<(cols + kColumnSumCols - 1) / kColumnSumCols, dim3(kColumnSumCols, kColumnSumRows), 0,
                         stream>>>(
      reinterpret_cast<const float*>(dw_partial), reinterpret_cast<T*>(dw), n_blocks, cols);
  check_cuda(cudaGetLastError(), "rmsnorm dweight column-sum launch");
}

void check_sizes(int64_t rows, int cols) {
  if (rows < 1 || cols < 1) {
    throw std::invalid_argument("rows and cols must be >= 1, got " + std::to_string(rows) + ", " +
                                std::to_string(cols));
  }
}

void forward(std::uintptr_t x, std::uintptr_t w, std::uintptr_t y, std::uintptr_t rstd, int64_t rows, int cols,
             float eps, int dtype, std::uintptr_t stream) {
  check_sizes(rows, cols);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return launch_forward<float>(x, w, y, rstd, rows, cols, eps, s);
    case kFloat16: return launch_forward<__half>(x, w, y, rstd, rows, cols, eps, s);
    case kBFloat16: return launch_forward<__nv_bfloat16>(x, w, y, rstd, rows, cols, eps, s);
    default: throw std::invalid_argument("dtype must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + std::to_string(dtype));
  }
}

void backward(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t w, std::uintptr_t rstd, std::uintptr_t dx,
              std::uintptr_t dw_partial, std::uintptr_t dw, int64_t rows, int cols, int n_blocks, int dtype,
              std::uintptr_t stream) {
  check_sizes(rows, cols);
  if (cols > kMaxBackwardCols) {
    throw std::invalid_argument("cols must be <= " + std::to_string(kMaxBackwardCols) + ", got " +
                                std::to_string(cols));
  }
  if (n_blocks < 1) throw std::invalid_argument("n_blocks must be >= 1, got " + std::to_string(n_blocks));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return launch_backward<float>(dy, x, w, rstd, dx, dw_partial, dw, rows, cols, n_blocks, s);
    case kFloat16: return launch_backward<__half>(dy, x, w, rstd, dx, dw_partial, dw, rows, cols, n_blocks, s);
    case kBFloat16:
      return launch_backward<__nv_bfloat16>(dy, x, w, rstd, dx, dw_partial, dw, rows, cols, n_blocks, s);
    default: throw std::invalid_argument("dtype must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + std::to_string(dtype));
  }
}

}  // namespace

PYBIND11_MODULE(rmsnorm_cuda_ext, m) {
  m.doc() = "RMSNorm forward/backward CUDA kernels over raw device pointers (see kernels/rmsnorm_cuda/rmsnorm_cuda.py)";
  m.attr("MAX_BACKWARD_COLS") = kMaxBackwardCols;
  m.attr("ROWS_PER_BLOCK") = kRowsPerBlock;
  m.attr("DTYPE_FLOAT32") = static_cast<int>(kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(kBFloat16);
  m.def("forward", &forward, "y = rmsnorm(x) * w; rstd saved per row", py::arg("x"), py::arg("w"), py::arg("y"),
        py::arg("rstd"), py::arg("rows"), py::arg("cols"), py::arg("eps"), py::arg("dtype"), py::arg("stream"));
  m.def("backward", &backward, "dx and dweight (through n_blocks fp32 partial rows)", py::arg("dy"), py::arg("x"),
        py::arg("w"), py::arg("rstd"), py::arg("dx"), py::arg("dw_partial"), py::arg("dw"), py::arg("rows"),
        py::arg("cols"), py::arg("n_blocks"), py::arg("dtype"), py::arg("stream"));
}
