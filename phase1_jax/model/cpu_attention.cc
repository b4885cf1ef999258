// Fused softmax attention for XLA:CPU, float32, as two XLA FFI handlers (forward, backward).
//
// The `fused_cpu` attention kind (attention.py) calls these through jax.ffi; cpu_attention.py
// compiles this file with the host's C++ compiler on first use. Layouts are the model's:
// q [B, T, N, H], k and v [B, S, N, H], lengths [B] int32 (keys [0, length) are valid), and the
// forward's log-sum-exp [B, N, T]. Query i sits at key position i + S - T (causal).
//
// Why a kernel: XLA:CPU writes the B x N x T x S scores and probabilities to memory several times
// per step and computes the masked upper half of causal attention. Here each (batch row, head)
// is done in L2-sized blocks of query rows, keys past the causal limit are skipped, and the
// backward pass recomputes the probabilities from the saved log-sum-exp (as FlashAttention-2).
//
// Each query row attends a prefix of the keys, [0, L_i) with L_i = min(length, i + S - T + 1)
// (causal) or length. A row with L_i = 0 gets the plain average of all S values, as the dense
// reference gives for a fully masked row (its scores all equal the finite mask value).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
// The same vector with the alignment of one float: loads and stores at any float address.
typedef float vfu __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
inline vf splat(float x) { return vf{} + x; }
inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

// exp(x) for x <= 0 (softmax arguments), Cephes' polynomial after reducing by powers of two;
// about 2 ulp. Below -87 (e^-87 ~ 1.6e-38) it returns 0.
inline vf exp_nonpositive(vf x) {
  const vi underflow = x < splat(-87.0f);
  x = underflow ? splat(-87.0f) : x;
  const vf t = x * splat(1.44269504088896341f) + splat(0.5f);
  vf n = __builtin_convertvector(__builtin_convertvector(t, vi), vf);   // toward zero
  n = n > t ? n - splat(1.0f) : n;                                         // floor
  vf r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? vf{} : p * scale;
}

const vi kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

inline float hsum(vf x) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += x[l];
  return s;
}

inline float hmax(vf x) {
  float m = x[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, x[l]);
  return m;
}

// C[M x N] (+)= A[M x K] B[K x N], row-major with leading dimensions; N a multiple of kLanes.
// With kTransA, A is stored transposed ([K x M], element (m, k) at A[k * lda + m]): A's
// elements are only ever broadcast one at a time, so either layout reads as fast.
// Register tiles of 4 rows x 64 columns (16 vector accumulators): per step of k, 4 loads of B,
// 4 broadcasts of A, 16 fused multiply-adds.
template <bool kTransA, int kRows, int kVecs>
inline void tile(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc,
                 bool accumulate) {
  vf acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kVecs; ++c)
      acc[r][c] = accumulate ? load(C + r * ldc + c * kLanes) : vf{};
  for (int k = 0; k < K; ++k) {
    vf b[kVecs];
    for (int c = 0; c < kVecs; ++c) b[c] = load(B + k * ldb + c * kLanes);
    for (int r = 0; r < kRows; ++r) {
      vf a = splat(kTransA ? A[k * lda + r] : A[r * lda + k]);
      for (int c = 0; c < kVecs; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kVecs; ++c) store(C + r * ldc + c * kLanes, acc[r][c]);
}

template <bool kTransA, int kRows>
inline void row_tiles(int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
                      int ldc, bool accumulate) {
  int n = 0;
  for (; n + 4 * kLanes <= N; n += 4 * kLanes)
    tile<kTransA, kRows, 4>(K, A, lda, B + n, ldb, C + n, ldc, accumulate);
  for (; n < N; n += kLanes)
    tile<kTransA, kRows, 1>(K, A, lda, B + n, ldb, C + n, ldc, accumulate);
}

// 4 rows: 6 and 8 (24 and 32 accumulators) measured no faster at these sizes (~100 GFLOP/s
// on one core of the 2-core Xeon, its float32 FMA peak).
constexpr int kTileRows = 4;

template <bool kTransA = false>
void gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
          int ldc, bool accumulate) {
  // Where row m of A starts: A + m * lda, or A + m when A is stored transposed.
  auto rows_of = [&](int m) { return kTransA ? A + m : A + m * lda; };
  int m = 0;
  for (; m + kTileRows <= M; m += kTileRows)
    row_tiles<kTransA, kTileRows>(N, K, rows_of(m), lda, B, ldb, C + m * ldc, ldc, accumulate);
  for (; m < M; ++m)
    row_tiles<kTransA, 1>(N, K, rows_of(m), lda, B, ldb, C + m * ldc, ldc, accumulate);
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols, in 16 x 16 tiles so that each tile
// reads and writes 16 cache lines (a plain strided loop touches a new line per element).
void transpose(const float* src, int lds, int rows, int cols, float* dst, int ldd) {
  constexpr int kTile = 16;
  for (int r0 = 0; r0 < rows; r0 += kTile)
    for (int c0 = 0; c0 < cols; c0 += kTile) {
      const int r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int r = r0; r < r1; ++r)
        for (int c = c0; c < c1; ++c) dst[size_t(c) * ldd + r] = src[size_t(r) * lds + c];
    }
}

