// SelectiveScanChunk: the selective scan over T tokens from state h0 (prefill). See README.md beside this file.
#pragma once

#include "../common/memmambaPlugin.h"

namespace memmamba::plugin
{

class SelectiveScanChunkPlugin : public PluginBase
{
public:
    static constexpr char const* kNAME = "SelectiveScanChunk";
    static std::vector<FieldSpec> fieldSpecs();
    static SelectiveScanChunkPlugin* create(FieldReader& fields, std::string const& ns);

    SelectiveScanChunkPlugin(std::string ns, int32_t dtSoftplus);

    IPluginV3* clone() noexcept override;
    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override;
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    PluginFieldCollection const* getFieldsToSerialize() noexcept override;

protected:
    std::string checkShapes(PluginTensorDesc const* in, PluginTensorDesc const* out) override;
    std::string checkLimits(DynamicPluginTensorDesc const* in) override;
    bool preloadKernels() override;

private:
    int32_t mDtSoftplus;
    SerialFields mSerial;
    int32_t mB{0}, mT{0}, mDi{0}, mN{0}; // set by onShapeChange
};

} // namespace memmamba::plugin
