// cudasim stand-in for <cooperative_groups.h>: everything is in cudasim.h (force-included by
// build.py).
#pragma once
#include "../cudasim.h"
