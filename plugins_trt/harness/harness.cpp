// See harness.h. Built against the TensorRT headers only: every interface used here is a class with virtual
// methods (the plugin's) or one the harness implements itself (logger, IExprBuilder, resource context).
#include "harness.h"

#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

std::mutex gErrorMutex;
std::string gErrors; // harness + plugin messages since the last mh_last_error()

void addError(std::string const& message)
{
    std::lock_guard<std::mutex> lock(gErrorMutex);
    gErrors += (gErrors.empty() ? "" : "\n") + message;
}

// ---- what TensorRT would provide ----------------------------------------------------------------------------------
class HarnessLogger : public ILogger
{
public:
    void log(Severity severity, char const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            addError(msg ? msg : "");
        }
    }
};

class HarnessLoggerFinder : public ILoggerFinder
{
public:
    ILogger* findLogger() override { return &mLogger; }

private:
    HarnessLogger mLogger;
};

HarnessLoggerFinder gLoggerFinder;

//! An extent as TensorRT's builder hands it to getOutputShapes: a constant, or unknown at build time. The harness
//! still carries the value of an unknown extent so it can evaluate the output shapes afterwards; a plugin that
//! reads it anyway (getConstantValue on a non-constant) is flagged.
class Expr : public IDimensionExpr
{
public:
    Expr(int64_t value, bool constant)
        : mBody(value, constant)
    {
        mImpl = &mBody;
    }
    int64_t value() const { return mBody.value; }
    bool constant() const { return mBody.constant; }
    bool misread() const { return mBody.misread; }

private:
    struct Body : apiv::VDimensionExpr
    {
        Body(int64_t v, bool c)
            : value(v)
            , constant(c)
        {
        }
        bool isConstant() const override { return constant; }
        bool isSizeTensor() const override { return false; }
        int64_t getConstantValue() const override
        {
            if (!constant)
            {
                misread = true;
                return -1; // what TensorRT gives for an extent it does not know at build time
            }
            return value;
        }
        int64_t value;
        bool constant;
        mutable bool misread{false};
    } mBody;
};

int64_t evaluate(DimensionOperation op, int64_t a, int64_t b)
{
    switch (op)
    {
    case DimensionOperation::kSUM: return a + b;
    case DimensionOperation::kPROD: return a * b;
    case DimensionOperation::kMAX: return a > b ? a : b;
    case DimensionOperation::kMIN: return a < b ? a : b;
    case DimensionOperation::kSUB: return a - b;
    case DimensionOperation::kEQUAL: return a == b;
    case DimensionOperation::kLESS: return a < b;
    case DimensionOperation::kFLOOR_DIV: return b ? (a / b - ((a % b != 0) && ((a < 0) != (b < 0)))) : 0;
    case DimensionOperation::kCEIL_DIV: return b ? -((-a) / b - (((-a) % b != 0) && (((-a) < 0) != (b < 0)))) : 0;
    }
    return 0;
}

class ExprBuilder : public IExprBuilder
{
public:
    ExprBuilder() { mImpl = &mBody; }
    Expr const* make(int64_t value, bool constant) { return &mBody.exprs.emplace_back(value, constant); }
    bool misread() const
    {
        for (Expr const& e : mBody.exprs)
        {
            if (e.misread())
            {
                return true;
            }
        }
        return false;
    }

private:
    struct Body : apiv::VExprBuilder
    {
        IDimensionExpr const* constant(int64_t value) override { return &exprs.emplace_back(value, true); }
        IDimensionExpr const* operation(
            DimensionOperation op, IDimensionExpr const& first, IDimensionExpr const& second) override
        {
            auto const& a = static_cast<Expr const&>(first);
            auto const& b = static_cast<Expr const&>(second);
            return &exprs.emplace_back(evaluate(op, a.value(), b.value()), a.constant() && b.constant());
        }
        IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
        {
            addError("harness: declareSizeTensor is not supported (no memmamba plugin has size tensors)");
            return nullptr;
        }
        std::deque<Expr> exprs; // stable addresses
    } mBody;
};

