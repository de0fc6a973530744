# Options for this project's own programs (tests, examples, benchmarks); never for consumers of the library.

# Precompiled torch + standard headers, shared by every program target (torch headers cost ~20 s per TU).
add_library(tdfusion_pch OBJECT "${PROJECT_SOURCE_DIR}/cmake/pch_anchor.cpp")
target_link_libraries(tdfusion_pch PUBLIC tdfusion::tdfusion)
target_precompile_headers(tdfusion_pch PUBLIC <torch/torch.h> <Eigen/Dense> <string> <vector> <map> <memory>)

# GCC 12 warns falsely about _mm512_undefined_* inside Eigen 3.4's AVX-512 code (GEMM packing, exp and log),
# which the CPU kernels instantiate (GCC bug 105593, fixed in GCC 13).
set(tdfusion_gcc12_eigen_warnings
    "$<$<AND:$<CXX_COMPILER_ID:GNU>,$<VERSION_LESS:$<CXX_COMPILER_VERSION>,13>>:-Wno-uninitialized;-Wno-maybe-uninitialized>")

# tdfusion_program(<target>): warnings on our code, optional -march=native, the shared precompiled header.
function(tdfusion_program target)
  target_link_libraries(${target} PRIVATE tdfusion::tdfusion)
  target_precompile_headers(${target} REUSE_FROM tdfusion_pch)
  target_compile_options(${target} PRIVATE -Wall -Wextra ${tdfusion_gcc12_eigen_warnings})
  if(TDFUSION_NATIVE)
    target_compile_options(${target} PRIVATE -march=native)
  endif()
endfunction()

if(TDFUSION_NATIVE)
  target_compile_options(tdfusion_pch PRIVATE -march=native)
endif()
target_compile_options(tdfusion_pch PRIVATE -Wall -Wextra ${tdfusion_gcc12_eigen_warnings})
