// memmamba AOT kernel runtime: launch Triton kernels compiled ahead of time (memmamba_deploy/aot.py).
//
// No TensorRT and no CUDA runtime dependency: the CUDA driver (libcuda.so.1) is opened on first use, so a library
// built on this layer loads on machines without a GPU (and fails with a clear message when asked to launch).
// Each KernelImage carries cubins for several SMs plus PTX of the lowest one; the first launch in a CUDA context
// picks the cubin for the context's device (or JIT-compiles the PTX on a newer GPU), loads it once and caches the
// function. Used by the TensorRT plugins (plugins_trt/) and the C++ runtime (cpp/).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda.h>

namespace memmamba::aot
{

//! One cubin of a kernel. `archSpecific` cubins (sm_90a) run only on exactly that SM. `pdl`: compiled to wait for
//! its predecessor itself (griddepcontrol, sm_90+), so it is launched as a programmatic dependent of it.
struct Cubin
{
    int sm;
    bool archSpecific;
    bool pdl;
    unsigned char const* data;
    size_t size;
};

//! A kernel compiled ahead of time: launch metadata + binaries. Generated; see memmamba_kernels.h.
struct KernelImage
{
    char const* name;       //!< variant name, e.g. "selective_scan_chunk_fp16"
    char const* entry;      //!< symbol of the kernel in its module
    int numWarps;           //!< block = 32 * numWarps threads
    int sharedBytes;        //!< dynamic shared memory per block
    int numParams;          //!< kernel parameters, Triton's two scratch pointers included
    int const* paramSizes;  //!< bytes of each parameter (the cubin's EIATTR_KPARAM_INFO, checked at generation)
    Cubin const* cubins;
    int numCubins;
    unsigned char const* ptx; //!< NUL-terminated PTX, or nullptr
    size_t ptxSize;
    int ptxSm;
    bool ptxPdl;            //!< the PTX waits for its predecessor itself (as Cubin::pdl)
};

struct Grid
{
    unsigned x{1}, y{1}, z{1};
};

//! Launch `kernel` on `stream` (in the CUDA context current on this thread). `params` holds one pointer per
//! kernel parameter, in order. A grid with a zero dimension launches nothing and succeeds. pdl: a binary compiled
//! with PDL (Cubin::pdl) is launched with programmatic stream serialization: it may be scheduled while the kernel
//! before it on the stream still runs, and waits for that kernel's results itself (also inside CUDA graphs). Ask
//! for it only where what the kernel reads before that wait is no predecessor's output (decode.py's rules);
//! MEMMAMBA_AOT_NO_PDL=1 launches every kernel plainly (the results are the same).
//! Returns CUDA_SUCCESS or an error code; lastError() then says what went wrong, naming the kernel.
//! Dry run (builds defining MEMMAMBA_AOT_TEST_HOOKS only, as compile_check.sh's for the tests): with
//! MEMMAMBA_AOT_DRYRUN=FILE set, nothing is loaded or run; each launch appends one line to FILE,
//! "name gridX gridY gridZ" and every parameter's bytes in hex, so a launcher can be checked without a GPU
//! (tests/test_plugins_aot.py replays the lines in Triton's interpreter).
CUresult launch(KernelImage const& kernel, Grid grid, CUstream stream, void** params, bool pdl = false);

//! Load `kernel` for the current context now (e.g. before CUDA-graph capture, where loading is not allowed).
CUresult preload(KernelImage const& kernel);

//! Whether launches of `kernel` asking for PDL get it in the current context (a PDL binary loaded, the driver's
//! cuLaunchKernelEx found, MEMMAMBA_AOT_NO_PDL unset); false where it cannot be loaded.
bool launchesPdl(KernelImage const& kernel);

//! The message of the last failure on this thread ("" when none).
std::string lastError();

//! Record a failure of the caller's own (e.g. sizes a kernel cannot take) for lastError(); returns `code`.
CUresult setError(CUresult code, std::string message);

//! Which binary `kernel` would use on a device of this SM: "cubin sm_86", "ptx sm_80 (JIT)" or "" if none.
//! Honours MEMMAMBA_AOT_FORCE_PTX=1, which makes every load JIT the PTX (to test the forward-compatible path).
std::string binaryFor(KernelImage const& kernel, int sm);

//! The name of CUDA device `ordinal` (the driver's), or "CUDA device N" where the driver cannot say.
std::string deviceName(int ordinal);

} // namespace memmamba::aot
