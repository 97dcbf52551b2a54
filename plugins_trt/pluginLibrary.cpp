// Entry points of libmemmamba_plugins.so, the two symbols IPluginRegistry::loadLibrary and
// `trtexec --dynamicPlugins` look up: setLoggerFinder and getCreators.
#include "common/memmambaPlugin.h"
#include "notePoolSweepPlugin/notePoolSweepPlugin.h"
#include "selectiveScanChunkPlugin/selectiveScanChunkPlugin.h"
#include "selectiveScanStepPlugin/selectiveScanStepPlugin.h"
#include "sparsePoolAttentionPlugin/sparsePoolAttentionPlugin.h"

using namespace memmamba::plugin;

extern "C"
{

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    memmamba::plugin::setLoggerFinder(finder);
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    // Each creator once per namespace (see kNAMESPACES): "" for the ONNX parser's default lookup, "memmamba" for
    // parsers that take the namespace from the node's domain.
    static Creator<SelectiveScanChunkPlugin> chunk0(kNAMESPACES[0]), chunk1(kNAMESPACES[1]);
    static Creator<SelectiveScanStepPlugin> step0(kNAMESPACES[0]), step1(kNAMESPACES[1]);
    static Creator<NotePoolSweepPlugin> sweep0(kNAMESPACES[0]), sweep1(kNAMESPACES[1]);
    static Creator<SparsePoolAttentionPlugin> attn0(kNAMESPACES[0]), attn1(kNAMESPACES[1]);
    static nvinfer1::IPluginCreatorInterface* const creators[]
        = {&chunk0, &step0, &sweep0, &attn0, &chunk1, &step1, &sweep1, &attn1};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}

} // extern "C"
