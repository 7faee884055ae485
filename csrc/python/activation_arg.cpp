// moe_ext.Activation -> core/types.h's Activation, for both Python modules (moe_ext._core, moe_ext._cuda).
#include "python/activation_arg.h"

#include <string>

namespace moe_ext::python {

namespace py = pybind11;

Activation activation_from(const py::object& activation) {
  // The parsing and validation live once, in Python (python/moe_ext/_activation.py).
  const py::object a = py::module_::import("moe_ext._activation").attr("activation_from")(activation);
  static const char* const kFns[] = {"silu", "gelu", "gelu_tanh", "relu", "relu2"};
  const std::string fn = a.attr("fn").cast<std::string>();
  Activation out;
  bool known = false;
  for (int i = 0; i < 5; ++i)
    if (fn == kFns[i]) out.fn = static_cast<ActivationFn>(i), known = true;
  if (!known) throw py::value_error("activation: unknown fn '" + fn + "'");
  out.gated = a.attr("gated").cast<bool>();
  out.interleaved = a.attr("interleaved").cast<bool>();
  out.alpha = a.attr("alpha").cast<float>();
  out.up_offset = a.attr("up_offset").cast<float>();
  const py::object limit = a.attr("limit");
  if (!limit.is_none()) out.limit = limit.cast<float>();
  if (!(out.limit > 0.f)) throw py::value_error("activation: expected limit > 0");
  const auto softcap = [&](const char* field) {  // None -> 0 (no softcap)
    const py::object c = a.attr(field);
    const float value = c.is_none() ? 0.f : c.cast<float>();
    if (!c.is_none() && !(value > 0.f && value < __builtin_inff()))
      throw py::value_error(std::string("activation: expected ") + field + " > 0 and finite");
    return value;
  };
  out.gate_softcap = softcap("gate_softcap");
  out.up_softcap = softcap("up_softcap");
  return out;
}

}  // namespace moe_ext::python