class ResourceContext : public IPluginResourceContext
{
public:
    IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
};

// ---- the library --------------------------------------------------------------------------------------------------
struct Library
{
    void* handle{};
    std::vector<IPluginCreatorV3One*> creators;
};

struct RuntimePlugin
{
    std::unique_ptr<IPluginV3> engineCopy; // what TensorRT keeps in the engine (created with kRUNTIME)
    std::unique_ptr<IPluginV3> context;    // what an execution context runs (attachToContext)
    IPluginV3OneRuntime* runtime{};
};

IPluginCreatorV3One* findCreator(Library* lib, char const* op, char const* ns)
{
    for (IPluginCreatorV3One* c : lib->creators)
    {
        if (std::strcmp(c->getPluginName(), op) == 0 && std::strcmp(c->getPluginVersion(), "1") == 0
            && std::strcmp(c->getPluginNamespace(), ns) == 0)
        {
            return c;
        }
    }
    addError(std::string("harness: no creator for plugin '") + op + "' version 1 namespace '" + ns + "'");
    return nullptr;
}

template <typename T>
T* capability(IPluginV3* p, PluginCapabilityType type, char const* what)
{
    auto* c = p ? p->getCapabilityInterface(type) : nullptr;
    if (!c)
    {
        addError(std::string("harness: plugin returned no ") + what + " capability");
    }
    return static_cast<T*>(c);
}

PluginTensorDesc tensorDesc(mh_tensor const& t)
{
    PluginTensorDesc d{};
    d.dims.nbDims = t.rank;
    for (int32_t i = 0; i < t.rank; ++i)
    {
        d.dims.d[i] = t.dims[i];
    }
    d.type = static_cast<DataType>(t.dtype);
    d.format = TensorFormat::kLINEAR;
    d.scale = 1.0F;
    return d;
}

DynamicPluginTensorDesc dynamicDesc(mh_tensor const& t, bool symbolic)
{
    DynamicPluginTensorDesc d{};
    d.desc = tensorDesc(t);
    d.min = d.opt = d.max = d.desc.dims;
    if (symbolic)
    {
        for (int32_t i = 0; i < t.rank; ++i)
        {
            d.desc.dims.d[i] = -1; // TensorRT marks extents unknown at build time with -1
        }
    }
    return d;
}

//! The fields TensorRT stores in the engine: a deep copy of what getFieldsToSerialize returned.
struct SerializedFields
{
    explicit SerializedFields(PluginFieldCollection const* fc)
    {
        for (int32_t i = 0; fc && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            size_t bytes = 0;
            switch (f.type)
            {
            case PluginFieldType::kINT32:
            case PluginFieldType::kFLOAT32: bytes = 4; break;
            case PluginFieldType::kFLOAT64:
            case PluginFieldType::kINT64: bytes = 8; break;
            case PluginFieldType::kINT16:
            case PluginFieldType::kFLOAT16: bytes = 2; break;
            default: bytes = 1;
            }
            names.emplace_back(f.name ? f.name : "");
            auto const* p = static_cast<unsigned char const*>(f.data);
            data.emplace_back(p, p + bytes * static_cast<size_t>(f.length));
            types.push_back(f.type);
            lengths.push_back(f.length);
        }
        for (size_t i = 0; i < names.size(); ++i)
        {
            fields.emplace_back(names[i].c_str(), data[i].data(), types[i], lengths[i]);
        }
        collection.nbFields = static_cast<int32_t>(fields.size());
        collection.fields = fields.data();
    }
    std::deque<std::string> names;
    std::deque<std::vector<unsigned char>> data;
    std::vector<PluginFieldType> types;
    std::vector<int32_t> lengths;
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};
};

