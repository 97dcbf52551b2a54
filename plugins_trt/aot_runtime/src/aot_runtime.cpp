// See memmamba/aot_runtime.h.
#include "memmamba/aot_runtime.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace memmamba::aot
{
namespace
{

thread_local std::string tLastError;

CUresult fail(CUresult code, std::string message)
{
    tLastError = std::move(message);
    return code;
}

// The few driver entry points we need, resolved from libcuda.so.1 at first use (no link-time dependency).
struct Driver
{
    CUresult (*init)(unsigned int){};
    CUresult (*getErrorString)(CUresult, char const**){};
    CUresult (*ctxGetCurrent)(CUcontext*){};
    CUresult (*ctxGetDevice)(CUdevice*){};
    CUresult (*deviceGetAttribute)(int*, CUdevice_attribute, CUdevice){};
    CUresult (*deviceGetName)(char*, int, CUdevice){};
    CUresult (*moduleLoadDataEx)(CUmodule*, void const*, unsigned int, CUjit_option*, void**){};
    CUresult (*moduleGetFunction)(CUfunction*, CUmodule, char const*){};
    CUresult (*funcSetAttribute)(CUfunction, CUfunction_attribute, int){};
    CUresult (*launchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
        CUstream, void**, void**){};
    CUresult (*launchKernelEx)(CUlaunchConfig const*, CUfunction, void**, void**){}; // CUDA 12+; else PDL is off
    std::string loadError;
};

template <typename F>
bool resolve(void* lib, char const* name, F& fn, std::string& error)
{
    fn = reinterpret_cast<F>(dlsym(lib, name));
    if (!fn && error.empty())
    {
        error = std::string("libcuda.so.1 lacks ") + name + " (NVIDIA driver too old?)";
    }
    return fn != nullptr;
}

Driver const& driver()
{
    static Driver const d = [] {
        Driver r;
        void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!lib)
        {
            char const* why = dlerror();
            r.loadError = std::string("cannot open the CUDA driver libcuda.so.1 (is an NVIDIA driver installed?): ")
                + (why ? why : "");
            return r;
        }
        std::string& e = r.loadError;
        resolve(lib, "cuInit", r.init, e);
        resolve(lib, "cuGetErrorString", r.getErrorString, e);
        resolve(lib, "cuCtxGetCurrent", r.ctxGetCurrent, e);
        resolve(lib, "cuCtxGetDevice", r.ctxGetDevice, e);
        resolve(lib, "cuDeviceGetAttribute", r.deviceGetAttribute, e);
        resolve(lib, "cuDeviceGetName", r.deviceGetName, e);
        resolve(lib, "cuModuleLoadDataEx", r.moduleLoadDataEx, e);
        resolve(lib, "cuModuleGetFunction", r.moduleGetFunction, e);
        resolve(lib, "cuFuncSetAttribute", r.funcSetAttribute, e);
        resolve(lib, "cuLaunchKernel", r.launchKernel, e);
        r.launchKernelEx = reinterpret_cast<decltype(r.launchKernelEx)>(dlsym(lib, "cuLaunchKernelEx"));
        if (e.empty() && r.init(0) != CUDA_SUCCESS)
        {
            e = "cuInit failed: no usable CUDA device";
        }
        return r;
    }();
    return d;
}

std::string errorName(CUresult code)
{
    char const* s = nullptr;
    if (driver().getErrorString)
    {
        driver().getErrorString(code, &s);
    }
    return std::string(s ? s : "unknown CUDA error") + " (" + std::to_string(static_cast<int>(code)) + ")";
}

char const* dryRunFile()
{
#ifdef MEMMAMBA_AOT_TEST_HOOKS   // test builds only (compile_check.sh): a library built for use never reads it
    char const* v = std::getenv("MEMMAMBA_AOT_DRYRUN");
    return v && v[0] ? v : nullptr;
#else
    return nullptr;
#endif
}

CUresult recordLaunch(char const* path, KernelImage const& k, Grid grid, void** params)
{
    static std::mutex fileMutex;
    std::lock_guard<std::mutex> lock(fileMutex);
    FILE* f = std::fopen(path, "a");
    if (!f)
    {
        return fail(CUDA_ERROR_FILE_NOT_FOUND, std::string("cannot append to MEMMAMBA_AOT_DRYRUN file ") + path);
    }
    std::fprintf(f, "%s %u %u %u", k.name, grid.x, grid.y, grid.z);
    for (int i = 0; i < k.numParams; ++i)
    {
        std::fputc(' ', f);
        auto const* bytes = static_cast<unsigned char const*>(params[i]);
        for (int b = 0; b < k.paramSizes[i]; ++b)
        {
            std::fprintf(f, "%02x", bytes[b]);
        }
    }
    std::fputc('\n', f);
    std::fclose(f);
    return CUDA_SUCCESS;
}

bool forcePtx()
{
    char const* v = std::getenv("MEMMAMBA_AOT_FORCE_PTX");
    return v && v[0] == '1';
}

bool noPdl()
{
    char const* v = std::getenv("MEMMAMBA_AOT_NO_PDL");
    return v && v[0] == '1';
}

// The cubin to load on a device of SM `sm`: the exact SM, else the newest same-major cubin of a lower minor
// (SASS is forward compatible within a major; arch-specific "a" cubins are not), else null (use the PTX).
Cubin const* pickCubin(KernelImage const& k, int sm)
{
    if (forcePtx())
    {
        return nullptr;
    }
    Cubin const* best = nullptr;
    for (int i = 0; i < k.numCubins; ++i)
    {
        Cubin const& c = k.cubins[i];
        if (c.sm == sm)
        {
            return &c;
        }
        if (!c.archSpecific && c.sm / 10 == sm / 10 && c.sm < sm && (!best || c.sm > best->sm))
        {
            best = &c;
        }
    }
    return best;
}

struct Loaded
{
    CUfunction fn{};
    bool pdl{false}; //!< the loaded binary waits for its predecessor itself
    CUresult status{CUDA_SUCCESS};
    std::string error;
};

std::mutex gMutex;
std::map<std::pair<CUcontext, KernelImage const*>, Loaded> gCache; // modules stay loaded for the context's life

// Load `k` into the context current on this thread (the caller holds the cache lock).
Loaded loadFor(KernelImage const& k)
{
    Driver const& d = driver();
    Loaded out;
    auto err = [&](CUresult code, std::string const& what) {
        out.status = code;
        out.error = std::string("kernel ") + k.name + ": " + what;
        return out;
    };
    CUdevice dev{};
    int major = 0, minor = 0;
    if (CUresult r = d.ctxGetDevice(&dev); r != CUDA_SUCCESS)
    {
        return err(r, "cuCtxGetDevice: " + errorName(r));
    }
    d.deviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
    d.deviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
    int const sm = major * 10 + minor;
    Cubin const* cubin = pickCubin(k, sm);
    void const* image = cubin ? static_cast<void const*>(cubin->data) : static_cast<void const*>(k.ptx);
    if (!cubin && (!k.ptx || k.ptxSm > sm))
    {
        return err(CUDA_ERROR_NO_BINARY_FOR_GPU,
            "no cubin for sm_" + std::to_string(sm) + " and no PTX it can JIT; rebuild the kernel library with sm_"
                + std::to_string(sm) + " in its archs (the TensorRT plugins: `memdeploy aot --arch ...,"
                + std::to_string(sm) + "`; the C++ runtime: -DMEMMAMBA_CUDA_ARCHS or cpp/aot_kernels.py --arch)");
    }
    char jitLog[4096] = {0};
    CUjit_option opts[] = {CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
    void* vals[] = {jitLog, reinterpret_cast<void*>(sizeof(jitLog) - 1)};
    CUmodule module{};
    if (CUresult r = d.moduleLoadDataEx(&module, image, 2, opts, vals); r != CUDA_SUCCESS)
    {
        return err(r,
            std::string("loading the ") + (cubin ? "sm_" + std::to_string(cubin->sm) + " cubin" : "PTX (JIT)")
                + " on sm_" + std::to_string(sm) + " failed: " + errorName(r) + (jitLog[0] ? "; " : "") + jitLog);
    }
    if (CUresult r = d.moduleGetFunction(&out.fn, module, k.entry); r != CUDA_SUCCESS)
    {
        return err(r, std::string("entry ") + k.entry + " not in its module: " + errorName(r));
    }
    out.pdl = (cubin ? cubin->pdl : k.ptxPdl) && d.launchKernelEx && !noPdl();
    if (k.sharedBytes > 48 * 1024)
    {
        int optin = 0;
        d.deviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev);
        if (k.sharedBytes > optin)
        {
            return err(CUDA_ERROR_INVALID_VALUE,
                "needs " + std::to_string(k.sharedBytes) + " B of shared memory, the device allows "
                    + std::to_string(optin));
        }
        if (CUresult r = d.funcSetAttribute(out.fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k.sharedBytes);
            r != CUDA_SUCCESS)
        {
            return err(r, "cannot raise the dynamic shared memory limit: " + errorName(r));
        }
    }
    return out;
}

CUresult function(KernelImage const& k, CUfunction& fn, bool* pdl = nullptr)
{
    Driver const& d = driver();
    if (!d.loadError.empty())
    {
        return fail(CUDA_ERROR_NOT_INITIALIZED, std::string("kernel ") + k.name + ": " + d.loadError);
    }
    CUcontext ctx{};
    if (d.ctxGetCurrent(&ctx) != CUDA_SUCCESS || !ctx)
    {
        return fail(CUDA_ERROR_INVALID_CONTEXT,
            std::string("kernel ") + k.name + ": no CUDA context is current on this thread (initialise CUDA first)");
    }
    std::lock_guard<std::mutex> lock(gMutex);
    auto key = std::make_pair(ctx, &k);
    auto it = gCache.find(key);
    if (it == gCache.end())
    {
        it = gCache.emplace(key, loadFor(k)).first;
    }
    if (it->second.status != CUDA_SUCCESS)
    {
        return fail(it->second.status, it->second.error);
    }
    fn = it->second.fn;
    if (pdl)
    {
        *pdl = it->second.pdl;
    }
    return CUDA_SUCCESS;
}

} // namespace

