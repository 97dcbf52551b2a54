// plugin_harness LIB: load a plugin library as TensorRT would and list its creators with their fields.
// The per-op checks (build phase, serialization round trip, enqueue vs the PyTorch reference) are driven from
// Python through the same harness library: tests/test_plugins_aot.py (CPU) and tests/gpu/test_plugins_gpu.py.
#include "harness.h"

#include <cstdio>

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s PLUGIN_LIBRARY\n", argv[0]);
        return 2;
    }
    void* lib = mh_open(argv[1]);
    if (!lib)
    {
        std::fprintf(stderr, "%s\n", mh_last_error());
        return 1;
    }
    char text[8192];
    if (mh_creators(lib, text, sizeof(text)) < 0)
    {
        std::fprintf(stderr, "cannot list creators: %s\n", mh_last_error());
        return 1;
    }
    std::printf("%s", text);
    mh_close(lib);
    return 0;
}
