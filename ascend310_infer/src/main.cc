/**
 * FCOS MindIR inference program (ModelZoo's ascend310_infer): the bins preprocess.py wrote in,
 * the result bins postprocess.py reads out; see inc/pipeline.h for the file contract and
 * src/mindspore_model.cc for how the MindIR is loaded.
 *
 * usage: main --mindir_path=FILE --input_path=DIR --result_path=DIR [--device_type=Ascend|GPU|CPU]
 *             [--device_id=0] [--precision_mode=MODE]
 */
#include <exception>
#include <iostream>

#include "inc/pipeline.h"
#include "inc/utils.h"

int main(int argc, char **argv) {
  try {
    return fcos::RunMain(argc, argv);
  } catch (const std::exception &error) {  // anything a library threw past the checks: one line, exit 1
    std::cerr << "error: " << fcos::FirstLine(error.what()) << std::endl;
    return 1;
  }
}
