// The TensorRT backend: runs the engines `memdeploy build` wrote into an export directory (decode_step.engine,
// prefill.engine, listed in manifest.json under "tensorrt") with the plugin library (libmemmamba_plugins.so).
//
// Built only with -DMEMMAMBA_WITH_TENSORRT=ON against the TensorRT headers; libnvinfer is opened at run time
// (dlopen), so the library links without TensorRT and a machine without it gets a clear error, not a loader
// failure. Same position semantics as the native backend (backend.h): state, logits and the next token are
// double-buffered; each step binds the engine's state inputs to buffers p and its new_<state> outputs to 1-p;
// the sampler is the same AOT-compiled Triton kernel. Not run on a GPU by us yet: no TensorRT runtime is
// available on our machines (cpp/README.md).
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include "backend.h"
#include "checkpoint.h"
#include "cuda_util.h"
#include "json.h"
#include "kernels.h"
#include "state_file.h"

#define MM_STR2(x) #x
#define MM_STR(x) MM_STR2(x)

namespace memmamba::detail
{
namespace
{

class Logger final : public nvinfer1::ILogger
{
public:
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::lock_guard<std::mutex> lock(mutex_);
            last_ = msg ? msg : "";
        }
    }
    std::string last() const
    {
        std::lock_guard<std::mutex> lock(mutex_);
        return last_;
    }

private:
    mutable std::mutex mutex_;
    std::string last_;
};

using CreateRuntime = void* (*) (void*, int32_t);

// TensorRT's plugin registry is one per process, and loadLibrary fails when a library's plugins are registered
// already (IPluginRegistry::loadLibrary, NvInferRuntimeCommon.h): a second session must not load the library
// again, and a second, different library cannot be loaded at all.
void loadPluginsOnce(nvinfer1::IPluginRegistry& registry, std::string const& path, Logger const& logger)
{
    static std::mutex loading;
    static std::string loaded; // the canonical path of the library this process loaded
    std::lock_guard<std::mutex> lock(loading);
    std::error_code ec;
    std::string const canonical = std::filesystem::canonical(path, ec).string();
    std::string const key = ec ? path : canonical;
    if (!loaded.empty())
    {
        if (key == loaded)
            return;
        throw Error("this process loaded the plugin library " + loaded + " already; TensorRT holds one per process, "
            "so " + path + " cannot be loaded beside it (open every TensorRT session with the same library)");
    }
    if (registry.getCreator("SelectiveScanChunk", "1", "")) // the application registered the plugins itself
        return;
    if (!registry.loadLibrary(path.c_str()))
        throw Error("TensorRT could not load the plugin library " + path + ": " + logger.last());
    loaded = key;
}

CreateRuntime openNvinfer()
{
    static std::mutex opening;      // sessions may be opened from several threads at once
    std::lock_guard<std::mutex> lock(opening);
    static void* lib = nullptr;
    std::string tried;
    for (char const* name : {"libnvinfer.so." MM_STR(NV_TENSORRT_MAJOR), "libnvinfer.so"})
    {
        if (!lib)
            lib = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
        if (!lib)
        {
            char const* why = dlerror();
            tried += std::string(tried.empty() ? "" : "; ") + (why ? why : name);
        }
    }
    if (!lib)
        throw Error("TensorRT is not installed (" + tried + "): on x86-64 `pip install tensorrt` or NVIDIA's "
            "TensorRT packages, on Jetson JetPack; the TensorRT backend was built for TensorRT "
            MM_STR(NV_TENSORRT_MAJOR) ".x headers");
    auto fn = reinterpret_cast<CreateRuntime>(dlsym(lib, "createInferRuntime_INTERNAL"));
    if (!fn)
        throw Error("libnvinfer lacks createInferRuntime_INTERNAL: not a TensorRT runtime library");
    return fn;
}

