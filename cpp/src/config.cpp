// Config (memmamba.h): config.json parsing and validation, mirroring models/config.py MemMambaConfig.
#include <cmath>
#include <fstream>
#include <sstream>

#include "checkpoint.h"
#include "json.h"
#include "memmamba/memmamba.h"

namespace memmamba
{

namespace
{
[[noreturn]] void invalid(std::string const& msg)
{
    throw Error("invalid MemMambaConfig: " + msg);
}

void need(bool cond, std::string const& msg)
{
    if (!cond)
        invalid(msg);
}

char const* const kKnownKeys[] = {"vocab_size", "d_model", "n_layers", "d_state", "expand", "d_conv", "dt_rank",
    "norm_eps", "memory", "pool_size", "summary_dim", "memory_heads", "cross_layer_every", "insert_threshold",
    "read_threshold", "architecture"};
} // namespace

char const* dtypeName(DType dtype)
{
    return dtype == DType::kFloat16 ? "fp16" : "fp32";
}

size_t StateTensorInfo::bytes() const
{
    size_t n = dtype == DType::kFloat16 ? 2 : 4;
    for (int64_t d : shape)
        n *= static_cast<size_t>(d);
    return n;
}

void SamplingParams::validate() const
{
    if (!(temperature >= 0.f) || topK < 0 || !(topP > 0.f && topP <= 1.f))
    {
        throw Error("bad sampling settings: temperature=" + std::to_string(temperature) + " (>= 0), top_k="
            + std::to_string(topK) + " (>= 0), top_p=" + std::to_string(topP) + " (in (0, 1])");
    }
}

void Config::validate() const
{
    if (architecture != "memmamba")
        throw Error("unknown architecture '" + architecture + "': this loader reads 'memmamba'");
    struct Named
    {
        char const* name;
        int64_t value;
    };
    for (Named n : {Named{"vocab_size", vocab_size}, {"d_model", d_model}, {"n_layers", n_layers},
             {"d_state", d_state}, {"expand", expand}, {"d_conv", d_conv}, {"dt_rank", dt_rank}})
    {
        need(n.value >= 1, std::string(n.name) + " must be a positive integer, got " + std::to_string(n.value));
    }
    need(d_conv >= 2, "d_conv must be >= 2, got " + std::to_string(d_conv));
    need(norm_eps > 0 && std::isfinite(norm_eps), "norm_eps must be a finite number > 0, got " + std::to_string(norm_eps));
    need(vocab_size <= (int64_t{1} << 31) - 1, "vocab_size must fit int32");
    // with the memory path off too (config.json keeps them), as MemMambaConfig does
    for (Named n : {Named{"pool_size", pool_size}, {"summary_dim", summary_dim}, {"memory_heads", memory_heads},
             {"cross_layer_every", cross_layer_every}})
    {
        need(n.value >= 1, std::string(n.name) + " must be a positive integer, got " + std::to_string(n.value));
    }
    // sizes past these are no model anyone builds, and their products would overflow int64 in the shape arithmetic
    for (Named n : {Named{"d_model", d_model}, {"n_layers", n_layers}, {"d_state", d_state}, {"expand", expand},
             {"d_conv", d_conv}, {"dt_rank", dt_rank}, {"pool_size", pool_size}, {"summary_dim", summary_dim},
             {"memory_heads", memory_heads}, {"cross_layer_every", cross_layer_every}})
    {
        need(n.value <= (int64_t{1} << 20), std::string(n.name) + " must be <= 2^20, got " + std::to_string(n.value));
    }
    need(insert_threshold >= 0 && insert_threshold < 1,
        "insert_threshold must lie in [0, 1) (scores are sigmoids), got " + std::to_string(insert_threshold));
    need(read_threshold >= 0 && read_threshold < 1,
        "read_threshold must lie in [0, 1) (scores are sigmoids), got " + std::to_string(read_threshold));
    if (!memory)
        return;
    need(d_model >= 4,
        "d_model must be >= 4 with the memory path on (Note Block width d/4), got " + std::to_string(d_model));
    need(summary_dim % memory_heads == 0,
        "summary_dim (" + std::to_string(summary_dim) + ") must be divisible by memory_heads ("
            + std::to_string(memory_heads) + ")");
    need(d_model % memory_heads == 0,
        "d_model (" + std::to_string(d_model) + ") must be divisible by memory_heads (" + std::to_string(memory_heads)
            + ")");
    need(cross_layer_every <= n_layers,
        "cross_layer_every (" + std::to_string(cross_layer_every) + ") must be <= n_layers (" + std::to_string(n_layers)
            + ")");
}

std::vector<std::string> missingConfigKeys(json::Value const& object)
{
    std::vector<std::string> missing;
    for (char const* k : kKnownKeys)
        if (!object.find(k))
            missing.push_back(k);
    return missing;
}

Config Config::fromJson(std::string const& text)
{
    return configFromJson(json::Value::parse(text));
}

Config configFromJson(json::Value const& doc)
{
    if (!doc.isObject())
        throw Error(std::string("config must be a JSON object, got ") + json::Value::kindName(doc.kind()));
    std::string unknown;
    for (auto const& kv : doc.asObject("config"))
    {
        bool known = false;
        for (char const* k : kKnownKeys)
            known = known || kv.first == k;
        if (!known)
            unknown += (unknown.empty() ? "'" : ", '") + kv.first + "'";
    }
    if (!unknown.empty())
    {
        std::string all;
        for (char const* k : kKnownKeys)
            all += (all.empty() ? "" : ", ") + std::string(k);
        throw Error("unknown config key(s) [" + unknown + "]; known keys: " + all);
    }
    Config c;
    if (auto const* v = doc.find("architecture"))
    {
        c.architecture = v->asString("architecture");
        if (c.architecture != "memmamba")
            throw Error("unknown architecture '" + c.architecture + "': this loader reads 'memmamba'");
    }
    auto integer = [&](char const* key, int64_t& field) {
        if (auto const* v = doc.find(key))
        {
            if (!v->isInteger())
                invalid(std::string(key) + " must be a positive integer, got " + json::Value::kindName(v->kind()));
            field = v->asInt(key);
        }
    };
    auto number = [&](char const* key, double& field) {
        if (auto const* v = doc.find(key))
        {
            if (!v->isNumber())
                invalid(std::string(key) + " must be a number, got " + json::Value::kindName(v->kind()));
            field = v->asNumber(key);
        }
    };
    integer("vocab_size", c.vocab_size);
    integer("d_model", c.d_model);
    integer("n_layers", c.n_layers);
    integer("d_state", c.d_state);
    integer("expand", c.expand);
    integer("d_conv", c.d_conv);
    integer("dt_rank", c.dt_rank);
    number("norm_eps", c.norm_eps);
    if (auto const* v = doc.find("memory"))
    {
        if (!v->isBool())
            invalid(std::string("memory must be true or false, got ") + json::Value::kindName(v->kind()));
        c.memory = v->asBool("memory");
    }
    integer("pool_size", c.pool_size);
    integer("summary_dim", c.summary_dim);
    integer("memory_heads", c.memory_heads);
    integer("cross_layer_every", c.cross_layer_every);
    number("insert_threshold", c.insert_threshold);
    number("read_threshold", c.read_threshold);
    if (c.dt_rank == 0)
        c.dt_rank = (c.d_model + 15) / 16;
    c.validate();
    return c;
}

Config Config::load(std::string const& path)
{
    std::ifstream f(path, std::ios::binary);
    if (!f)
        throw Error("no config file at " + path);
    std::stringstream ss;
    ss << f.rdbuf();
    try
    {
        return fromJson(ss.str());
    }
    catch (Error const& e)
    {
        throw Error(path + ": " + e.what());
    }
}

} // namespace memmamba
