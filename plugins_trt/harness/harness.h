// memmamba plugin harness: plays TensorRT's part for a plugin library, without TensorRT.
//
// It dlopens the library, hands it a logger (setLoggerFinder), takes its creators (getCreators), builds a plugin
// from a PluginFieldCollection the way TensorRT's ONNX parser does, runs the build-phase calls (output dtypes and
// shapes through an IExprBuilder of its own, supportsFormatCombination, configurePlugin, workspace size),
// serializes the plugin (getFieldsToSerialize), recreates it for the runtime phase (createPlugin with kRUNTIME,
// attachToContext) and calls onShapeChange + enqueue on device buffers the caller provides.
//
// A C API, so the Python driver (tests/gpu/test_plugins_gpu.py, tests/test_plugins_aot.py) can use it via ctypes.
#pragma once

#include <cstdint>

extern "C"
{

//! One tensor: dtype is the nvinfer1::DataType value (0 float32, 1 float16, 3 int32), dims its extents.
struct mh_tensor
{
    int32_t dtype;
    int32_t rank;
    int64_t dims[8];
};

//! One plugin field as the ONNX parser passes it: type is the nvinfer1::PluginFieldType value.
struct mh_field
{
    char const* name;
    int32_t type;
    void const* data;
    int32_t length;
};

//! Open a plugin library. Returns a handle, or null (see mh_last_error).
void* mh_open(char const* library);
void mh_close(void* lib);

//! The library's creators, one per line: "name version namespace field:type,field:type" (type = PluginFieldType).
//! Returns the length written (truncated to len-1), or -1.
int32_t mh_creators(void* lib, char* buf, int32_t len);

//! Build `op` (version "1", namespace `ns`) as TensorRT would from an ONNX node and bring it to the runtime phase.
//! `in` gives the input dtypes and extents; with `symbolic` = 1 every input extent is unknown at build time (as for
//! dynamic shapes), else every extent is a build-time constant. On success `out` holds the output dtypes and
//! extents the plugin reported, `workspace` its workspace size, and the return value is the runtime plugin (for
//! mh_enqueue / mh_release). onShapeChange is called by mh_enqueue, not here. Null on failure (mh_last_error).
void* mh_build(void* lib, char const* op, char const* ns, char const* nodeName, int32_t nbFields,
    mh_field const* fields, int32_t nbInputs, mh_tensor const* in, int32_t nbOutputs, mh_tensor* out, int32_t symbolic,
    uint64_t* workspace);

//! Does supportsFormatCombination accept this dtype assignment (inputs then outputs, linear format) at every
//! position? 1 yes, 0 no, -1 when the plugin cannot be created.
int32_t mh_supports(void* lib, char const* op, char const* ns, int32_t nbFields, mh_field const* fields,
    int32_t nbInputs, int32_t nbOutputs, int32_t const* dtypes);

//! onShapeChange + enqueue on device pointers (in the current CUDA context) on `stream` (a cudaStream_t; null for
//! the legacy default stream). 0 on success; see mh_last_error otherwise.
int32_t mh_enqueue(void* plugin, int32_t nbInputs, mh_tensor const* in, void const* const* inputs, int32_t nbOutputs,
    mh_tensor const* out, void* const* outputs, void* workspace, void* stream);
void mh_release(void* plugin);

//! Errors since the previous call: the harness's own and what the plugins logged (then cleared).
char const* mh_last_error();

} // extern "C"
