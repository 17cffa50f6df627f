/**
 * The header fields of a MindIR file (a mind_ir.ModelProto protobuf), read without protobuf:
 * who exported it and its MindIR format version, so that a runtime that cannot build it can be
 * told apart from a broken file.
 */
#ifndef FCOS_ASCEND310_INFER_INC_MINDIR_INFO_H_
#define FCOS_ASCEND310_INFER_INC_MINDIR_INFO_H_

#include <cstdint>
#include <string>

namespace fcos {

struct MindirInfo {
  std::string producer_name;     // ModelProto.producer_name (2), "MindSpore"
  std::string producer_version;  // ModelProto.model_version (5), e.g. "2.10.0"
  int64_t mind_ir_version = 0;   // ModelProto.mind_ir_version (13); absent means 0
};

// Reads path's top-level ModelProto fields; "" or why it is not a MindIR file.
std::string ReadMindirInfo(const std::string &path, MindirInfo *info);

// Compares dotted release numbers ("2.0.0" < "2.10.0"); false when either has no leading number.
bool VersionLess(const std::string &a, const std::string &b);

}  // namespace fcos

#endif  // FCOS_ASCEND310_INFER_INC_MINDIR_INFO_H_