std::unique_ptr<IPluginV3> createPlugin(Library* lib, char const* op, char const* ns, char const* nodeName,
    int32_t nbFields, mh_field const* fields, TensorRTPhase phase, std::vector<PluginField>& storage)
{
    IPluginCreatorV3One* creator = findCreator(lib, op, ns);
    if (!creator)
    {
        return nullptr;
    }
    storage.clear();
    for (int32_t i = 0; i < nbFields; ++i)
    {
        storage.emplace_back(fields[i].name, fields[i].data, static_cast<PluginFieldType>(fields[i].type),
            fields[i].length);
    }
    PluginFieldCollection fc{static_cast<int32_t>(storage.size()), storage.data()};
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin(nodeName, &fc, phase));
    if (!plugin)
    {
        addError(std::string("harness: ") + op + " creator refused the fields");
    }
    return plugin;
}

bool identityMatches(IPluginV3OneCore* core, char const* op, char const* ns)
{
    if (std::strcmp(core->getPluginName(), op) != 0 || std::strcmp(core->getPluginVersion(), "1") != 0
        || std::strcmp(core->getPluginNamespace(), ns) != 0)
    {
        addError(std::string("harness: plugin reports name/version/namespace '") + core->getPluginName() + "' '"
            + core->getPluginVersion() + "' '" + core->getPluginNamespace() + "', its creator '" + op + "' '1' '"
            + ns + "'");
        return false;
    }
    return true;
}

} // namespace

