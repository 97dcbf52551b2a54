# The TensorRT headers for plugins_trt/ and cpp/ (only headers: neither links libnvinfer at build time).
# TensorRT_INCLUDE_DIR, when given, is used as is (and re-read on every configure, so changing it takes effect);
# otherwise the system's folders are searched, then the open-source headers fetched into third_party/TensorRT/include
# (a development fallback: a machine with TensorRT installed builds against its own version).
# Sets MEMMAMBA_TRT_INCLUDE (empty when none is found) and MEMMAMBA_TRT_VERSION in the caller's scope.
function(memmamba_find_tensorrt_headers repo)
  set(dir "")
  if(TensorRT_INCLUDE_DIR)
    if(NOT EXISTS "${TensorRT_INCLUDE_DIR}/NvInferRuntime.h")
      message(FATAL_ERROR "TensorRT_INCLUDE_DIR=${TensorRT_INCLUDE_DIR} has no NvInferRuntime.h: pass the include/ "
        "folder of a TensorRT 10.x or 11.x install")
    endif()
    set(dir "${TensorRT_INCLUDE_DIR}")
  else()
    foreach(candidate /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/local/tensorrt/include
                      /usr/include "${repo}/third_party/TensorRT/include")
      if(NOT dir AND EXISTS "${candidate}/NvInferRuntime.h")
        set(dir "${candidate}")
      endif()
    endforeach()
  endif()
  set(version "")
  if(dir AND EXISTS "${dir}/NvInferVersion.h")
    # 10.x: NV_TENSORRT_MAJOR 10; 11.x: TRT_MAJOR_ENTERPRISE 11 (NV_TENSORRT_MAJOR names that macro)
    file(STRINGS "${dir}/NvInferVersion.h" lines REGEX "^#define (NV_TENSORRT|TRT)_(MAJOR|MINOR|PATCH)(_ENTERPRISE)? +[0-9]+")
    foreach(part MAJOR MINOR PATCH)
      string(REGEX MATCH "_${part}(_ENTERPRISE)? +([0-9]+)" match "${lines}")
      list(APPEND version "${CMAKE_MATCH_2}")
    endforeach()
    list(JOIN version "." version)
  endif()
  set(MEMMAMBA_TRT_INCLUDE "${dir}" PARENT_SCOPE)
  set(MEMMAMBA_TRT_VERSION "${version}" PARENT_SCOPE)
endfunction()
