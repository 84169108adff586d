// Declarations of the C++ CPU kernels bound in module.cpp.
#pragma once
#include <ATen/ATen.h>
