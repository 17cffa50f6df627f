/**
 * The model behind inc/infer_model.h on MindSpore's C++ inference API, in one of two builds
 * (CMakeLists.txt picks one from the library it finds, as ModelZoo's cpp_infer does):
 *
 *   ENABLE_LITE  MindSpore Lite (libmindspore-lite.so; the mindspore-lite wheel's
 *                libmindspore-extendrt_python.so): Model::Build(path, kMindIR, context). Lite's
 *                Build(GraphCell) overload is a stub answering "Unsupported Feature".
 *   otherwise    the full MindSpore C++ package (libmindspore.so, e.g. the MindSpore 310 package):
 *                Serialization::Load + Model::Build(GraphCell(graph), context).
 *
 * --device_type picks the device info: Ascend (device id, precision mode), GPU (device id) or CPU.
 */
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "include/api/context.h"
#include "include/api/model.h"
#include "include/api/serialization.h"
#include "include/api/status.h"
#include "include/api/types.h"
#include "inc/infer_model.h"
#include "inc/mindir_info.h"
#include "inc/utils.h"

#ifndef FCOS_RUNTIME_VERSION
#define FCOS_RUNTIME_VERSION ""  // the release CMake found next to the library; may stay unknown
#endif

namespace fcos {
namespace {

#ifndef FCOS_RUNTIME_NAME  // the library CMake linked: MindSpore Lite or MindSpore
#ifdef ENABLE_LITE
#define FCOS_RUNTIME_NAME "MindSpore Lite"
#else
#define FCOS_RUNTIME_NAME "MindSpore"
#endif
#endif
const char kRuntime[] = FCOS_RUNTIME_NAME;
#ifdef ENABLE_LITE
const char kLoadPath[] = "Model::Build(path, kMindIR)";
#else
const char kLoadPath[] = "Serialization::Load + Model::Build(GraphCell)";
#endif

std::string RuntimeVersion() {
#ifdef ENABLE_LITE
  const std::string reported = mindspore::Version();  // empty in the mindspore-lite 2.0.0 wheel
  if (!reported.empty()) {
    return reported;
  }
#endif
  return FCOS_RUNTIME_VERSION;
}

DType ToDType(mindspore::DataType type) {
  switch (type) {
    case mindspore::DataType::kNumberTypeFloat32:
      return DType::kFloat32;
    case mindspore::DataType::kNumberTypeInt32:
      return DType::kInt32;
    default:
      return DType::kOther;
  }
}

std::string DTypeName(mindspore::DataType type) {
  switch (type) {
    case mindspore::DataType::kNumberTypeFloat32:
      return "float32";
    case mindspore::DataType::kNumberTypeFloat16:
      return "float16";
    case mindspore::DataType::kNumberTypeInt32:
      return "int32";
    case mindspore::DataType::kNumberTypeInt64:
      return "int64";
    default:
      return "dtype#" + std::to_string(static_cast<int>(type));
  }
}

std::shared_ptr<mindspore::Context> MakeContext(const ModelOptions &options) {
  auto context = std::make_shared<mindspore::Context>();
  if (options.device_type == "Ascend") {
    auto ascend = std::make_shared<mindspore::AscendDeviceInfo>();
    ascend->SetDeviceID(options.device_id);
    if (!options.precision_mode.empty()) {
      ascend->SetPrecisionMode(options.precision_mode);
    }
    context->MutableDeviceInfo().push_back(ascend);
  } else if (options.device_type == "GPU") {
    auto gpu = std::make_shared<mindspore::GPUDeviceInfo>();
    gpu->SetDeviceID(options.device_id);
    context->MutableDeviceInfo().push_back(gpu);
  } else {
    context->MutableDeviceInfo().push_back(std::make_shared<mindspore::CPUDeviceInfo>());
  }
  return context;
}

// The one line for a MindIR the runtime would not build: a version mismatch when the exporting
// MindSpore is newer than this runtime, otherwise the runtime's status with the file's versions.
std::string BuildProblem(const ModelOptions &options, const MindirInfo &info, const std::string &status) {
  const std::string version = RuntimeVersion().empty() ? "(version unknown)" : RuntimeVersion();
  const std::string runtime = std::string(kRuntime) + " " + version;
  const std::string exported = "MindIR version " + std::to_string(info.mind_ir_version) + ", exported by " +
                               info.producer_name + " " + info.producer_version;
  if (VersionLess(RuntimeVersion(), info.producer_version)) {
    return "MindIR/runtime version mismatch: " + options.mindir_path + " is " + exported + ", newer than " + runtime +
           ", which could not build it (" + status + "); build ascend310_infer against the " + kRuntime +
           " release of the exporting MindSpore (" + info.producer_version + ")";
  }
  return runtime + " could not build " + options.mindir_path + " (" + exported + ") for " + options.device_type +
         ": " + status;
}

class MindSporeModel : public InferenceModel {
 public:
  std::string Build(const ModelOptions &options) {
    MindirInfo info;
    std::string problem = ReadMindirInfo(options.mindir_path, &info);
    if (!problem.empty()) {
      return problem;
    }
    auto context = MakeContext(options);
    std::string failure;
    try {  // some runtimes throw (with a call stack) instead of returning a Status
#ifdef ENABLE_LITE
      mindspore::Status status = model_.Build(options.mindir_path, mindspore::ModelType::kMindIR, context);
#else
      mindspore::Graph graph;
      mindspore::Status status =
          mindspore::Serialization::Load(options.mindir_path, mindspore::ModelType::kMindIR, &graph);
      if (status == mindspore::kSuccess) {
        status = model_.Build(mindspore::GraphCell(graph), context);
      }
#endif
      if (status != mindspore::kSuccess) {
        failure = FirstLine(status.ToString());
      }
    } catch (const std::exception &error) {
      failure = "exception: " + FirstLine(error.what());
    }
    if (!failure.empty()) {
      return BuildProblem(options, info, failure);
    }
    std::vector<mindspore::MSTensor> inputs = model_.GetInputs();
    if (inputs.size() != 1) {
      return options.mindir_path + ": expected one model input, got " + std::to_string(inputs.size());
    }
    input_ = inputs[0];
    return "";
  }

