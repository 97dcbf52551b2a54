// The interface behind memmamba::Session: one implementation per backend (native.cpp, tensorrt.cpp).
//
// Position semantics every backend keeps: the *current* state is the one after the tokens fed so far; with it go
// the logits of the last token fed and `next`, the token per row the sampler drew from those logits (drawn as
// part of each step, so generation never leaves the GPU). A step feeds either host tokens or `next`.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "memmamba/memmamba.h"

namespace memmamba::detail
{

class Backend
{
public:
    virtual ~Backend() = default;
    virtual Config const& config() const = 0;
    virtual SessionOptions const& options() const = 0;
    virtual std::string describe() const = 0;

    //! tokens [B, T]; lengths [B] (1..T) or null: rows of their own lengths (Session::prefill's)
    virtual void prefill(int32_t const* tokens, int T, int32_t const* lengths) = 0;
    virtual void step(int32_t const* tokens) = 0;           //!< tokens [B]
    virtual bool hasLogits() const = 0;
    virtual void logits(float* out) const = 0;              //!< [B, V] fp32

    virtual void setSampling(SamplingParams const& params) = 0; //!< for the draws of the steps that follow
    virtual void resample() = 0;                 //!< draw `next` again from the current logits (current params)
    //! Feed `next` (asynchronously); afterwards the current position is one token further and `next` is drawn
    //! from the new logits.
    virtual void stepNext() = 0;
    //! Enqueue a copy of `next` into slot `slot` of a host ring (0 <= slot < 2) and return at once;
    //! waitNext(slot, out) waits for that copy.
    virtual void copyNextAsync(int slot) = 0;
    virtual void waitNext(int slot, int32_t* out) = 0;
    //! Go back to the position before the last stepNext (possible once: the state is double-buffered).
    virtual void undoStep() = 0;

    virtual void reset() = 0;
    //! Where the next draw reads the sampling stream: (seed, step); each draw launch then advances the step by one.
    virtual void setStream(uint64_t seed, uint32_t step) = 0;
    virtual std::unique_ptr<Backend> fork() const = 0;
    //! A backend on the same weights (engines) and options but `batch` rows, in the empty state.
    virtual std::unique_ptr<Backend> sibling(int batch) const = 0;
    //! The weights (engines) in memory this backend runs on: equal for forks and siblings of one backend.
    virtual void const* weightsIdentity() const = 0;
    virtual std::vector<StateTensorInfo> stateInfo() const = 0;
    //! Row `toRow` of the current state and logits becomes a copy of row `fromRow` of `from`'s (a backend of the
    //! same kind, model and device; any batch), on the GPU; the other rows stay. `complete`: every row now holds
    //! logits (a session that had none). `next` is drawn again before any use; the step can no longer be undone.
    virtual void copyRow(Backend const& from, int fromRow, int toRow, bool complete) = 0;
    virtual void readState(std::string const& name, void* host) const = 0;
    virtual void writeState(std::string const& name, void const* host) = 0;
    //! Set the current logits [B, V] fp32 (a loaded state's); `next` is drawn again before any use.
    virtual void writeLogits(float const* host) = 0;
    virtual DType logitsDtype() const = 0;                  //!< what the backend keeps logits in
    //! weights_fingerprint of the weights' safetensors file (computed once), or "" where unknown.
    virtual std::string weightsFingerprint() const = 0;
    virtual void synchronize() const = 0;
};

//! copyRow's source as the backend type `B` (Session::copyRow has checked the kind, GPU and dtype).
template <class B>
B const& rowSource(Backend const& from)
{
    auto const* source = dynamic_cast<B const*>(&from);
    if (!source)
        throw Error("copyRow: the source session runs another backend (native and tensorrt do not mix)");
    return *source;
}

std::unique_ptr<Backend> openNative(std::string const& checkpoint, SessionOptions const& options);
std::unique_ptr<Backend> openTensorRT(std::string const& exportDir, SessionOptions const& options);

} // namespace memmamba::detail
