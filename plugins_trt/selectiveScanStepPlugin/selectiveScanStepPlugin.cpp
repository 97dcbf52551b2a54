// See selectiveScanStepPlugin.h and README.md.
#include "selectiveScanStepPlugin.h"

#include "../common/opLaunch.h"

#include <initializer_list>

namespace memmamba::plugin
{
namespace
{
// inputs x, dt, A, B, C, D, z, dt_bias, h0; outputs y, h (export/contract.py)
std::vector<IoType> const kIO = {IoType::kACTIVATION, IoType::kACTIVATION, IoType::kFLOAT32, IoType::kACTIVATION,
    IoType::kACTIVATION, IoType::kFLOAT32, IoType::kACTIVATION, IoType::kFLOAT32, IoType::kFLOAT32,
    IoType::kACTIVATION, IoType::kFLOAT32};
enum In { kX, kDT, kA, kB, kC, kD, kZ, kDT_BIAS, kH0 };
} // namespace

std::vector<FieldSpec> SelectiveScanStepPlugin::fieldSpecs()
{
    return {{"dt_softplus", PluginFieldType::kINT32}};
}

SelectiveScanStepPlugin* SelectiveScanStepPlugin::create(FieldReader& fields, std::string const& ns)
{
    int32_t const softplus = fields.getInt("dt_softplus");
    if (softplus != 0 && softplus != 1)
    {
        fields.fail("dt_softplus must be 0 or 1, got " + std::to_string(softplus));
        return nullptr;
    }
    return new SelectiveScanStepPlugin(ns, softplus);
}

SelectiveScanStepPlugin::SelectiveScanStepPlugin(std::string ns, int32_t dtSoftplus)
    : PluginBase(kNAME, std::move(ns), kIO, 9)
    , mDtSoftplus(dtSoftplus)
{
}

IPluginV3* SelectiveScanStepPlugin::clone() noexcept
{
    try
    {
        auto* p = new SelectiveScanStepPlugin(mNamespace, mDtSoftplus);
        p->mB = mB, p->mDi = mDi, p->mN = mN;
        return p;
    }
    catch (std::exception const& e)
    {
        fail(e.what());
        return nullptr;
    }
}

int32_t SelectiveScanStepPlugin::getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* out, int32_t nbOutputs, IExprBuilder&) noexcept
{
    if (nbOutputs != 2 || !checkRanks(in, nbInputs, {2, 2, 2, 2, 2, 1, 2, 1, 3}))
    {
        return -1;
    }
    bool ok = sameExtent(kNAME, "d_inner of x and A", in[kX].d[1], in[kA].d[0])
        && sameExtent(kNAME, "d_state of A and h0", in[kA].d[1], in[kH0].d[2])
        && sameExtent(kNAME, "d_state of A and B", in[kA].d[1], in[kB].d[1])
        && sameExtent(kNAME, "d_inner of x and h0", in[kX].d[1], in[kH0].d[1]);
    if (!ok)
    {
        return -1;
    }
    out[0] = in[kX];  // y [B, Di]
    out[1] = in[kH0]; // h [B, Di, N]
    return 0;
}

std::string SelectiveScanStepPlugin::checkShapes(PluginTensorDesc const* in, PluginTensorDesc const* out)
{
    int64_t const b = in[kX].dims.d[0], di = in[kX].dims.d[1], n = in[kA].dims.d[1];
    for (std::string const& problem : {expectDims("dt", in[kDT].dims, {b, di}), expectDims("A", in[kA].dims, {di, n}),
             expectDims("B", in[kB].dims, {b, n}), expectDims("C", in[kC].dims, {b, n}),
             expectDims("D", in[kD].dims, {di}), expectDims("z", in[kZ].dims, {b, di}),
             expectDims("dt_bias", in[kDT_BIAS].dims, {di}), expectDims("h0", in[kH0].dims, {b, di, n}),
             expectDims("y", out[0].dims, {b, di}), expectDims("h", out[1].dims, {b, di, n})})
    {
        if (!problem.empty())
        {
            return problem;
        }
    }
    mB = static_cast<int32_t>(b), mDi = static_cast<int32_t>(di), mN = static_cast<int32_t>(n);
    return scanLimits(ScanSizes{mB, 1, mDi, mN});
}

std::string SelectiveScanStepPlugin::checkLimits(DynamicPluginTensorDesc const* in)
{
    return scanLimits(ScanSizes{maxExtent(in[kX], 0), 1, maxExtent(in[kX], 1), maxExtent(in[kA], 1)});
}

bool SelectiveScanStepPlugin::preloadKernels()
{
    return scanStepPreload();
}

int32_t SelectiveScanStepPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*,
    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept
{
    ScanTensors s{inputs[kX], inputs[kDT], inputs[kA], inputs[kB], inputs[kC], inputs[kD], inputs[kZ],
        inputs[kDT_BIAS], inputs[kH0], outputs[0], outputs[1], nullptr};
    CUresult r = scanStepLaunch(s, ScanSizes{mB, 1, mDi, mN}, inputDesc[kX].type == DataType::kHALF,
        mDtSoftplus != 0, reinterpret_cast<CUstream>(stream));
    return r == CUDA_SUCCESS ? 0 : fail(aot::lastError());
}

PluginFieldCollection const* SelectiveScanStepPlugin::getFieldsToSerialize() noexcept
{
    mSerial = SerialFields{};
    mSerial.addInt("dt_softplus", mDtSoftplus);
    return mSerial.collection();
}

} // namespace memmamba::plugin
