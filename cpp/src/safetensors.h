// Reading model.safetensors: an 8-byte little-endian header length, a JSON header
// {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw tensor bytes.
// The file is memory-mapped; every check that can fail on a corrupt or truncated file is made when it is opened,
// and each failure is a memmamba::Error naming the file and the problem.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace memmamba
{

struct TensorView
{
    std::string name;
    std::string dtype;          //!< safetensors spelling: "F32", "F16", "BF16", "I64", ...
    std::vector<int64_t> shape;
    uint8_t const* data;        //!< into the mapping; valid while the SafetensorsFile lives
    size_t nbytes;
    int64_t numel() const;
};

//! Bytes per element of a safetensors dtype, or 0 for a name safetensors does not define.
size_t safetensorsItemSize(std::string const& dtype);

class SafetensorsFile
{
public:
    explicit SafetensorsFile(std::string const& path); //!< maps and validates the whole file
    //! Parses a buffer the caller keeps alive (tests).
    SafetensorsFile(uint8_t const* data, size_t size, std::string const& label);
    ~SafetensorsFile();
    SafetensorsFile(SafetensorsFile const&) = delete;
    SafetensorsFile& operator=(SafetensorsFile const&) = delete;

    std::vector<TensorView> const& tensors() const { return tensors_; } //!< sorted by name
    TensorView const* find(std::string const& name) const;
    std::map<std::string, std::string> const& metadata() const { return metadata_; }
    std::string const& path() const { return path_; }

private:
    void parse(uint8_t const* data, size_t size);
    std::string path_;
    void* map_{nullptr};
    size_t mapSize_{0};
    std::vector<TensorView> tensors_;
    std::map<std::string, std::string> metadata_;
};

} // namespace memmamba
