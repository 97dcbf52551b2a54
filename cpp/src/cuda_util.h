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
