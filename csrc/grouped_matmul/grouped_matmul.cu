// run_grouped_matmul: a setup kernel turns the device-resident group sizes into per-group problems (grouped_problems
// .cuh), then one persistent CUTLASS launch runs them all; the bias gradient is a segmented column sum.
#include "grouped_matmul/grouped_matmul.h"

#include <climits>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/convert.cuh"
#include "common/cuda_status.h"
#include "common/dispatch.h"
#include "grouped_matmul/grouped_problems.cuh"

namespace subq {
namespace {

using grouped_matmul::ColumnMajor;
using grouped_matmul::Problems;
using grouped_matmul::RowMajor;
using grouped_matmul::kOperands;

// ---- workspace ----------------------------------------------------------------------------------------------------

constexpr int64_t kWorkspaceAlign = 256;

int64_t aligned_up(int64_t bytes) { return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

// Problems G, plus problem G itself for the rows past the total (see ProblemPlan::tail).
int64_t problem_slots(const GroupedMatmulParams& p) { return p.groups + 1; }

bool forward_with_bias(const GroupedMatmulParams& p) { return p.product == GroupedProduct::kForward && p.bias; }

struct Workspace {
  Problems problems;
  int64_t* starts = nullptr;  // (G + 1,): the first row of each group, then the total
  char* zero_row = nullptr;   // n elements of zeros: the C operand of the tail problem when C is the bias
};

// One layout for grouped_matmul_workspace_bytes and run_grouped_matmul: problem sizes, 4 pointer arrays, 4
// leading-dimension arrays, the group starts, the zero row; each region 256-byte aligned. Returns the bytes; with
// a null p.workspace only the size is meaningful.
int64_t carve(const GroupedMatmulParams& p, Workspace& ws) {
  const int64_t slots = problem_slots(p);
  char* base = static_cast<char*>(p.workspace);
  int64_t offset = 0;
  auto take = [&](int64_t bytes) {
    char* region = base ? base + offset : nullptr;
    offset += aligned_up(bytes);
    return region;
  };
  ws.problems.sizes = reinterpret_cast<cutlass::gemm::GemmCoord*>(take(slots * sizeof(cutlass::gemm::GemmCoord)));
  for (int i = 0; i < kOperands; ++i) {
    ws.problems.ptr[i] = reinterpret_cast<void**>(take(slots * sizeof(void*)));
    ws.problems.ld[i] = reinterpret_cast<int64_t*>(take(slots * sizeof(int64_t)));
  }
  ws.starts = reinterpret_cast<int64_t*>(take((p.groups + 1) * sizeof(int64_t)));
  ws.zero_row = forward_with_bias(p) ? take(p.n * dtype_size(p.dtype)) : nullptr;
  return offset;
}

// ---- setup: group sizes -> problems ---------------------------------------------------------------------------------

// An operand's pointer for group g starting at row `start`: base + (start * per_row + g * per_group) elements.
// Row-sliced operands (x, dy, y, dx) move per row; per-group ones (w, bias, dw) per group.
struct OperandPlan {
  const char* base = nullptr;
  int64_t ld = 0;
  int64_t per_row = 0;
  int64_t per_group = 0;
};

// kGroupRows in m, n or k: that extent is the group's row count.
constexpr int64_t kGroupRows = -1;

struct ProblemPlan {
  int64_t m = 0, n = 0, k = 0;
  OperandPlan operand[kOperands];
  int element_size = 0;
  int64_t tokens = 0, groups = 0;
  const int64_t* group_sizes = nullptr;
  // Row-sliced outputs end with problem G: the rows past the total, with k = 0, so its epilogue writes
  // 1 * 0 + beta * C = 0 (C the zero row when beta = 1).
  bool tail = false;
  int64_t zero_row_bytes = 0;
};

constexpr int kSetupThreads = 256;
constexpr int kWarps = kSetupThreads / 32;

// Inclusive prefix sum of v over the block; `total` gets the block's sum.
__device__ int64_t block_inclusive_sum(int64_t v, int64_t& total) {
  __shared__ int64_t warp_sums[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int d = 1; d < 32; d *= 2) {
    const int64_t up = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += up;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  int64_t before = 0;
  total = 0;
  for (int w = 0; w < kWarps; ++w) {  // 8 warps: a serial sum is shorter than another scan
    if (w < warp) before += warp_sums[w];
    total += warp_sums[w];
  }
  __syncthreads();  // warp_sums is rewritten by the next call
  return before + v;
}

__device__ void write_problem(const ProblemPlan& plan, const Problems& out, const Workspace& ws, int64_t slot,
                              int64_t group, int64_t start, int64_t rows, bool tail) {
  auto extent = [&](int64_t planned) { return static_cast<int>(planned == kGroupRows ? rows : planned); };
  out.sizes[slot] = cutlass::gemm::GemmCoord(extent(plan.m), extent(plan.n), tail ? 0 : extent(plan.k));
  for (int i = 0; i < kOperands; ++i) {
    const OperandPlan& o = plan.operand[i];
    const char* ptr = o.base + (start * o.per_row + group * o.per_group) * plan.element_size;
    int64_t ld = o.ld;
    if (tail && i == grouped_matmul::kC && ws.zero_row) {
      ptr = ws.zero_row;
      ld = 0;
    }
    out.ptr[i][slot] = const_cast<char*>(ptr);
    out.ld[i][slot] = ld;
  }
}

// One block. Sizes are clamped (negative -> 0, groups end at row `tokens`) so no problem reaches past the rows.
__global__ void __launch_bounds__(kSetupThreads) setup_problems(ProblemPlan plan, Workspace ws) {
  int64_t carry = 0;  // rows of the groups before this chunk; each size is at most tokens, so no overflow
  for (int64_t chunk = 0; chunk < plan.groups; chunk += kSetupThreads) {
    const int64_t g = chunk + threadIdx.x;
    const int64_t size = g < plan.groups ? min(max(plan.group_sizes[g], int64_t(0)), plan.tokens) : 0;
    int64_t chunk_rows = 0;
    const int64_t end = carry + block_inclusive_sum(size, chunk_rows);
    if (g < plan.groups) {
      const int64_t start = min(end - size, plan.tokens);
      ws.starts[g] = start;
      write_problem(plan, ws.problems, ws, g, g, start, min(end, plan.tokens) - start, false);
    }
    carry += chunk_rows;
  }
  const int64_t total = min(carry, plan.tokens);
  if (threadIdx.x == 0) {
    ws.starts[plan.groups] = total;
    if (plan.tail) write_problem(plan, ws.problems, ws, plan.groups, 0, total, plan.tokens - total, true);
  }
  for (int64_t i = threadIdx.x; i < plan.zero_row_bytes; i += kSetupThreads) ws.zero_row[i] = 0;
}

// The three GEMM products in the paper's indices (x_g, dy_g the group's rows).
ProblemPlan plan_for(const GroupedMatmulParams& p) {
  auto rows_of = [](const void* ptr, int64_t ld) { return OperandPlan{static_cast<const char*>(ptr), ld, ld, 0}; };
  auto per_group = [](const void* ptr, int64_t ld, int64_t stride) {
    return OperandPlan{static_cast<const char*>(ptr), ld, 0, stride};
  };
  ProblemPlan plan;
  plan.element_size = dtype_size(p.dtype);
  plan.tokens = p.tokens;
  plan.groups = p.groups;
  plan.group_sizes = p.group_sizes;
  OperandPlan* op = plan.operand;
  switch (p.product) {
    case GroupedProduct::kForward:  // y_g (rows, n) = x_g (rows, k) · w_g (k, n) + bias_g
      plan.m = kGroupRows, plan.n = p.n, plan.k = p.k;
      op[grouped_matmul::kA] = rows_of(p.x, p.x_row_stride);
      op[grouped_matmul::kB] = per_group(p.w, p.n, p.k * p.n);
      op[grouped_matmul::kD] = rows_of(p.out, p.n);
      // ld 0 repeats the bias row down the rows of the tile.
      op[grouped_matmul::kC] = p.bias ? per_group(p.bias, 0, p.n) : op[grouped_matmul::kD];
      plan.tail = true;
      plan.zero_row_bytes = p.bias ? p.n * plan.element_size : 0;
      break;
    case GroupedProduct::kInputGrad:  // dx_g (rows, k) = dy_g (rows, n) · w_g^T (n, k), w_g^T column-major
      plan.m = kGroupRows, plan.n = p.k, plan.k = p.n;
      op[grouped_matmul::kA] = rows_of(p.dy, p.dy_row_stride);
      op[grouped_matmul::kB] = per_group(p.w, p.n, p.k * p.n);
      op[grouped_matmul::kD] = rows_of(p.out, p.k);
      op[grouped_matmul::kC] = op[grouped_matmul::kD];
      plan.tail = true;
      break;
    case GroupedProduct::kWeightGrad:  // dw_g (k, n) = x_g^T (k, rows) · dy_g (rows, n), x_g^T column-major
      plan.m = p.k, plan.n = p.n, plan.k = kGroupRows;
      op[grouped_matmul::kA] = rows_of(p.x, p.x_row_stride);
      op[grouped_matmul::kB] = rows_of(p.dy, p.dy_row_stride);
      op[grouped_matmul::kD] = per_group(p.out, p.n, p.k * p.n);
      op[grouped_matmul::kC] = op[grouped_matmul::kD];
      break;
    case GroupedProduct::kBiasGrad:  // only the group starts: empty problems, null pointers
      break;
  }
  return plan;
}

// ---- bias gradient: dbias[g] = column sums of dy over the group's rows --------------------------------------------

constexpr int kSumColumns = 32, kSumRowLanes = 8;

// A block sums 32 columns of one group: 8 row lanes stride down the rows (loads coalesced along the columns), then
// fold in a fixed order, so the result is deterministic.
template <typename T>
__global__ void __launch_bounds__(kSumColumns * kSumRowLanes)
    bias_grad(const T* dy, int64_t ld, const int64_t* starts, int64_t groups, int64_t n, T* dbias) {
  __shared__ float partial[kSumRowLanes][kSumColumns];
  const int64_t col = blockIdx.x * int64_t(kSumColumns) + threadIdx.x;
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    float sum = 0.f;
    if (col < n) {
      for (int64_t r = starts[g] + threadIdx.y; r < starts[g + 1]; r += kSumRowLanes) sum += to_float(dy[r * ld + col]);
    }
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && col < n) {
      float total = 0.f;
      for (int lane = 0; lane < kSumRowLanes; ++lane) total += partial[lane][threadIdx.x];
      dbias[g * n + col] = from_float<T>(total);
    }
    __syncthreads();
  }
}

template <typename T>
Status launch_bias_grad(const GroupedMatmulParams& p, const int64_t* starts, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.n + kSumColumns - 1) / kSumColumns),
                  static_cast<unsigned>(p.groups < 65535 ? p.groups : 65535));
  bias_grad<T><<<grid, dim3(kSumColumns, kSumRowLanes), 0, stream>>>(
      static_cast<const T*>(p.dy), p.dy_row_stride, starts, p.groups, p.n, static_cast<T*>(p.out));
  return launch_status();
}

