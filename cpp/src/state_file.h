// Session state files: the format of the Python Session.save_state (memmamba_deploy/session.py, "memmamba-session-
// state" version 1), so a stream saved by either runtime goes on in the other. A safetensors file:
//   state.conv, state.ssm[, state.pool, state.prio]  MemMambaLM's State layout [L, B, ...]; conv/pool in the model
//                                                    dtype (F32, F16 or BF16 read), ssm/prio F32
//   logits [B, vocab] F32                            after the last token consumed
//   pending [B] I64 (optional)                       generate()'s last tokens, not yet fed
//   sampling_philox [2] I64 (optional, C++ only)     the C++ sampling stream: seed (its bits), draws so far
//   sampling_rng (optional, Python only)             torch.Generator state
// metadata: format, format_version, producer, config (every MemMambaConfig key, JSON), weights_sha256 (optional).
// Each runtime keeps its own sampling stream and ignores the other's: they draw with different generators.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "memmamba/memmamba.h"
#include "safetensors.h"

namespace memmamba
{

struct HostTensor
{
    std::string dtype;          //!< safetensors spelling ("F32", "F16", "I64", ...)
    std::vector<int64_t> shape;
    std::vector<uint8_t> data;
};

//! Write a safetensors file, whole or not at all: a temp file beside `path`, renamed over it.
void writeSafetensors(std::string const& path, std::map<std::string, HostTensor> const& tensors,
    std::map<std::string, std::string> const& metadata);

//! Every MemMambaConfig key as one JSON object (what Python's to_dict gives; floats round-trip).
std::string configToJson(Config const& config);
//! "key a vs b" for each key where the two configs differ (MemMambaConfig.differences).
std::vector<std::string> configDifferences(Config const& a, Config const& b);

//! Whether this build can hash weights (OpenSSL's libcrypto found at configure time).
bool canFingerprintWeights();
//! memmamba_deploy.session.weights_fingerprint: sha256 (hex) over the tensors in name order of
//! "name|torch dtype|[shape]|" and their bytes, so a checkpoint and its export's reference/ copy agree. Empty
//! where this build has no sha256 (canFingerprintWeights()).
std::string weightsFingerprint(SafetensorsFile const& file);

//! The weightsFingerprint of one safetensors file, computed on first use and kept (a session's forks share one):
//! empty where there is no file, it no longer opens, or this build has no sha256.
class LazyFingerprint
{
public:
    explicit LazyFingerprint(std::string file = {})
        : file_(std::move(file))
    {
    }
    std::string const& get() const;

private:
    std::string file_;
    mutable std::once_flag once_;
    mutable std::string value_;
};

//! MemMambaLM's State layout for a batch (State.shapes / State.dtypes): conv, ssm[, pool, prio].
std::vector<StateTensorInfo> stateLayout(Config const& config, int64_t batch, DType dtype);

struct SessionStateData
{
    std::map<std::string, std::vector<uint8_t>> state; //!< by StateTensorInfo name, in the session's dtypes
    std::vector<float> logits;      //!< [batch, vocab]
    std::vector<int32_t> pending;   //!< [batch], or empty
    bool hasStream{false};          //!< sampling_philox present
    uint64_t seed{0};
    uint64_t draws{0};
};

extern char const* const kStateFormat;
extern int const kStateFormatVersion;

//! Write `data` (tensors as `layout` describes them) for a model of `config`; weightsSha256 may be empty.
void writeSessionState(std::string const& path, Config const& config, std::string const& weightsSha256,
    std::vector<StateTensorInfo> const& layout, SessionStateData const& data);

//! Read a state file for a session of `config` whose state is `layout` (its shapes give the batch), weights
//! `weightsSha256` (empty: unknown). Refuses, naming the file and the problem: another format or version, another
//! model (config; weights where both sides know their sha256), another batch, tensors of the wrong shape or dtype,
//! NaN or infinite values, priorities that are neither scores nor -1, pending tokens outside the vocabulary.
//! `logitsDtype`: the dtype the session keeps logits in (values past its range are refused too).
SessionStateData readSessionState(std::string const& path, Config const& config, std::string const& weightsSha256,
    std::vector<StateTensorInfo> const& layout, DType logitsDtype);

} // namespace memmamba
