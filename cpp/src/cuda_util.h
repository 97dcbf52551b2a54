// CUDA runtime / cuBLAS error checks that throw memmamba::Error with the call and the error's name.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <string>

#include "memmamba/memmamba.h"

namespace memmamba
{

inline void cudaCheck(cudaError_t e, char const* what)
{
    if (e != cudaSuccess)
        throw Error(std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

inline void cublasCheck(cublasStatus_t s, char const* what)
{
    if (s != CUBLAS_STATUS_SUCCESS)
        throw Error(std::string(what) + ": cuBLAS status " + std::to_string(static_cast<int>(s)));
}

#define MM_CUDA(call) ::memmamba::cudaCheck((call), #call)
#define MM_CUBLAS(call) ::memmamba::cublasCheck((call), #call)

//! Make `device` current for a scope and give the calling thread its own current device back on leaving: a
//! service's CUDA work on another device must not find its current device changed by a session call.
class DeviceGuard
{
public:
    explicit DeviceGuard(int device)
    {
        MM_CUDA(cudaGetDevice(&previous_));
        if (previous_ != device)
        {
            MM_CUDA(cudaSetDevice(device));
            changed_ = true;
        }
    }
    ~DeviceGuard()
    {
        if (changed_)
            cudaSetDevice(previous_);
    }
    DeviceGuard(DeviceGuard const&) = delete;
    DeviceGuard& operator=(DeviceGuard const&) = delete;

private:
    int previous_ = 0;
    bool changed_ = false;
};

//! Enqueue on `stream` a copy of row `srcRow` of a state tensor [L, srcBatch, ...] into row `dstRow` of one of the
//! same shape but batch dstBatch (`info`: the destination's): L strided blocks in one 2D copy, or, within one tensor
//! (whose 2D areas interleave, which cudaMemcpy2D does not allow), one copy a layer.
inline void copyStateRow(void* dst, int dstBatch, int dstRow, void const* src, int srcBatch, int srcRow,
    StateTensorInfo const& info, cudaStream_t stream)
{
    size_t const L = static_cast<size_t>(info.shape.at(0));
    size_t const row = info.bytes() / (L * dstBatch);
    auto* to = static_cast<char*>(dst) + dstRow * row;
    auto const* from = static_cast<char const*>(src) + srcRow * row;
    if (dst != src)
    {
        MM_CUDA(cudaMemcpy2DAsync(to, dstBatch * row, from, srcBatch * row, row, L, cudaMemcpyDeviceToDevice, stream));
        return;
    }
    for (size_t l = 0; l < L; ++l)
        MM_CUDA(cudaMemcpyAsync(to + l * dstBatch * row, from + l * srcBatch * row, row, cudaMemcpyDeviceToDevice,
            stream));
}

//! Throw a clear error unless CUDA sees a GPU numbered `device` (`who`: the backend that needs it).
inline void requireDevice(int device, char const* who)
{
    int devices = 0;
    cudaError_t e = cudaGetDeviceCount(&devices);
    if (e != cudaSuccess || devices == 0)
        throw Error(std::string(who) + " needs an NVIDIA GPU, and CUDA finds none ("
            + (e != cudaSuccess ? cudaGetErrorString(e) : "0 devices") + ")");
    if (device < 0 || device >= devices)
        throw Error("device " + std::to_string(device) + " does not exist (" + std::to_string(devices) + " visible)");
}

//! A device allocation (cudaMalloc / cudaFree).
class DeviceBuffer
{
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes)
        : bytes_(bytes)
    {
        if (bytes)
            MM_CUDA(cudaMalloc(&ptr_, bytes));
    }
    ~DeviceBuffer()
    {
        if (ptr_)
            cudaFree(ptr_);
    }
    DeviceBuffer(DeviceBuffer&& o) noexcept
        : ptr_(o.ptr_)
        , bytes_(o.bytes_)
    {
        o.ptr_ = nullptr;
        o.bytes_ = 0;
    }
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept
    {
        std::swap(ptr_, o.ptr_);
        std::swap(bytes_, o.bytes_);
        return *this;
    }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
    void* get() const { return ptr_; }
    template <typename T>
    T* as() const
    {
        return static_cast<T*>(ptr_);
    }
    size_t bytes() const { return bytes_; }

private:
    void* ptr_{nullptr};
    size_t bytes_{0};
};

} // namespace memmamba
