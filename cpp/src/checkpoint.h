// A memmamba checkpoint directory: config.json + model.safetensors (models/checkpoint.py writes them). Opening
// one validates everything the runtime relies on: the config, every tensor MemMambaLM.state_dict() has (tied
// embeddings: no lm_head), no extra tensor, each tensor's shape, and a float dtype (F32, F16 or BF16).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "memmamba/memmamba.h"
#include "safetensors.h"

namespace memmamba
{

namespace json
{
class Value;
}

//! Config::fromJson on an already parsed JSON object (manifest.json embeds one).
Config configFromJson(json::Value const& object);
// The config keys a checkpoint's config.json lacks (a checkpoint names every field: Config's defaults are for code)
std::vector<std::string> missingConfigKeys(json::Value const& object);

struct ExpectedTensor
{
    std::string name;
    std::vector<int64_t> shape;
};

//! The parameter names and shapes of MemMambaLM(config).state_dict(), in its order.
std::vector<ExpectedTensor> expectedTensors(Config const& config);

std::string shapeString(std::vector<int64_t> const& shape); //!< "[2, 3]"

class Checkpoint
{
public:
    explicit Checkpoint(std::string const& directory);
    Config const& config() const { return config_; }
    std::string const& directory() const { return directory_; }
    //! A tensor's values as fp32, rounded through fp16 first when `modelDtype` is fp16: what MemMambaLM holds
    //! after .to(torch.float16), which every derived value (A = -exp(A_log), ...) starts from.
    std::vector<float> values(std::string const& name, DType modelDtype) const;
    int64_t parameterCount() const;

private:
    std::string directory_;
    Config config_;
    std::unique_ptr<SafetensorsFile> file_;
};

} // namespace memmamba
