// See state_file.h.
#include "state_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "checkpoint.h"
#include "half.h"
#include "json.h"

#ifdef MEMMAMBA_HAVE_OPENSSL
#include <openssl/evp.h>
#endif

namespace memmamba
{

char const* const kStateFormat = "memmamba-session-state";
int const kStateFormatVersion = 1;

namespace
{
std::string jsonString(std::string const& s)
{
    std::string out = "\"";
    for (unsigned char c : s)
    {
        if (c == '"' || c == '\\')
            out += {'\\', static_cast<char>(c)};
        else if (c < 0x20)
        {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
        }
        else
            out += static_cast<char>(c);
    }
    return out + "\"";
}

//! Shortest round-trip form, locale-free, always read back as a float ("1.0", not "1").
std::string jsonNumber(double v)
{
    char buf[64];
    auto r = std::to_chars(buf, buf + sizeof buf, v);
    std::string s(buf, r.ptr);
    if (s.find_first_of(".eEn") == std::string::npos)
        s += ".0";
    return s;
}

std::string torchDtype(std::string const& st)
{
    static std::map<std::string, std::string> const names{{"F64", "torch.float64"}, {"F32", "torch.float32"},
        {"F16", "torch.float16"}, {"BF16", "torch.bfloat16"}, {"I64", "torch.int64"}, {"I32", "torch.int32"},
        {"I16", "torch.int16"}, {"I8", "torch.int8"}, {"U64", "torch.uint64"}, {"U32", "torch.uint32"},
        {"U16", "torch.uint16"}, {"U8", "torch.uint8"}, {"BOOL", "torch.bool"}, {"F8_E4M3", "torch.float8_e4m3fn"},
        {"F8_E5M2", "torch.float8_e5m2"}};
    auto it = names.find(st);
    return it == names.end() ? st : it->second;
}

char const* stDtype(DType d) { return d == DType::kFloat16 ? "F16" : "F32"; }

//! A float tensor's values as fp32 (F32, F16 or BF16).
std::vector<float> floats(TensorView const& t)
{
    std::vector<float> out(static_cast<size_t>(t.numel()));
    for (size_t i = 0; i < out.size(); ++i)
    {
        if (t.dtype == "F32")
            std::memcpy(&out[i], t.data + 4 * i, 4);
        else
        {
            uint16_t h;
            std::memcpy(&h, t.data + 2 * i, 2);
            out[i] = t.dtype == "F16" ? halfToFloat(h) : bf16ToFloat(h);
        }
    }
    return out;
}

std::vector<uint8_t> encode(std::vector<float> const& v, DType d)
{
    std::vector<uint8_t> out(v.size() * (d == DType::kFloat16 ? 2 : 4));
    for (size_t i = 0; i < v.size(); ++i)
    {
        if (d == DType::kFloat16)
        {
            uint16_t h = floatToHalf(v[i]);
            std::memcpy(out.data() + 2 * i, &h, 2);
        }
        else
            std::memcpy(out.data() + 4 * i, &v[i], 4);
    }
    return out;
}

bool allFinite(std::vector<float> const& v)
{
    return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

std::vector<float> decode(std::vector<uint8_t> const& bytes, DType d)
{
    TensorView view{"", stDtype(d), {static_cast<int64_t>(bytes.size() / (d == DType::kFloat16 ? 2 : 4))},
        bytes.data(), bytes.size()};
    return floats(view);
}

std::string join(std::vector<std::string> const& parts, size_t most)
{
    std::string s;
    for (size_t i = 0; i < parts.size() && i < most; ++i)
        s += (i ? "; " : "") + parts[i];
    return s;
}
} // namespace

void writeSafetensors(std::string const& path, std::map<std::string, HostTensor> const& tensors,
    std::map<std::string, std::string> const& metadata)
{
    struct stat st{};
    if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
        throw Error(path + " is a directory: give a file path to write the state to");
    std::string header = "{";
    if (!metadata.empty())
    {
        header += "\"__metadata__\":{";
        bool first = true;
        for (auto const& [k, v] : metadata)
        {
            header += (first ? "" : ",") + jsonString(k) + ":" + jsonString(v);
            first = false;
        }
        header += "}";
    }
    size_t offset = 0;
    for (auto const& [name, t] : tensors)
    {
        size_t item = safetensorsItemSize(t.dtype);
        size_t numel = 1;
        for (int64_t d : t.shape)
            numel *= static_cast<size_t>(d);
        if (item == 0 || numel * item != t.data.size())
            throw Error("internal: tensor '" + name + "' (" + t.dtype + " " + shapeString(t.shape) + ") holds "
                + std::to_string(t.data.size()) + " bytes");
        header += (header.size() > 1 ? "," : "") + jsonString(name) + ":{\"dtype\":" + jsonString(t.dtype)
            + ",\"shape\":" + shapeString(t.shape) + ",\"data_offsets\":[" + std::to_string(offset) + ","
            + std::to_string(offset + t.data.size()) + "]}";
        offset += t.data.size();
    }
    header += "}";
    header.append((8 - header.size() % 8) % 8, ' ');   // the data starts 8-byte aligned, as safetensors writes it

    static std::atomic<unsigned> counter{0};
    std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
    // a new file (O_EXCL): never through a link or over a file someone else left at that name
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    FILE* f = fd < 0 ? nullptr : ::fdopen(fd, "wb");
    if (!f)
    {
        int err = errno;
        if (fd >= 0)
            ::close(fd);
        throw Error("cannot write " + path + ": " + std::strerror(err));
    }
    uint8_t len[8];
    for (int i = 0; i < 8; ++i)
        len[i] = static_cast<uint8_t>(static_cast<uint64_t>(header.size()) >> (8 * i));
    bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(header.data(), 1, header.size(), f) == header.size();
    for (auto const& kv : tensors)
        ok = ok && std::fwrite(kv.second.data.data(), 1, kv.second.data.size(), f) == kv.second.data.size();
    int err = errno;
    ok = std::fflush(f) == 0 && ok;
    ok = ::fsync(fileno(f)) == 0 && ok;
    err = ok ? 0 : (errno ? errno : err);
    ok = std::fclose(f) == 0 && ok;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0)
    {
        err = err ? err : errno;
        std::remove(tmp.c_str());
        throw Error("cannot write " + path + ": " + std::strerror(err));
    }
}

namespace
{
//! Every MemMambaConfig key with its value as a JSON literal, in key order (MemMambaConfig.to_json sorts them).
std::vector<std::pair<char const*, std::string>> configFields(Config const& c)
{
    auto n = [](int64_t v) { return std::to_string(v); };
    return {{"architecture", jsonString(c.architecture)}, {"cross_layer_every", n(c.cross_layer_every)},
        {"d_conv", n(c.d_conv)}, {"d_model", n(c.d_model)}, {"d_state", n(c.d_state)}, {"dt_rank", n(c.dt_rank)},
        {"expand", n(c.expand)}, {"insert_threshold", jsonNumber(c.insert_threshold)},
        {"memory", c.memory ? "true" : "false"}, {"memory_heads", n(c.memory_heads)}, {"n_layers", n(c.n_layers)},
        {"norm_eps", jsonNumber(c.norm_eps)}, {"pool_size", n(c.pool_size)},
        {"read_threshold", jsonNumber(c.read_threshold)}, {"summary_dim", n(c.summary_dim)},
        {"vocab_size", n(c.vocab_size)}};
}
} // namespace

std::string configToJson(Config const& config)
{
    std::string out;
    for (auto const& [key, value] : configFields(config))
        out += (out.empty() ? "{" : ",") + jsonString(key) + ":" + value;
    return out + "}";
}

std::vector<std::string> configDifferences(Config const& a, Config const& b)
{
    // shortest round-trip literals: two values print alike exactly when they are equal
    std::vector<std::string> out;
    auto fa = configFields(a), fb = configFields(b);
    for (size_t i = 0; i < fa.size(); ++i)
        if (fa[i].second != fb[i].second)
            out.push_back(std::string(fa[i].first) + " " + fa[i].second + " vs " + fb[i].second);
    return out;
}

bool canFingerprintWeights()
{
#ifdef MEMMAMBA_HAVE_OPENSSL
    return true;
#else
    return false;
#endif
}

std::string weightsFingerprint(SafetensorsFile const& file)
{
#ifdef MEMMAMBA_HAVE_OPENSSL
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    bool ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) == 1;
    for (TensorView const& t : file.tensors())   // sorted by name, as weights_fingerprint iterates them
    {
        std::string head = t.name + "|" + torchDtype(t.dtype) + "|" + shapeString(t.shape) + "|";
        ok = ok && EVP_DigestUpdate(ctx, head.data(), head.size()) == 1;
        ok = ok && (t.nbytes == 0 || EVP_DigestUpdate(ctx, t.data, t.nbytes) == 1);
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    ok = ok && EVP_DigestFinal_ex(ctx, md, &n) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok)
        throw Error("sha256 of " + file.path() + " failed (OpenSSL)");
    std::string hex;
    char buf[3];
    for (unsigned int i = 0; i < n; ++i)
    {
        std::snprintf(buf, sizeof buf, "%02x", md[i]);
        hex += buf;
    }
    return hex;
#else
    (void) file;
    return {};
#endif
}

