/**
 * FCOS MindIR inference program (ModelZoo's ascend310_infer): the bins preprocess.py wrote in,
 * the result bins postprocess.py reads out; see inc/pipeline.h for the file contract and
 * src/mindspore_model.cc for how the MindIR is loaded.
 *
 * usage: main --mindir_path=FILE --input_path=DIR --result_path=DIR [--device_type=Ascend|GPU|CPU]
 *             [--device_id=0] [--precision_mode=MODE]
 */
#include "inc/pipeline.h"

int main(int argc, char **argv) { return fcos::RunMain(argc, argv); }
