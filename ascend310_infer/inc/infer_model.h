/**
 * The one seam between the FCOS inference program's file handling (pipeline.cc, no MindSpore
 * headers) and the model: what the input looks like and "run one batch -> host outputs".
 *
 * Exactly one implementation of LoadModel/RuntimeName is linked into a program:
 *   src/mindspore_model.cc  MindSpore (Lite Model::Build(path, kMindIR) or the full package's
 *                           Serialization::Load + Model::Build(GraphCell), chosen at build time)
 *   test/fake_model.cc      a test double (deterministic outputs computed from the inputs)
 */
#ifndef FCOS_ASCEND310_INFER_INC_INFER_MODEL_H_
#define FCOS_ASCEND310_INFER_INC_INFER_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fcos {

enum class DType { kFloat32, kInt32, kOther };

// A tensor in host memory: what the pipeline writes to the result bins.
struct HostTensor {
  std::string name;
  DType dtype = DType::kOther;
  std::string dtype_name;  // as the runtime calls it, for messages
  std::vector<int64_t> shape;
  std::vector<char> data;
};

struct TensorSpec {
  std::string name;
  DType dtype = DType::kOther;
  std::string dtype_name;
  std::vector<int64_t> shape;
};

struct ModelOptions {
  std::string mindir_path;
  std::string device_type;  // Ascend, GPU or CPU (checked by the pipeline)
  uint32_t device_id = 0;
  std::string precision_mode;  // Ascend only; empty: the runtime's default
};

class InferenceModel {
 public:
  virtual ~InferenceModel() = default;
  // The model's single input.
  virtual TensorSpec Input() const = 0;
  // Runs one batch (the input's shape, its bytes in batch) -> *outputs; "" or the problem.
  virtual std::string Predict(const std::vector<char> &batch, std::vector<HostTensor> *outputs) = 0;
};

// Loads and builds the model; nullptr and *problem (one line) on failure.
std::unique_ptr<InferenceModel> LoadModel(const ModelOptions &options, std::string *problem);

// What runs the model, e.g. "MindSpore Lite 2.0.0, Model::Build(path, kMindIR)".
std::string RuntimeName();

}  // namespace fcos

#endif  // FCOS_ASCEND310_INFER_INC_INFER_MODEL_H_
