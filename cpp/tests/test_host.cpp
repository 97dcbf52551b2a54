// CPU unit tests of the runtime's host code (no GPU): JSON, config validation, safetensors parsing (including
// corrupt and truncated files), checkpoint validation, fp16 conversion and the host sampler that is the GPU
// sampler's reference. Run by ctest (tests/test_cpp_unit.py): `memmamba_unit_tests NAME` runs one test,
// `memmamba_unit_tests --list` lists them.
#include <unistd.h>

#include <clocale>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint.h"
#include "half.h"
#include "json.h"
#include "memmamba/memmamba.h"
#include "safetensors.h"
#include "sampling.h"
#include "state_file.h"

using namespace memmamba;

namespace
{
std::map<std::string, std::function<void()>>& registry()
{
    static std::map<std::string, std::function<void()>> r;
    return r;
}

struct Register
{
    Register(char const* name, std::function<void()> fn) { registry()[name] = std::move(fn); }
};

#define TEST(name)                                                                                                     \
    void name();                                                                                                       \
    Register reg_##name(#name, name);                                                                                  \
    void name()

struct Failure
{
    std::string what;
};

//! A test that cannot run here: ctest reports it as skipped (kSkipped, SKIP_RETURN_CODE), not passed.
struct Skip
{
    std::string why;
};
constexpr int kSkipped = 77;

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
            throw Failure{std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": CHECK(" #cond ") failed"};      \
    } while (0)

//! `fn` must throw memmamba::Error whose message contains `needle`.
void expectError(std::function<void()> const& fn, std::string const& needle, int line)
{
    try
    {
        fn();
    }
    catch (Error const& e)
    {
        if (std::string(e.what()).find(needle) == std::string::npos)
            throw Failure{"line " + std::to_string(line) + ": error message '" + e.what() + "' lacks '" + needle + "'"};
        return;
    }
    throw Failure{"line " + std::to_string(line) + ": expected an error containing '" + needle + "', got none"};
}
#define CHECK_ERROR(expr, needle) expectError([&] { (void) (expr); }, needle, __LINE__)

std::string tempDir()
{
    char tmpl[] = "/tmp/memmamba-unit-XXXXXX";
    char* d = mkdtemp(tmpl);
    if (!d)
        throw Failure{"mkdtemp failed"};
    return d;
}

void writeFile(std::string const& path, std::string const& data)
{
    std::ofstream f(path, std::ios::binary);
    f.write(data.data(), static_cast<std::streamsize>(data.size()));
}

// A safetensors file from (name, dtype, shape, raw bytes) entries, laid out in order.
struct Entry
{
    std::string name, dtype;
    std::vector<int64_t> shape;
    std::string bytes;
};

std::string safetensors(std::vector<Entry> const& entries, std::string const& extraHeader = "")
{
    std::string header = "{";
    std::string body;
    for (auto const& e : entries)
    {
        header += "\"" + e.name + "\":{\"dtype\":\"" + e.dtype + "\",\"shape\":" + shapeString(e.shape)
            + ",\"data_offsets\":[" + std::to_string(body.size()) + "," + std::to_string(body.size() + e.bytes.size())
            + "]},";
        body += e.bytes;
    }
    header += "\"__metadata__\":{\"format\":\"pt\"}" + extraHeader + "}";
    std::string out(8, '\0');
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i)
        out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
    return out + header + body;
}

std::string f32Bytes(std::vector<float> const& v)
{
    return std::string(reinterpret_cast<char const*>(v.data()), v.size() * 4);
}

SafetensorsFile parseBuffer(std::string const& data)
{
    return SafetensorsFile(reinterpret_cast<uint8_t const*>(data.data()), data.size(), "test.safetensors");
}

// The tiny preset's config.json exactly as MemMambaConfig.to_json() writes it.
std::string const kTinyConfig = R"({
  "architecture": "memmamba",
  "cross_layer_every": 2,
  "d_conv": 4,
  "d_model": 64,
  "d_state": 8,
  "dt_rank": 4,
  "expand": 2,
  "insert_threshold": 0.5,
  "memory": true,
  "memory_heads": 2,
  "n_layers": 4,
  "norm_eps": 1e-05,
  "pool_size": 8,
  "read_threshold": 0.3,
  "summary_dim": 16,
  "vocab_size": 256
}
)";