// The rows of one (batch row, head) slice of a [.., rows, N, H] array into a dense [rows, Hp]
// buffer (zero padding kept).
void gather(const float* src, int rows, int row_stride, int H, float* dst, int Hp) {
  for (int r = 0; r < rows; ++r)
    std::memcpy(dst + r * Hp, src + r * row_stride, H * sizeof(float));
}

struct Shape {
  int B, T, S, N, H;
  int Tp, Sp, Hp;   // padded to whole vectors
  int offset;       // S - T: the key position of query 0
  bool causal;
  int row_stride() const { return N * H; }
  int valid_keys(int i, int length) const {
    return causal ? std::min(length, i + offset + 1) : length;
  }
};

Shape make_shape(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, bool causal) {
  auto qd = q.dimensions(), kd = k.dimensions();
  Shape s{int(qd[0]), int(qd[1]), int(kd[1]), int(qd[2]), int(qd[3]), 0, 0, 0, 0, causal};
  s.Tp = round_up(s.T, kLanes);
  s.Sp = round_up(s.S, kLanes);
  s.Hp = round_up(s.H, kLanes);
  s.offset = s.S - s.T;
  return s;
}

int clipped_length(const int32_t* lengths, int b, int S) {
  return std::clamp(int(lengths[b]), 0, S);
}

