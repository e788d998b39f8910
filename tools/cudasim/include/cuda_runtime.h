// cudasim stand-in for <cuda_runtime.h>: everything is in cudasim.h (force-included by build.py).
#pragma once
#include "../cudasim.h"
