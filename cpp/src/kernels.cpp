// See kernels.h.
#include "kernels.h"

#include <cstring>
#include <sstream>

#include "memmamba/memmamba.h"

namespace memmamba
{

int Kernel::at(std::string const& name) const
{
    for (auto const& [n, v] : constexprs)
        if (n == name)
            return v;
    throw Error(std::string("kernel ") + image->name + " has no constexpr " + name);
}

Kernel findKernel(std::string const& op, std::string const& act, std::string const& key)
{
    std::string have;
    for (int i = 0; i < kernels::kNumRuntimeVariants; ++i)
    {
        auto const& v = kernels::kRuntimeVariants[i];
        if (op != v.op || act != v.act)
            continue;
        if (key != v.key)
        {
            have += (have.empty() ? "" : ", ") + std::string(v.key);
            continue;
        }
        Kernel k;
        k.image = v.image;
        std::stringstream cx(v.constexprs), ps(v.params);
        std::string item;
        while (std::getline(cx, item, ','))
        {
            auto eq = item.find('=');
            k.constexprs.emplace_back(item.substr(0, eq), std::stoi(item.substr(eq + 1)));
        }
        while (std::getline(ps, item, ','))
        {
            auto colon = item.find(':'), slash = item.find('/');
            bool const divisible = slash != std::string::npos;
            k.params.push_back({item.substr(0, colon),
                item.substr(colon + 1, divisible ? slash - colon - 1 : std::string::npos), divisible});
        }
        return k;
    }
    throw Error("the kernel library has no " + op + " kernel for " + act + " and model shape " + key
        + " (compiled shapes: " + (have.empty() ? "none" : have)
        + "); rebuild it for this model: cmake -DMEMMAMBA_MODEL_CONFIGS=<checkpoint>/config.json (cpp/README.md)");
}

Launch& Launch::put(std::string const& name, char const* kind, void const* v, size_t n, int64_t value)
{
    Value val{name, kind, {}, value};
    std::memcpy(val.bytes, v, n);
    values_.push_back(std::move(val));
    return *this;
}

Launch& Launch::ptr(std::string const& name, void const* p)
{
    return put(name, "ptr", &p, sizeof(p), static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)));
}

Launch& Launch::i32(std::string const& name, int64_t v)
{
    if (v < INT32_MIN || v > INT32_MAX)
        throw Error("kernel argument " + name + " = " + std::to_string(v) + " does not fit int32");
    int32_t x = static_cast<int32_t>(v);
    return put(name, "i32", &x, 4, v);
}

Launch& Launch::f32(char const* name, double v)
{
    float x = static_cast<float>(v);
    return put(name, "fp32", &x, 4, 0);
}

void Launch::run(aot::Grid grid, cudaStream_t stream, bool pdl)
{
    char const* kname = k_.image->name;
    std::vector<void*> params;
    std::vector<bool> used(values_.size(), false);
    params.reserve(k_.params.size() + 2);
    for (auto const& [name, kind, divisible] : k_.params)
    {
        size_t i = params.size(); // where the runtime passes arguments in the kernel's order
        if (i >= values_.size() || values_[i].name != name)
            for (i = 0; i < values_.size() && values_[i].name != name;)
                ++i;
        if (i == values_.size())
            throw Error(std::string("kernel ") + kname + " takes argument '" + name + "', which the runtime does not pass: "
                "the kernel's signature changed (update cpp/src/native.cpp)");
        if (kind != values_[i].kind)
            throw Error(std::string("kernel ") + kname + " argument '" + name + "' is " + kind + ", the runtime passes "
                + values_[i].kind);
        int bytes = kind == "ptr" ? 8 : 4;
        if (k_.image->paramSizes && k_.image->paramSizes[params.size()] != bytes)
            throw Error(std::string("kernel ") + kname + " argument '" + name + "' is " + std::to_string(k_.image->paramSizes[params.size()])
                + " bytes in the cubin, " + std::to_string(bytes) + " in its table entry: rebuild the kernel library");
        if (divisible && values_[i].value % 16 != 0)
            throw Error(std::string("kernel ") + kname + " was compiled for argument '" + name + "' a multiple of 16"
                + (kind == "ptr" ? " (a 16-byte aligned address)" : "") + ", the runtime passes "
                + std::to_string(values_[i].value) + " (cpp/aot_kernels.py and cpp/src/native.cpp disagree)");
        used[i] = true;
        params.push_back(values_[i].bytes);
    }
    for (size_t i = 0; i < values_.size(); ++i)
        if (!used[i])
            throw Error("the runtime passes '" + values_[i].name + "' to kernel " + std::string(kname)
                + ", which takes no such argument: the kernel's signature changed (update cpp/src/native.cpp)");
    static void* scratch = nullptr; // Triton's two scratch pointers: these kernels need none
    params.push_back(&scratch);
    params.push_back(&scratch);
    if (static_cast<int>(params.size()) != k_.image->numParams)
        throw Error(std::string("kernel ") + kname + " has " + std::to_string(k_.image->numParams) + " parameters, its table entry "
            + std::to_string(params.size()) + ": the kernel library and its table are out of step");
    if (aot::launch(*k_.image, grid, reinterpret_cast<CUstream>(stream), params.data(), pdl) != CUDA_SUCCESS)
        throw Error(aot::lastError());
}

} // namespace memmamba
