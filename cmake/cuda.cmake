# MOE_EXT_CUDA=AUTO|ON|OFF: decides whether the CUDA kernels are built, then builds them.
# Kernels: csrc/cuda/*.cu -> static library moe_ext_cuda; bindings: csrc/python/cuda_module.cpp -> moe_ext._cuda.
string(TOUPPER "${MOE_EXT_CUDA}" MOE_EXT_CUDA)
if(NOT MOE_EXT_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "MOE_EXT_CUDA must be AUTO, ON or OFF; got '${MOE_EXT_CUDA}'")
endif()
set(MOE_EXT_CUDA_BUILT OFF)
if(MOE_EXT_SANITIZE AND MOE_EXT_CUDA STREQUAL "AUTO")
  # The sanitizers instrument host C++ only and nvcc rejects their flags: sanitizer builds are CPU builds.
  message(STATUS "moe_ext: MOE_EXT_SANITIZE=ON: not building the CUDA kernels (MOE_EXT_CUDA=AUTO)")
elseif(NOT MOE_EXT_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(MOE_EXT_CUDA_BUILT ON)
  elseif(MOE_EXT_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MOE_EXT_CUDA=ON but no CUDA compiler was found (set CUDACXX or put nvcc on PATH)")
  else()
    message(STATUS "moe_ext: no CUDA compiler found; building the CPU kernels only")
  endif()
endif()

if(MOE_EXT_CUDA_BUILT)
  # sm_80 (Ampere: mma.sync, cp.async) and sm_90 machine code, plus compute_90 PTX for later GPUs.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 80-real 90)
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "moe_ext: building the CUDA kernels (CUDA ${CUDAToolkit_VERSION}, archs ${CMAKE_CUDA_ARCHITECTURES})")

  # Only the Python module uses the kernels so far: without it the library is a target, not built by default.
  if(MOE_EXT_PYTHON)
    set(exclude "")
  else()
    set(exclude EXCLUDE_FROM_ALL)
  endif()
  add_library(moe_ext_cuda STATIC ${exclude}
    csrc/cuda/runtime.cu csrc/cuda/route.cu csrc/cuda/permute.cu csrc/cuda/grouped_gemm.cu
    csrc/cuda/grouped_gemm_decode.cu csrc/cuda/elementwise.cu)
  target_include_directories(moe_ext_cuda PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
  target_compile_options(moe_ext_cuda PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra --expt-relaxed-constexpr -Xptxas=-warn-spills>)
  set_target_properties(moe_ext_cuda PROPERTIES CUDA_RUNTIME_LIBRARY Static POSITION_INDEPENDENT_CODE ON)
  target_link_libraries(moe_ext_cuda PUBLIC CUDA::cudart_static)

  if(MOE_EXT_PYTHON)
    pybind11_add_module(_cuda csrc/python/cuda_module.cpp csrc/python/activation_arg.cpp csrc/core/checks.cpp)
    target_link_libraries(_cuda PRIVATE moe_ext_cuda)
    target_compile_options(_cuda PRIVATE -Wall -Wextra)
    string(REPLACE ";" " " archs "${CMAKE_CUDA_ARCHITECTURES}")
    target_compile_definitions(_cuda PRIVATE
      MOE_EXT_CUDA_ARCHS="${archs}" MOE_EXT_CUDA_COMPILER="${CMAKE_CUDA_COMPILER_VERSION}")
    install(TARGETS _cuda LIBRARY DESTINATION moe_ext)
  endif()
endif()
