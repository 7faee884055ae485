// The activation argument of the bindings (moe_ext._core and moe_ext._cuda): one conversion from Python's
// description (python/moe_ext/_activation.py) to core/types.h's Activation.
#pragma once
#include <pybind11/pybind11.h>

#include "core/types.h"

namespace moe_ext::python {

// An activation description: a moe_ext.Activation or a string moe_ext.activation_from accepts (presets,
// canonical strings); ValueError / TypeError otherwise.
Activation activation_from(const pybind11::object& activation);

}  // namespace moe_ext::python
