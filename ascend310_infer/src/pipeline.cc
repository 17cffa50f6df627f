/**
 * The FCOS inference program around the model call; see inc/pipeline.h. The file contract is
 * the Python runner's (src/deploy/contract.py, python -m src.deploy.runner):
 *   --input_path/<name>.bin   one preprocessed image, raw float32 (3, H, W), fed in sorted order,
 *                             B per call (B = the exported batch size; a last incomplete batch is
 *                             filled with zeros and the outputs of those slots are dropped);
 *   --result_path/<name>_<i>.bin  output i of that image: 0 boxes (K, 4) float32, 1 scores (K,)
 *                             float32, 2 labels (K,) int32;
 *   --result_path/infer_time.json  {"images", "batch_size", "mean_ms_per_image", "mean_ms_per_batch"}:
 *                             the model call's time, after one untimed warm-up call on zeros (which
 *                             also checks the outputs before anything is written).
 */
#include "inc/pipeline.h"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <iostream>
#include <map>
#include <sstream>
#include <vector>

#include "inc/utils.h"

namespace fcos {

const char kUsage[] =
    "usage: main --mindir_path=FILE --input_path=DIR --result_path=DIR [--device_type=Ascend|GPU|CPU] "
    "[--device_id=0] [--precision_mode=MODE]";
const char kTimeFile[] = "infer_time.json";

namespace {

constexpr size_t kNumOutputs = 3;
const DType kOutputDtypes[kNumOutputs] = {DType::kFloat32, DType::kFloat32, DType::kInt32};

std::string ShapeText(const std::vector<int64_t> &shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return text + ")";
}

constexpr uint64_t kMaxInputBytes = uint64_t{1} << 36;  // 64 GiB a batch: far above any detector input

// "" unless the model has one float32 (B, 3, H, W) input with positive sizes whose batch's bytes fit
// in kMaxInputBytes (so every size computed from them fits in size_t).
std::string CheckInput(const TensorSpec &input) {
  bool positive = input.shape.size() == 4;
  uint64_t bytes = sizeof(float);
  for (int64_t dim : input.shape) {
    positive = positive && dim > 0;
    if (positive && (__builtin_mul_overflow(bytes, static_cast<uint64_t>(dim), &bytes) || bytes > kMaxInputBytes)) {
      return "the model input " + ShapeText(input.shape) + " is larger than " + std::to_string(kMaxInputBytes) +
             " bytes a batch";
    }
  }
  if (input.dtype != DType::kFloat32 || !positive || input.shape[1] != 3) {
    return "expected one float32 (B, 3, H, W) model input of fixed size, got " + input.dtype_name + " " +
           ShapeText(input.shape);
  }
  return "";
}

// "" unless the outputs are FCOSInference's three: boxes float32, scores float32, labels int32, each
// with batch rows (the result bins are raw bytes, so another dtype would silently break postprocess).
std::string CheckOutputs(const std::vector<HostTensor> &outputs, size_t batch) {
  bool ok = outputs.size() == kNumOutputs;
  std::string got;
  for (size_t i = 0; i < outputs.size(); ++i) {
    got += (i ? ", " : "") + outputs[i].dtype_name + " " + ShapeText(outputs[i].shape);
    ok = ok && outputs[i].dtype == kOutputDtypes[i] && !outputs[i].shape.empty() &&
         outputs[i].shape[0] == static_cast<int64_t>(batch) && outputs[i].data.size() % batch == 0;
  }
  if (!ok) {
    return "expected outputs boxes float32 (B, K, 4), scores float32 (B, K), labels int32 (B, K) with B=" +
           std::to_string(batch) + ", got [" + got + "]";
  }
  return "";
}

// The sorted input bins, each checked to hold one image of image_bytes; "" or the problem.
std::string ListInputs(const std::string &input_path, size_t image_bytes, std::vector<std::string> *files) {
  const std::string problem = ListFiles(input_path, ".bin", files);
  if (!problem.empty()) {
    return problem;
  }
  if (files->empty()) {
    return "no .bin input files in " + input_path;
  }
  for (const auto &file : *files) {
    if (FileSize(file) != static_cast<long long>(image_bytes)) {
      return file + " has " + std::to_string(FileSize(file)) + " bytes, the model input needs " +
             std::to_string(image_bytes) + " per image (preprocessed at another export shape?)";
    }
  }
  return "";
}

// Writes each output's slot-th share (one image of the batch) as <result_path>/<name>_<i>.bin.
std::string WriteOutputs(const std::vector<HostTensor> &outputs, size_t slot, size_t batch,
                         const std::string &result_path, const std::string &name) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    const size_t bytes = outputs[i].data.size() / batch;
    const std::string path = result_path + "/" + name + "_" + std::to_string(i) + ".bin";
    if (!WriteBinary(path, outputs[i].data.data() + slot * bytes, bytes)) {
      return "cannot write " + path;
    }
  }
  return "";
}

struct Timing {
  size_t images = 0;
  size_t batch = 0;
  size_t calls = 0;
  double total_ms = 0.0;
};

