// See sparsePoolAttentionPlugin.h and README.md.
#include "sparsePoolAttentionPlugin.h"

#include "../common/opLaunch.h"

#include <initializer_list>

namespace memmamba::plugin
{
namespace
{
// inputs q, keys, values, index; output o (export/contract.py)
std::vector<IoType> const kIO
    = {IoType::kACTIVATION, IoType::kACTIVATION, IoType::kACTIVATION, IoType::kINT32, IoType::kACTIVATION};
enum In { kQ, kKEYS, kVALUES, kINDEX };
} // namespace

std::vector<FieldSpec> SparsePoolAttentionPlugin::fieldSpecs()
{
    return {{"num_heads", PluginFieldType::kINT32}};
}

SparsePoolAttentionPlugin* SparsePoolAttentionPlugin::create(FieldReader& fields, std::string const& ns)
{
    int32_t const heads = fields.getInt("num_heads");
    if (heads < 1)
    {
        fields.fail("num_heads must be >= 1, got " + std::to_string(heads));
        return nullptr;
    }
    return new SparsePoolAttentionPlugin(ns, heads);
}

SparsePoolAttentionPlugin::SparsePoolAttentionPlugin(std::string ns, int32_t numHeads)
    : PluginBase(kNAME, std::move(ns), kIO, 4)
    , mNumHeads(numHeads)
{
}

IPluginV3* SparsePoolAttentionPlugin::clone() noexcept
{
    try
    {
        auto* p = new SparsePoolAttentionPlugin(mNamespace, mNumHeads);
        p->mB = mB, p->mT = mT, p->mM = mM, p->mS = mS, p->mDs = mDs, p->mD = mD;
        return p;
    }
    catch (std::exception const& e)
    {
        fail(e.what());
        return nullptr;
    }
}

int32_t SparsePoolAttentionPlugin::getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* out, int32_t nbOutputs, IExprBuilder&) noexcept
{
    if (nbOutputs != 1 || !checkRanks(in, nbInputs, {3, 3, 3, 3}))
    {
        return -1;
    }
    bool ok = sameExtent(kNAME, "summary widths of q and keys", in[kQ].d[2], in[kKEYS].d[2])
        && sameExtent(kNAME, "bank sizes of keys and values", in[kKEYS].d[1], in[kVALUES].d[1]);
    for (IDimensionExpr const* width : {in[kQ].d[2], in[kVALUES].d[2]})
    {
        if (ok && width->isConstant() && width->getConstantValue() % mNumHeads != 0)
        {
            return fail("widths of q and values must be divisible by num_heads=" + std::to_string(mNumHeads)
                + ", got " + std::to_string(width->getConstantValue()));
        }
    }
    if (!ok)
    {
        return -1;
    }
    out[0].nbDims = 3; // o [B, T, d]
    out[0].d[0] = in[kQ].d[0];
    out[0].d[1] = in[kQ].d[1];
    out[0].d[2] = in[kVALUES].d[2];
    return 0;
}

std::string SparsePoolAttentionPlugin::checkShapes(PluginTensorDesc const* in, PluginTensorDesc const* out)
{
    int64_t const b = in[kQ].dims.d[0], t = in[kQ].dims.d[1], ds = in[kQ].dims.d[2];
    int64_t const m = in[kKEYS].dims.d[1], d = in[kVALUES].dims.d[2], s = in[kINDEX].dims.d[2];
    for (std::string const& problem : {expectDims("keys", in[kKEYS].dims, {b, m, ds}),
             expectDims("values", in[kVALUES].dims, {b, m, d}), expectDims("index", in[kINDEX].dims, {b, t, s}),
             expectDims("o", out[0].dims, {b, t, d})})
    {
        if (!problem.empty())
        {
            return problem;
        }
    }
    if (ds % mNumHeads != 0 || d % mNumHeads != 0)
    {
        return "widths of q (" + std::to_string(ds) + ") and values (" + std::to_string(d)
            + ") must be divisible by num_heads=" + std::to_string(mNumHeads);
    }
    mB = static_cast<int32_t>(b), mT = static_cast<int32_t>(t), mM = static_cast<int32_t>(m);
    mS = static_cast<int32_t>(s), mDs = static_cast<int32_t>(ds), mD = static_cast<int32_t>(d);
    return poolAttentionLimits(AttentionSizes{mB, mT, mM, mS, mDs, mD, mNumHeads});
}

std::string SparsePoolAttentionPlugin::checkLimits(DynamicPluginTensorDesc const* in)
{
    return poolAttentionLimits(AttentionSizes{maxExtent(in[kQ], 0), maxExtent(in[kQ], 1), maxExtent(in[kKEYS], 1),
        maxExtent(in[kINDEX], 2), maxExtent(in[kQ], 2), maxExtent(in[kVALUES], 2), mNumHeads});
}

bool SparsePoolAttentionPlugin::preloadKernels()
{
    return poolAttentionPreload();
}

int32_t SparsePoolAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*,
    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept
{
    CUresult r = poolAttentionLaunch(inputs[kQ], inputs[kKEYS], inputs[kVALUES], inputs[kINDEX], outputs[0],
        AttentionSizes{mB, mT, mM, mS, mDs, mD, mNumHeads}, inputDesc[kQ].type == DataType::kHALF,
        reinterpret_cast<CUstream>(stream));
    return r == CUDA_SUCCESS ? 0 : fail(aot::lastError());
}

PluginFieldCollection const* SparsePoolAttentionPlugin::getFieldsToSerialize() noexcept
{
    mSerial = SerialFields{};
    mSerial.addInt("num_heads", mNumHeads);
    return mSerial.collection();
}

} // namespace memmamba::plugin
