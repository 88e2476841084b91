// Stands in for CUDA's header under the emulation (tests/emulate.rs): the kernels include
// <cuda_bf16.h> through common.cuh; the emulation defines the one bf16 type and function used.
#pragma once
#include "cuda_emu.h"
