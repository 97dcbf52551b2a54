// See memmambaPlugin.h.
#include "memmambaPlugin.h"

#include "memmamba/aot_runtime.h"

#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <iostream>

namespace memmamba::plugin
{

// ---- logging -------------------------------------------------------------------------------------------------------
namespace
{
std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

void log(ILogger::Severity severity, std::string const& message)
{
    ILoggerFinder* finder = gLoggerFinder.load();
    ILogger* logger = finder ? finder->findLogger() : nullptr;
    std::string const text = "[memmamba plugins] " + message;
    if (logger)
    {
        logger->log(severity, text.c_str());
    }
    else if (severity <= ILogger::Severity::kWARNING)
    {
        std::cerr << text << std::endl;
    }
}
} // namespace

void setLoggerFinder(ILoggerFinder* finder)
{
    gLoggerFinder.store(finder);
}

void logError(std::string const& message)
{
    log(ILogger::Severity::kERROR, message);
}

void logWarning(std::string const& message)
{
    log(ILogger::Severity::kWARNING, message);
}

// ---- fields -----------------------------------------------------------------------------------------------------------
namespace
{
char const* fieldTypeName(PluginFieldType t)
{
    switch (t)
    {
    case PluginFieldType::kFLOAT16: return "kFLOAT16";
    case PluginFieldType::kFLOAT32: return "kFLOAT32";
    case PluginFieldType::kFLOAT64: return "kFLOAT64";
    case PluginFieldType::kINT8: return "kINT8";
    case PluginFieldType::kINT16: return "kINT16";
    case PluginFieldType::kINT32: return "kINT32";
    case PluginFieldType::kCHAR: return "kCHAR";
    case PluginFieldType::kDIMS: return "kDIMS";
    case PluginFieldType::kINT64: return "kINT64";
    default: return "another type";
    }
}
} // namespace

FieldReader::FieldReader(char const* pluginName, PluginFieldCollection const* fc, std::vector<FieldSpec> const& specs)
    : mPlugin(pluginName)
    , mFc(fc)
{
    std::string known;
    for (FieldSpec const& s : specs)
    {
        known += std::string(known.empty() ? "" : ", ") + s.name;
    }
    int32_t const n = fc ? fc->nbFields : 0;
    if (n > 0 && !fc->fields)
    {
        fail("the field collection has " + std::to_string(n) + " fields but no field array");
        return;
    }
    for (int32_t i = 0; i < n; ++i)
    {
        PluginField const& f = fc->fields[i];
        std::string const name = f.name ? f.name : "";
        FieldSpec const* spec = nullptr;
        for (FieldSpec const& s : specs)
        {
            spec = name == s.name ? &s : spec;
        }
        if (!spec)
        {
            fail("unknown field '" + name + "' (this plugin takes: " + known + ")");
            return;
        }
        for (int32_t j = 0; j < i; ++j)
        {
            if (fc->fields[j].name && name == fc->fields[j].name)
            {
                fail("field '" + name + "' given twice");
                return;
            }
        }
        if (f.type != spec->type || f.length != 1 || !f.data)
        {
            fail("field '" + name + "' must be one " + fieldTypeName(spec->type) + " value (the ONNX parser's type "
                + "for this attribute), got " + std::to_string(f.length) + " x " + fieldTypeName(f.type));
            return;
        }
    }
    for (FieldSpec const& s : specs)
    {
        if (!find(s.name))
        {
            fail(std::string("missing field '") + s.name + "' (the ONNX node needs the attribute " + s.name + ")");
            return;
        }
    }
}

PluginField const* FieldReader::find(char const* name) const
{
    for (int32_t i = 0; mFc && i < mFc->nbFields; ++i)
    {
        if (mFc->fields[i].name && std::strcmp(mFc->fields[i].name, name) == 0)
        {
            return &mFc->fields[i];
        }
    }
    return nullptr;
}

int32_t FieldReader::getInt(char const* name) const
{
    int32_t v = 0;
    std::memcpy(&v, find(name)->data, sizeof(v));
    return v;
}

float FieldReader::getFloat(char const* name) const
{
    float v = 0;
    std::memcpy(&v, find(name)->data, sizeof(v));
    return v;
}

void FieldReader::fail(std::string message)
{
    if (mError.empty())
    {
        mError = std::move(message);
    }
}

void SerialFields::addInt(char const* name, int32_t value)
{
    mInts.push_back(value);
    mFields.emplace_back(name, &mInts.back(), PluginFieldType::kINT32, 1);
}

void SerialFields::addFloat(char const* name, float value)
{
    mFloats.push_back(value);
    mFields.emplace_back(name, &mFloats.back(), PluginFieldType::kFLOAT32, 1);
}

PluginFieldCollection const* SerialFields::collection()
{
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
    return &mCollection;
}

// ---- tensor descriptions ---------------------------------------------------------------------------------------------
char const* dataTypeName(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT8: return "int8";
    case DataType::kBOOL: return "bool";
    default: return "another dtype";
    }
}

std::string dimsString(Dims const& d)
{
    std::string s = "[";
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        s += (i ? "," : "") + std::to_string(d.d[i]);
    }
    return s + "]";
}

std::string expectDims(char const* what, Dims const& got, std::vector<int64_t> const& want)
{
    bool same = got.nbDims == static_cast<int32_t>(want.size());
    for (int32_t i = 0; same && i < got.nbDims; ++i)
    {
        same = got.d[i] == want[i];
    }
    if (same)
    {
        return "";
    }
    Dims w{};
    w.nbDims = static_cast<int32_t>(want.size());
    for (int32_t i = 0; i < w.nbDims; ++i)
    {
        w.d[i] = want[i];
    }
    return std::string(what) + " must be " + dimsString(w) + ", got " + dimsString(got);
}

