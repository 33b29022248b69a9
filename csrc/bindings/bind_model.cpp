#include "bindings/bindings.h"

namespace mq::bind {
void register_model(pybind11::module_&) {}
}  // namespace mq::bind