std::string readFile(std::string const& path)
{
    std::ifstream f(path, std::ios::binary);
    if (!f)
        throw Error("cannot read " + path);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

//! Member `key` of a manifest object, or an Error naming it.
json::Value const& field(json::Value const& obj, char const* key, std::string const& where)
{
    auto const* v = obj.isObject() ? obj.find(key) : nullptr;
    if (!v)
        throw Error(where + " lacks '" + key + "'");
    return *v;
}

struct StateSpec
{
    std::string field;  // conv / ssm / pool / prio
    std::string input;  // graph input name, e.g. conv_state
    std::string output; // new_conv_state
    std::vector<int64_t> shape;
    DType dtype;
    float initial;
};

template <typename T>
struct TrtDeleter
{
    void operator()(T* p) const { delete p; }
};
template <typename T>
using TrtPtr = std::unique_ptr<T, TrtDeleter<T>>;

struct Engines
{
    Logger logger;
    TrtPtr<nvinfer1::IRuntime> runtime;
    TrtPtr<nvinfer1::ICudaEngine> decode, prefill;
    Config config;
    DType dtype;
    int maxBatch{1}, maxPrefill{1};
    std::vector<StateSpec> states;
    std::string dir;
    std::shared_ptr<LazyFingerprint> fingerprint;   // of the export's reference weights, for session state files
    ~Engines()
    {
        decode.reset(); // engines before the runtime
        prefill.reset();
    }
};

std::shared_ptr<Engines> loadEngines(std::string const& dir, SessionOptions const& options)
{
    auto e = std::make_shared<Engines>();
    e->dir = dir;
    std::string path = dir + "/manifest.json";
    json::Value m;
    try
    {
        m = json::Value::parse(readFile(path));
    }
    catch (Error const& err)
    {
        throw Error(dir + " is not an export directory (" + err.what() + "): run `memdeploy export` and `memdeploy build`");
    }
    auto need = [&](char const* key) -> json::Value const& {
        auto const* v = m.find(key);
        if (!v)
            throw Error(path + " lacks '" + key + "'");
        return *v;
    };
    if (need("format").asString("format") != "memmamba-deploy-export")
        throw Error(path + " is not a memdeploy export manifest");
    int64_t const version = need("format_version").asInt("format_version"); // export/manifest.py READS_VERSIONS
    if (version != 1 && version != 2)
        throw Error(path + " has format_version " + std::to_string(version) + "; this runtime reads 1 and 2");
    auto const* trt = m.find("tensorrt");
    if (!trt)
        throw Error(dir + " has no TensorRT engines yet: run `memdeploy build " + dir + " --plugins LIB`");
    try
    {
        e->config = configFromJson(need("config"));
    }
    catch (Error const& err)
    {
        throw Error(path + ": config: " + err.what());
    }
    std::string dtype = need("dtype").asString("dtype");
    e->dtype = dtype == "fp16" ? DType::kFloat16 : DType::kFloat32;
    if (dtype != "fp16" && dtype != "fp32")
        throw Error(path + ": unknown dtype '" + dtype + "'");
    for (auto const& s : need("state").asArray("state"))
    {
        StateSpec spec;
        spec.field = field(s, "field", path + " state").asString("state field");
        spec.input = field(s, "name", path + " state").asString("state name");
        spec.output = field(s, "output", path + " state").asString("state output");
        for (auto const& d : field(s, "shape", path + " state").asArray("state shape"))
            spec.shape.push_back(d.isString() ? -1 : d.asInt("state shape")); // "batch" -> -1
        std::string const stateDtype = field(s, "dtype", path + " state").asString("state dtype");
        if (stateDtype != "float16" && stateDtype != "float32")
            throw Error(path + ": state " + spec.field + " has dtype '" + stateDtype + "' (float16 or float32)");
        spec.dtype = stateDtype == "float16" ? DType::kFloat16 : DType::kFloat32;
        spec.initial = static_cast<float>(field(s, "initial", path + " state").asNumber("state initial"));
        e->states.push_back(spec);
    }
    auto const* reference = m.find("reference");    // the exported weights (export/manifest.py), if kept
    e->fingerprint = std::make_shared<LazyFingerprint>(reference && reference->isString()
            ? dir + "/" + reference->asString("reference") + "/model.safetensors" : std::string());
    e->maxBatch = static_cast<int>(field(*trt, "max_batch", path).asInt("max_batch"));
    e->maxPrefill = static_cast<int>(field(*trt, "max_prefill", path).asInt("max_prefill"));
    if (options.batch > e->maxBatch)
        throw Error("batch " + std::to_string(options.batch) + " is outside the engines' profile 1.."
            + std::to_string(e->maxBatch) + " (memdeploy build --max-batch)");

    CreateRuntime create = openNvinfer();
    e->runtime.reset(static_cast<nvinfer1::IRuntime*>(create(&e->logger, NV_TENSORRT_VERSION)));
    if (!e->runtime)
        throw Error("TensorRT refused to create a runtime (the installed libnvinfer is not the "
            MM_STR(NV_TENSORRT_MAJOR) ".x this backend was built for?): " + e->logger.last());
    std::string plugins = options.pluginLibrary.empty() ? field(*trt, "plugins", path).asString("plugins") : options.pluginLibrary;
    if (!std::ifstream(plugins))
        throw Error("no plugin library at " + plugins + " (build plugins_trt/, or pass SessionOptions::pluginLibrary)");
    loadPluginsOnce(e->runtime->getPluginRegistry(), plugins, e->logger);
    auto const& engines = field(*trt, "engines", path).asObject("engines");
    for (auto const& [graph, entry] : engines)
    {
        std::string file = dir + "/" + field(entry, "file", path + " engine").asString("engine file");
        std::string blob = readFile(file);
        auto* engine = e->runtime->deserializeCudaEngine(blob.data(), blob.size());
        if (!engine)
            throw Error("TensorRT could not load " + file + " (built by another TensorRT version or for another GPU?): "
                + e->logger.last());
        (graph == "decode_step" ? e->decode : e->prefill).reset(engine);
    }
    if (!e->decode || !e->prefill)
        throw Error(path + " must list decode_step and prefill engines");
    return e;
}

class TensorRTBackend final : public Backend
{
public:
    TensorRTBackend(std::shared_ptr<Engines> engines, SessionOptions options)
        : e_(std::move(engines))
        , opt_(std::move(options))
    {
        opt_.dtype = e_->dtype;     // the engines decide; options() tells what runs
        DeviceGuard onDevice(opt_.device);
        // blocking w.r.t. the legacy stream: TensorRT's own setup work there is ordered before our first step
        MM_CUDA(cudaStreamCreate(&stream_));
        decode_.reset(e_->decode->createExecutionContext());
        prefill_.reset(e_->prefill->createExecutionContext());
        if (!decode_ || !prefill_)
            throw Error("TensorRT could not create execution contexts: " + e_->logger.last());
        prefillLengths_ = e_->prefill->getTensorIOMode("lengths") == nvinfer1::TensorIOMode::kINPUT;
        if (prefillLengths_ && e_->prefill->getTensorDataType("lengths") != nvinfer1::DataType::kINT64)
            throw Error("the prefill engine's lengths input is not int64: build the engines again (memdeploy build)");
        int64_t B = opt_.batch, V = e_->config.vocab_size;
        for (int p = 0; p < 2; ++p)
        {
            for (auto const& s : e_->states)
                state_[p][s.field] = DeviceBuffer(bytes(s));
            logits_[p] = DeviceBuffer(B * V * 4);
            tok_[p] = DeviceBuffer(B * 8);
        }
        rng_ = DeviceBuffer(16);
        params_ = DeviceBuffer(16);
        for (DeviceBuffer* b : {&tok_[0], &tok_[1], &logits_[0], &logits_[1], &rng_})
            MM_CUDA(cudaMemset(b->get(), 0, b->bytes()));
        MM_CUDA(cudaDeviceSynchronize());
        MM_CUDA(cudaMallocHost(reinterpret_cast<void**>(&pinned_), 2 * B * sizeof(int64_t)));
        for (auto& ev : nextReady_)
            MM_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
        if (aot::preload(*sample_.image) != CUDA_SUCCESS)
            throw Error(aot::lastError());
        reset();
        setStream(opt_.seed, 0);
        setSampling({});
    }

    ~TensorRTBackend() override
    {
        if (stream_)
            cudaStreamSynchronize(stream_);
        decode_.reset();
        prefill_.reset();
        for (auto ev : nextReady_)
            if (ev)
                cudaEventDestroy(ev);
        if (pinned_)
            cudaFreeHost(pinned_);
        if (stream_)
            cudaStreamDestroy(stream_);
    }

    Config const& config() const override { return e_->config; }
    SessionOptions const& options() const override { return opt_; }
    std::string describe() const override
    {
        return "tensorrt | " + e_->dir + " | " + dtypeName(e_->dtype) + " | batch " + std::to_string(opt_.batch)
            + " | TensorRT " MM_STR(NV_TENSORRT_MAJOR) ".x headers";
    }

    void prefill(int32_t const* tokens, int T, int32_t const* lengths) override
    {
        if (lengths)
            throw Error("the tensorrt backend prefills rows of one length (it would have to keep each row's logits "
                        "from the chunk of max_prefill tokens where the row ends): prefill each prompt in a "
                        "sibling(1) session and copyRow it into the batch");
        DeviceGuard onDevice(opt_.device);
        int const B = opt_.batch;
        for (int start = 0; start < T; start += e_->maxPrefill) // resumable prefill, in chunks of the profile's max
        {
            int n = std::min(e_->maxPrefill, T - start);
            std::vector<int64_t> ids(static_cast<size_t>(B) * n);
            for (int b = 0; b < B; ++b)
                for (int t = 0; t < n; ++t)
                    ids[static_cast<size_t>(b) * n + t] = tokens[static_cast<size_t>(b) * T + start + t];
            if (ids_.bytes() < ids.size() * 8)
                ids_ = DeviceBuffer(ids.size() * 8);
            MM_CUDA(cudaMemcpyAsync(ids_.get(), ids.data(), ids.size() * 8, cudaMemcpyHostToDevice, stream_));
            run(*prefill_, ids_.get(), n);
            MM_CUDA(cudaStreamSynchronize(stream_));
        }
    }

    void step(int32_t const* tokens) override
    {
        DeviceGuard onDevice(opt_.device);
        std::vector<int64_t> t(tokens, tokens + opt_.batch);
        MM_CUDA(cudaMemcpyAsync(tok_[cur_].get(), t.data(), t.size() * 8, cudaMemcpyHostToDevice, stream_));
        run(*decode_, tok_[cur_].get(), 1);
        MM_CUDA(cudaStreamSynchronize(stream_));
    }

    bool hasLogits() const override { return hasLogits_; }
    void logits(float* out) const override
    {
        DeviceGuard onDevice(opt_.device);
        MM_CUDA(cudaMemcpyAsync(out, logits_[cur_].get(), logits_[cur_].bytes(), cudaMemcpyDeviceToHost, stream_));
        MM_CUDA(cudaStreamSynchronize(stream_));
    }

    void setSampling(SamplingParams const& p) override
    {
        DeviceGuard onDevice(opt_.device);
        float host[4] = {p.temperature, static_cast<float>(p.topK), p.topP, 0.f};
        MM_CUDA(cudaMemcpyAsync(params_.get(), host, sizeof(host), cudaMemcpyHostToDevice, stream_));
        MM_CUDA(cudaStreamSynchronize(stream_));
    }
    void resample() override
    {
        DeviceGuard onDevice(opt_.device);
        sample(cur_);
    }
    void stepNext() override
    {
        DeviceGuard onDevice(opt_.device);
        run(*decode_, tok_[cur_].get(), 1);
    }
    void copyNextAsync(int slot) override
    {
        DeviceGuard onDevice(opt_.device);
        MM_CUDA(cudaMemcpyAsync(pinned_ + slot * opt_.batch, tok_[cur_].get(), opt_.batch * 8, cudaMemcpyDeviceToHost,
            stream_));
        MM_CUDA(cudaEventRecord(nextReady_[slot], stream_));
    }
    void waitNext(int slot, int32_t* out) override
    {
        MM_CUDA(cudaEventSynchronize(nextReady_[slot]));
        for (int b = 0; b < opt_.batch; ++b)
            out[b] = static_cast<int32_t>(pinned_[slot * opt_.batch + b]);
    }
    void undoStep() override
    {
        if (!canUndo_)
            throw Error("internal: undoStep without a step to undo");
        cur_ ^= 1;
        canUndo_ = false;
    }

    void reset() override
    {
        DeviceGuard onDevice(opt_.device);
        for (int p = 0; p < 2; ++p)
            for (auto const& s : e_->states)
            {
                std::vector<float> init(bytes(s) / 4, s.initial);
                if (s.dtype == DType::kFloat16 && s.initial != 0.f)
                    throw Error("internal: fp16 state with a non-zero initial value");
                if (s.initial == 0.f)
                    MM_CUDA(cudaMemset(state_[p][s.field].get(), 0, bytes(s)));
                else
                    MM_CUDA(cudaMemcpy(state_[p][s.field].get(), init.data(), bytes(s), cudaMemcpyHostToDevice));
            }
        hasLogits_ = false;
        canUndo_ = false;
    }
    void setStream(uint64_t seed, uint32_t step) override
    {
        DeviceGuard onDevice(opt_.device);
        uint32_t rng[4] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), step, 0};
        // on the session's stream, after its earlier draws; synchronized before rng leaves scope
        MM_CUDA(cudaMemcpyAsync(rng_.get(), rng, sizeof(rng), cudaMemcpyHostToDevice, stream_));
        MM_CUDA(cudaStreamSynchronize(stream_));
    }
    std::unique_ptr<Backend> sibling(int batch) const override
    {
        if (batch > e_->maxBatch)
            throw Error("batch " + std::to_string(batch) + " is outside the engines' profile 1.."
                + std::to_string(e_->maxBatch) + " (memdeploy build --max-batch)");
        SessionOptions options = opt_;
        options.batch = batch;
        DeviceGuard onDevice(opt_.device);
        return std::make_unique<TensorRTBackend>(e_, options);
    }
    void const* weightsIdentity() const override { return e_.get(); }
    std::unique_ptr<Backend> fork() const override
    {
        DeviceGuard onDevice(opt_.device);
        synchronize();
        auto other = std::make_unique<TensorRTBackend>(e_, opt_);
        for (auto const& s : e_->states)
            MM_CUDA(cudaMemcpy(other->state_[0][s.field].get(), state_[cur_].at(s.field).get(), bytes(s),
                cudaMemcpyDeviceToDevice));
        MM_CUDA(cudaMemcpy(other->logits_[0].get(), logits_[cur_].get(), logits_[cur_].bytes(), cudaMemcpyDeviceToDevice));
        MM_CUDA(cudaMemcpy(other->tok_[0].get(), tok_[cur_].get(), tok_[cur_].bytes(), cudaMemcpyDeviceToDevice));
        MM_CUDA(cudaMemcpy(other->rng_.get(), rng_.get(), 16, cudaMemcpyDeviceToDevice));
        MM_CUDA(cudaMemcpy(other->params_.get(), params_.get(), 16, cudaMemcpyDeviceToDevice));
        other->hasLogits_ = hasLogits_;
        return other;
    }
    std::vector<StateTensorInfo> stateInfo() const override
    {
        std::vector<StateTensorInfo> out;
        for (auto const& s : e_->states)
            out.push_back({s.field, shape(s), s.dtype});
        return out;
    }
    void copyRow(Backend const& fromBase, int fromRow, int toRow, bool complete) override
    {
        auto const& from = rowSource<TensorRTBackend>(fromBase);
        DeviceGuard onDevice(opt_.device);
        from.synchronize();
        for (auto const& info : stateInfo())
            if (spec(info.name).shape.size() < 2 || spec(info.name).shape[1] != -1)
                throw Error("copyRow: the export's state '" + info.name + "' does not keep its batch as dimension "
                    "1 ([L, batch, ...], as memdeploy exports do)");
        for (auto const& info : stateInfo())
            copyStateRow(state_[cur_].at(info.name).get(), opt_.batch, toRow,
                from.state_[from.cur_].at(info.name).get(), from.opt_.batch, fromRow, info, stream_);
        size_t const row = static_cast<size_t>(e_->config.vocab_size) * 4;     // fp32 logits
        MM_CUDA(cudaMemcpyAsync(static_cast<char*>(logits_[cur_].get()) + toRow * row,
            static_cast<char const*>(from.logits_[from.cur_].get()) + fromRow * row, row,
            cudaMemcpyDeviceToDevice, stream_));
        MM_CUDA(cudaStreamSynchronize(stream_));
        hasLogits_ = hasLogits_ || complete;
        canUndo_ = false;
    }
    void readState(std::string const& name, void* host) const override
    {
        DeviceGuard onDevice(opt_.device);
        synchronize();
        auto const& s = spec(name);
        MM_CUDA(cudaMemcpy(host, state_[cur_].at(s.field).get(), bytes(s), cudaMemcpyDeviceToHost));
    }
    void writeState(std::string const& name, void const* host) override
    {
        DeviceGuard onDevice(opt_.device);
        synchronize();
        auto const& s = spec(name);
        MM_CUDA(cudaMemcpy(state_[cur_].at(s.field).get(), host, bytes(s), cudaMemcpyHostToDevice));
        hasLogits_ = false;     // they were the old state's: the next token fed gives the restored state's
        canUndo_ = false;
    }
    void writeLogits(float const* host) override
    {
        DeviceGuard onDevice(opt_.device);
        synchronize();
        MM_CUDA(cudaMemcpy(logits_[cur_].get(), host, logits_[cur_].bytes(), cudaMemcpyHostToDevice));
        hasLogits_ = true;
        canUndo_ = false;
    }
    std::string weightsFingerprint() const override { return e_->fingerprint->get(); }
    DType logitsDtype() const override { return DType::kFloat32; }   // the engines' logits are fp32
    void synchronize() const override
    {
        DeviceGuard onDevice(opt_.device);
        MM_CUDA(cudaStreamSynchronize(stream_));
    }

