// See notePoolSweepPlugin.h and README.md.
#include "notePoolSweepPlugin.h"

#include "../common/opLaunch.h"

#include <cmath>
#include <initializer_list>

namespace memmamba::plugin
{
namespace
{
// inputs scores, prio0; outputs index, prio (export/contract.py)
std::vector<IoType> const kIO = {IoType::kFLOAT32, IoType::kFLOAT32, IoType::kINT32, IoType::kFLOAT32};
} // namespace

std::vector<FieldSpec> NotePoolSweepPlugin::fieldSpecs()
{
    return {{"insert_threshold", PluginFieldType::kFLOAT32}};
}

NotePoolSweepPlugin* NotePoolSweepPlugin::create(FieldReader& fields, std::string const& ns)
{
    float const tau = fields.getFloat("insert_threshold");
    if (!std::isfinite(tau))
    {
        fields.fail("insert_threshold must be a finite number");
        return nullptr;
    }
    return new NotePoolSweepPlugin(ns, tau);
}

NotePoolSweepPlugin::NotePoolSweepPlugin(std::string ns, float insertThreshold)
    : PluginBase(kNAME, std::move(ns), kIO, 2)
    , mInsertThreshold(insertThreshold)
{
}

IPluginV3* NotePoolSweepPlugin::clone() noexcept
{
    try
    {
        auto* p = new NotePoolSweepPlugin(mNamespace, mInsertThreshold);
        p->mB = mB, p->mT = mT, p->mK = mK;
        return p;
    }
    catch (std::exception const& e)
    {
        fail(e.what());
        return nullptr;
    }
}

int32_t NotePoolSweepPlugin::getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* out, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    if (nbOutputs != 2 || !checkRanks(in, nbInputs, {2, 2}) || !sameExtent(kNAME, "batch of scores and prio0",
            in[0].d[0], in[1].d[0]))
    {
        return -1;
    }
    out[0].nbDims = 3; // index [B, T+1, K]: row t is the pool before token t, row T the pool after the last one
    out[0].d[0] = in[0].d[0];
    out[0].d[1] = exprBuilder.operation(DimensionOperation::kSUM, *in[0].d[1], *exprBuilder.constant(1));
    out[0].d[2] = in[1].d[1];
    out[1] = in[1]; // prio [B, K]
    return 0;
}

std::string NotePoolSweepPlugin::checkShapes(PluginTensorDesc const* in, PluginTensorDesc const* out)
{
    int64_t const b = in[0].dims.d[0], t = in[0].dims.d[1], k = in[1].dims.d[1];
    for (std::string const& problem : {expectDims("prio0", in[1].dims, {b, k}),
             expectDims("index", out[0].dims, {b, t + 1, k}), expectDims("prio", out[1].dims, {b, k})})
    {
        if (!problem.empty())
        {
            return problem;
        }
    }
    mB = static_cast<int32_t>(b), mT = static_cast<int32_t>(t), mK = static_cast<int32_t>(k);
    return poolSweepLimits(mB, mT, mK);
}

std::string NotePoolSweepPlugin::checkLimits(DynamicPluginTensorDesc const* in)
{
    return poolSweepLimits(maxExtent(in[0], 0), maxExtent(in[0], 1), maxExtent(in[1], 1));
}

bool NotePoolSweepPlugin::preloadKernels()
{
    return poolSweepPreload();
}

int32_t NotePoolSweepPlugin::enqueue(PluginTensorDesc const*, PluginTensorDesc const*, void const* const* inputs,
    void* const* outputs, void*, cudaStream_t stream) noexcept
{
    CUresult r = poolSweepLaunch(inputs[0], inputs[1], outputs[0], outputs[1], mB, mT, mK, mInsertThreshold,
        reinterpret_cast<CUstream>(stream));
    return r == CUDA_SUCCESS ? 0 : fail(aot::lastError());
}

PluginFieldCollection const* NotePoolSweepPlugin::getFieldsToSerialize() noexcept
{
    mSerial = SerialFields{};
    mSerial.addFloat("insert_threshold", mInsertThreshold);
    return mSerial.collection();
}

} // namespace memmamba::plugin