std::string configWith(std::string const& key, std::string const& value, std::string c = kTinyConfig)
{
    size_t at = c.find("\"" + key + "\":");
    if (at == std::string::npos)
        return c.substr(0, c.rfind('}')) + ",\"" + key + "\": " + value + "}";
    size_t start = c.find(':', at) + 1, end = c.find_first_of(",\n}", start);
    return c.substr(0, start) + " " + value + c.substr(end);
}

// A complete, valid checkpoint of `config` with deterministic values (tensor i, element j = i + j / 1000).
std::string writeCheckpoint(Config const& config, std::string const& configText, char const* dtype = "F32",
    std::function<void(std::vector<Entry>&)> edit = {})
{
    std::string dir = tempDir();
    writeFile(dir + "/config.json", configText);
    std::vector<Entry> entries;
    int i = 0;
    for (auto const& t : expectedTensors(config))
    {
        int64_t n = 1;
        for (int64_t d : t.shape)
            n *= d;
        std::vector<float> v(n);
        for (int64_t j = 0; j < n; ++j)
            v[j] = static_cast<float>(i) + static_cast<float>(j % 1000) / 1000.f;
        std::string bytes;
        if (std::string(dtype) == "F32")
        {
            bytes = f32Bytes(v);
        }
        else
        {
            for (float f : v)
            {
                uint16_t h = floatToHalf(f);
                bytes += static_cast<char>(h & 0xFF);
                bytes += static_cast<char>(h >> 8);
            }
        }
        entries.push_back({t.name, dtype, t.shape, bytes});
        ++i;
    }
    if (edit)
        edit(entries);
    writeFile(dir + "/model.safetensors", safetensors(entries));
    return dir;
}
} // namespace

// ---- JSON -----------------------------------------------------------------------------------------------------
TEST(json_values)
{
    auto v = json::Value::parse(R"( {"a": [1, -2.5e3, true, null, "x\"\u00e9\ud83d\ude00"], "b": {}, "c": 12345678901234} )");
    auto const& a = v.find("a")->asArray("a");
    CHECK(a.size() == 5);
    CHECK(a[0].isInteger() && a[0].asInt("a0") == 1);
    CHECK(!a[1].isInteger() && a[1].asNumber("a1") == -2500.0);
    CHECK(a[2].asBool("a2") && a[3].isNull());
    CHECK(a[4].asString("a4") == "x\"\xC3\xA9\xF0\x9F\x98\x80");
    CHECK(v.find("b")->asObject("b").empty());
    CHECK(v.find("c")->asInt("c") == 12345678901234LL);
    CHECK(v.find("zz") == nullptr);
}

TEST(json_errors_name_the_place)
{
    CHECK_ERROR(json::Value::parse("{\"a\": 1,}"), "line 1, column 9");
    CHECK_ERROR(json::Value::parse("{\"a\": 1, \"a\": 2}"), "duplicate key \"a\"");
    CHECK_ERROR(json::Value::parse("{\"a\": \"abc"), "unterminated string");
    CHECK_ERROR(json::Value::parse("[1, 2]\n x"), "line 2, column 2");
    CHECK_ERROR(json::Value::parse(""), "unexpected end");
    CHECK_ERROR(json::Value::parse("[01]"), "expected ',' or ']'");
    CHECK_ERROR(json::Value::parse("\"\\ud800\""), "surrogate");
    CHECK_ERROR(json::Value::parse(std::string(100, '[') + std::string(100, ']')), "nested deeper");
    CHECK_ERROR(json::Value::parse("{\"a\": 1}").find("a")->asString("a"), "a must be a string, got a number");
    CHECK_ERROR(json::Value::parse("1.5").asInt("x"), "x must be an integer");
}

// ---- Config -----------------------------------------------------------------------------------------------------
TEST(config_reads_python_output)
{
    Config c = Config::fromJson(kTinyConfig);
    CHECK(c.vocab_size == 256 && c.d_model == 64 && c.n_layers == 4 && c.d_state == 8 && c.dt_rank == 4);
    CHECK(c.memory && c.pool_size == 8 && c.summary_dim == 16 && c.memory_heads == 2 && c.cross_layer_every == 2);
    CHECK(c.insert_threshold == 0.5 && c.read_threshold == 0.3 && c.norm_eps == 1e-5);
    CHECK(!c.isCrossLayer(0) && c.isCrossLayer(1) && !c.isCrossLayer(2) && c.isCrossLayer(3));
    Config d = Config::fromJson(R"({"architecture": "memmamba", "d_model": 768, "dt_rank": 0})");
    CHECK(d.dt_rank == 48 && d.vocab_size == 256); // defaults, and dt_rank 0 -> ceil(d/16)
}

