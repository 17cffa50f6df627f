/**
 * Reads the top-level fields of a MindIR file's ModelProto (protobuf wire format) that say who
 * exported it; every other field (the graph, the weights) is skipped by its length.
 */
#include "inc/mindir_info.h"

#include <cctype>
#include <fstream>
#include <iterator>
#include <sstream>
#include <vector>

namespace fcos {
namespace {

constexpr int kProducerName = 2;
constexpr int kModelVersion = 5;
constexpr int kMindIrVersion = 13;

bool ReadVarint(const std::string &bytes, size_t *pos, uint64_t *value) {
  *value = 0;
  for (int shift = 0; shift < 64 && *pos < bytes.size(); shift += 7) {
    const auto byte = static_cast<unsigned char>(bytes[(*pos)++]);
    *value |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if ((byte & 0x80) == 0) {
      return true;
    }
  }
  return false;
}

}  // namespace

std::string ReadMindirInfo(const std::string &path, MindirInfo *info) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return "cannot open " + path;
  }
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.empty()) {
    return path + " is empty";
  }
  *info = MindirInfo();
  size_t pos = 0;
  while (pos < bytes.size()) {
    uint64_t key = 0;
    uint64_t value = 0;
    if (!ReadVarint(bytes, &pos, &key)) {
      return path + " is not a MindIR file (broken protobuf field at byte " + std::to_string(pos) + ")";
    }
    const uint64_t field = key >> 3;
    switch (key & 7) {
      case 0:  // varint
        if (!ReadVarint(bytes, &pos, &value)) {
          return path + " is not a MindIR file (broken varint at byte " + std::to_string(pos) + ")";
        }
        if (field == kMindIrVersion) {
          info->mind_ir_version = static_cast<int64_t>(value);
        }
        break;
      case 1:  // 64-bit
        pos += 8;
        break;
      case 5:  // 32-bit
        pos += 4;
        break;
      case 2:  // length-delimited
        if (!ReadVarint(bytes, &pos, &value) || value > bytes.size() - pos) {
          return path + " is not a MindIR file (field " + std::to_string(field) + " runs past the end)";
        }
        if (field == kProducerName) {
          info->producer_name = bytes.substr(pos, value);
        } else if (field == kModelVersion) {
          info->producer_version = bytes.substr(pos, value);
        }
        pos += value;
        break;
      default:
        return path + " is not a MindIR file (protobuf wire type " + std::to_string(key & 7) + " at byte " +
               std::to_string(pos) + ")";
    }
    if (pos > bytes.size()) {
      return path + " is not a MindIR file (truncated)";
    }
  }
  if (info->producer_name.empty()) {
    return path + " is not a MindIR file (no producer name)";
  }
  return "";
}

bool VersionLess(const std::string &a, const std::string &b) {
  auto parse = [](const std::string &text) {
    std::vector<long> numbers;
    std::istringstream in(text);
    std::string part;
    while (std::getline(in, part, '.') && !part.empty() && std::isdigit(static_cast<unsigned char>(part[0]))) {
      numbers.push_back(std::stol(part));
    }
    return numbers;
  };
  const std::vector<long> x = parse(a);
  const std::vector<long> y = parse(b);
  return !x.empty() && !y.empty() && x < y;
}

}  // namespace fcos
