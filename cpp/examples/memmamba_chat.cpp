// memmamba_chat: stream text from a byte-level MemMamba checkpoint (vocab_size >= 256, token = byte).
//
//   memmamba_chat CHECKPOINT [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
//                 [--fp32] [--no-graph] [--backend native|tensorrt] [--plugins LIB]
//
// Without --prompt it reads prompts from stdin, one per line, and keeps the conversation's state between them
// (the recurrent state is all the context there is). Prints the session description and tokens/s to stderr.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "memmamba/memmamba.h"

namespace
{
void usage()
{
    std::fprintf(stderr,
        "usage: memmamba_chat CHECKPOINT [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--top-p P]\n"
        "                     [--seed S] [--fp32] [--no-graph] [--backend native|tensorrt] [--plugins LIB]\n");
}
} // namespace

int main(int argc, char** argv)
{
    if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")
    {
        usage();
        return argc < 2 ? 2 : 0;
    }
    std::string checkpoint = argv[1], prompt;
    bool havePrompt = false;
    int tokens = 200;
    memmamba::SamplingParams sampling{0.8f, 0, 0.95f};
    memmamba::SessionOptions options;
    try
    {
        for (int i = 2; i < argc; ++i)
        {
            std::string a = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc)
                    throw memmamba::Error(a + " needs a value");
                return argv[++i];
            };
            auto number = [&](auto parse) {   // std::stoi's own message is just "stoi": name the option
                std::string v = value();
                try
                {
                    size_t used = 0;
                    auto n = parse(v, &used);
                    if (used == v.size())
                        return n;
                }
                catch (std::exception const&)
                {
                }
                throw memmamba::Error(a + " wants a number, got '" + v + "'");
            };
            auto toInt = [](std::string const& v, size_t* used) { return std::stoi(v, used); };
            auto toFloat = [](std::string const& v, size_t* used) { return std::stof(v, used); };
            if (a == "--prompt")
            {
                prompt = value();
                havePrompt = true;
            }
            else if (a == "--tokens")
                tokens = number(toInt);
            else if (a == "--temperature")
                sampling.temperature = number(toFloat);
            else if (a == "--top-k")
                sampling.topK = number(toInt);
            else if (a == "--top-p")
                sampling.topP = number(toFloat);
            else if (a == "--seed")
                options.seed = number([](std::string const& v, size_t* used) { return std::stoull(v, used); });
            else if (a == "--fp32")
                options.dtype = memmamba::DType::kFloat32;
            else if (a == "--no-graph")
                options.cudaGraph = false;
            else if (a == "--backend")
                options.backend = value();
            else if (a == "--plugins")
                options.pluginLibrary = value();
            else
                throw memmamba::Error("unknown option " + a);
        }
        sampling.validate();
        if (tokens < 1)
            throw memmamba::Error("--tokens must be >= 1, got " + std::to_string(tokens));
        auto session = memmamba::Session::open(checkpoint, options);
        if (session->config().vocab_size < 256)
            throw memmamba::Error("memmamba_chat streams bytes and needs vocab_size >= 256 (this model has "
                + std::to_string(session->config().vocab_size) + ")");
        std::fprintf(stderr, "%s\n", session->describe().c_str());
        // the session feeds each reply's last token before the next turn's prompt (generate leaves it pending), so
        // the conversation's state holds every byte of every reply
        auto turn = [&](std::string const& text) {
            std::vector<int32_t> ids;
            for (unsigned char c : text)
                ids.push_back(c);
            if (ids.empty())
                ids.push_back('\n');
            session->prefill(ids.data(), static_cast<int>(ids.size()));
            auto t0 = std::chrono::steady_clock::now();
            auto out = session->generate(tokens, sampling, [](int, int32_t const* tok) {
                if (tok[0] < 256)
                    std::fputc(tok[0], stdout);
                std::fflush(stdout);
                return true;
            });
            double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            std::fprintf(stderr, "\n[%zu tokens in %.3f s: %.1f tokens/s]\n", out[0].size(), s, out[0].size() / s);
        };
        if (havePrompt)
        {
            turn(prompt);
            return 0;
        }
        std::string line;
        while (std::fprintf(stderr, "> "), std::getline(std::cin, line))
            turn(line + "\n");
        return 0;
    }
    catch (std::exception const& e)
    {
        std::fprintf(stderr, "memmamba_chat: %s\n", e.what());
        return 1;
    }
}
