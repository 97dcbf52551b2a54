// Session (memmamba.h): argument checks, backend choice, and generation written once over the Backend interface.
#include <algorithm>

#include "backend.h"
#include "checkpoint.h"
#include "state_file.h"

namespace memmamba
{

Session::Session(std::unique_ptr<detail::Backend> backend)
    : backend_(std::move(backend))
    , seed_(backend_->options().seed)
{
}

Session::~Session() = default;

std::unique_ptr<Session> Session::open(std::string const& path, SessionOptions const& options)
{
    if (options.batch < 1)
        throw Error("batch must be >= 1, got " + std::to_string(options.batch));
    if (options.prefillRows < 0 || options.prefillRows > 65535)
        throw Error("prefillRows must be 0 (token by token) to 65535, got " + std::to_string(options.prefillRows));
    if (options.plan != "cublas" && options.plan != "fused")
        throw Error("unknown plan '" + options.plan + "': choose cublas or fused");
    if (options.dtype != DType::kFloat16 && options.dtype != DType::kFloat32)
        throw Error("unknown dtype " + std::to_string(static_cast<int>(options.dtype)) + ": choose kFloat16 or "
                    "kFloat32");
    if (options.backend == "native")
        return std::unique_ptr<Session>(new Session(detail::openNative(path, options)));
    if (options.backend == "tensorrt")
        return std::unique_ptr<Session>(new Session(detail::openTensorRT(path, options)));
    throw Error("unknown backend '" + options.backend + "': choose native or tensorrt");
}

Config const& Session::config() const { return backend_->config(); }
SessionOptions const& Session::options() const { return backend_->options(); }
int Session::batch() const { return backend_->options().batch; }
std::string Session::describe() const { return backend_->describe(); }

namespace
{
void checkTokens(int32_t const* tokens, size_t n, int64_t vocab)
{
    if (!tokens)
        throw Error("tokens is null");
    for (size_t i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= vocab)
            throw Error("token id " + std::to_string(tokens[i]) + " at position " + std::to_string(i)
                + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}
} // namespace

void Session::feedPending()
{
    if (pending_.empty())
        return;
    std::vector<int32_t> tokens;
    tokens.swap(pending_);          // dropped before the step, as the Python Session: never fed twice
    backend_->step(tokens.data());
}

void Session::prefill(int32_t const* tokens, int T) { prefill(tokens, T, nullptr); }

void Session::prefill(int32_t const* tokens, int T, int32_t const* lengths)
{
    if (T < 1)
        throw Error("prefill needs T >= 1 tokens per row, got " + std::to_string(T));
    int const B = batch();
    checkTokens(tokens, static_cast<size_t>(T) * B, config().vocab_size);
    int longest = T;                // columns past every row's end are not fed
    std::vector<int32_t> lens;      // rows of their own lengths; none where every row has `longest`
    if (lengths)
    {
        for (int b = 0; b < B; ++b)
            if (lengths[b] < 1 || lengths[b] > T)
                throw Error("prefill: lengths[" + std::to_string(b) + "] is " + std::to_string(lengths[b])
                            + ", outside 1.." + std::to_string(T) + " (a row's tokens, at most T)");
        longest = *std::max_element(lengths, lengths + B);
        if (std::any_of(lengths, lengths + B, [longest](int32_t n) { return n != longest; }))
            lens.assign(lengths, lengths + B);
    }
    int const lead = pending_.empty() ? 0 : 1; // generate()'s last tokens go first, each row's own
    int const W = lead + longest;
    std::vector<int32_t> ids;
    int32_t const* feed = tokens;
    if (lead || longest < T)
    {
        ids.resize(static_cast<size_t>(B) * W);
        for (int b = 0; b < B; ++b)
        {
            if (lead)
                ids[static_cast<size_t>(b) * W] = pending_[b];
            std::copy(tokens + static_cast<size_t>(b) * T, tokens + static_cast<size_t>(b) * T + longest,
                ids.begin() + static_cast<size_t>(b) * W + lead);
        }
        feed = ids.data();
    }
    for (int32_t& n : lens)
        n += lead;
    backend_->prefill(feed, W, lens.empty() ? nullptr : lens.data()); // a refusal changes nothing
    rowsCopied_.clear();            // a token fed gives every row logits: copyRow's marks are done with
    pending_.clear();
}

void Session::step(int32_t const* tokens)
{
    checkTokens(tokens, static_cast<size_t>(batch()), config().vocab_size);
    rowsCopied_.clear();
    feedPending();
    backend_->step(tokens);
}

void Session::logits(float* out) const
{
    if (!backend_->hasLogits())
        throw Error("no logits yet: feed tokens with prefill() or step() first");
    backend_->logits(out);
}

std::vector<float> Session::logits() const
{
    std::vector<float> out(static_cast<size_t>(batch()) * config().vocab_size);
    logits(out.data());
    return out;
}

std::vector<int32_t> Session::sample(SamplingParams const& params)
{
    params.validate();
    feedPending();
    if (!backend_->hasLogits())
        throw Error("no logits to sample from: feed tokens with prefill() or step() first");
    backend_->setSampling(params);
    backend_->setStream(seed_, draws_);
    backend_->resample();
    std::vector<int32_t> out(batch());
    backend_->copyNextAsync(0);
    backend_->waitNext(0, out.data());
    draws_ += params.temperature > 0 ? 1 : 0;     // greedy takes no draw (as Python's sampler)
    return out;
}

std::vector<std::vector<int32_t>> Session::generate(int maxNewTokens, SamplingParams const& params,
    TokenCallback const& onToken, std::vector<int32_t> const& stop)
{
    params.validate();
    if (maxNewTokens < 1)
        throw Error("maxNewTokens must be >= 1, got " + std::to_string(maxNewTokens));
    if (!backend_->hasLogits())
        throw Error("generate needs a prompt: call prefill() first");
    int const B = batch();
    std::vector<std::vector<int32_t>> out(B);
    feedPending();
    backend_->setSampling(params);
    backend_->setStream(seed_, draws_);   // token i is draw draws_ + i of the stream, whatever ran before
    backend_->resample();           // token 0 from the current logits with these settings
    backend_->copyNextAsync(0);
    std::vector<char> done(B, 0);
    std::vector<int32_t> tokens(B);
    // Token i is on the GPU before the host sees it: step i+1 (which feeds token i) is launched first, so the GPU
    // never waits for the host. When generation ends, the last token returned must not be in the state (it stays
    // pending): the step that fed it, or one token past it after an error, is undone (the state is double-buffered).
    int launched = -1;              // the last token whose feeding step was launched
    int returned = -1;              // the last token handed to the caller (pending_)
    auto settle = [&] {
        if (params.temperature > 0)   // the tokens handed out, drawn (greedy takes no draw); later draws are not kept
            draws_ += static_cast<uint32_t>(returned + 1);
        if (launched >= 0 && launched >= returned)
        {
            backend_->synchronize();
            backend_->undoStep();
        }
        if (launched > returned)    // the undone step fed a token the caller never saw: the one returned is fed
            pending_.clear();
    };
    try
    {
        for (int i = 0; i < maxNewTokens; ++i)
        {
            if (i + 1 < maxNewTokens)
            {
                backend_->stepNext();
                launched = i;
                backend_->copyNextAsync((i + 1) % 2);
            }
            backend_->waitNext(i % 2, tokens.data());
            returned = i;
            pending_ = tokens;      // the next prefill/step/sample/generate feeds it
            bool all = true;
            for (int b = 0; b < B; ++b)
            {
                out[b].push_back(tokens[b]);
                done[b] = done[b] || std::find(stop.begin(), stop.end(), tokens[b]) != stop.end();
                all = all && done[b];
            }
            bool keepGoing = onToken ? onToken(i, tokens.data()) : true;
            if (all || !keepGoing)
                break;
        }
    }
    catch (...)                     // a callback that throws (or a failed launch): the tokens returned until then
    {                               // count as generated, the last of them pending
        settle();
        throw;
    }
    settle();
    return out;
}

void Session::reset()
{
    backend_->reset();
    pending_.clear();
    rowsCopied_.clear();
}

void Session::reseed(uint64_t seed)
{
    seed_ = seed;
    draws_ = 0;
}

std::unique_ptr<Session> Session::fork() const
{
    std::unique_ptr<Session> other(new Session(backend_->fork()));
    other->pending_ = pending_;
    other->rowsCopied_ = rowsCopied_;
    other->seed_ = seed_;
    other->draws_ = draws_;
    return other;
}

void Session::copyRow(Session& from, int fromRow, int toRow)
{
    if (fromRow < 0 || fromRow >= from.batch())
        throw Error("copyRow: source row " + std::to_string(fromRow) + " is outside its session's rows 0.."
            + std::to_string(from.batch() - 1));
    if (toRow < 0 || toRow >= batch())
        throw Error("copyRow: row " + std::to_string(toRow) + " is outside this session's rows 0.."
            + std::to_string(batch() - 1));
    std::vector<std::string> differ = configDifferences(from.config(), config());
    if (!differ.empty())
        throw Error("copyRow: the source session runs another model (" + differ.front() + ")");
    SessionOptions const &theirs = from.options(), &ours = options();
    if (theirs.backend != ours.backend || theirs.device != ours.device || theirs.dtype != ours.dtype)
        throw Error("copyRow: the source session runs " + theirs.backend + " on GPU " + std::to_string(theirs.device)
            + " in " + dtypeName(theirs.dtype) + ", this one " + ours.backend + " on GPU "
            + std::to_string(ours.device) + " in " + dtypeName(ours.dtype));
    if (backend_->weightsIdentity() != from.backend_->weightsIdentity())
    {
        std::string const ourSha = backend_->weightsFingerprint(), theirSha = from.backend_->weightsFingerprint();
        if (ourSha.empty() || theirSha.empty())
            throw Error("copyRow: the two sessions load their weights apart and this build cannot hash them (no "
                        "OpenSSL, or an export without its reference weights): make one a sibling() or fork() of the "
                        "other");
        if (ourSha != theirSha)
            throw Error("copyRow: the source session runs other weights (the same config, another sha256)");
    }
    from.feedPending();
    if (!from.backend_->hasLogits())
        throw Error("copyRow: the source session holds no logits: prefill its prompt first");
    feedPending();
    if (&from == this && fromRow == toRow)
        return;
    std::vector<char> copied = rowsCopied_;     // marked once the copy has succeeded
    bool complete = backend_->hasLogits();
    if (!complete)
    {
        copied.resize(batch(), 0);
        copied[toRow] = 1;
        complete = std::count(copied.begin(), copied.end(), 1) == batch();
    }
    backend_->copyRow(*from.backend_, fromRow, toRow, complete);
    rowsCopied_ = complete ? std::vector<char>() : copied;
}

std::unique_ptr<Session> Session::sibling(int batch) const
{
    if (batch < 1)
        throw Error("batch must be >= 1, got " + std::to_string(batch));
    return std::unique_ptr<Session>(new Session(backend_->sibling(batch)));
}

std::vector<StateTensorInfo> Session::stateInfo() const { return backend_->stateInfo(); }
void Session::readState(std::string const& name, void* host) const { backend_->readState(name, host); }

namespace
{
void checkStateBuffer(std::vector<StateTensorInfo> const& layout, std::string const& name, void const* host,
    size_t bytes)
{
    std::string names;
    for (auto const& info : layout)
    {
        if (info.name == name)
        {
            if (!host)
                throw Error("the host buffer for state tensor '" + name + "' is null");
            if (bytes != info.bytes())
                throw Error("state tensor '" + name + "' " + shapeString(info.shape) + " " + dtypeName(info.dtype)
                    + " is " + std::to_string(info.bytes()) + " bytes; the host buffer is " + std::to_string(bytes));
            return;
        }
        names += (names.empty() ? "" : ", ") + info.name;
    }
    throw Error("no state tensor '" + name + "': the state has " + names);
}
} // namespace

void Session::readState(std::string const& name, void* host, size_t bytes) const
{
    checkStateBuffer(stateInfo(), name, host, bytes);
    backend_->readState(name, host);
}

void Session::writeState(std::string const& name, void const* host, size_t bytes)
{
    checkStateBuffer(stateInfo(), name, host, bytes);
    writeState(name, host);
}

void Session::saveState(std::string const& path) const
{
    if (!backend_->hasLogits())
        throw Error("nothing to save: no token fed since the session was opened, reset or its state written "
                    "(prefill() or step() first)");
    std::vector<StateTensorInfo> layout = stateInfo();
    SessionStateData data;
    for (auto const& info : layout)
    {
        std::vector<uint8_t>& bytes = data.state[info.name];
        bytes.resize(info.bytes());
        backend_->readState(info.name, bytes.data());
    }
    data.logits.resize(static_cast<size_t>(batch()) * config().vocab_size);
    backend_->logits(data.logits.data());
    data.pending = pending_;
    data.hasStream = true;
    data.seed = seed_;
    data.draws = draws_;
    writeSessionState(path, config(), backend_->weightsFingerprint(), layout, data);
}

void Session::loadState(std::string const& path)
{
    std::vector<StateTensorInfo> layout = stateInfo();
    SessionStateData data =
        readSessionState(path, config(), backend_->weightsFingerprint(), layout, backend_->logitsDtype());
    for (auto const& info : layout)
        backend_->writeState(info.name, data.state.at(info.name).data());
    backend_->writeLogits(data.logits.data());
    pending_ = data.pending;
    if (data.hasStream)
    {
        seed_ = data.seed;
        draws_ = static_cast<uint32_t>(data.draws);
    }
}

void Session::writeState(std::string const& name, void const* host)
{
    backend_->writeState(name, host);
    pending_.clear();
    rowsCopied_.clear();
}
void Session::synchronize() const { backend_->synchronize(); }

} // namespace memmamba
