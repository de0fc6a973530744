# Options for this project's own programs (tests, examples, benchmarks); never for consumers of the library.

# Precompiled torch + standard headers, shared by every program target (torch headers cost ~20 s per TU).
add_library(tdfusion_pch OBJECT "${PROJECT_SOURCE_DIR}/cmake/pch_anchor.cpp")
target_link_libraries(tdfusion_pch PUBLIC tdfusion::tdfusion)
target_precompile_headers(tdfusion_pch PUBLIC <torch/torch.h> <Eigen/Dense> <string> <vector> <map> <memory>)

# GCC 12 warns falsely about _mm512_undefined_* inside Eigen 3.4's AVX-512 code (GEMM packing, exp and log),
# which the CPU kernels instantiate (GCC bug 105593, fixed in GCC 13).
set(tdfusion_gcc12_eigen_warnings
    "$<$<AND:$<CXX_COMPILER_ID:GNU>,$<VERSION_LESS:$<CXX_COMPILER_VERSION>,13>>:-Wno-uninitialized;-Wno-maybe-uninitialized>")

# Source paths in messages (__FILE__) relative to the project, so that no path of the build machine ends up
# in a program.
set(tdfusion_relative_paths "-ffile-prefix-map=${PROJECT_SOURCE_DIR}/=" "-ffile-prefix-map=${PROJECT_BINARY_DIR}/=")

# tdfusion_program(<target>): warnings on our code, optional -march=native, the shared precompiled header.
function(tdfusion_program target)
  target_link_libraries(${target} PRIVATE tdfusion::tdfusion)
  target_precompile_headers(${target} REUSE_FROM tdfusion_pch)
  target_compile_options(${target} PRIVATE -Wall -Wextra ${tdfusion_gcc12_eigen_warnings} ${tdfusion_relative_paths})
  if(TDFUSION_NATIVE)
    target_compile_options(${target} PRIVATE -march=native)
  endif()
endfunction()

if(TDFUSION_NATIVE)
  target_compile_options(tdfusion_pch PRIVATE -march=native)
endif()
target_compile_options(tdfusion_pch PRIVATE -Wall -Wextra ${tdfusion_gcc12_eigen_warnings} ${tdfusion_relative_paths})

# The NumPy/SciPy reference of the fusion metrics (tests/reference/) runs on a python3 with numpy, scipy and
# PIL (Debian: /usr/bin/python3 with python3-numpy python3-scipy python3-pil); without one,
# tdfusion_reference_python is empty and the tests and benchmarks that compare with it skip that part.
find_program(TDFUSION_REFERENCE_PYTHON python3 PATHS /usr/bin NO_DEFAULT_PATH)
set(tdfusion_reference_python "")
if(TDFUSION_REFERENCE_PYTHON)
  execute_process(COMMAND ${TDFUSION_REFERENCE_PYTHON} -c "import numpy, scipy, PIL" RESULT_VARIABLE no_reference
                  OUTPUT_QUIET ERROR_QUIET)
  if(NOT no_reference)
    set(tdfusion_reference_python "${TDFUSION_REFERENCE_PYTHON}")
  endif()
endif()
if(NOT tdfusion_reference_python)
  message(STATUS "tdfusion: no python3 with numpy, scipy and PIL; the metric reference comparison will be skipped")
endif()
