/**
 * Test double for inc/infer_model.h: links with the real pipeline into main_fake, so that
 * everything around the model call runs for real without a MindSpore runtime.
 *
 * --mindir_path names a text file "fcos-fake-model key=value ...":
 *   batch, height, width, candidates  the input (batch, 3, height, width) and K (default 2 3 8 8 4 here)
 *   fail_at_call=N    Predict fails on call N (call 0 is the warm-up)
 *   labels_dtype=float32   the third output gets the wrong dtype
 *   sleep_ms=N        each call takes at least N ms (a known time for the program's timing)
 *   log=PATH          one line per call and slot: "call C slot S nonzero N"
 *
 * Outputs of call C for slot S, whose image x has n = 3*H*W values (k = 0..K-1):
 *   boxes[k]  = {x[0], x[n-1], x[k % n], C}   scores[k] = S   labels[k] = 1000*C + 100*S + k
 */
#include <chrono>
#include <cstring>
#include <exception>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "inc/infer_model.h"

namespace fcos {
namespace {

class FakeModel : public InferenceModel {
 public:
  std::string Load(const std::string &path) {
    std::ifstream in(path);
    std::string magic;
    if (!(in >> magic) || magic != "fcos-fake-model") {
      return path + " is not a fake model spec (expected 'fcos-fake-model key=value ...')";
    }
    std::map<std::string, std::string> keys = {{"batch", "2"}, {"height", "8"}, {"width", "8"}, {"candidates", "4"},
                                               {"fail_at_call", "-1"}, {"labels_dtype", "int32"}, {"log", ""},
                                               {"sleep_ms", "0"}};
    std::string item;
    while (in >> item) {
      const size_t eq = item.find('=');
      if (eq == std::string::npos || keys.count(item.substr(0, eq)) == 0) {
        return path + ": unknown fake model key '" + item + "'";
      }
      keys[item.substr(0, eq)] = item.substr(eq + 1);
    }
    shape_ = {std::stoll(keys["batch"]), 3, std::stoll(keys["height"]), std::stoll(keys["width"])};
    candidates_ = std::stoll(keys["candidates"]);
    fail_at_call_ = std::stoll(keys["fail_at_call"]);
    labels_int32_ = keys["labels_dtype"] == "int32";
    log_path_ = keys["log"];
    sleep_ms_ = std::stoll(keys["sleep_ms"]);
    return "";
  }

  TensorSpec Input() const override { return {"x", DType::kFloat32, "float32", shape_}; }

  std::string Predict(const std::vector<char> &batch, std::vector<HostTensor> *outputs) override {
    const int64_t call = calls_++;
    std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms_));
    if (call == fail_at_call_) {
      return "fake failure at call " + std::to_string(call);
    }
    const int64_t b = shape_[0];
    const int64_t n = shape_[1] * shape_[2] * shape_[3];
    const int64_t k = candidates_;
    if (static_cast<int64_t>(batch.size()) != b * n * 4) {
      return "fake model: the batch has " + std::to_string(batch.size()) + " bytes";
    }
    std::vector<float> x(static_cast<size_t>(b * n));
    std::memcpy(x.data(), batch.data(), batch.size());
    std::vector<float> boxes(static_cast<size_t>(b * k * 4));
    std::vector<float> scores(static_cast<size_t>(b * k));
    std::vector<int32_t> labels(static_cast<size_t>(b * k));
    std::ofstream log;
    if (!log_path_.empty()) {
      log.open(log_path_, std::ios::app);
    }
    for (int64_t s = 0; s < b; ++s) {
      const float *image = x.data() + s * n;
      int64_t nonzero = 0;
      for (int64_t i = 0; i < n; ++i) {
        nonzero += image[i] != 0.0f;
      }
      if (log) {
        log << "call " << call << " slot " << s << " nonzero " << nonzero << "\n";
      }
      for (int64_t j = 0; j < k; ++j) {
        float *box = boxes.data() + (s * k + j) * 4;
        box[0] = image[0];
        box[1] = image[n - 1];
        box[2] = image[j % n];
        box[3] = static_cast<float>(call);
        scores[s * k + j] = static_cast<float>(s);
        labels[s * k + j] = static_cast<int32_t>(1000 * call + 100 * s + j);
      }
    }
    outputs->clear();
    outputs->push_back(Tensor("boxes", DType::kFloat32, "float32", {b, k, 4}, boxes.data(), boxes.size() * 4));
    outputs->push_back(Tensor("scores", DType::kFloat32, "float32", {b, k}, scores.data(), scores.size() * 4));
    if (labels_int32_) {
      outputs->push_back(Tensor("labels", DType::kInt32, "int32", {b, k}, labels.data(), labels.size() * 4));
    } else {
      std::vector<float> as_float(labels.begin(), labels.end());
      outputs->push_back(Tensor("labels", DType::kFloat32, "float32", {b, k}, as_float.data(), as_float.size() * 4));
    }
    return "";
  }

 private:
  static HostTensor Tensor(const std::string &name, DType dtype, const std::string &dtype_name,
                           std::vector<int64_t> shape, const void *data, size_t bytes) {
    HostTensor tensor{name, dtype, dtype_name, std::move(shape), std::vector<char>(bytes)};
    std::memcpy(tensor.data.data(), data, bytes);
    return tensor;
  }

  std::vector<int64_t> shape_;
  int64_t candidates_ = 0;
  int64_t fail_at_call_ = -1;
  bool labels_int32_ = true;
  std::string log_path_;
  int64_t calls_ = 0;
  int64_t sleep_ms_ = 0;
};

}  // namespace

std::string RuntimeName() { return "fake model (test double)"; }

std::unique_ptr<InferenceModel> LoadModel(const ModelOptions &options, std::string *problem) {
  auto model = std::make_unique<FakeModel>();
  try {
    *problem = model->Load(options.mindir_path);
  } catch (const std::exception &) {
    *problem = options.mindir_path + ": a fake model size is not a number";
  }
  return problem->empty() ? std::move(model) : nullptr;
}

}  // namespace fcos
