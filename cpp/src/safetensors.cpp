// See safetensors.h.
#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "json.h"
#include "memmamba/memmamba.h"

namespace memmamba
{

namespace
{
constexpr uint64_t kMaxHeader = 100ull << 20; // the safetensors format's own limit on the header

struct ItemSize
{
    char const* name;
    size_t bytes;
};
constexpr ItemSize kItemSizes[] = {{"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4},
    {"I16", 2}, {"I8", 1}, {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1}, {"F8_E4M3", 1},
    {"F8_E5M2", 1}};
} // namespace

size_t safetensorsItemSize(std::string const& dtype)
{
    for (auto const& it : kItemSizes)
        if (dtype == it.name)
            return it.bytes;
    return 0;
}

int64_t TensorView::numel() const
{
    int64_t n = 1;
    for (int64_t d : shape)
        n *= d;
    return n;
}

SafetensorsFile::SafetensorsFile(std::string const& path)
    : path_(path)
{
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        throw Error("cannot open " + path + ": " + std::strerror(errno));
    struct stat st{};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
    {
        ::close(fd);
        throw Error(path + " is not a regular file");
    }
    mapSize_ = static_cast<size_t>(st.st_size);
    if (mapSize_ > 0)
    {
        map_ = ::mmap(nullptr, mapSize_, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map_ == MAP_FAILED)
        {
            map_ = nullptr;
            int err = errno;
            ::close(fd);
            throw Error("cannot map " + path + ": " + std::strerror(err));
        }
    }
    ::close(fd);
    try
    {
        parse(static_cast<uint8_t const*>(map_), mapSize_);
    }
    catch (...)
    {
        if (map_)
            ::munmap(map_, mapSize_);
        map_ = nullptr;
        throw;
    }
}

SafetensorsFile::SafetensorsFile(uint8_t const* data, size_t size, std::string const& label)
    : path_(label)
{
    parse(data, size);
}

SafetensorsFile::~SafetensorsFile()
{
    if (map_)
        ::munmap(map_, mapSize_);
}

TensorView const* SafetensorsFile::find(std::string const& name) const
{
    auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
        [](TensorView const& t, std::string const& n) { return t.name < n; });
    return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

void SafetensorsFile::parse(uint8_t const* data, size_t size)
{
    auto bad = [&](std::string const& why) {
        return Error(path_ + " is corrupt or not a safetensors file: " + why);
    };
    if (size < 8)
        throw bad("only " + std::to_string(size) + " bytes (a safetensors file starts with an 8-byte header length)");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i)
        n = (n << 8) | data[i];
    if (n > kMaxHeader)
        throw bad("header length " + std::to_string(n) + " exceeds the format's 100 MiB limit");
    if (n > size - 8)
        throw bad("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size)
            + " bytes): truncated?");
    json::Value header;
    try
    {
        header = json::Value::parse(std::string(reinterpret_cast<char const*>(data + 8), n));
    }
    catch (Error const& e)
    {
        throw bad(std::string("header: ") + e.what());
    }
    if (!header.isObject())
        throw bad("the header is not a JSON object");
    uint8_t const* body = data + 8 + n;
    size_t bodySize = size - 8 - n;
    std::vector<std::pair<size_t, size_t>> spans;
    for (auto const& [name, entry] : header.asObject("header"))
    {
        if (name == "__metadata__")
        {
            for (auto const& [k, v] : entry.asObject("__metadata__"))
                metadata_[k] = v.isString() ? v.asString(k) : std::string();
            continue;
        }
        std::string what = "tensor '" + name + "'";
        try
        {
            if (!entry.isObject())
                throw Error(what + " must be described by an object");
            for (auto const& kv : entry.asObject(what))
                if (kv.first != "dtype" && kv.first != "shape" && kv.first != "data_offsets")
                    throw Error(what + " has an unknown field '" + kv.first + "'");
            auto const* dt = entry.find("dtype");
            auto const* sh = entry.find("shape");
            auto const* off = entry.find("data_offsets");
            if (!dt || !sh || !off)
                throw Error(what + " needs dtype, shape and data_offsets");
            TensorView t;
            t.name = name;
            t.dtype = dt->asString(what + " dtype");
            size_t item = safetensorsItemSize(t.dtype);
            if (item == 0)
                throw Error(what + " has unknown dtype '" + t.dtype + "'");
            uint64_t numel = 1;
            for (auto const& d : sh->asArray(what + " shape"))
            {
                int64_t v = d.asInt(what + " shape entry");
                if (v < 0 || v > (int64_t{1} << 40))
                    throw Error(what + " has an invalid dimension " + std::to_string(v));
                t.shape.push_back(v);
                numel *= static_cast<uint64_t>(v);
                if (numel > (uint64_t{1} << 48))
                    throw Error(what + " has an absurd number of elements");
            }
            auto const& o = off->asArray(what + " data_offsets");
            if (o.size() != 2)
                throw Error(what + " data_offsets must be [begin, end]");
            int64_t b = o[0].asInt(what + " data_offsets"), e = o[1].asInt(what + " data_offsets");
            if (b < 0 || e < b)
                throw Error(what + " has data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + "]");
            if (static_cast<uint64_t>(e) > bodySize)
                throw Error(what + " ends at byte " + std::to_string(e) + " of the data but the file holds only "
                    + std::to_string(bodySize) + " data bytes: truncated?");
            if (static_cast<uint64_t>(e - b) != numel * item)
                throw Error(what + " spans " + std::to_string(e - b) + " bytes but its shape and dtype need "
                    + std::to_string(numel * item));
            t.data = body + b;
            t.nbytes = static_cast<size_t>(e - b);
            spans.emplace_back(static_cast<size_t>(b), static_cast<size_t>(e));
            tensors_.push_back(std::move(t));
        }
        catch (Error const& e)
        {
            throw bad(e.what());
        }
    }
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i)
        if (spans[i].first < spans[i - 1].second)
            throw bad("two tensors' data_offsets overlap");
    std::sort(tensors_.begin(), tensors_.end(), [](TensorView const& a, TensorView const& b) { return a.name < b.name; });
}

} // namespace memmamba