CUresult preload(KernelImage const& kernel)
{
    if (dryRunFile())
    {
        return CUDA_SUCCESS;
    }
    CUfunction fn{};
    return function(kernel, fn);
}

bool launchesPdl(KernelImage const& kernel)
{
    CUfunction fn{};
    bool pdl = false;
    return !dryRunFile() && function(kernel, fn, &pdl) == CUDA_SUCCESS && pdl;
}

CUresult launch(KernelImage const& kernel, Grid grid, CUstream stream, void** params, bool allowPdl)
{
    if (grid.x == 0 || grid.y == 0 || grid.z == 0)
    {
        return CUDA_SUCCESS;
    }
    if (char const* path = dryRunFile())
    {
        return recordLaunch(path, kernel, grid, params);
    }
    CUfunction fn{};
    bool pdl = false;
    if (CUresult r = function(kernel, fn, &pdl); r != CUDA_SUCCESS)
    {
        return r;
    }
    pdl = pdl && allowPdl;
    CUresult r;
    if (pdl)
    {
        CUlaunchAttribute attr{};
        attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        CUlaunchConfig config{};
        config.gridDimX = grid.x, config.gridDimY = grid.y, config.gridDimZ = grid.z;
        config.blockDimX = 32 * kernel.numWarps, config.blockDimY = 1, config.blockDimZ = 1;
        config.sharedMemBytes = static_cast<unsigned>(kernel.sharedBytes);
        config.hStream = stream;
        config.attrs = &attr;
        config.numAttrs = 1;
        r = driver().launchKernelEx(&config, fn, params, nullptr);
    }
    else
    {
        r = driver().launchKernel(fn, grid.x, grid.y, grid.z, 32 * kernel.numWarps, 1, 1,
            static_cast<unsigned>(kernel.sharedBytes), stream, params, nullptr);
    }
    if (r != CUDA_SUCCESS)
    {
        return fail(r,
            std::string("kernel ") + kernel.name + ": launch of grid (" + std::to_string(grid.x) + ","
                + std::to_string(grid.y) + "," + std::to_string(grid.z) + ") failed: " + errorName(r));
    }
    return CUDA_SUCCESS;
}

std::string lastError()
{
    return tLastError;
}

CUresult setError(CUresult code, std::string message)
{
    return fail(code, std::move(message));
}

std::string deviceName(int ordinal)
{
    char name[256] = {};
    Driver const& d = driver();
    if (!d.loadError.empty() || d.deviceGetName(name, sizeof(name) - 1, ordinal) != CUDA_SUCCESS)
    {
        return "CUDA device " + std::to_string(ordinal);
    }
    return name;
}

std::string binaryFor(KernelImage const& kernel, int sm)
{
    if (Cubin const* c = pickCubin(kernel, sm))
    {
        return "cubin sm_" + std::to_string(c->sm);
    }
    if (kernel.ptx && kernel.ptxSm <= sm)
    {
        return "ptx sm_" + std::to_string(kernel.ptxSm) + " (JIT)";
    }
    return "";
}

} // namespace memmamba::aot