std::string const& LazyFingerprint::get() const
{
    std::call_once(once_, [this] {
        if (file_.empty() || !canFingerprintWeights())
            return;
        try
        {
            value_ = weightsFingerprint(SafetensorsFile(file_));
        }
        catch (Error const&)    // gone or rewritten since the weights were loaded: unknown, as with no file
        {
        }
    });
    return value_;
}

std::vector<StateTensorInfo> stateLayout(Config const& c, int64_t B, DType dtype)
{
    int64_t L = c.n_layers;
    std::vector<StateTensorInfo> out{{"conv", {L, B, c.dInner(), c.d_conv - 1}, dtype},
        {"ssm", {L, B, c.dInner(), c.d_state}, DType::kFloat32}};
    if (c.memory)
    {
        out.push_back({"pool", {L, B, c.pool_size, c.summary_dim}, dtype});
        out.push_back({"prio", {L, B, c.pool_size}, DType::kFloat32});
    }
    return out;
}

void writeSessionState(std::string const& path, Config const& config, std::string const& weightsSha256,
    std::vector<StateTensorInfo> const& layout, SessionStateData const& data)
{
    std::map<std::string, HostTensor> tensors;
    std::vector<std::string> bad;
    for (StateTensorInfo const& info : layout)
    {
        auto it = data.state.find(info.name);
        if (it == data.state.end() || it->second.size() != info.bytes())
            throw Error("internal: state tensor '" + info.name + "' missing or of the wrong size");
        if (!allFinite(decode(it->second, info.dtype)))
            bad.push_back("state." + info.name);
        tensors["state." + info.name] = {stDtype(info.dtype), info.shape, it->second};
    }
    int64_t const B = layout.empty() ? 0 : layout.front().shape.at(1);
    if (data.logits.size() != static_cast<size_t>(B * config.vocab_size))
        throw Error("internal: logits of the wrong size");
    if (!allFinite(data.logits))
        bad.push_back("logits");
    if (!bad.empty())
        throw Error("this session's " + join(bad, 4) + " hold NaN or infinite values: " + path + " not written");
    HostTensor& logits = tensors["logits"] = {"F32", {B, config.vocab_size}, {}};
    logits.data.resize(data.logits.size() * 4);
    std::memcpy(logits.data.data(), data.logits.data(), logits.data.size());
    if (!data.pending.empty())
    {
        HostTensor& p = tensors["pending"] = {"I64", {B}, std::vector<uint8_t>(static_cast<size_t>(B) * 8)};
        for (int64_t b = 0; b < B; ++b)
        {
            int64_t v = data.pending.at(static_cast<size_t>(b));
            std::memcpy(p.data.data() + 8 * b, &v, 8);
        }
    }
    if (data.hasStream)
    {
        HostTensor& s = tensors["sampling_philox"] = {"I64", {2}, std::vector<uint8_t>(16)};
        std::memcpy(s.data.data(), &data.seed, 8);      // the seed's bits (int64 in the file)
        std::memcpy(s.data.data() + 8, &data.draws, 8);
    }
    std::map<std::string, std::string> meta{{"format", kStateFormat},
        {"format_version", std::to_string(kStateFormatVersion)}, {"producer", "memmamba-deploy C++ runtime"},
        {"config", configToJson(config)}};
    if (!weightsSha256.empty())
        meta["weights_sha256"] = weightsSha256;
    writeSafetensors(path, tensors, meta);
}

