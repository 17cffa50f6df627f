/**
 * FCOS MindIR inference on Ascend (310 / 310P / 910) with MindSpore's C++ inference API.
 *
 * The file contract is the Python runner's (src/infer_mindir.py): the sorted *.bin files of
 * --input_path each hold one preprocessed image, float32 (3, H, W); they are fed in order,
 * B per call (B = the exported batch size; a last incomplete batch is zero-filled and its
 * outputs dropped), and output i of image <name> is written to --result_path/<name>_<i>.bin
 * (0 boxes (K, 4) float32, 1 scores (K,) float32, 2 labels (K,) int32). The mean time of
 * Model::Predict per image is printed and written to --result_path/infer_time.json.
 *
 * usage: main --mindir_path=FILE --input_path=DIR --result_path=DIR [--device_id=0]
 *             [--precision_mode=MODE]
 */
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "include/api/context.h"
#include "include/api/model.h"
#include "include/api/serialization.h"
#include "include/api/status.h"
#include "include/api/types.h"
#include "inc/utils.h"

namespace {

const char kUsage[] =
    "usage: main --mindir_path=FILE --input_path=DIR --result_path=DIR [--device_id=0] [--precision_mode=MODE]";
const char kTimeFile[] = "infer_time.json";

struct Options {
  std::string mindir_path;
  std::string input_path;
  std::string result_path;
  std::string precision_mode;  // empty: the runtime's default (the names differ between versions)
  uint32_t device_id = 0;
};

// Parses the command line into *options; returns an empty string or the problem.
std::string ParseOptions(int argc, char **argv, Options *options) {
  std::map<std::string, std::string> flags = {
      {"mindir_path", ""}, {"input_path", ""}, {"result_path", ""}, {"device_id", "0"}, {"precision_mode", ""}};
  std::string problem = ParseFlags(argc, argv, &flags);
  if (!problem.empty()) {
    return problem;
  }
  if (flags["mindir_path"].empty() || flags["input_path"].empty() || flags["result_path"].empty()) {
    return "--mindir_path, --input_path and --result_path are required";
  }
  try {
    options->device_id = static_cast<uint32_t>(std::stoul(flags["device_id"]));
  } catch (const std::exception &) {
    return "--device_id must be a number, got '" + flags["device_id"] + "'";
  }
  options->mindir_path = flags["mindir_path"];
  options->input_path = flags["input_path"];
  options->result_path = flags["result_path"];
  options->precision_mode = flags["precision_mode"];
  return "";
}

// Loads the MindIR and compiles it for the Ascend device; returns an empty string or the problem.
std::string BuildModel(const Options &options, mindspore::Model *model) {
  auto context = std::make_shared<mindspore::Context>();
  auto ascend = std::make_shared<mindspore::AscendDeviceInfo>();
  ascend->SetDeviceID(options.device_id);
  if (!options.precision_mode.empty()) {
    ascend->SetPrecisionMode(options.precision_mode);
  }
  context->MutableDeviceInfo().push_back(ascend);
  mindspore::Status status;
  try {
    // Some runtimes throw instead of returning a Status (e.g. for a MindIR version they do not know).
    mindspore::Graph graph;
    status = mindspore::Serialization::Load(options.mindir_path, mindspore::ModelType::kMindIR, &graph);
    if (status == mindspore::kSuccess) {
      status = model->Build(mindspore::GraphCell(graph), context);
    }
  } catch (const std::exception &error) {
    return error.what();
  }
  return status == mindspore::kSuccess ? "" : status.ToString();
}

// The sorted input bins, each checked to hold one image of image_bytes; returns the problem or "".
std::string ListInputs(const std::string &input_path, size_t image_bytes, std::vector<std::string> *files) {
  *files = ListFiles(input_path, ".bin");
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
bool WriteOutputs(const std::vector<mindspore::MSTensor> &outputs, size_t slot, size_t batch,
                  const std::string &result_path, const std::string &name) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    const size_t bytes = outputs[i].DataSize() / batch;
    auto data = outputs[i].Data();
    const char *start = static_cast<const char *>(data.get()) + slot * bytes;
    if (!WriteBinary(result_path + "/" + name + "_" + std::to_string(i) + ".bin", start, bytes)) {
      return false;
    }
  }
  return true;
}

