// SparsePoolAttention: each query attends over the bank entries its index row names. See README.md beside this file.
#pragma once

#include "../common/memmambaPlugin.h"

namespace memmamba::plugin
{

class SparsePoolAttentionPlugin : public PluginBase
{
public:
    static constexpr char const* kNAME = "SparsePoolAttention";
    static std::vector<FieldSpec> fieldSpecs();
    static SparsePoolAttentionPlugin* create(FieldReader& fields, std::string const& ns);

    SparsePoolAttentionPlugin(std::string ns, int32_t numHeads);

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
    int32_t mNumHeads;
    SerialFields mSerial;
    int32_t mB{0}, mT{0}, mM{0}, mS{0}, mDs{0}, mD{0};
};

} // namespace memmamba::plugin