TEST(config_rejects_bad_values)
{
    CHECK_ERROR(Config::fromJson(configWith("colour", "1")), "unknown config key(s) ['colour']");
    CHECK_ERROR(Config::fromJson(configWith("architecture", "\"llama\"")), "unknown architecture 'llama'");
    CHECK_ERROR(Config::fromJson(configWith("d_model", "64.0")), "d_model must be a positive integer");
    CHECK_ERROR(Config::fromJson(configWith("d_model", "true")), "d_model must be a positive integer");
    CHECK_ERROR(Config::fromJson(configWith("n_layers", "0")), "n_layers must be a positive integer, got 0");
    CHECK_ERROR(Config::fromJson(configWith("memory", "1")), "memory must be true or false");
    CHECK_ERROR(Config::fromJson(configWith("norm_eps", "\"small\"")), "norm_eps must be a number");
    CHECK_ERROR(Config::fromJson(configWith("memory_heads", "3")), "must be divisible by memory_heads");
    CHECK_ERROR(Config::fromJson(configWith("cross_layer_every", "5")), "cross_layer_every (5) must be <= n_layers");
    CHECK_ERROR(Config::fromJson(configWith("insert_threshold", "1.0")), "insert_threshold must lie in [0, 1)");
    CHECK_ERROR(Config::fromJson("[1]"), "config must be a JSON object");
    CHECK_ERROR(Config::fromJson("{\"d_model\": "), "invalid JSON");
    CHECK_ERROR(Config::load("/nonexistent/config.json"), "no config file at /nonexistent/config.json");
    CHECK_ERROR(Config::fromJson(configWith("norm_eps", "1e999")), "norm_eps must be a finite number > 0");
    CHECK_ERROR(Config::fromJson(configWith("d_model", "4611686018427387904")), "d_model must be <= 2^20");
    // memory off: the memory keys' values are still checked, their relations not (as MemMambaConfig)
    Config off = Config::fromJson(configWith("memory_heads", "3", configWith("memory", "false")));
    CHECK(!off.memory);
    CHECK_ERROR(Config::fromJson(configWith("pool_size", "0", configWith("memory", "false"))),
        "pool_size must be a positive integer, got 0");
    CHECK_ERROR(Config::fromJson(configWith("insert_threshold", "5.0", configWith("memory", "false"))),
        "insert_threshold must lie in [0, 1)");
}

TEST(config_numbers_do_not_depend_on_the_locale)
{
    // strtod reads LC_NUMERIC's decimal point: "0.5" read 0 where an embedding application set a comma locale
    char const* set = nullptr;
    for (char const* name : {"de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8", "ru_RU.UTF-8"})
        if ((set = std::setlocale(LC_NUMERIC, name)))
            break;
    Config c = Config::fromJson(kTinyConfig);
    std::setlocale(LC_NUMERIC, "C");
    CHECK(c.insert_threshold == 0.5 && c.read_threshold == 0.3 && c.norm_eps == 1e-5);
    if (!set)
        std::fprintf(stderr, "  (no comma-decimal locale installed: read in the C locale only)\n");
}

// ---- fp16 ---------------------------------------------------------------------------------------------------------
TEST(half_conversion)
{
    CHECK(floatToHalf(1.0f) == 0x3C00 && floatToHalf(-2.0f) == 0xC000 && floatToHalf(65504.f) == 0x7BFF);
    CHECK(floatToHalf(65519.f) == 0x7BFF && floatToHalf(65520.f) == 0x7C00);      // overflow rounds to inf
    CHECK(floatToHalf(std::ldexp(1.f, -24)) == 0x0001 && floatToHalf(std::ldexp(1.f, -25)) == 0x0000);
    CHECK(floatToHalf(std::ldexp(3.f, -26)) == 0x0001);                            // 0.75 ulp rounds up
    CHECK(floatToHalf(std::ldexp(3.f, -25)) == 0x0002);                            // 1.5 ulp: tie to even
    CHECK(floatToHalf(1.0f + std::ldexp(1.f, -11)) == 0x3C00);                     // tie to even (down)
    CHECK(floatToHalf(1.0f + 3 * std::ldexp(1.f, -11)) == 0x3C02);                 // tie to even (up)
    CHECK(std::isnan(halfToFloat(floatToHalf(NAN))) && halfToFloat(0x7C00) == INFINITY);
    CHECK(bf16ToFloat(0x3F80) == 1.0f && bf16ToFloat(0xC040) == -3.0f);
    for (uint32_t h = 0; h < 0x10000; ++h) // every half survives the round trip (NaNs stay NaN)
    {
        float f = halfToFloat(static_cast<uint16_t>(h));
        if (std::isnan(f))
            CHECK(std::isnan(halfToFloat(floatToHalf(f))));
        else
            CHECK(floatToHalf(f) == h);
    }
}

