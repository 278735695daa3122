// One-pass backward kernels for the lean ops on CUDA (src/model/ops/rowwise.rs holds the Rust
// side and the CPU loops these mirror). Compiled to PTX by build.rs with the `cuda` feature.
// Everything is accumulated in f32 whatever the storage dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// GELU (erf form) backward: da = dy * (Phi(a) + a * phi(a)).
template <typename T>
__device__ void gelu_bwd(const T *a, const T *dy, T *da, uint64_t n) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        float x = to_f(a[i]);
        float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
        da[i] = from_f<T>(to_f(dy[i]) * (cdf + x * pdf));
    }
}

// GELU (erf form) forward.
template <typename T>
__device__ void gelu_fwd(const T *a, T *y, uint64_t n) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        float x = to_f(a[i]);
        y[i] = from_f<T>(0.5f * x * (1.0f + erff(x * 0.70710678118654752f)));
    }
}

// Softmax forward over rows of length n, one warp per row.
template <typename T>
__device__ void softmax_fwd(const T *x, T *y, uint64_t rows, uint32_t n) {
    uint64_t row = (uint64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    uint32_t lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T *xr = x + row * n;
    T *out = y + row * n;
    float m = -INFINITY;
    for (uint32_t i = lane; i < n; i += 32) m = fmaxf(m, to_f(xr[i]));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float s = 0.0f;
    for (uint32_t i = lane; i < n; i += 32) s += expf(to_f(xr[i]) - m);
    float inv = 1.0f / warp_sum(s);
    for (uint32_t i = lane; i < n; i += 32) out[i] = from_f<T>(expf(to_f(xr[i]) - m) * inv);
}

// Softmax backward over rows of length n, one warp per row: ds = p * (dp - sum(dp * p)).
template <typename T>
__device__ void softmax_bwd(const T *p, const T *dp, T *ds, uint64_t rows, uint32_t n) {
    uint64_t row = (uint64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    uint32_t lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T *pr = p + row * n;
    const T *dr = dp + row * n;
    T *out = ds + row * n;
    float s = 0.0f;
    for (uint32_t i = lane; i < n; i += 32) s += to_f(pr[i]) * to_f(dr[i]);
    s = warp_sum(s);
    for (uint32_t i = lane; i < n; i += 32) out[i] = from_f<T>(to_f(pr[i]) * (to_f(dr[i]) - s));
}

// LayerNorm input gradient over rows of length n, one warp per row, from the input x, gamma
// and the output gradient dy:  g = dy * gamma,  xhat = (x - mean) * rstd,
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
template <typename T>
__device__ void layer_norm_bwd(const T *x, const T *gamma, const T *dy, T *dx, uint64_t rows, uint32_t n,
                               float eps) {
    uint64_t row = (uint64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    uint32_t lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T *xr = x + row * n;
    const T *dr = dy + row * n;
    T *out = dx + row * n;
    float s = 0.0f;
    for (uint32_t i = lane; i < n; i += 32) s += to_f(xr[i]);
    float mean = warp_sum(s) / (float)n;
    float var = 0.0f, sg = 0.0f, sgx = 0.0f;
    for (uint32_t i = lane; i < n; i += 32) {
        float xc = to_f(xr[i]) - mean;
        float g = to_f(dr[i]) * to_f(gamma[i]);
        var += xc * xc;
        sg += g;
        sgx += g * xc;
    }
    var = warp_sum(var) / (float)n;
    float rstd = rsqrtf(var + eps);
    float mg = warp_sum(sg) / (float)n;
    float mgx = warp_sum(sgx) / (float)n * rstd;
    for (uint32_t i = lane; i < n; i += 32) {
        float xhat = (to_f(xr[i]) - mean) * rstd;
        float g = to_f(dr[i]) * to_f(gamma[i]);
        out[i] = from_f<T>(rstd * (g - mg - xhat * mgx));
    }
}

// y[r, j] += b[j] in place over rows of length n (the bias of a linear layer, after the GEMM).
template <typename T>
__device__ void add_bias(T *y, const T *b, uint64_t len, uint32_t n) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (uint64_t)blockDim.x * gridDim.x) {
        y[i] = from_f<T>(to_f(y[i]) + to_f(b[i % n]));
    }
}

// Attention head split: x (B, T, parts * D) [+ delta (B, T, 2D) on parts 0 and 2] -> out
// (parts, B, H, T, hd), part 0 multiplied by `scale`; parts is 3 (q, k, v) or 1. One thread per
// output element.
template <typename T>
__device__ void split_qkv(const T *qkv, const T *delta, T *out, uint32_t b, uint32_t t, uint32_t h,
                          uint32_t hd, uint32_t parts, float scale) {
    uint64_t d = (uint64_t)h * hd;
    uint64_t len = (uint64_t)parts * b * t * d;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (uint64_t)blockDim.x * gridDim.x) {
        uint64_t e = i % hd, r = i / hd;
        uint64_t ti = r % t;
        r /= t;
        uint64_t hi = r % h;
        r /= h;
        uint64_t bi = r % b, part = r / b;
        uint64_t row = bi * t + ti;
        uint64_t col = hi * hd + e;
        float v = to_f(qkv[row * parts * d + part * d + col]);
        if (delta != nullptr && part != 1) v += to_f(delta[row * 2 * d + (part == 0 ? 0 : d) + col]);
        if (part == 0) v *= scale;
        out[i] = from_f<T>(v);
    }
}