// ---- dispatch -------------------------------------------------------------------------------------------------------

bool aligned(const void* ptr, int64_t ld, int vector, int element_size) {
  return reinterpret_cast<uintptr_t>(ptr) % (uintptr_t(vector) * element_size) == 0 && ld % vector == 0;
}

// Every vector load and store of the products stays inside a row when k and n are multiples of the vector width,
// and is aligned when the pointers and row strides are.
bool operands_aligned(const GroupedMatmulParams& p, int vector) {
  const int size = dtype_size(p.dtype);
  if (p.k % vector != 0 || p.n % vector != 0) return false;
  const bool x = p.product == GroupedProduct::kForward || p.product == GroupedProduct::kWeightGrad;
  const bool w = p.product == GroupedProduct::kForward || p.product == GroupedProduct::kInputGrad;
  const bool dy = p.product != GroupedProduct::kForward;
  const bool bias = p.product == GroupedProduct::kForward && p.bias;  // only the forward reads it
  return (!x || aligned(p.x, p.x_row_stride, vector, size)) && (!w || aligned(p.w, 0, vector, size)) &&
         (!dy || aligned(p.dy, p.dy_row_stride, vector, size)) && (!bias || aligned(p.bias, 0, vector, size)) &&
         aligned(p.out, 0, vector, size);
}