// ---- safetensors ----------------------------------------------------------------------------------------------------
TEST(safetensors_reads_tensors)
{
    std::string data = safetensors({{"b", "F32", {2, 2}, f32Bytes({1, 2, 3, 4})}, {"a", "F16", {1}, std::string("\x00\x3c", 2)},
        {"e", "F32", {0, 3}, ""}});
    auto f = parseBuffer(data);
    CHECK(f.tensors().size() == 3 && f.tensors()[0].name == "a"); // sorted by name
    auto const* b = f.find("b");
    CHECK(b && b->dtype == "F32" && b->shape == (std::vector<int64_t>{2, 2}) && b->nbytes == 16);
    float v[4];
    std::memcpy(v, b->data, 16);
    CHECK(v[0] == 1 && v[3] == 4);
    CHECK(f.find("e")->numel() == 0 && f.metadata().at("format") == "pt" && !f.find("zz"));
}

TEST(safetensors_corrupt_files_give_clear_errors)
{
    std::string good = safetensors({{"w", "F32", {2}, f32Bytes({1, 2})}});
    CHECK_ERROR(parseBuffer(""), "only 0 bytes");
    CHECK_ERROR(parseBuffer(good.substr(0, 5)), "only 5 bytes");
    CHECK_ERROR(parseBuffer(good.substr(0, 20)), "runs past the end of the file");
    CHECK_ERROR(parseBuffer(good.substr(0, good.size() - 1)), "truncated?");           // data cut short
    std::string huge = good;
    huge[7] = '\x7f';
    CHECK_ERROR(parseBuffer(huge), "exceeds the format's 100 MiB limit");
    std::string garbled = good;
    garbled[9] = '#';
    CHECK_ERROR(parseBuffer(garbled), "header: invalid JSON");
    CHECK_ERROR(parseBuffer(safetensors({{"w", "Q4", {2}, "12"}})), "unknown dtype 'Q4'");
    CHECK_ERROR(parseBuffer(safetensors({{"w", "F32", {3}, f32Bytes({1, 2})}})), "but its shape and dtype need 12");
    CHECK_ERROR(parseBuffer(safetensors({{"w", "F32", {-2}, ""}})), "invalid dimension -2");
    std::string overlap = safetensors({{"a", "F32", {2}, f32Bytes({1, 2})}, {"b", "F32", {2}, f32Bytes({1, 2})}});
    size_t at = overlap.find("[8,16]");
    overlap.replace(at, 6, "[4,12]");
    CHECK_ERROR(parseBuffer(overlap), "overlap");
    std::string junk(4096, '\0');
    for (size_t i = 0; i < junk.size(); ++i)
        junk[i] = static_cast<char>((i * 2654435761u) >> 13);
    CHECK_ERROR(parseBuffer(junk), "is corrupt or not a safetensors file");
    // on disk, through mmap
    std::string dir = tempDir();
    writeFile(dir + "/cut.safetensors", good.substr(0, good.size() - 3));
    CHECK_ERROR(SafetensorsFile(dir + "/cut.safetensors"), dir + "/cut.safetensors is corrupt");
    writeFile(dir + "/empty.safetensors", "");
    CHECK_ERROR(SafetensorsFile(dir + "/empty.safetensors"), "only 0 bytes");
    CHECK_ERROR(SafetensorsFile(dir + "/none.safetensors"), "cannot open");
    writeFile(dir + "/ok.safetensors", good);
    CHECK(SafetensorsFile(dir + "/ok.safetensors").find("w")->numel() == 2);
}