private:
    std::shared_ptr<Engines> e_;
    SessionOptions opt_;
    cudaStream_t stream_{};
    TrtPtr<nvinfer1::IExecutionContext> decode_, prefill_;
    std::map<std::string, DeviceBuffer> state_[2];
    DeviceBuffer logits_[2], tok_[2], ids_, rng_, params_;
    DeviceBuffer lens_;                  //!< the prefill engine's lengths input [B] (T for every row), if it has one
    std::vector<int64_t> lensHost_;      //!< its source (outlives the copy: prefill waits for each chunk)
    bool prefillLengths_{false};         //!< the prefill engine has that input (exports of format version 2)
    int64_t* pinned_{nullptr};
    cudaEvent_t nextReady_[2]{};
    int cur_{0};
    bool canUndo_{false}, hasLogits_{false};
    Kernel sample_ = findKernel("sample", "fp32", "any"); // the engines' logits are fp32

    std::vector<int64_t> shape(StateSpec const& s) const
    {
        std::vector<int64_t> out = s.shape;
        for (auto& d : out)
            if (d < 0)
                d = opt_.batch;
        return out;
    }
    size_t bytes(StateSpec const& s) const
    {
        size_t n = s.dtype == DType::kFloat16 ? 2 : 4;
        for (int64_t d : shape(s))
            n *= static_cast<size_t>(d);
        return n;
    }
    StateSpec const& spec(std::string const& field) const
    {
        for (auto const& s : e_->states)
            if (s.field == field)
                return s;
        throw Error("no state tensor '" + field + "'");
    }

    static nvinfer1::Dims dims(std::vector<int64_t> const& shape)
    {
        nvinfer1::Dims d{};
        d.nbDims = static_cast<int32_t>(shape.size());
        for (size_t i = 0; i < shape.size(); ++i)
            d.d[i] = shape[i];
        return d;
    }

    void bind(nvinfer1::IExecutionContext& ctx, char const* name, void* ptr)
    {
        if (!ctx.setTensorAddress(name, ptr))
            throw Error(std::string("TensorRT rejected the address of tensor ") + name + ": " + e_->logger.last());
    }

    //! Feed input_ids [B, T] (int64 on the device) from state cur_ into state 1-cur_, then draw the next token.
    void run(nvinfer1::IExecutionContext& ctx, void* ids, int T)
    {
        int const p = cur_, q = 1 - cur_;
        if (!ctx.setInputShape("input_ids", dims({opt_.batch, T})))
            throw Error("TensorRT rejected input_ids of shape [" + std::to_string(opt_.batch) + ", " + std::to_string(T)
                + "]: " + e_->logger.last());
        bind(ctx, "input_ids", ids);
        // prefill engines of exports since the graph took lengths [B]: every row has all T tokens
        if (&ctx == prefill_.get() && prefillLengths_)
        {
            if (lensHost_.size() != static_cast<size_t>(opt_.batch))
                lensHost_.resize(opt_.batch), lens_ = DeviceBuffer(opt_.batch * 8);
            std::fill(lensHost_.begin(), lensHost_.end(), T);
            MM_CUDA(cudaMemcpyAsync(lens_.get(), lensHost_.data(), opt_.batch * 8, cudaMemcpyHostToDevice, stream_));
            if (!ctx.setInputShape("lengths", dims({opt_.batch})))
                throw Error("TensorRT rejected lengths of shape [" + std::to_string(opt_.batch) + "]: "
                    + e_->logger.last());
            bind(ctx, "lengths", lens_.get());
        }
        for (auto const& s : e_->states)
        {
            if (!ctx.setInputShape(s.input.c_str(), dims(shape(s))))
                throw Error("TensorRT rejected the shape of state " + s.input + ": " + e_->logger.last());
            bind(ctx, s.input.c_str(), state_[p][s.field].get());
            bind(ctx, s.output.c_str(), state_[q][s.field].get());
        }
        bind(ctx, "logits", logits_[q].get());
        if (!ctx.enqueueV3(stream_))
            throw Error("TensorRT failed to run the engine: " + e_->logger.last());
        sample(q);
        cur_ = q;
        canUndo_ = true;
        hasLogits_ = true;
    }

    void sample(int p)
    {
        Launch(sample_)
            .ptr("logits_ptr", logits_[p].get())
            .ptr("params_ptr", params_.get())
            .ptr("rng_ptr", rng_.get())
            .ptr("token_ptr", tok_[p].get())
            .i32("V", e_->config.vocab_size)
            .i32("stride_row", e_->config.vocab_size)
            .i32("n_rows", opt_.batch)
            .run({static_cast<unsigned>(opt_.batch), 1, 1}, stream_);
    }
};

} // namespace

std::unique_ptr<Backend> openTensorRT(std::string const& exportDir, SessionOptions const& options)
{
    if (!std::ifstream(exportDir + "/manifest.json"))   // a bad export is reported as such, GPU or not
        throw Error(exportDir + " is not an export directory (no manifest.json): run `memdeploy export` and "
                                "`memdeploy build`");
    requireDevice(options.device, "the TensorRT backend");
    DeviceGuard onDevice(options.device);
    return std::make_unique<TensorRTBackend>(loadEngines(exportDir, options), options);
}

} // namespace memmamba::detail
