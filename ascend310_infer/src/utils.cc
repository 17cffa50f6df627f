/**
 * File and command-line helpers of the FCOS MindIR inference program.
 */
#include "inc/utils.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <system_error>

namespace fs = std::filesystem;

namespace fcos {

std::string ParseFlags(int argc, char **argv, std::map<std::string, std::string> *flags) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos) {
      return "expected --name=value, got '" + arg + "'";
    }
    std::string name = arg.substr(2, eq - 2);
    auto it = flags->find(name);
    if (it == flags->end()) {
      return "unknown flag --" + name;
    }
    it->second = arg.substr(eq + 1);
  }
  return "";
}

std::vector<std::string> ListFiles(const std::string &dir, const std::string &suffix) {
  std::vector<std::string> paths;
  std::error_code error;
  for (const auto &entry : fs::directory_iterator(dir, error)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && name.size() > suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      paths.push_back(entry.path().string());
    }
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

std::string Stem(const std::string &path) { return fs::path(path).stem().string(); }

long long FileSize(const std::string &path) {
  std::error_code error;
  auto size = fs::file_size(path, error);
  return error ? -1 : static_cast<long long>(size);
}

bool ReadBinary(const std::string &path, void *data, size_t size) {
  std::ifstream in(path, std::ios::binary);
  in.read(static_cast<char *>(data), static_cast<std::streamsize>(size));
  return in.good() && static_cast<size_t>(in.gcount()) == size;
}

bool WriteBinary(const std::string &path, const void *data, size_t size) {
  // A temporary name and a rename, so that a crash never leaves a truncated result behind.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(static_cast<const char *>(data), static_cast<std::streamsize>(size));
    if (!out.good()) {
      return false;
    }
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

bool WriteText(const std::string &path, const std::string &text) {
  return WriteBinary(path, text.data(), text.size());
}

std::string MakeDirs(const std::string &dir) {
  std::error_code error;
  fs::create_directories(dir, error);
  if (error || !fs::is_directory(dir, error)) {
    return "cannot create the folder " + dir + (error ? " (" + error.message() + ")" : " (a file has that name)");
  }
  return "";
}

std::string FirstLine(const std::string &text) {
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) {
      end = text.size();
    }
    const size_t first = text.find_first_not_of(" \t\r", start);
    if (first != std::string::npos && first < end) {
      size_t last = text.find_last_not_of(" \t\r", end - 1);
      return text.substr(first, last + 1 - first);
    }
    start = end + 1;
  }
  return "";
}

bool IsFile(const std::string &path) {
  std::error_code error;
  return fs::is_regular_file(path, error);
}

bool IsDir(const std::string &path) {
  std::error_code error;
  return fs::is_directory(path, error);
}

}  // namespace fcos
