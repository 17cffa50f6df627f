/**
 * File and command-line helpers of the FCOS MindIR inference program (no dependency beyond the
 * C++17 standard library, so the program builds wherever the MindSpore inference headers are).
 */
#ifndef FCOS_ASCEND310_INFER_INC_UTILS_H_
#define FCOS_ASCEND310_INFER_INC_UTILS_H_

#include <cstddef>
#include <map>
#include <string>
#include <vector>

namespace fcos {

// Parses "--name=value" arguments into *flags (which holds the defaults; a name that is not
// there already is unknown). Returns an empty string, or the problem.
std::string ParseFlags(int argc, char **argv, std::map<std::string, std::string> *flags);

// Paths of the regular files in dir whose names end with suffix, sorted by name, into *paths.
// Returns "", or the problem (the folder cannot be listed; a link named like an input is broken).
std::string ListFiles(const std::string &dir, const std::string &suffix, std::vector<std::string> *paths);

// File name without its folder and its last extension: "a/000001.bin" -> "000001".
std::string Stem(const std::string &path);

// Size of a file in bytes, or -1 when it cannot be read.
long long FileSize(const std::string &path);

// Reads exactly size bytes of path into data; false on any failure.
bool ReadBinary(const std::string &path, void *data, size_t size);

// Writes size bytes of data to path (through a temporary file); false on any failure.
bool WriteBinary(const std::string &path, const void *data, size_t size);

// Writes text to path (through a temporary file); false on any failure.
bool WriteText(const std::string &path, const std::string &text);

// Creates dir and its parents when missing; "" or the problem.
std::string MakeDirs(const std::string &dir);

// The first non-empty line of text (runtime exceptions carry call stacks), trimmed.
std::string FirstLine(const std::string &text);

bool IsFile(const std::string &path);
bool IsDir(const std::string &path);

}  // namespace fcos

#endif  // FCOS_ASCEND310_INFER_INC_UTILS_H_
