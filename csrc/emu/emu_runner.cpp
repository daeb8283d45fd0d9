// The sanitizer runners' main (build/emu/subq_emu_run_{asan,tsan}): runs a list of op calls, written by
// torch.save([(op_name, [args...]), ...]) in tests/emu_cases.py, through the dispatcher (the emulated glue and
// kernels), then prints the emulator's reports. Exit status: 0 when every call ran and nothing was reported, 1
// otherwise (ASan, UBSan and TSan report and set their own exit status on top).
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/serialization/pickle.h>

namespace subq_emu {
std::vector<std::string> take_reports();
std::vector<std::string> take_launches();
}

namespace {

// Python lists arrive as generic lists; the schema says which typed list (bool[4], int[]) the op takes.
c10::IValue as_argument(const c10::IValue& value, const c10::TypePtr& type) {
  if (!value.isList()) return value;
  const auto list = value.toListRef();
  const c10::TypePtr element = type->castRaw<c10::ListType>() ? type->castRaw<c10::ListType>()->getElementType()
                                                                  : c10::TypePtr();
  if (element && element->kind() == c10::TypeKind::BoolType) {
    c10::List<bool> out;
    for (const auto& v : list) out.push_back(v.toBool());
    return out;
  }
  if (element && element->kind() == c10::TypeKind::IntType) {
    c10::List<int64_t> out;
    for (const auto& v : list) out.push_back(v.toInt());
    return out;
  }
  return value;
}

// Which elements, and which kernels (with their launch sites) wrote the output: the kernel that left an element
// unwritten is one of them.
void report_non_finite(const std::string& op, size_t k, const at::Tensor& t,
                       const std::vector<std::string>& launches) {
  const at::Tensor bad = t.isfinite().logical_not().nonzero();
  std::string first;
  for (int64_t d = 0; d < bad.size(1); ++d) first += (d ? ", " : "") + std::to_string(bad[0][d].item<int64_t>());
  std::string kernels;
  for (const std::string& launch : launches) {
    if (kernels.find(launch) == std::string::npos) kernels += (kernels.empty() ? "" : "; ") + launch;
  }
  std::fprintf(stderr,
               "subq-emu initcheck: %s output %zu has %lld of %lld elements non-finite (never written?), the first "
               "at [%s]; kernels run: %s\n",
               op.c_str(), k, static_cast<long long>(bad.size(0)), static_cast<long long>(t.numel()), first.c_str(),
               kernels.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASES.pt\n", argv[0]);
    return 2;
  }
  std::ifstream file(argv[1], std::ios::binary);
  const std::vector<char> data((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const c10::IValue cases = torch::jit::pickle_load(data);
  int failures = 0, count = 0;
  for (const auto& item : cases.toListRef()) {
    const auto call = item.toTupleRef().elements();
    const std::string name = call[0].toStringRef();
    const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
    const auto& arguments = handle.schema().arguments();
    torch::jit::Stack stack;
    const auto args = call[1].toListRef();
    for (size_t i = 0; i < args.size(); ++i) stack.push_back(as_argument(args[i], arguments.at(i).type()));
    try {
      subq_emu::take_launches();
      handle.callBoxed(stack);
      const std::vector<std::string> launches = subq_emu::take_launches();
      // initcheck: outputs start as NaN, and finite random inputs must give finite outputs.
      for (const auto& out : stack) {
        std::vector<at::Tensor> tensors;
        if (out.isTensor()) tensors.push_back(out.toTensor());
        if (out.isTensorList()) tensors = out.toTensorVector();
        for (size_t k = 0; k < tensors.size(); ++k) {
          const at::Tensor& t = tensors[k];
          if (t.defined() && t.is_floating_point() && t.numel() > 0 && !t.isfinite().all().item<bool>()) {
            report_non_finite(name, k, t, launches);
            ++failures;
          }
        }
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "subq-emu runner: %s raised: %s\n", name.c_str(), e.what());
      ++failures;
    }
    ++count;
  }
  const std::vector<std::string> reports = subq_emu::take_reports();
  std::printf("subq-emu runner: %d calls, %d raised, %zu reports\n", count, failures, reports.size());
  return failures == 0 && reports.empty() ? 0 : 1;
}
