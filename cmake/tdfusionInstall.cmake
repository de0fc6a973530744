# Install the headers and a CMake package so that consumers can `find_package(tdfusion)`.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS tdfusion EXPORT tdfusionTargets)
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/tdfusion" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
set(tdfusion_cmake_dir "${CMAKE_INSTALL_DATADIR}/cmake/tdfusion")  # arch-independent: header-only
install(EXPORT tdfusionTargets NAMESPACE tdfusion:: DESTINATION "${tdfusion_cmake_dir}")
configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/tdfusionConfig.cmake.in"
                              "${PROJECT_BINARY_DIR}/tdfusionConfig.cmake" INSTALL_DESTINATION "${tdfusion_cmake_dir}")
write_basic_package_version_file("${PROJECT_BINARY_DIR}/tdfusionConfigVersion.cmake"
                                 COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/tdfusionConfig.cmake" "${PROJECT_BINARY_DIR}/tdfusionConfigVersion.cmake"
        DESTINATION "${tdfusion_cmake_dir}")