  TensorSpec Input() const override {
    TensorSpec spec;
    spec.name = input_.Name();
    spec.dtype = ToDType(input_.DataType());
    spec.dtype_name = DTypeName(input_.DataType());
    spec.shape = input_.Shape();
    return spec;
  }

  std::string Predict(const std::vector<char> &batch, std::vector<HostTensor> *outputs) override {
    if (batch.size() != input_.DataSize()) {
      return "the batch has " + std::to_string(batch.size()) + " bytes, the model input " +
             std::to_string(input_.DataSize());
    }
    std::vector<mindspore::MSTensor> inputs = {
        mindspore::MSTensor(input_.Name(), input_.DataType(), input_.Shape(), batch.data(), batch.size())};
    std::vector<mindspore::MSTensor> results;
    mindspore::Status status = model_.Predict(inputs, &results);
    if (status != mindspore::kSuccess) {
      return "Predict: " + FirstLine(status.ToString());
    }
    outputs->clear();
    for (auto &result : results) {
      HostTensor tensor;
      tensor.name = result.Name();
      tensor.dtype = ToDType(result.DataType());
      tensor.dtype_name = DTypeName(result.DataType());
      tensor.shape = result.Shape();
      auto data = result.Data();
      if (data == nullptr && result.DataSize() != 0) {
        return "output " + tensor.name + " has no host data";
      }
      const char *start = static_cast<const char *>(data.get());
      tensor.data.assign(start, start + result.DataSize());
      outputs->push_back(std::move(tensor));
    }
    return "";
  }

 private:
  mindspore::Model model_;
  mindspore::MSTensor input_;
};

}  // namespace

std::string RuntimeName() {
  const std::string version = RuntimeVersion();
  return std::string(kRuntime) + (version.empty() ? "" : " " + version) + ", " + kLoadPath;
}

std::unique_ptr<InferenceModel> LoadModel(const ModelOptions &options, std::string *problem) {
  auto model = std::make_unique<MindSporeModel>();
  *problem = model->Build(options);
  if (!problem->empty()) {
    return nullptr;
  }
  return model;
}

}  // namespace fcos
