# run(<command> <args>...): runs a step of a CMake-script test, failing the test with the command line when
# the step fails. Included by the package/ and subproject/ test scripts.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "'${ARGN}' failed (${result})")
  endif()
endfunction()