extern "C"
{

void* mh_open(char const* library)
{
    void* handle = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (!handle)
    {
        char const* why = dlerror();
        addError(std::string("harness: cannot load plugin library ") + library + ": " + (why ? why : ""));
        return nullptr;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder"));
    if (!getCreators || !setLoggerFinder)
    {
        addError(std::string("harness: ") + library + " does not export getCreators and setLoggerFinder");
        dlclose(handle);
        return nullptr;
    }
    setLoggerFinder(&gLoggerFinder);
    auto lib = std::make_unique<Library>();
    lib->handle = handle;
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    for (int32_t i = 0; i < n; ++i)
    {
        InterfaceInfo info = creators[i]->getInterfaceInfo();
        if (std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") != 0 || info.major != 1)
        {
            addError(std::string("harness: creator ") + std::to_string(i) + " is a " + info.kind
                + ", not an IPluginCreatorV3One");
            dlclose(handle);
            return nullptr;
        }
        lib->creators.push_back(static_cast<IPluginCreatorV3One*>(creators[i]));
    }
    return lib.release();
}

void mh_close(void* lib)
{
    auto* l = static_cast<Library*>(lib);
    if (l)
    {
        dlclose(l->handle);
        delete l;
    }
}

int32_t mh_creators(void* lib, char* buf, int32_t len)
{
    auto* l = static_cast<Library*>(lib);
    if (!l || !buf || len <= 0)
    {
        return -1;
    }
    std::string text;
    for (IPluginCreatorV3One* c : l->creators)
    {
        text += std::string(c->getPluginName()) + " " + c->getPluginVersion() + " "
            + (c->getPluginNamespace()[0] ? c->getPluginNamespace() : "\"\"") + " ";
        PluginFieldCollection const* fc = c->getFieldNames();
        for (int32_t i = 0; fc && i < fc->nbFields; ++i)
        {
            text += std::string(i ? "," : "") + fc->fields[i].name + ":"
                + std::to_string(static_cast<int32_t>(fc->fields[i].type));
        }
        text += "\n";
    }
    std::strncpy(buf, text.c_str(), static_cast<size_t>(len) - 1);
    buf[len - 1] = '\0';
    return static_cast<int32_t>(text.size() < static_cast<size_t>(len) ? text.size() : len - 1);
}

void* mh_build(void* lib, char const* op, char const* ns, char const* nodeName, int32_t nbFields,
    mh_field const* fields, int32_t nbInputs, mh_tensor const* in, int32_t nbOutputs, mh_tensor* out, int32_t symbolic,
    uint64_t* workspace)
{
    auto* l = static_cast<Library*>(lib);
    std::vector<PluginField> storage;
    std::unique_ptr<IPluginV3> plugin = createPlugin(l, op, ns, nodeName, nbFields, fields, TensorRTPhase::kBUILD, storage);
    if (!plugin)
    {
        return nullptr;
    }
    auto* core = capability<IPluginV3OneCore>(plugin.get(), PluginCapabilityType::kCORE, "core");
    auto* build = capability<IPluginV3OneBuild>(plugin.get(), PluginCapabilityType::kBUILD, "build");
    auto* runtime = capability<IPluginV3OneRuntime>(plugin.get(), PluginCapabilityType::kRUNTIME, "runtime");
    if (!core || !build || !runtime || !identityMatches(core, op, ns))
    {
        return nullptr;
    }
    if (build->getNbOutputs() != nbOutputs)
    {
        addError("harness: " + std::string(op) + " reports " + std::to_string(build->getNbOutputs())
            + " outputs, the contract says " + std::to_string(nbOutputs));
        return nullptr;
    }
    // Output dtypes.
    std::vector<DataType> inTypes(nbInputs), outTypes(nbOutputs, DataType::kBOOL);
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        inTypes[i] = static_cast<DataType>(in[i].dtype);
    }
    if (build->getOutputDataTypes(outTypes.data(), nbOutputs, inTypes.data(), nbInputs) != 0)
    {
        addError(std::string("harness: ") + op + " getOutputDataTypes failed");
        return nullptr;
    }
    // Output shapes, through the harness's expression builder.
    ExprBuilder exprs;
    std::vector<DimsExprs> inExprs(nbInputs), outExprs(nbOutputs);
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        inExprs[i].nbDims = in[i].rank;
        for (int32_t k = 0; k < in[i].rank; ++k)
        {
            inExprs[i].d[k] = exprs.make(in[i].dims[k], symbolic == 0);
        }
    }
    if (build->getOutputShapes(inExprs.data(), nbInputs, nullptr, 0, outExprs.data(), nbOutputs, exprs) != 0)
    {
        addError(std::string("harness: ") + op + " getOutputShapes failed");
        return nullptr;
    }
    if (exprs.misread())
    {
        addError(std::string("harness: ") + op + " read the value of an extent unknown at build time");
        return nullptr;
    }
    for (int32_t j = 0; j < nbOutputs; ++j)
    {
        out[j].dtype = static_cast<int32_t>(outTypes[j]);
        out[j].rank = outExprs[j].nbDims;
        for (int32_t k = 0; k < outExprs[j].nbDims; ++k)
        {
            if (!outExprs[j].d[k])
            {
                addError(std::string("harness: ") + op + " left output " + std::to_string(j) + " extent "
                    + std::to_string(k) + " unset");
                return nullptr;
            }
            out[j].dims[k] = static_cast<Expr const*>(outExprs[j].d[k])->value();
        }
    }
    // Formats, position by position as TensorRT asks.
    std::vector<DynamicPluginTensorDesc> descs;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        descs.push_back(dynamicDesc(in[i], symbolic != 0));
    }
    for (int32_t j = 0; j < nbOutputs; ++j)
    {
        descs.push_back(dynamicDesc(out[j], symbolic != 0));
    }
    for (int32_t pos = 0; pos < nbInputs + nbOutputs; ++pos)
    {
        if (!build->supportsFormatCombination(pos, descs.data(), nbInputs, nbOutputs))
        {
            addError(std::string("harness: ") + op + " rejects the formats/dtypes at position " + std::to_string(pos));
            return nullptr;
        }
    }
    if (build->configurePlugin(descs.data(), nbInputs, descs.data() + nbInputs, nbOutputs) != 0)
    {
        addError(std::string("harness: ") + op + " configurePlugin failed");
        return nullptr;
    }
    if (workspace)
    {
        *workspace = build->getWorkspaceSize(descs.data(), nbInputs, descs.data() + nbInputs, nbOutputs);
    }
    // Serialize, drop the build-phase plugin, recreate from the serialized fields as the runtime does.
    SerializedFields serialized(runtime->getFieldsToSerialize());
    plugin.reset();
    auto result = std::make_unique<RuntimePlugin>();
    IPluginCreatorV3One* creator = findCreator(l, op, ns);
    result->engineCopy.reset(creator->createPlugin(nodeName, &serialized.collection, TensorRTPhase::kRUNTIME));
    auto* core2 = capability<IPluginV3OneCore>(result->engineCopy.get(), PluginCapabilityType::kCORE, "core");
    auto* runtime2
        = capability<IPluginV3OneRuntime>(result->engineCopy.get(), PluginCapabilityType::kRUNTIME, "runtime");
    if (!core2 || !runtime2 || !identityMatches(core2, op, ns))
    {
        addError(std::string("harness: ") + op + " could not be recreated from its serialized fields");
        return nullptr;
    }
    ResourceContext context;
    result->context.reset(runtime2->attachToContext(&context));
    result->runtime
        = capability<IPluginV3OneRuntime>(result->context.get(), PluginCapabilityType::kRUNTIME, "runtime");
    if (!result->runtime)
    {
        return nullptr;
    }
    return result.release();
}

