# Installs tdfusion into a scratch prefix, then configures, builds and runs the consumer against it.
set(work "${BINARY_DIR}/package-test")
file(REMOVE_RECURSE "${work}")
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "package test: '${ARGN}' failed (${result})")
  endif()
endfunction()
run(${CMAKE_COMMAND} --install "${BINARY_DIR}" --prefix "${work}/prefix")
run(${CMAKE_COMMAND} -S "${CONSUMER_DIR}" -B "${work}/build" -DCMAKE_BUILD_TYPE=Release
    "-DCMAKE_PREFIX_PATH=${work}/prefix" "-DTorch_DIR=${Torch_DIR}")
run(${CMAKE_COMMAND} --build "${work}/build")
run("${work}/build/consumer")