// ---- checkpoints -------------------------------------------------------------------------------------------------------
TEST(checkpoint_validates_names_shapes_dtypes)
{
    Config c = Config::fromJson(kTinyConfig);
    auto expected = expectedTensors(c);
    CHECK(expected.front().name == "embeddings.weight" && expected.back().name == "norm_f.weight");
    std::string dir = writeCheckpoint(c, kTinyConfig);
    Checkpoint ck(dir);
    CHECK(ck.config().d_model == 64);
    auto v = ck.values("layers.0.norm.weight", DType::kFloat32);
    CHECK(v.size() == 64 && v[1] == static_cast<float>(1) + 0.001f);
    auto h = ck.values("layers.0.norm.weight", DType::kFloat16); // rounded through fp16
    CHECK(h[1] == halfToFloat(floatToHalf(1.001f)) && h[1] != v[1]);
    Checkpoint half(writeCheckpoint(c, kTinyConfig, "F16"));
    CHECK(half.values("norm_f.weight", DType::kFloat32)[3] == halfToFloat(floatToHalf(static_cast<float>(expected.size() - 1) + 0.003f)));

    CHECK_ERROR(Checkpoint(writeCheckpoint(c, kTinyConfig, "F32", [](auto& e) { e.erase(e.begin() + 3); })),
        "missing tensor(s) ['layers.0.mixer.D']");
    CHECK_ERROR(Checkpoint(writeCheckpoint(c, kTinyConfig, "F32",
                    [](auto& e) { e.push_back({"lm_head.weight", "F32", {1}, f32Bytes({0})}); })),
        "unexpected tensor(s) ['lm_head.weight'] (does config.json match the weights?)");
    CHECK_ERROR(Checkpoint(writeCheckpoint(c, kTinyConfig, "F32",
                    [](auto& e) { e[1] = {e[1].name, "F32", {63}, f32Bytes(std::vector<float>(63))}; })),
        "tensor 'layers.0.norm.weight' has shape [63] in the file but the config needs [64]");
    CHECK_ERROR(Checkpoint(writeCheckpoint(c, kTinyConfig, "F32",
                    [](auto& e) { e[1] = {e[1].name, "I32", {64}, std::string(256, '\0')}; })),
        "has dtype I32");
    // config.json that does not match the weights (more layers than the file holds)
    CHECK_ERROR(Checkpoint(writeCheckpoint(c, configWith("n_layers", "6"))), "missing tensor(s) ['layers.4.");
    std::string hf = tempDir();
    writeFile(hf + "/config.json", R"({"model_type": "mamba", "hidden_size": 768})");
    CHECK_ERROR(Checkpoint{hf}, "Hugging Face Mamba checkpoint");
    writeFile(hf + "/config.json", R"({"architectures": ["MambaForCausalLM"], "hidden_size": 768})");
    CHECK_ERROR(Checkpoint{hf}, "Hugging Face Mamba checkpoint");
    std::string noPool = kTinyConfig;                                       // a default would pass unseen
    noPool.erase(noPool.find("\"pool_size\""), noPool.find('\n', noPool.find("\"pool_size\"")) + 1
        - noPool.find("\"pool_size\""));
    CHECK_ERROR(Checkpoint(writeCheckpoint(c, noPool)), "lacks ['pool_size'] (a checkpoint names every field)");
    float const nan = std::numeric_limits<float>::quiet_NaN();
    Checkpoint diverged(writeCheckpoint(c, kTinyConfig, "F32",
        [&](auto& e) { e[1] = {e[1].name, "F32", e[1].shape, f32Bytes(std::vector<float>(64, nan))}; }));
    CHECK_ERROR(diverged.values(expected[1].name, DType::kFloat32), "holds NaN or infinite values");
    Checkpoint big(writeCheckpoint(c, kTinyConfig, "F32",
        [&](auto& e) { e[1] = {e[1].name, "F32", e[1].shape, f32Bytes(std::vector<float>(64, 1e5f))}; }));
    CHECK(big.values(expected[1].name, DType::kFloat32)[0] == 1e5f);
    CHECK_ERROR(big.values(expected[1].name, DType::kFloat16), "holds values beyond fp16's range");
    std::string f64(64 * 8, '\0');
    for (int j = 0; j < 64; ++j)
    {
        double d = 0.25 * j;
        std::memcpy(&f64[8 * j], &d, 8);
    }
    Checkpoint wide(writeCheckpoint(c, kTinyConfig, "F32", [&](auto& e) { e[1] = {e[1].name, "F64", e[1].shape, f64}; }));
    CHECK(wide.values(expected[1].name, DType::kFloat32)[3] == 0.75f);
    std::string noArch = tempDir();
    writeFile(noArch + "/config.json", "{\"d_model\": 64}");
    CHECK_ERROR(Checkpoint{noArch}, "no 'architecture' key");
    std::string noWeights = tempDir();
    writeFile(noWeights + "/config.json", kTinyConfig);
    CHECK_ERROR(Checkpoint{noWeights}, "missing model.safetensors in");
    CHECK_ERROR(Checkpoint{"/nonexistent/ckpt"}, "no checkpoint directory at /nonexistent/ckpt");
    std::string corrupt = writeCheckpoint(c, kTinyConfig);
    writeFile(corrupt + "/model.safetensors", "not a safetensors file at all");
    CHECK_ERROR(Checkpoint{corrupt}, "model.safetensors is corrupt or not a safetensors file");
}

