"""CI runs exactly the README's install and test commands; both READMEs stay in step."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = "pip install -r requirements.txt"
# oneDNN's headers alone (1.2 MB) for src/ops: without --no-deps pip adds Intel's oneDNN, SYCL and
# OpenMP runtimes (about 2 GB), none of which the build uses (it links the mindspore wheel's libdnnl).
HEADERS = 'pip install --no-deps "onednn-devel>=2025,<2026"'
TEST = "python -m pytest -q"


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readme_commands():
    ci_lines = [line.strip() for line in _read(".ci/run").splitlines()]
    for readme in ("README.md", "README_CN.md"):
        text = _read(readme)
        assert f"```bash\n{INSTALL}\n{HEADERS}\n```" in text and f"```bash\n{TEST}\n```" in text, readme
    assert INSTALL in ci_lines and HEADERS in ci_lines and TEST in ci_lines


def _commands(text):
    """Command lines of the code blocks, without trailing comments (those are translated)."""
    lines = re.findall(r"^(?:python|bash|OUTPUT_DIR=\S+ bash) .*$", text, re.M)
    return sorted(re.sub(r"\s+#.*$", "", line) for line in lines)


def test_readmes_have_no_unfilled_sections_and_same_commands():
    en, cn = _read("README.md"), _read("README_CN.md")
    for text in (en, cn):
        assert not re.search(r"\b[A-Z_]+_(SECTION|RESULT|EXAMPLE)(_CN)?\b", text)
    assert _commands(en) == _commands(cn)


def test_scripts_named_in_readme_exist():
    for path in set(re.findall(r"(scripts/\w+\.sh|configs/\w+\.yaml)", _read("README.md"))):
        assert os.path.isfile(os.path.join(ROOT, path)), path
