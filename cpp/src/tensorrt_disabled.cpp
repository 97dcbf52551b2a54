// openTensorRT when libmemmamba is built without the TensorRT backend (MEMMAMBA_WITH_TENSORRT=OFF).
#include "backend.h"

namespace memmamba::detail
{

std::unique_ptr<Backend> openTensorRT(std::string const&, SessionOptions const&)
{
    throw Error("this libmemmamba was built without the TensorRT backend: configure cpp/ with "
                "-DMEMMAMBA_WITH_TENSORRT=ON -DTensorRT_INCLUDE_DIR=<TensorRT>/include (cpp/README.md)");
}

} // namespace memmamba::detail
