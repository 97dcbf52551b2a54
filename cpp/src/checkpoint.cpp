// See checkpoint.h.
#include "checkpoint.h"

#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "half.h"
#include "json.h"

namespace memmamba
{

std::string shapeString(std::vector<int64_t> const& shape)
{
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i)
        s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

std::vector<ExpectedTensor> expectedTensors(Config const& c)
{
    int64_t const d = c.d_model, di = c.dInner(), n = c.d_state, r = c.dt_rank, ds = c.summary_dim;
    std::vector<ExpectedTensor> out{{"embeddings.weight", {c.vocab_size, d}}};
    for (int64_t l = 0; l < c.n_layers; ++l)
    {
        std::string p = "layers." + std::to_string(l) + ".";
        std::vector<ExpectedTensor> layer{{p + "norm.weight", {d}}, {p + "mixer.A_log", {di, n}}, {p + "mixer.D", {di}},
            {p + "mixer.in_proj.weight", {2 * di, d}}, {p + "mixer.conv1d.weight", {di, 1, c.d_conv}},
            {p + "mixer.conv1d.bias", {di}}, {p + "mixer.x_proj.weight", {r + 2 * n, di}},
            {p + "mixer.dt_proj.weight", {di, r}}, {p + "mixer.dt_proj.bias", {di}},
            {p + "mixer.out_proj.weight", {d, di}}};
        if (c.memory)
        {
            layer.insert(layer.end(),
                {{p + "note.score_in.weight", {d / 4, d}}, {p + "note.score_out.weight", {1, d / 4}},
                    {p + "note.summary.weight", {ds, d}}, {p + "token_attn.alpha", {1}},
                    {p + "token_attn.q_proj.weight", {ds, d}}, {p + "token_attn.k_proj.weight", {ds, ds}},
                    {p + "token_attn.v_proj.weight", {d, ds}}, {p + "token_attn.trigger.weight", {1, d}},
                    {p + "token_attn.trigger.bias", {1}}});
            if (c.isCrossLayer(l))
                layer.insert(layer.end(),
                    {{p + "cross_attn.alpha", {1}}, {p + "cross_attn.q_proj.weight", {ds, d}},
                        {p + "cross_attn.k_proj.weight", {ds, ds}}, {p + "cross_attn.v_proj.weight", {d, ds}}});
        }
        out.insert(out.end(), layer.begin(), layer.end());
    }
    out.push_back({"norm_f.weight", {d}});
    return out;
}

namespace
{
std::string readFile(std::string const& path)
{
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

bool isFile(std::string const& path)
{
    struct stat st{};
    return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string listSome(std::vector<std::string> const& names)
{
    std::string s = "[";
    for (size_t i = 0; i < names.size() && i < 8; ++i)
        s += (i ? ", '" : "'") + names[i] + "'";
    return s + (names.size() > 8 ? ", ...]" : "]");
}
} // namespace

Checkpoint::Checkpoint(std::string const& directory)
    : directory_(directory)
{
    struct stat st{};
    if (::stat(directory.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
        throw Error("no checkpoint directory at " + directory);
    std::string cfgPath = directory + "/config.json";
    if (!isFile(cfgPath))
        throw Error("missing config.json in " + directory);
    std::string text = readFile(cfgPath);
    json::Value raw;
    try
    {
        raw = json::Value::parse(text);
    }
    catch (Error const& e)
    {
        throw Error(cfgPath + " is not valid JSON: " + e.what());
    }
    if (!raw.isObject())
        throw Error(cfgPath + " must hold a JSON object");
    auto const* modelType = raw.find("model_type");
    bool hf = modelType && modelType->isString() && modelType->asString("model_type") == "mamba";
    if (auto const* archs = raw.find("architectures"); archs && archs->isArray())
        for (auto const& a : archs->asArray("architectures"))
            hf = hf || (a.isString() && a.asString("architectures") == "MambaForCausalLM");
    if (hf)
        throw Error(directory + " is a Hugging Face Mamba checkpoint; the C++ runtime reads memmamba checkpoints: "
                                "load it with MemMambaLM.from_pretrained(...) and save_pretrained() it first");
    if (!raw.find("architecture"))
        throw Error(cfgPath + ": unknown architecture (no 'architecture' key); expected architecture 'memmamba'");
    if (auto missing = missingConfigKeys(raw); !missing.empty())   // a default would pass unseen: pool_size has
        throw Error(cfgPath + " lacks " + listSome(missing) + " (a checkpoint names every field)");   // no weights
    try
    {
        config_ = Config::fromJson(text);
    }
    catch (Error const& e)
    {
        throw Error(cfgPath + ": " + e.what());
    }
    std::string weights = directory + "/model.safetensors";
    if (!isFile(weights))
        throw Error("missing model.safetensors in " + directory);
    file_ = std::make_unique<SafetensorsFile>(weights);

    auto expected = expectedTensors(config_);
    std::vector<std::string> missing, extra;
    for (auto const& e : expected)
        if (!file_->find(e.name))
            missing.push_back(e.name);
    for (auto const& t : file_->tensors())
    {
        bool known = false;
        for (auto const& e : expected)
            known = known || e.name == t.name;
        if (!known)
            extra.push_back(t.name);
    }
    if (!missing.empty())
        throw Error(directory + ": missing tensor(s) " + listSome(missing));
    if (!extra.empty())
        throw Error(directory + ": unexpected tensor(s) " + listSome(extra) + " (does config.json match the weights?)");
    for (auto const& e : expected)
    {
        TensorView const* t = file_->find(e.name);
        if (t->shape != e.shape)
            throw Error(directory + ": tensor '" + e.name + "' has shape " + shapeString(t->shape)
                + " in the file but the config needs " + shapeString(e.shape));
        if (t->dtype != "F32" && t->dtype != "F16" && t->dtype != "BF16" && t->dtype != "F64")
            throw Error(directory + ": tensor '" + e.name + "' has dtype " + t->dtype
                + "; the runtime reads F32, F16, BF16 or F64 weights");
    }
}

std::vector<float> Checkpoint::values(std::string const& name, DType modelDtype) const
{
    TensorView const* t = file_->find(name);
    if (!t)
        throw Error(directory_ + ": no tensor '" + name + "'");
    size_t n = static_cast<size_t>(t->numel());
    std::vector<float> out(n);
    uint8_t const* p = t->data;
    if (t->dtype == "F32")
    {
        std::memcpy(out.data(), p, 4 * n);
    }
    else if (t->dtype == "F64")
    {
        for (size_t i = 0; i < n; ++i)
        {
            double d;
            std::memcpy(&d, p + 8 * i, 8);
            out[i] = static_cast<float>(d);
        }
    }
    else
    {
        bool f16 = t->dtype == "F16";
        for (size_t i = 0; i < n; ++i)
        {
            uint16_t h = static_cast<uint16_t>(p[2 * i] | (p[2 * i + 1] << 8));
            out[i] = f16 ? halfToFloat(h) : bf16ToFloat(h);
        }
    }
    // as load_pretrained: a diverged run's weights, or values the model's dtype cannot hold, are named
    for (float v : out)
        if (!std::isfinite(v))
            throw Error(directory_ + ": tensor '" + name + "' holds NaN or infinite values"
                + (t->dtype == "F64" ? " (or values beyond fp32's range)" : ""));
    if (modelDtype == DType::kFloat16)
        for (float& v : out)
        {
            v = halfToFloat(floatToHalf(v));
            if (!std::isfinite(v))
                throw Error(directory_ + ": tensor '" + name + "' (" + t->dtype + ") holds values beyond fp16's range");
        }
    return out;
}

int64_t Checkpoint::parameterCount() const
{
    int64_t n = 0;
    for (auto const& t : file_->tensors())
        n += t.numel();
    return n;
}

} // namespace memmamba
