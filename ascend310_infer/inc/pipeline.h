/**
 * Everything the FCOS inference program does around the model call (no MindSpore headers):
 * command line, path checks, reading and ordering the input bins, batching (a last incomplete
 * batch is zero-filled and its extra outputs dropped), output checks, the result bins and
 * infer_time.json. The file contract is the Python runner's (src/deploy/contract.py).
 */
#ifndef FCOS_ASCEND310_INFER_INC_PIPELINE_H_
#define FCOS_ASCEND310_INFER_INC_PIPELINE_H_

#include <string>

#include "inc/infer_model.h"

namespace fcos {

extern const char kUsage[];
extern const char kTimeFile[];  // infer_time.json, in --result_path

struct Options {
  ModelOptions model;
  std::string input_path;
  std::string result_path;
};

// Parses the command line into *options; "" or the problem.
std::string ParseOptions(int argc, char **argv, Options *options);

// The whole program: returns the exit status (0, or 1 after one "error: ..." line on stderr).
int RunMain(int argc, char **argv);

}  // namespace fcos

#endif  // FCOS_ASCEND310_INFER_INC_PIPELINE_H_