// Runs every file through the model, batch images per Predict, and writes the results.
// *total_ms accumulates the time spent in Predict. Returns an empty string or the problem.
std::string RunAll(mindspore::Model *model, const mindspore::MSTensor &input, const std::vector<std::string> &files,
                   const std::string &result_path, double *total_ms) {
  const size_t batch = static_cast<size_t>(input.Shape()[0]);
  const size_t image_bytes = input.DataSize() / batch;
  std::vector<char> buffer(batch * image_bytes);
  for (size_t start = 0; start < files.size(); start += batch) {
    const size_t count = std::min(batch, files.size() - start);
    std::memset(buffer.data(), 0, buffer.size());
    for (size_t slot = 0; slot < count; ++slot) {
      if (!ReadBinary(files[start + slot], buffer.data() + slot * image_bytes, image_bytes)) {
        return "cannot read " + files[start + slot];
      }
    }
    std::vector<mindspore::MSTensor> inputs = {
        mindspore::MSTensor(input.Name(), input.DataType(), input.Shape(), buffer.data(), buffer.size())};
    std::vector<mindspore::MSTensor> outputs;
    auto tic = std::chrono::steady_clock::now();
    mindspore::Status status = model->Predict(inputs, &outputs);
    *total_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - tic).count();
    if (status != mindspore::kSuccess) {
      return "Predict failed on " + files[start] + ": " + status.ToString();
    }
    for (size_t slot = 0; slot < count; ++slot) {
      if (!WriteOutputs(outputs, slot, batch, result_path, Stem(files[start + slot]))) {
        return "cannot write the outputs of " + files[start + slot] + " to " + result_path;
      }
    }
    std::cout << "inferred " << start + count << "/" << files.size() << std::endl;
  }
  return "";
}

int Fail(const std::string &message) {
  std::cerr << "error: " << message << std::endl;
  return 1;
}

}  // namespace

int main(int argc, char **argv) {
  Options options;
  std::string problem = ParseOptions(argc, argv, &options);
  if (!problem.empty()) {
    std::cerr << kUsage << std::endl;
    return Fail(problem);
  }
  mindspore::Model model;
  problem = BuildModel(options, &model);
  if (!problem.empty()) {
    return Fail("cannot load and build " + options.mindir_path + ": " + problem);
  }
  std::vector<mindspore::MSTensor> model_inputs = model.GetInputs();
  if (model_inputs.size() != 1 || model_inputs[0].Shape().size() != 4 ||
      model_inputs[0].DataType() != mindspore::DataType::kNumberTypeFloat32) {
    return Fail("expected one float32 (B, 3, H, W) model input");
  }
  const mindspore::MSTensor &input = model_inputs[0];
  const size_t batch = static_cast<size_t>(input.Shape()[0]);
  std::vector<std::string> files;
  problem = ListInputs(options.input_path, input.DataSize() / batch, &files);
  double total_ms = 0.0;
  if (problem.empty()) {
    problem = RunAll(&model, input, files, options.result_path, &total_ms);
  }
  if (!problem.empty()) {
    return Fail(problem);
  }

  const double ms_per_image = total_ms / files.size();
  std::ostringstream timing;
  timing << "{\"images\": " << files.size() << ", \"batch_size\": " << batch << ", \"mean_ms_per_image\": "
         << ms_per_image << ", \"mean_ms_per_batch\": " << total_ms / ((files.size() + batch - 1) / batch) << "}";
  if (!WriteText(options.result_path + "/" + kTimeFile, timing.str())) {
    return Fail("cannot write " + options.result_path + "/" + kTimeFile);
  }
  std::cout << "NN inference cost average time: " << ms_per_image << " ms per image (" << files.size()
            << " images, batch " << batch << ")" << std::endl;
  return 0;
}