template <typename Family>
Status launch_product(GroupedProduct product, const Problems& problems, cudaStream_t stream) {
  switch (product) {
    case GroupedProduct::kForward:
      return grouped_matmul::launch_grouped_gemm<Family, RowMajor, RowMajor>(problems, stream);
    case GroupedProduct::kInputGrad:
      return grouped_matmul::launch_grouped_gemm<Family, RowMajor, ColumnMajor>(problems, stream);
    case GroupedProduct::kWeightGrad:
      return grouped_matmul::launch_grouped_gemm<Family, ColumnMajor, RowMajor>(problems, stream);
    case GroupedProduct::kBiasGrad: break;
  }
  return Status::kInvalidArgument;
}

int64_t out_elements(const GroupedMatmulParams& p) {
  switch (p.product) {
    case GroupedProduct::kForward: return p.tokens * p.n;
    case GroupedProduct::kInputGrad: return p.tokens * p.k;
    case GroupedProduct::kWeightGrad: return p.groups * p.k * p.n;
    case GroupedProduct::kBiasGrad: return p.groups * p.n;
  }
  return 0;
}

// CUTLASS problem extents are int and it rounds them up to tiles in int (kernel/gemm_grouped_problem_visitor.h,
// the K loop count, the problem visitor's 32-problem steps): the margin keeps those sums from overflowing.
// Input pointers may be null where their extents are 0 (empty tensors), so only the sizes are checked; the
// workspace must be 256-byte aligned (carve() lays out the zero row and descriptors from it).
bool valid(const GroupedMatmulParams& p) {
  constexpr int64_t kMax = INT_MAX - 256;
  return p.tokens >= 0 && p.groups >= 0 && p.k >= 0 && p.n >= 0 && p.tokens <= kMax && p.k <= kMax &&
         p.n <= kMax && p.groups <= kMax && p.workspace && reinterpret_cast<uintptr_t>(p.workspace) % 256 == 0;
}

}  // namespace