TEST(checkpoint_written_by_python)
{
    // tests/test_cpp_unit.py points this at a checkpoint saved by MemMambaLM.save_pretrained and a JSON file of
    // reference values; without it the test is skipped, never passed (and test_cpp_unit.py fails on a skip)
    char const* dir = std::getenv("MEMMAMBA_TEST_CHECKPOINT");
    if (!dir)
        throw Skip{"MEMMAMBA_TEST_CHECKPOINT is not set: this test reads a checkpoint the Python side writes "
                   "(python -m pytest tests/test_cpp_unit.py runs it so)"};
    Checkpoint ck(dir);
    std::ifstream f(std::string(dir) + "/expected.json");
    std::stringstream ss;
    ss << f.rdbuf();
    auto want = json::Value::parse(ss.str());
    CHECK(ck.parameterCount() == want.find("parameters")->asInt("parameters"));
    CHECK(ck.config().memory == want.find("memory")->asBool("memory"));
    for (auto const& [name, vals] : want.find("first_values")->asObject("first_values"))
    {
        auto got = ck.values(name, DType::kFloat32);
        auto const& w = vals.asArray(name);
        for (size_t i = 0; i < w.size(); ++i)
            CHECK(got[i] == static_cast<float>(w[i].asNumber(name)));
    }
}

