# Installs tdfusion into a scratch prefix, then configures, builds and runs the consumer against it.
set(work "${BINARY_DIR}/package-test")
file(REMOVE_RECURSE "${work}")
include("${CMAKE_CURRENT_LIST_DIR}/../run_step.cmake")
run(${CMAKE_COMMAND} --install "${BINARY_DIR}" --prefix "${work}/prefix")
# The installed program carries no path of the machine it was built on (sources, build folder, ../shared).
if(EXISTS "${work}/prefix/bin/tdfusion")
  foreach(dir IN ITEMS "${SOURCE_DIR}" "${BINARY_DIR}")
    file(STRINGS "${work}/prefix/bin/tdfusion" baked REGEX "${dir}")
    if(baked)
      list(GET baked 0 first)
      message(FATAL_ERROR "package test: the installed tdfusion contains the build machine path ${dir}: '${first}'")
    endif()
  endforeach()
endif()
run(${CMAKE_COMMAND} -S "${CONSUMER_DIR}" -B "${work}/build" -DCMAKE_BUILD_TYPE=Release
    "-DCMAKE_PREFIX_PATH=${work}/prefix" "-DTorch_DIR=${Torch_DIR}")
run(${CMAKE_COMMAND} --build "${work}/build")
run("${work}/build/consumer")
