// memmamba_trt_check LIB: does a real TensorRT accept the plugin library? Loads it into TensorRT's plugin registry
// (what `trtexec --dynamicPlugins` and `memdeploy build --plugins` do) and looks every memmamba op up by name,
// version and namespace. Built only when TensorRT_LIB_DIR is given (it links libnvinfer).
#include <NvInferRuntime.h>

#include <cstdio>
#include <initializer_list>

namespace
{
class Logger : public nvinfer1::ILogger
{
    void log(Severity severity, char const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::fprintf(stderr, "[TensorRT] %s\n", msg);
        }
    }
} gLogger;
} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s libmemmamba_plugins.so\n", argv[0]);
        return 2;
    }
    nvinfer1::IRuntime* runtime = nvinfer1::createInferRuntime(gLogger); // initialises the registry's logger
    nvinfer1::IPluginRegistry& registry = runtime->getPluginRegistry();
    if (!registry.loadLibrary(argv[1]))
    {
        std::fprintf(stderr, "TensorRT refused to load %s\n", argv[1]);
        return 1;
    }
    int failures = 0;
    for (char const* ns : {"", "memmamba"})
    {
        for (char const* op : {"SelectiveScanChunk", "SelectiveScanStep", "NotePoolSweep", "SparsePoolAttention"})
        {
            bool found = registry.getCreator(op, "1", ns) != nullptr;
            std::printf("%-20s version 1 namespace '%s': %s\n", op, ns, found ? "registered" : "MISSING");
            failures += found ? 0 : 1;
        }
    }
    std::printf("TensorRT %d.%d.%d\n", getInferLibMajorVersion(), getInferLibMinorVersion(), getInferLibPatchVersion());
    delete runtime;
    return failures == 0 ? 0 : 1;
}