// ---- session state files -----------------------------------------------------------------------------------------
TEST(session_state_file_round_trip_and_refusals)
{
    Config c;
    c.vocab_size = 11;
    c.n_layers = 2;
    c.dt_rank = 4;
    c.norm_eps = 1e-6;            // floats that must round-trip through the file's JSON
    c.insert_threshold = 0.1;
    c.read_threshold = 0.0;
    c.validate();
    Config back = Config::fromJson(configToJson(c));
    CHECK(configDifferences(back, c).empty());
    auto layout = stateLayout(c, 2, DType::kFloat16);
    SessionStateData data;
    uint16_t v = 0;
    for (auto const& info : layout)
    {
        auto& bytes = data.state[info.name];
        bytes.resize(info.bytes());
        for (size_t i = 0; i < bytes.size(); i += info.dtype == DType::kFloat16 ? 2 : 4)
        {
            float x = info.name == "prio" ? (i % 8 ? 0.25f * (i % 5) : -1.f) : 0.001f * static_cast<float>(++v);
            if (info.dtype == DType::kFloat16)
            {
                uint16_t h = floatToHalf(x);
                std::memcpy(bytes.data() + i, &h, 2);
            }
            else
                std::memcpy(bytes.data() + i, &x, 4);
        }
    }
    for (int i = 0; i < 22; ++i)
        data.logits.push_back(0.5f * static_cast<float>(i) - 3.f);
    data.pending = {3, 10};
    data.hasStream = true;
    data.seed = ~uint64_t{0} - 5;   // a seed past int64: its bits go through the file
    data.draws = 42;
    std::string dir = tempDir(), path = dir + "/s.safetensors", sha = std::string(64, 'a');
    writeSessionState(path, c, sha, layout, data);
    SessionStateData got = readSessionState(path, c, sha, layout, DType::kFloat16);
    CHECK(got.state == data.state && got.logits == data.logits && got.pending == data.pending);
    CHECK(got.hasStream && got.seed == data.seed && got.draws == 42);
    CHECK(readSessionState(path, c, "", layout, DType::kFloat16).logits == data.logits);   // weights unknown here: not checked
    auto fp32 = stateLayout(c, 2, DType::kFloat32);      // conv and pool read into an fp32 session, converted
    SessionStateData wide = readSessionState(path, c, sha, fp32, DType::kFloat32);
    float first;
    std::memcpy(&first, wide.state.at("conv").data(), 4);
    CHECK(first == halfToFloat(floatToHalf(0.001f)));

    Config other = c;
    other.d_state = 4;
    CHECK_ERROR(readSessionState(path, other, sha, stateLayout(other, 2, DType::kFloat16), DType::kFloat16),
        "another model: d_state 8 vs 4");
    CHECK_ERROR(readSessionState(path, c, std::string(64, 'b'), layout, DType::kFloat16), "other weights");
    CHECK_ERROR(readSessionState(path, c, sha, stateLayout(c, 1, DType::kFloat16), DType::kFloat16), "batch of 2 rows; this session has batch 1");
    CHECK_ERROR(readSessionState(dir, c, sha, layout, DType::kFloat16), "is a directory");
    CHECK_ERROR(readSessionState(dir + "/none", c, sha, layout, DType::kFloat16), "no session state file");

    auto mutate = [&](std::function<void(SessionStateData&)> const& f) {
        SessionStateData d = data;
        f(d);
        return d;
    };
    SessionStateData nan = mutate([](SessionStateData& d) { d.logits[3] = std::nanf(""); });
    CHECK_ERROR(writeSessionState(dir + "/nan.safetensors", c, sha, layout, nan), "hold NaN or infinite values");
    SessionStateData prio = mutate([](SessionStateData& d) {
        float bad = -0.5f;
        std::memcpy(d.state["prio"].data(), &bad, 4);
    });
    writeSessionState(dir + "/prio.safetensors", c, sha, layout, prio);
    CHECK_ERROR(readSessionState(dir + "/prio.safetensors", c, sha, layout, DType::kFloat16), "neither scores (>= 0) nor -1");
    writeSessionState(dir + "/tok.safetensors", c, sha, layout, mutate([](SessionStateData& d) { d.pending[1] = 11; }));
    CHECK_ERROR(readSessionState(dir + "/tok.safetensors", c, sha, layout, DType::kFloat16), "pending tokens must be [2] integer ids");

    // finite in the file, past fp16's range: refused by an fp16 session (its buffers would hold infinity)
    SessionStateData wideData = wide;
    float huge = 1e5f;
    std::memcpy(wideData.state["conv"].data(), &huge, 4);
    writeSessionState(dir + "/huge.safetensors", c, sha, fp32, wideData);
    CHECK(readSessionState(dir + "/huge.safetensors", c, sha, fp32, DType::kFloat32).state.at("conv") == wideData.state.at("conv"));
    CHECK_ERROR(readSessionState(dir + "/huge.safetensors", c, sha, layout, DType::kFloat16), "state.conv hold NaN or infinite values");
    wideData = wide;
    wideData.logits[0] = 7e4f;
    writeSessionState(dir + "/loud.safetensors", c, sha, fp32, wideData);
    CHECK_ERROR(readSessionState(dir + "/loud.safetensors", c, sha, layout, DType::kFloat16), "logits hold NaN or infinite values");
    CHECK(readSessionState(dir + "/loud.safetensors", c, sha, layout, DType::kFloat32).logits[0] == 7e4f);  // fp32 logits

    std::ifstream in(path, std::ios::binary);
    std::string whole((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    writeFile(dir + "/cut.safetensors", whole.substr(0, whole.size() - 9));
    CHECK_ERROR(readSessionState(dir + "/cut.safetensors", c, sha, layout, DType::kFloat16), "truncated?");
    writeFile(dir + "/ckpt.safetensors", safetensors({{"w", "F32", {1}, f32Bytes({1})}}));
    CHECK_ERROR(readSessionState(dir + "/ckpt.safetensors", c, sha, layout, DType::kFloat16), "is not a session state file");
    CHECK_ERROR(writeSessionState(dir, c, sha, layout, data), "is a directory");
    CHECK_ERROR(writeSessionState(dir + "/no/such/dir.safetensors", c, sha, layout, data), "cannot write");
    // every write above went through a temp file: none is left behind, and the refused ones wrote nothing
    std::string listing;
    for (char const* name : {"nan.safetensors", "no"})
        CHECK(access((dir + "/" + name).c_str(), F_OK) != 0);
    FILE* ls = popen(("ls -a " + dir).c_str(), "r");
    char buf[256];
    while (std::fgets(buf, sizeof buf, ls))
        listing += buf;
    pclose(ls);
    CHECK(listing.find(".tmp-") == std::string::npos);
}

// ---- sampling ------------------------------------------------------------------------------------------------------------
TEST(philox_known_answers)
{
    CHECK((philox4x32_10({0, 0, 0, 0}, {0, 0}) == std::array<uint32_t, 4>{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
    CHECK((philox4x32_10({~0u, ~0u, ~0u, ~0u}, {~0u, ~0u})
        == std::array<uint32_t, 4>{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
    CHECK((philox4x32_10({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0})
        == std::array<uint32_t, 4>{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
    float u = samplerUniform(3, 7, 42);
    CHECK(u >= 0.f && u < 1.f && u != samplerUniform(3, 8, 42) && u != samplerUniform(4, 7, 42));
}

TEST(sampler_greedy_and_limits)
{
    std::vector<float> x{0.1f, 2.f, -1.f, 2.f, 1.9f};
    CHECK(sampleRow(x.data(), 5, {}, 0, 0, 0) == 1);                       // lowest id among the tied maxima
    for (uint32_t s = 0; s < 50; ++s)
    {
        int32_t t = sampleRow(x.data(), 5, {1.f, 1, 1.f}, 9, s, 0);          // top_k 1: a tied maximum
        CHECK(t == 1 || t == 3);
        CHECK(sampleRow(x.data(), 5, {0.7f, 0, 1e-6f}, 9, s, 0) != 2);       // top_p -> the maxima only
        int32_t k3 = sampleRow(x.data(), 5, {1.f, 3, 1.f}, 9, s, 0);
        CHECK(k3 == 1 || k3 == 3 || k3 == 4);
    }
    std::vector<float> inf(4, -INFINITY);
    CHECK(sampleRow(inf.data(), 4, {1.f, 0, 0.5f}, 1, 0, 0) == 0);
    CHECK_ERROR(sampleRow(x.data(), 5, {-1.f, 0, 1.f}, 0, 0, 0), "bad sampling settings");
    CHECK_ERROR(sampleRow(x.data(), 5, {1.f, 0, 0.f}, 0, 0, 0), "top_p");
}

TEST(sampler_frequencies_match_the_distribution)
{
    // probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1; top_p 0.7 keeps {0, 1} (mass above token 2 is 0.8)
    std::vector<float> x{std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
    int const n = 40000;
    struct Case
    {
        SamplingParams p;
        std::vector<double> want;
    };
    for (Case const& c : {Case{{1.f, 0, 1.f}, {0.5, 0.3, 0.15, 0.05}}, Case{{1.f, 0, 0.7f}, {0.625, 0.375, 0, 0}},
             Case{{1.f, 3, 1.f}, {0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0}}, Case{{2.f, 0, 1.f}, {}}})
    {
        std::vector<double> want = c.want;
        if (want.empty()) // temperature 2: p ~ sqrt(p)
        {
            double z = 0;
            for (float v : x)
                z += std::exp(v / 2);
            for (float v : x)
                want.push_back(std::exp(v / 2) / z);
        }
        std::vector<int> count(4, 0);
        for (int s = 0; s < n; ++s)
            ++count[sampleRow(x.data(), 4, c.p, 1234, static_cast<uint32_t>(s), 0)];
        for (int i = 0; i < 4; ++i)
        {
            double sd = std::sqrt(want[i] * (1 - want[i]) / n);
            CHECK(std::fabs(count[i] / double(n) - want[i]) <= 5 * sd + 1e-12);
        }
    }
}

int main(int argc, char** argv)
{
    if (argc > 1 && std::string(argv[1]) == "--list")
    {
        for (auto const& kv : registry())
            std::printf("%s\n", kv.first.c_str());
        return 0;
    }
    int failed = 0, run = 0, skipped = 0;
    for (auto const& [name, fn] : registry())
    {
        if (argc > 1 && name != argv[1])
            continue;
        ++run;
        try
        {
            fn();
            std::printf("ok   %s\n", name.c_str());
        }
        catch (Failure const& f)
        {
            ++failed;
            std::printf("FAIL %s: %s\n", name.c_str(), f.what.c_str());
        }
        catch (Skip const& s)
        {
            ++skipped;
            std::printf("SKIP %s: %s\n", name.c_str(), s.why.c_str());
        }
        catch (std::exception const& e)
        {
            ++failed;
            std::printf("FAIL %s: unexpected exception: %s\n", name.c_str(), e.what());
        }
    }
    if (run == 0)
    {
        std::printf("no test named %s\n", argc > 1 ? argv[1] : "");
        return 2;
    }
    std::printf("%d passed, %d failed, %d skipped\n", run - failed - skipped, failed, skipped);
    return failed ? 1 : skipped == run ? kSkipped : 0;
}