// Query rows per block, forward and backward (32 and 16 measured the same).
constexpr int kBlock = 64;

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, bool causal, float scale) {
  const Shape s = make_shape(q, k, causal);
  const int rs = s.row_stride();
  std::vector<float> Q(s.Tp * s.Hp, 0.0f), KT(s.Hp * s.Sp, 0.0f), V(s.Sp * s.Hp, 0.0f);
  std::vector<float> P(kBlock * s.Sp), O(kBlock * s.Hp);
  for (int b = 0; b < s.B; ++b) {
    const int length = clipped_length(lengths.typed_data(), b, s.S);
    for (int n = 0; n < s.N; ++n) {
      const float* qbn = q.typed_data() + (size_t(b) * s.T * s.N + n) * s.H;
      const size_t kv_base = (size_t(b) * s.S * s.N + n) * s.H;
      gather(qbn, s.T, rs, s.H, Q.data(), s.Hp);
      for (float& x : Q) x *= scale;
      transpose(k.typed_data() + kv_base, rs, s.S, s.H, KT.data(), s.Sp);
      gather(v.typed_data() + kv_base, s.S, rs, s.H, V.data(), s.Hp);
      float* out_bn = out->typed_data() + (size_t(b) * s.T * s.N + n) * s.H;
      float* lse_bn = lse->typed_data() + (size_t(b) * s.N + n) * s.T;
      for (int i0 = 0; i0 < s.T; i0 += kBlock) {
        const int rows = std::min(kBlock, s.T - i0);
        const int cols = round_up(std::max(1, s.valid_keys(i0 + rows - 1, length)), kLanes);
        gemm(rows, cols, s.Hp, Q.data() + i0 * s.Hp, s.Hp, KT.data(), s.Sp, P.data(), s.Sp,
             false);
        for (int r = 0; r < rows; ++r) {
          float* p = P.data() + r * s.Sp;
          const int valid = s.valid_keys(i0 + r, length);
          if (valid == 0) {   // fully masked: the average of all S values
            std::fill(p, p + s.Sp, 0.0f);
            std::fill(p, p + s.S, 1.0f / s.S);
            lse_bn[i0 + r] = 0.0f;
            continue;
          }
          vf m = splat(-INFINITY);
          int j = 0;
          for (; j + kLanes <= valid; j += kLanes) m = load(p + j) > m ? load(p + j) : m;
          float row_max = hmax(m);
          for (; j < valid; ++j) row_max = std::max(row_max, p[j]);
          std::fill(p + valid, p + round_up(valid, kLanes), -INFINITY);   // exp gives 0
          vf sum = vf{};
          for (j = 0; j < valid; j += kLanes) {
            vf e = exp_nonpositive(load(p + j) - splat(row_max));
            store(p + j, e);
            sum += e;
          }
          std::fill(p + round_up(valid, kLanes), p + cols, 0.0f);
          const float total = hsum(sum);
          const vf inv = splat(1.0f / total);
          for (j = 0; j < valid; j += kLanes) store(p + j, load(p + j) * inv);
          lse_bn[i0 + r] = row_max + std::log(total);
        }
        // Fully masked rows read all S columns.
        const int read = (length == 0) ? s.Sp : cols;
        gemm(rows, s.Hp, read, P.data(), s.Sp, V.data(), s.Hp, O.data(), s.Hp, false);
        for (int r = 0; r < rows; ++r)
          std::memcpy(out_bn + size_t(i0 + r) * rs, O.data() + r * s.Hp, s.H * sizeof(float));
      }
    }
  }
  return ffi::Error::Success();
}