int64_t grouped_matmul_workspace_bytes(const GroupedMatmulParams& params) {
  GroupedMatmulParams p = params;
  p.workspace = nullptr;
  Workspace ws;
  return carve(p, ws);
}

int grouped_matmul_alignment(DType dtype, MathMode math) {
  int vector = 0;
  SUBQ_GEMM_FAMILY_SWITCH(dtype, math, Family, [&] {
    vector = Family::kAlignment;
    return Status::kSuccess;
  });
  return vector;
}

Status run_grouped_matmul(const GroupedMatmulParams& p, cudaStream_t stream) {
  if (out_elements(p) == 0) return Status::kSuccess;
  if (!valid(p)) return Status::kInvalidArgument;
  const bool gemm = p.product != GroupedProduct::kBiasGrad;
  if (gemm && !operands_aligned(p, grouped_matmul_alignment(p.dtype, p.math))) return Status::kMisaligned;
  Workspace ws;
  carve(p, ws);
  const int64_t slots = problem_slots(p);
  ws.problems.count = static_cast<int>(p.product == GroupedProduct::kWeightGrad ? p.groups : slots);
  ws.problems.add_c = forward_with_bias(p);
  setup_problems<<<1, kSetupThreads, 0, stream>>>(plan_for(p), ws);
  SUBQ_RETURN_IF_ERROR(launch_status());
  if (!gemm) return SUBQ_DTYPE_SWITCH(p.dtype, T, [&] { return launch_bias_grad<T>(p, ws.starts, stream); });
  return SUBQ_GEMM_FAMILY_SWITCH(p.dtype, p.math, Family, [&] {
    return launch_product<Family>(p.product, ws.problems, stream);
  });
}

}  // namespace subq
