// SelectiveScanStep: one decode token of the selective scan. See README.md beside this file.
#pragma once

#include "../common/memmambaPlugin.h"

namespace memmamba::plugin
{

class SelectiveScanStepPlugin : public PluginBase
{
public:
    static constexpr char const* kNAME = "SelectiveScanStep";
    static std::vector<FieldSpec> fieldSpecs();
    static SelectiveScanStepPlugin* create(FieldReader& fields, std::string const& ns);

    SelectiveScanStepPlugin(std::string ns, int32_t dtSoftplus);

    IPluginV3* clone() noexcept override;
    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override;
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
    int32_t mB{0}, mDi{0}, mN{0};
};

} // namespace memmamba::plugin