int32_t mh_supports(void* lib, char const* op, char const* ns, int32_t nbFields, mh_field const* fields,
    int32_t nbInputs, int32_t nbOutputs, int32_t const* dtypes)
{
    std::vector<PluginField> storage;
    std::unique_ptr<IPluginV3> plugin = createPlugin(
        static_cast<Library*>(lib), op, ns, "probe", nbFields, fields, TensorRTPhase::kBUILD, storage);
    if (!plugin)
    {
        return -1;
    }
    auto* build = capability<IPluginV3OneBuild>(plugin.get(), PluginCapabilityType::kBUILD, "build");
    if (!build)
    {
        return -1;
    }
    std::vector<DynamicPluginTensorDesc> descs(nbInputs + nbOutputs);
    for (int32_t pos = 0; pos < nbInputs + nbOutputs; ++pos)
    {
        descs[pos].desc.type = static_cast<DataType>(dtypes[pos]);
        descs[pos].desc.format = TensorFormat::kLINEAR;
    }
    for (int32_t pos = 0; pos < nbInputs + nbOutputs; ++pos)
    {
        if (!build->supportsFormatCombination(pos, descs.data(), nbInputs, nbOutputs))
        {
            return 0;
        }
    }
    return 1;
}

int32_t mh_enqueue(void* plugin, int32_t nbInputs, mh_tensor const* in, void const* const* inputs, int32_t nbOutputs,
    mh_tensor const* out, void* const* outputs, void* workspace, void* stream)
{
    auto* p = static_cast<RuntimePlugin*>(plugin);
    std::vector<PluginTensorDesc> inDesc, outDesc;
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        inDesc.push_back(tensorDesc(in[i]));
    }
    for (int32_t j = 0; j < nbOutputs; ++j)
    {
        outDesc.push_back(tensorDesc(out[j]));
    }
    if (p->runtime->onShapeChange(inDesc.data(), nbInputs, outDesc.data(), nbOutputs) != 0)
    {
        addError("harness: onShapeChange failed");
        return -1;
    }
    if (p->runtime->enqueue(inDesc.data(), outDesc.data(), inputs, outputs, workspace,
            static_cast<cudaStream_t>(stream))
        != 0)
    {
        addError("harness: enqueue failed");
        return -1;
    }
    return 0;
}

void mh_release(void* plugin)
{
    delete static_cast<RuntimePlugin*>(plugin);
}

char const* mh_last_error()
{
    static thread_local std::string returned;
    std::lock_guard<std::mutex> lock(gErrorMutex);
    returned.swap(gErrors);
    gErrors.clear();
    return returned.c_str();
}

} // extern "C"
