// NotePoolSweep: replays the note pool's priority replacement over T tokens. See README.md beside this file.
#pragma once

#include "../common/memmambaPlugin.h"

namespace memmamba::plugin
{

class NotePoolSweepPlugin : public PluginBase
{
public:
    static constexpr char const* kNAME = "NotePoolSweep";
    static std::vector<FieldSpec> fieldSpecs();
    static NotePoolSweepPlugin* create(FieldReader& fields, std::string const& ns);

    NotePoolSweepPlugin(std::string ns, float insertThreshold);

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
    float mInsertThreshold;
    SerialFields mSerial;
    int32_t mB{0}, mT{0}, mK{0};
};

} // namespace memmamba::plugin