int32_t maxExtent(DynamicPluginTensorDesc const& d, int32_t axis)
{
    int64_t const m = axis < d.max.nbDims ? d.max.d[axis] : 1;
    return static_cast<int32_t>(m > 0 && m <= INT32_MAX ? m : 1);
}

bool sameExtent(char const* plugin, char const* what, IDimensionExpr const* a, IDimensionExpr const* b)
{
    if (a && b && a->isConstant() && b->isConstant() && a->getConstantValue() != b->getConstantValue())
    {
        logError(std::string(plugin) + ": " + what + " disagree (" + std::to_string(a->getConstantValue()) + " vs "
            + std::to_string(b->getConstantValue()) + ")");
        return false;
    }
    return true;
}

bool supportsLinear(std::vector<IoType> const& io, int32_t pos, DynamicPluginTensorDesc const* inOut)
{
    if (pos < 0 || pos >= static_cast<int32_t>(io.size()) || inOut[pos].desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    DataType const t = inOut[pos].desc.type;
    switch (io[pos])
    {
    case IoType::kFLOAT32: return t == DataType::kFLOAT;
    case IoType::kINT32: return t == DataType::kINT32;
    case IoType::kACTIVATION:
        for (int32_t i = 0; i < pos; ++i) // TensorRT asks position by position: match the first activation
        {
            if (io[i] == IoType::kACTIVATION)
            {
                return t == inOut[i].desc.type;
            }
        }
        return t == DataType::kFLOAT || t == DataType::kHALF;
    }
    return false;
}

int32_t outputTypes(std::vector<IoType> const& io, int32_t nbInputs, DataType* out, DataType const* in,
    char const* pluginName)
{
    DataType act = DataType::kFLOAT;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (io[i] == IoType::kACTIVATION)
        {
            act = in[i];
            break;
        }
    }
    if (act != DataType::kFLOAT && act != DataType::kHALF)
    {
        logError(std::string(pluginName) + ": activations must be float32 or float16, got " + dataTypeName(act));
        return -1;
    }
    for (size_t j = nbInputs; j < io.size(); ++j)
    {
        out[j - nbInputs] = io[j] == IoType::kACTIVATION ? act
            : io[j] == IoType::kFLOAT32                  ? DataType::kFLOAT
                                                         : DataType::kINT32;
    }
    return 0;
}

// ---- PluginBase ------------------------------------------------------------------------------------------------------
PluginBase::PluginBase(char const* name, std::string ns, std::vector<IoType> io, int32_t nbInputs)
    : mName(name)
    , mNamespace(std::move(ns))
    , mIo(std::move(io))
    , mNbInputs(nbInputs)
{
}

IPluginCapability* PluginBase::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

int32_t PluginBase::getOutputDataTypes(
    DataType* outTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != mNbInputs || nbOutputs != getNbOutputs())
    {
        return fail("expects " + std::to_string(mNbInputs) + " inputs and " + std::to_string(getNbOutputs())
            + " outputs, got " + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
    }
    return outputTypes(mIo, nbInputs, outTypes, inputTypes, mName);
}

bool PluginBase::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    return nbInputs == mNbInputs && nbOutputs == getNbOutputs() && supportsLinear(mIo, pos, inOut);
}

int32_t PluginBase::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    try
    {
        if (nbInputs != mNbInputs || nbOutputs != getNbOutputs())
        {
            return fail("configurePlugin: wrong number of inputs/outputs");
        }
        std::string const problem = checkLimits(in);
        return problem.empty() ? 0 : fail(problem);
    }
    catch (std::exception const& e)
    {
        return fail(e.what());
    }
}

int32_t PluginBase::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        if (nbInputs != mNbInputs || nbOutputs != getNbOutputs())
        {
            return fail("onShapeChange: wrong number of inputs/outputs");
        }
        for (int32_t i = 0; i < nbInputs + nbOutputs; ++i)
        {
            PluginTensorDesc const& d = i < nbInputs ? in[i] : out[i - nbInputs];
            for (int32_t k = 0; k < d.dims.nbDims; ++k)
            {
                if (d.dims.d[k] < 0 || d.dims.d[k] > INT32_MAX)
                {
                    return fail("tensor " + std::to_string(i) + " has unsupported extent " + dimsString(d.dims));
                }
            }
        }
        std::string const problem = checkShapes(in, out);
        if (!problem.empty())
        {
            return fail(problem);
        }
        return preloadKernels() ? 0 : fail(aot::lastError());
    }
    catch (std::exception const& e)
    {
        return fail(e.what());
    }
}

IPluginV3* PluginBase::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    // No per-context resources. Load the kernels now, while the execution context is being created, so that a
    // later enqueue under CUDA-graph capture never loads a module; a failure here reappears in onShapeChange.
    preloadKernels();
    return clone();
}

bool PluginBase::checkRanks(DimsExprs const* inputs, int32_t nbInputs, std::vector<int32_t> const& ranks) const
{
    if (nbInputs != static_cast<int32_t>(ranks.size()))
    {
        fail("expects " + std::to_string(ranks.size()) + " inputs, got " + std::to_string(nbInputs));
        return false;
    }
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (inputs[i].nbDims != ranks[i])
        {
            fail("input " + std::to_string(i) + " must have rank " + std::to_string(ranks[i]) + ", got rank "
                + std::to_string(inputs[i].nbDims));
            return false;
        }
    }
    return true;
}

int32_t PluginBase::fail(std::string const& message) const
{
    logError(std::string(mName) + ": " + message);
    return -1;
}

} // namespace memmamba::plugin
