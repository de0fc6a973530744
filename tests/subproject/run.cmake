# Configures, builds and runs the consumer of tests/subproject/, which includes tdfusion with add_subdirectory.
set(work "${BINARY_DIR}/subproject-test")
file(REMOVE_RECURSE "${work}")
include("${CMAKE_CURRENT_LIST_DIR}/../run_step.cmake")
run(${CMAKE_COMMAND} -S "${CONSUMER_DIR}" -B "${work}" -G Ninja "-DTDFUSION_SOURCE_DIR=${SOURCE_DIR}"
    "-DTorch_DIR=${Torch_DIR}")
run(${CMAKE_COMMAND} --build "${work}")
run("${work}/consumer")
