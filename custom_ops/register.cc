// Registration entry point: the only symbol the library exports (see exports.map).
//
// onnxruntime calls RegisterCustomOps with its own API base. The library is compiled against the C API of
// ORT_API_VERSION; an older onnxruntime returns no API table for that version, and we refuse with an error
// status built from the oldest API table, which every onnxruntime provides, instead of crashing.
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ops.h"

namespace {

std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>& OpStore() {
  // Ops outlive every session that uses them: onnxruntime keeps raw pointers into the domain.
  static std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;
  return ops;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  if (api_base == nullptr) return nullptr;  // nothing to report through; onnxruntime never passes null
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* oldest = api_base->GetApi(1);
    std::string msg = std::string("onnxopt custom ops need onnxruntime with C API version >= ") +
                      std::to_string(ORT_API_VERSION) + " (onnxruntime 1." + std::to_string(ORT_API_VERSION) +
                      "); this process runs onnxruntime " + api_base->GetVersionString();
    return oldest ? oldest->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);

  static std::mutex mu;
  static std::vector<Ort::CustomOpDomain> domains;  // kept alive for the process lifetime
  std::lock_guard<std::mutex> lock(mu);
  try {
    auto& ops = OpStore();
    if (ops.empty()) {
      ops.emplace_back(onnxopt::MakeWinogradConvOp());
      ops.emplace_back(onnxopt::MakeDepthwiseConvOp());
      ops.emplace_back(onnxopt::MakeFFTConvOp());
      ops.emplace_back(onnxopt::MakeCirculantMatMulOp());
      ops.emplace_back(onnxopt::MakeFastfoodMatMulOp());
      ops.emplace_back(onnxopt::MakeACDCMatMulOp());
      ops.emplace_back(onnxopt::MakeSparseGemmOp());
      ops.emplace_back(onnxopt::MakeSparseConvOp());
      ops.emplace_back(onnxopt::MakeLowBitMatMulOp());
      ops.emplace_back(onnxopt::MakeLowBitConvOp());
      ops.emplace_back(onnxopt::MakeBinaryMatMulOp());
      ops.emplace_back(onnxopt::MakeBinaryConvOp());
    }
    Ort::CustomOpDomain domain{onnxopt::kDomain};
    for (auto& op : ops) domain.Add(op.get());
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