// Attention head merge: `parts` tensors (B, H, T, hd) -> out (B, T, parts * D), part 0
// multiplied by `scale0`.
template <typename T>
__device__ void merge_heads(const T *a, const T *b2, const T *c, T *out, uint32_t b, uint32_t t, uint32_t h,
                            uint32_t hd, uint32_t parts, float scale0) {
    uint64_t d = (uint64_t)h * hd;
    uint64_t len = (uint64_t)parts * b * t * d;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (uint64_t)blockDim.x * gridDim.x) {
        uint64_t col = i % (parts * d), row = i / (parts * d);
        uint64_t part = col / d, c2 = col % d;
        uint64_t hi = c2 / hd, e = c2 % hd;
        uint64_t bi = row / t, ti = row % t;
        const T *src = part == 0 ? a : (part == 1 ? b2 : c);
        float v = to_f(src[((bi * h + hi) * t + ti) * hd + e]);
        if (part == 0) v *= scale0;
        out[i] = from_f<T>(v);
    }
}

#define ROWWISE(SUFFIX, T)                                                                               \
    extern "C" __global__ void gelu_fwd_##SUFFIX(const T *a, T *y, uint64_t n) { gelu_fwd<T>(a, y, n); }  \
    extern "C" __global__ void softmax_fwd_##SUFFIX(const T *x, T *y, uint64_t rows, uint32_t n) {      \
        softmax_fwd<T>(x, y, rows, n);                                                                   \
    }                                                                                                    \
    extern "C" __global__ void gelu_bwd_##SUFFIX(const T *a, const T *dy, T *da, uint64_t n) {          \
        gelu_bwd<T>(a, dy, da, n);                                                                       \
    }                                                                                                    \
    extern "C" __global__ void softmax_bwd_##SUFFIX(const T *p, const T *dp, T *ds, uint64_t rows,      \
                                                    uint32_t n) {                                        \
        softmax_bwd<T>(p, dp, ds, rows, n);                                                              \
    }                                                                                                    \
    extern "C" __global__ void layer_norm_bwd_##SUFFIX(const T *x, const T *gamma, const T *dy, T *dx,  \
                                                       uint64_t rows, uint32_t n, float eps) {           \
        layer_norm_bwd<T>(x, gamma, dy, dx, rows, n, eps);                                               \
    }                                                                                                    \
    extern "C" __global__ void add_bias_##SUFFIX(T *y, const T *b, uint64_t len, uint32_t n) {          \
        add_bias<T>(y, b, len, n);                                                                       \
    }                                                                                                    \
    extern "C" __global__ void split_qkv_##SUFFIX(const T *qkv, const T *delta, T *out, uint32_t b,     \
                                                  uint32_t t, uint32_t h, uint32_t hd, uint32_t parts,   \
                                                  float scale) {                                         \
        split_qkv<T>(qkv, delta, out, b, t, h, hd, parts, scale);                                        \
    }                                                                                                    \
    extern "C" __global__ void merge_heads_##SUFFIX(const T *a, const T *b2, const T *c, T *out,        \
                                                    uint32_t b, uint32_t t, uint32_t h, uint32_t hd,     \
                                                    uint32_t parts, float scale0) {                      \
        merge_heads<T>(a, b2, c, out, b, t, h, hd, parts, scale0);                                       \
    }

ROWWISE(f32, float)
ROWWISE(bf16, __nv_bfloat16)
ROWWISE(f16, __half)
