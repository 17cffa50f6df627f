/**
 * File and command-line helpers of the FCOS MindIR inference program.
 */
#include "inc/utils.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
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

std::string ListFiles(const std::string &dir, const std::string &suffix, std::vector<std::string> *paths) {
  paths->clear();
  std::error_code error;
  fs::directory_iterator it(dir, error), end;
  for (; !error && it != end; it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
      continue;
    }
    std::error_code status;
    const bool regular = it->is_regular_file(status);
    if (status) {  // a broken or looping link named like an input
      return "cannot read " + it->path().string() + ": " + status.message();
    }
    if (regular) {
      paths->push_back(it->path().string());
    }
  }
  if (error) {
    return "cannot list " + dir + ": " + error.message();
  }
  std::sort(paths->begin(), paths->end());
  return "";
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
  // A temporary name, every byte written and flushed to disk, then a rename: a crash or a full disk
  // never leaves a truncated result under the final name, and a failed write leaves nothing.
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return false;
  }
  const char *bytes = static_cast<const char *>(data);
  size_t done = 0;
  while (done < size) {
    const ssize_t wrote = ::write(fd, bytes + done, size - done);
    if (wrote < 0 && errno == EINTR) {
      continue;
    }
    if (wrote <= 0) {
      break;
    }
    done += static_cast<size_t>(wrote);
  }
  const bool ok = done == size && ::fsync(fd) == 0;
  if (::close(fd) != 0 || !ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return false;
  }
  return true;
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