// Runs every file through the model, batch images per call, and writes the results.
std::string RunAll(InferenceModel *model, size_t batch, size_t image_bytes, const std::vector<std::string> &files,
                   const std::string &result_path, Timing *timing) {
  std::vector<char> buffer(batch * image_bytes, 0);
  std::vector<HostTensor> outputs;
  // Warm-up on zeros, untimed (as the Python runner): the first call may compile or allocate.
  std::string problem = model->Predict(buffer, &outputs);
  if (!problem.empty()) {
    return "the model failed on a batch of zeros (warm-up): " + problem;
  }
  problem = CheckOutputs(outputs, batch);
  if (!problem.empty()) {
    return problem;
  }
  timing->images = files.size();
  timing->batch = batch;
  for (size_t start = 0; start < files.size(); start += batch) {
    const size_t count = std::min(batch, files.size() - start);
    std::memset(buffer.data(), 0, buffer.size());
    for (size_t slot = 0; slot < count; ++slot) {
      if (!ReadBinary(files[start + slot], buffer.data() + slot * image_bytes, image_bytes)) {
        return "cannot read " + files[start + slot];
      }
    }
    outputs.clear();
    const auto tic = std::chrono::steady_clock::now();
    problem = model->Predict(buffer, &outputs);
    timing->total_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - tic).count();
    ++timing->calls;
    if (problem.empty()) {
      problem = CheckOutputs(outputs, batch);
    }
    if (!problem.empty()) {
      return "the model failed on the batch of " + files[start] + ": " + problem;
    }
    for (size_t slot = 0; slot < count; ++slot) {
      problem = WriteOutputs(outputs, slot, batch, result_path, Stem(files[start + slot]));
      if (!problem.empty()) {
        return problem;
      }
    }
    std::cout << "inferred " << start + count << "/" << files.size() << std::endl;
  }
  return "";
}

std::string TimingJson(const Timing &timing) {
  std::ostringstream json;
  json.precision(6);
  json << std::fixed << "{\"images\": " << timing.images << ", \"batch_size\": " << timing.batch
       << ", \"mean_ms_per_image\": " << timing.total_ms / timing.images
       << ", \"mean_ms_per_batch\": " << timing.total_ms / timing.calls << "}";
  return json.str();
}

int Fail(const std::string &message) {
  std::cout.flush();
  std::cerr << "error: " << message << std::endl;
  return 1;
}

}  // namespace

std::string ParseOptions(int argc, char **argv, Options *options) {
  std::map<std::string, std::string> flags = {{"mindir_path", ""},    {"input_path", ""},     {"result_path", ""},
                                              {"device_type", "Ascend"}, {"device_id", "0"}, {"precision_mode", ""}};
  std::string problem = ParseFlags(argc, argv, &flags);
  if (!problem.empty()) {
    return problem;
  }
  if (flags["mindir_path"].empty() || flags["input_path"].empty() || flags["result_path"].empty()) {
    return "--mindir_path, --input_path and --result_path are required";
  }
  const std::string &device_type = flags["device_type"];
  if (device_type != "Ascend" && device_type != "GPU" && device_type != "CPU") {
    return "--device_type must be Ascend, GPU or CPU, got '" + device_type + "'";
  }
  const std::string &device_id = flags["device_id"];
  if (device_id.empty() || device_id.size() > 9 || device_id.find_first_not_of("0123456789") != std::string::npos) {
    return "--device_id must be a number, got '" + device_id + "'";
  }
  options->model.mindir_path = flags["mindir_path"];
  options->model.device_type = device_type;
  options->model.device_id = static_cast<uint32_t>(std::stoul(device_id));
  options->model.precision_mode = flags["precision_mode"];
  options->input_path = flags["input_path"];
  options->result_path = flags["result_path"];
  return "";
}

int RunMain(int argc, char **argv) {
  std::signal(SIGXFSZ, SIG_IGN);  // a file-size limit makes write() fail (reported), not kill the program
  Options options;
  std::string problem = ParseOptions(argc, argv, &options);
  if (!problem.empty()) {
    std::cerr << kUsage << std::endl;
    return Fail(problem);
  }
  if (!IsFile(options.model.mindir_path)) {
    return Fail("--mindir_path: not a file: " + options.model.mindir_path);
  }
  if (!IsDir(options.input_path)) {
    return Fail("--input_path: not a folder: " + options.input_path);
  }
  problem = MakeDirs(options.result_path);
  if (!problem.empty()) {
    return Fail("--result_path: " + problem);
  }
  std::cout << "runtime: " << RuntimeName() << ", device " << options.model.device_type << " "
            << options.model.device_id << std::endl;
  std::unique_ptr<InferenceModel> model;
  try {  // some runtimes throw instead of returning a Status
    model = LoadModel(options.model, &problem);
  } catch (const std::exception &error) {
    problem = "the runtime threw: " + FirstLine(error.what());
  }
  if (!model) {
    return Fail(problem.empty() ? "cannot load " + options.model.mindir_path : problem);
  }
  const TensorSpec input = model->Input();
  problem = CheckInput(input);
  if (!problem.empty()) {
    return Fail(options.model.mindir_path + ": " + problem);
  }
  const size_t batch = static_cast<size_t>(input.shape[0]);
  const size_t image_bytes = static_cast<size_t>(input.shape[1] * input.shape[2] * input.shape[3]) * sizeof(float);
  std::vector<std::string> files;
  problem = ListInputs(options.input_path, image_bytes, &files);
  Timing timing;
  if (problem.empty()) {
    try {
      problem = RunAll(model.get(), batch, image_bytes, files, options.result_path, &timing);
    } catch (const std::exception &error) {
      problem = "the runtime threw: " + FirstLine(error.what());
    }
  }
  if (!problem.empty()) {
    return Fail(problem);
  }
  const std::string time_file = options.result_path + "/" + kTimeFile;
  if (!WriteText(time_file, TimingJson(timing))) {
    return Fail("cannot write " + time_file);
  }
  char line[160];
  std::snprintf(line, sizeof(line), "NN inference cost average time: %.3f ms per image (%zu images, batch %zu)",
                timing.total_ms / timing.images, timing.images, timing.batch);
  std::cout << line << std::endl;
  return 0;
}

}  // namespace fcos
