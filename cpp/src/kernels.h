// The runtime's kernel variants and how they are launched.
//
// cpp/aot_kernels.py compiles the Triton kernels ahead of time (memmamba_kernels.{h,cpp}) and writes the table
// kRuntimeVariants (runtime_variants.cpp): per variant the op, activation dtype, model-shape key, the constexprs it
// was compiled with (grids are sized from them) and its runtime arguments by name and kind. Arguments are passed by
// name (Launch), so a kernel whose signature changed fails with a message naming the argument.
#pragma once

#include <cuda_runtime_api.h>

#include <string>
#include <utility>
#include <vector>

#include "memmamba/aot_runtime.h"

namespace memmamba
{

namespace kernels
{
struct RuntimeVariant
{
    char const* op;         //!< "norm_embed", "norm_residual", "note_pool", "note_pool_cross", "conv_step", ...
    char const* act;        //!< "fp32" / "fp16"
    char const* key;        //!< model-shape key, e.g. "d768_K50_ds64_H4" (cpp/aot_kernels.py shape_keys)
    aot::KernelImage const* image;
    char const* constexprs; //!< "BLOCK_O=128,BLOCK_K=64,..."
    char const* params;     //!< runtime arguments in order: "u_ptr:ptr,d:i32,eps:fp32,..."; "/16" after a kind:
                            //!< compiled as a multiple of 16 (a pointer: 16-byte aligned), which Launch checks
};
extern const RuntimeVariant kRuntimeVariants[];
extern const int kNumRuntimeVariants;
} // namespace kernels

struct Kernel
{
    aot::KernelImage const* image{nullptr};
    std::vector<std::pair<std::string, int>> constexprs;
    struct Param
    {
        std::string name, kind; //!< kind: "ptr" | "i32" | "fp32"
        bool divisible;         //!< compiled as a multiple of 16 (pointers: 16-byte aligned)
    };
    std::vector<Param> params;
    int at(std::string const& name) const;                    //!< a constexpr's value
};

//! The variant of `op` for `act` and shape `key`; an Error lists the compiled keys when there is none.
Kernel findKernel(std::string const& op, std::string const& act, std::string const& key);

//! One launch: arguments by name, then run(). Missing, unknown or wrongly typed arguments are errors, and so is a
//! value that is not the multiple of 16 its kernel was compiled for.
class Launch
{
public:
    explicit Launch(Kernel const& kernel)
        : k_(kernel)
    {
        values_.reserve(kernel.params.size());
    }
    Launch& ptr(std::string const& name, void const* p);
    Launch& i32(std::string const& name, int64_t v);
    Launch& f32(char const* name, double v);
    //! pdl: launch a kernel compiled for it as a programmatic dependent (aot::launch); false: plainly
    void run(aot::Grid grid, cudaStream_t stream, bool pdl = false);

private:
    struct Value
    {
        std::string name;
        char const* kind; //!< "ptr" | "i32" | "fp32"
        unsigned char bytes[8];
        int64_t value; //!< a pointer's address or an integer's value (the divisibility check)
    };
    Launch& put(std::string const& name, char const* kind, void const* v, size_t n, int64_t value);
    Kernel const& k_;
    std::vector<Value> values_;
};

inline unsigned cdiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

} // namespace memmamba