// Query blocks as in the forward pass: recompute the block's probabilities P from the saved
// log-sum-exp, then dS = P * (dO V^T - D) with D_i = dO_i . O_i; dQ = scale dS K for the block,
// and its share of dK = scale dS^T Q and dV = P^T dO (A-transposed products, no transposes).
ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, bool causal, float scale) {
  const Shape s = make_shape(q, k, causal);
  const int rs = s.row_stride();
  std::vector<float> Qs(s.Tp * s.Hp, 0.0f), dO(s.Tp * s.Hp, 0.0f), O(s.Tp * s.Hp, 0.0f),
      K(s.Sp * s.Hp, 0.0f), KT(s.Hp * s.Sp, 0.0f), VT(s.Hp * s.Sp, 0.0f), D(s.Tp),
      dK(s.Sp * s.Hp), dV(s.Sp * s.Hp), P(kBlock * s.Sp), dS(kBlock * s.Sp), dQ(kBlock * s.Hp);
  for (int b = 0; b < s.B; ++b) {
    const int length = clipped_length(lengths.typed_data(), b, s.S);
    for (int n = 0; n < s.N; ++n) {
      const size_t q_base = (size_t(b) * s.T * s.N + n) * s.H;
      const size_t kv_base = (size_t(b) * s.S * s.N + n) * s.H;
      const float* lse_bn = lse.typed_data() + (size_t(b) * s.N + n) * s.T;
      gather(q.typed_data() + q_base, s.T, rs, s.H, Qs.data(), s.Hp);
      for (float& x : Qs) x *= scale;
      gather(dout.typed_data() + q_base, s.T, rs, s.H, dO.data(), s.Hp);
      gather(out.typed_data() + q_base, s.T, rs, s.H, O.data(), s.Hp);
      gather(k.typed_data() + kv_base, s.S, rs, s.H, K.data(), s.Hp);
      transpose(k.typed_data() + kv_base, rs, s.S, s.H, KT.data(), s.Sp);
      transpose(v.typed_data() + kv_base, rs, s.S, s.H, VT.data(), s.Sp);
      for (int i = 0; i < s.T; ++i) {
        vf d = vf{};
        for (int h = 0; h < s.Hp; h += kLanes)
          d += load(&dO[i * s.Hp + h]) * load(&O[i * s.Hp + h]);
        D[i] = hsum(d);
      }
      std::fill(dK.begin(), dK.end(), 0.0f);
      std::fill(dV.begin(), dV.end(), 0.0f);
      float* dq_bn = dq->typed_data() + q_base;
      if (length == 0) {   // every row fully masked averaged all S values: dv_j = sum_i dO_i / S,
        // and no gradient reaches q or k
        for (int i = 0; i < s.T; ++i)
          std::fill(dq_bn + size_t(i) * rs, dq_bn + size_t(i) * rs + s.H, 0.0f);
        for (int i = 0; i < s.T; ++i)
          for (int h = 0; h < s.H; ++h) dV[h] += dO[i * s.Hp + h] / s.S;
        for (int j = 1; j < s.S; ++j) std::memcpy(&dV[j * s.Hp], &dV[0], s.Hp * sizeof(float));
      }
      for (int i0 = 0; length > 0 && i0 < s.T; i0 += kBlock) {
        const int rows = std::min(kBlock, s.T - i0);
        const int cols = round_up(s.valid_keys(i0 + rows - 1, length), kLanes);
        gemm(rows, cols, s.Hp, Qs.data() + i0 * s.Hp, s.Hp, KT.data(), s.Sp, P.data(), s.Sp,
             false);
        gemm(rows, cols, s.Hp, dO.data() + i0 * s.Hp, s.Hp, VT.data(), s.Sp, dS.data(), s.Sp,
             false);
        for (int r = 0; r < rows; ++r) {
          const int valid = s.valid_keys(i0 + r, length);
          const vf row_lse = splat(lse_bn[i0 + r]), row_d = splat(D[i0 + r]);
          float* p = P.data() + r * s.Sp;
          float* ds = dS.data() + r * s.Sp;
          for (int c = 0; c < cols; c += kLanes) {
            const vi keep = (kIota + c) < valid;
            // Masked scores may exceed the row's log-sum-exp; their exp is discarded.
            const vf e = keep ? exp_nonpositive(keep ? load(p + c) - row_lse : vf{}) : vf{};
            store(p + c, e);
            store(ds + c, e * (load(ds + c) - row_d));
          }
        }
        gemm(rows, s.Hp, cols, dS.data(), s.Sp, K.data(), s.Hp, dQ.data(), s.Hp, false);
        for (int r = 0; r < rows; ++r)
          for (int h = 0; h < s.H; ++h) dq_bn[size_t(i0 + r) * rs + h] = scale * dQ[r * s.Hp + h];
        gemm<true>(cols, s.Hp, rows, P.data(), s.Sp, dO.data() + i0 * s.Hp, s.Hp, dV.data(),
                   s.Hp, true);
        gemm<true>(cols, s.Hp, rows, dS.data(), s.Sp, Qs.data() + i0 * s.Hp, s.Hp, dK.data(),
                   s.Hp, true);
      }
      float* dk_bn = dk->typed_data() + kv_base;
      float* dv_bn = dv->typed_data() + kv_base;
      for (int j = 0; j < s.S; ++j) {
        std::memcpy(dk_bn + size_t(j) * rs, &dK[j * s.Hp], s.H * sizeof(float));
        std::memcpy(dv_bn + size_t(j) * rs, &dV[j * s.Hp], s.H * sizeof(float));
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Phase1AttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Phase1AttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale"));
