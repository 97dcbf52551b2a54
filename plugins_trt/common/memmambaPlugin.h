// Shared pieces of the memmamba TensorRT plugins: logging, PluginField parsing, the IPluginV3 base class and the
// creator template. Each plugin folder (selectiveScanChunkPlugin/, ...) holds one plugin; the contract every one
// of them follows is export/contract.py (op name = plugin name, version "1", ONNX attributes = plugin fields).
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <deque>
#include <exception>
#include <string>
#include <vector>

namespace memmamba::plugin
{

using namespace nvinfer1;

inline constexpr char const* kPLUGIN_VERSION = "1";
//! The creators are registered twice, in the default namespace "" and in the ONNX domain "memmamba": TensorRT's
//! parser looks plugins up with the node's `plugin_namespace` attribute (default ""), and since TensorRT 10.10
//! also with the node's domain. Either lookup finds the same plugin.
inline constexpr char const* kNAMESPACES[] = {"", "memmamba"};

// ---- logging: through TensorRT's logger once setLoggerFinder has been called, else stderr -------------------------
void setLoggerFinder(ILoggerFinder* finder);
void logError(std::string const& message);
void logWarning(std::string const& message);

// ---- plugin fields ---------------------------------------------------------------------------------------------------
//! A scalar field the creator accepts: its name (the ONNX attribute) and the PluginFieldType the ONNX parser
//! passes for it (an INT attribute arrives as kINT32, a FLOAT one as kFLOAT32, each of length 1).
struct FieldSpec
{
    char const* name;
    PluginFieldType type;
};

//! Reads a PluginFieldCollection strictly: every spec'd field present once with its type and length 1, no others.
class FieldReader
{
public:
    FieldReader(char const* pluginName, PluginFieldCollection const* fc, std::vector<FieldSpec> const& specs);
    bool ok() const { return mError.empty(); }
    std::string const& error() const { return mError; }
    int32_t getInt(char const* name) const;
    float getFloat(char const* name) const;
    void fail(std::string message);

private:
    PluginField const* find(char const* name) const;
    std::string mPlugin;
    PluginFieldCollection const* mFc;
    std::string mError;
};

//! Owns the fields a plugin serializes (the same names and types as its creator accepts). The fields point into
//! this object: rebuild it (assign a fresh one) in each getFieldsToSerialize call.
class SerialFields
{
public:
    void addInt(char const* name, int32_t value);
    void addFloat(char const* name, float value);
    PluginFieldCollection const* collection();

private:
    std::deque<int32_t> mInts; // a deque keeps element addresses stable as it grows
    std::deque<float> mFloats;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

// ---- tensor descriptions -------------------------------------------------------------------------------------------
//! Dtype class of a plugin input or output (export/contract.py: "T", "float32", "int32").
enum class IoType
{
    kACTIVATION, //!< "T": float32 or float16, the same for every such tensor of the node
    kFLOAT32,
    kINT32,
};

char const* dataTypeName(DataType t);
std::string dimsString(Dims const& d);
//! "" when `got` equals `want`, else "<what> must be [..], got [..]".
std::string expectDims(char const* what, Dims const& got, std::vector<int64_t> const& want);
//! A build-time extent for limit checks: the profile's maximum along `axis` (unknown counts as 1).
int32_t maxExtent(DynamicPluginTensorDesc const& d, int32_t axis);
//! getOutputShapes helper: false (after logging) when two build-time constant extents disagree.
bool sameExtent(char const* plugin, char const* what, IDimensionExpr const* a, IDimensionExpr const* b);

//! supportsFormatCombination for a plugin whose tensors (inputs then outputs) have the dtype classes `io`:
//! linear format; activations float32/float16, all alike; fixed-dtype tensors exactly their dtype.
bool supportsLinear(std::vector<IoType> const& io, int32_t pos, DynamicPluginTensorDesc const* inOut);

//! getOutputDataTypes: activation outputs take the activation dtype of the inputs, the others are fixed.
int32_t outputTypes(std::vector<IoType> const& io, int32_t nbInputs, DataType* outputTypes,
    DataType const* inputTypes, char const* pluginName);

// ---- the IPluginV3 base ----------------------------------------------------------------------------------------------
//! The capability plumbing shared by every memmamba plugin. A plugin derives from this and implements the shape,
//! dtype and launch logic; checkShapes() (runtime shapes) is called from onShapeChange.
class PluginBase : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    PluginBase(char const* name, std::string ns, std::vector<IoType> io, int32_t nbInputs);
    ~PluginBase() override = default;

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return mName; }
    char const* getPluginVersion() const noexcept override { return kPLUGIN_VERSION; }
    char const* getPluginNamespace() const noexcept override { return mNamespace.c_str(); }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return static_cast<int32_t>(mIo.size()) - mNbInputs; }
    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
        int32_t nbInputs) const noexcept override;
    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    IPluginV3* attachToContext(IPluginResourceContext* context) noexcept override;

protected:
    //! Runtime shapes are consistent (return "" or what is wrong); the plugin records what enqueue needs.
    virtual std::string checkShapes(PluginTensorDesc const* in, PluginTensorDesc const* out) = 0;
    //! At build time: "" when the kernels take the profile's largest shapes (`in[i].max`), else what is too large.
    virtual std::string checkLimits(DynamicPluginTensorDesc const* in) = 0;
    //! Load the kernels this plugin launches (before enqueue, so an enqueue under CUDA-graph capture never loads).
    //! False when that failed: aot::lastError() says why.
    virtual bool preloadKernels() = 0;
    //! Check the input count and ranks given to getOutputShapes; logs and returns false when wrong.
    bool checkRanks(DimsExprs const* inputs, int32_t nbInputs, std::vector<int32_t> const& ranks) const;
    int32_t fail(std::string const& message) const; //!< logs "<plugin> <name>: message", returns -1

    char const* mName;
    std::string mNamespace;
    std::vector<IoType> mIo;
    int32_t mNbInputs;
};

// ---- creators ----------------------------------------------------------------------------------------------------------
//! IPluginCreatorV3One for plugin class P, which provides:
//!   static constexpr char const* kNAME;  static std::vector<FieldSpec> fieldSpecs();
//!   static P* create(FieldReader& fields, std::string const& ns)   (nullptr after fields.fail(...) when invalid)
template <typename P>
class Creator : public IPluginCreatorV3One
{
public:
    explicit Creator(char const* ns)
        : mNamespace(ns)
    {
        for (FieldSpec const& f : P::fieldSpecs())
        {
            mFieldNames.emplace_back(f.name, nullptr, f.type, 1);
        }
        mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mCollection.fields = mFieldNames.data();
    }
    char const* getPluginName() const noexcept override { return P::kNAME; }
    char const* getPluginVersion() const noexcept override { return kPLUGIN_VERSION; }
    char const* getPluginNamespace() const noexcept override { return mNamespace.c_str(); }
    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }

    IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept override
    {
        try
        {
            FieldReader fields(P::kNAME, fc, P::fieldSpecs());
            P* plugin = fields.ok() ? P::create(fields, mNamespace) : nullptr;
            if (!plugin)
            {
                logError(std::string(P::kNAME) + " node '" + (name ? name : "") + "': " + fields.error());
            }
            return plugin;
        }
        catch (std::exception const& e)
        {
            logError(std::string(P::kNAME) + ": " + e.what());
            return nullptr;
        }
    }

private:
    std::string mNamespace;
    std::vector<PluginField> mFieldNames;
    PluginFieldCollection mCollection{};
};

} // namespace memmamba::plugin