SessionStateData readSessionState(std::string const& path, Config const& config, std::string const& weightsSha256,
    std::vector<StateTensorInfo> const& layout, DType logitsDtype)
{
    struct stat st{};
    if (::stat(path.c_str(), &st) != 0)
        throw Error("no session state file at " + path);
    if (S_ISDIR(st.st_mode))
        throw Error(path + " is a directory: give the session state file saveState() wrote");
    SafetensorsFile file(path);   // a corrupt or truncated file: an Error naming it
    auto fail = [&](std::string const& why) { return Error(path + ": " + why); };
    auto const& meta = file.metadata();
    auto get = [&](char const* k) {
        auto it = meta.find(k);
        return it == meta.end() ? std::string() : it->second;
    };
    if (get("format") != kStateFormat)
        throw Error(path + " is not a session state file (its metadata names format '" + get("format") + "', not '"
            + kStateFormat + "')");
    if (get("format_version") != std::to_string(kStateFormatVersion))
        throw Error(path + " is a session state file of format version '" + get("format_version") + "' ("
            + (get("producer").empty() ? "unknown writer" : get("producer")) + "); this runtime reads version "
            + std::to_string(kStateFormatVersion));
    Config saved;
    try
    {
        json::Value doc = json::Value::parse(get("config"));
        if (doc.isObject())
        {
            std::vector<std::string> missing = missingConfigKeys(doc);
            if (!missing.empty())
                throw Error("it lacks " + join(missing, 16) + " (a stored config names every field)");
        }
        saved = configFromJson(doc);
    }
    catch (Error const& e)
    {
        throw fail(std::string("its model config does not read (") + e.what() + ")");
    }
    std::vector<std::string> differ = configDifferences(saved, config);
    if (!differ.empty())
        throw fail("it holds the state of another model: " + join(differ, 4) + " (the file's vs this session's)");
    std::string theirs = get("weights_sha256");
    if (!theirs.empty() && !weightsSha256.empty() && theirs != weightsSha256)
        throw fail("it holds the state of a model with other weights (sha256 " + theirs.substr(0, 12)
            + "..., this session's " + weightsSha256.substr(0, 12) + "...): the same config, another checkpoint");

    SessionStateData out;
    int64_t const B = layout.empty() ? 0 : layout.front().shape.at(1);
    std::vector<std::string> bad;
    std::string convDtype;
    for (StateTensorInfo const& info : layout)
    {
        std::string key = "state." + info.name;
        TensorView const* t = file.find(key);
        if (!t)
            throw fail("it lacks " + key);
        if (t->shape.size() >= 2 && t->shape[1] != B && t->shape.size() == info.shape.size())
            throw fail("it holds a batch of " + std::to_string(t->shape[1]) + " rows; this session has batch "
                + std::to_string(B) + " (SessionOptions::batch)");
        if (t->shape != info.shape)
            throw fail(key + " has shape " + shapeString(t->shape) + ", expected " + shapeString(info.shape));
        bool modelDtype = info.name == "conv" || info.name == "pool";
        if (modelDtype ? (t->dtype != "F32" && t->dtype != "F16" && t->dtype != "BF16") : t->dtype != "F32")
            throw fail(key + " has dtype " + t->dtype + ", expected " + (modelDtype ? "F32, F16 or BF16" : "F32"));
        if (info.name == "conv")
            convDtype = t->dtype;
        if (info.name == "pool" && t->dtype != convDtype)
            throw fail("state.pool has dtype " + t->dtype + " but state.conv " + convDtype + " (both are the model's)");
        std::vector<uint8_t> bytes = encode(floats(*t), info.dtype);   // in this session's dtype
        std::vector<float> v = decode(bytes, info.dtype);               // as the session will hold them
        if (!allFinite(v))                      // NaN or infinite in the file, or past the session dtype's range
            bad.push_back(key);
        if (info.name == "prio" && !std::all_of(v.begin(), v.end(), [](float p) { return p >= 0.f || p == -1.f; }))
            throw fail("state.prio holds values that are neither scores (>= 0) nor -1 (an empty slot)");
        out.state[info.name] = std::move(bytes);
    }
    for (TensorView const& t : file.tensors())
    {
        bool known = t.name == "logits" || t.name == "pending" || t.name == "sampling_philox"
            || t.name == "sampling_rng";
        for (StateTensorInfo const& info : layout)
            known = known || t.name == "state." + info.name;
        if (!known && t.name.rfind("state.", 0) == 0)
            throw fail(t.name + " given but this model has no such state" + (config.memory ? "" : " (memory=False)"));
    }
    TensorView const* logits = file.find("logits");
    if (!logits || logits->shape != std::vector<int64_t>{B, config.vocab_size}
        || (logits->dtype != "F32" && logits->dtype != "F16" && logits->dtype != "BF16"))
        throw fail("logits must be float [" + std::to_string(B) + ", " + std::to_string(config.vocab_size) + "], got "
            + (logits ? shapeString(logits->shape) + " " + logits->dtype : std::string("none")));
    out.logits = floats(*logits);
    // the logits land in the session's logits dtype (fp16 in an fp16 native session): values past it are refused
    if (!allFinite(decode(encode(out.logits, logitsDtype), logitsDtype)))
        bad.push_back("logits");
    if (!bad.empty())
        throw fail(join(bad, 4) + " hold NaN or infinite values");
    if (TensorView const* p = file.find("pending"))
    {
        bool ok = (p->dtype == "I64" || p->dtype == "I32") && p->shape == std::vector<int64_t>{B};
        for (int64_t b = 0; ok && b < B; ++b)
        {
            int64_t v = 0;
            if (p->dtype == "I64")
                std::memcpy(&v, p->data + 8 * b, 8);
            else
            {
                int32_t w;
                std::memcpy(&w, p->data + 4 * b, 4);
                v = w;
            }
            ok = v >= 0 && v < config.vocab_size;
            out.pending.push_back(static_cast<int32_t>(v));
        }
        if (!ok)
            throw fail("the pending tokens must be [" + std::to_string(B) + "] integer ids in the vocabulary, got "
                + shapeString(p->shape) + " " + p->dtype);
    }
    if (TensorView const* s = file.find("sampling_philox"))
    {
        if (s->dtype != "I64" || s->shape != std::vector<int64_t>{2})
            throw fail("sampling_philox must be I64 [2] (seed, draws), got " + s->dtype + " " + shapeString(s->shape));
        std::memcpy(&out.seed, s->data, 8);
        int64_t draws;
        std::memcpy(&draws, s->data + 8, 8);
        if (draws < 0 || draws > int64_t{UINT32_MAX})
            throw fail("sampling_philox's draw count " + std::to_string(draws) + " is out of range");
        out.draws = static_cast<uint64_t>(draws);
        out.hasStream = true;
    }
    return out;
}

} // namespace memmamba
