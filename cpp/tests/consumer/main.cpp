// Greedy-generate 16 tokens from a checkpoint with the installed library; prints them (a byte-level model: text).
#include <cstdio>
#include <string>
#include <vector>

#include <memmamba/memmamba.h>

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: consumer CHECKPOINT\n");
        return 2;
    }
    try
    {
        auto session = memmamba::Session::open(argv[1]);
        std::string prompt = "The passkey is ";
        std::vector<int32_t> ids(prompt.begin(), prompt.end());
        session->prefill(ids.data(), static_cast<int>(ids.size()));
        auto rows = session->generate(16, {});
        std::printf("%zu tokens:", rows[0].size());
        for (int32_t t : rows[0])
            std::printf(" %d", t);
        std::printf("\n");
        return 0;
    }
    catch (memmamba::Error const& e)
    {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
