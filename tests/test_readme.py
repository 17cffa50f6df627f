"""The READMEs are a manual that runs: CI runs exactly their install and test commands, every
command they show names scripts, modules, flags and files that exist (or that an earlier command
makes), both languages show the same commands, and the English one stays short and plain."""
import ast
import os
import re
import shlex

import pytest

from src.config import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# oneDNN's headers alone (1.2 MB) for src/ops: without --no-deps pip adds Intel's oneDNN, SYCL and
# OpenMP runtimes (about 2 GB), none of which the build uses (it links the mindspore wheel's libdnnl).
INSTALL = 'pip install -r requirements.txt && pip install --no-deps "onednn-devel>=2025,<2026"'
TEST = "python -m pytest -q"
# Paths a README command may name without their existing in the repository: what an earlier
# command writes, what the user brings (downloaded weights, COCO, rank tables).
PRODUCED = ("output/", "./", "fcos_deepforest", "resnet50_backbone.ckpt", "fcos_r50.ckpt", "coco2017/",
            "hccl_8p_")
USER_FILES = (".pth",)


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def commands(text):
    """The command lines of the bash code blocks (continuation lines joined, comments dropped)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def test_ci_runs_the_readme_commands():
    ci_lines = [line.strip() for line in _read(".ci/run").splitlines()]
    for readme in ("README.md", "README_CN.md"):
        text = _read(readme)
        assert f"```bash\n{INSTALL}\n```" in text and f"```bash\n{TEST}\n```" in text, readme
    assert INSTALL in ci_lines and TEST in ci_lines


def test_both_readmes_show_the_same_commands_and_samples():
    """The same commands and the same sample outputs (text blocks), none left unfilled."""
    en, cn = _read("README.md"), _read("README_CN.md")
    assert commands(en) == commands(cn)
    samples = [re.findall(r"```text\n(.*?)```", text, re.S) for text in (en, cn)]
    assert [s for s in samples[0] if "Average" in s or "INFO" in s] == [s for s in samples[1] if "Average" in s or "INFO" in s]
    assert not re.search(r"\b[A-Z_]+_SAMPLE\b", en + cn)


def _entry_flags(script):
    """Flags an entry point takes: every schema key, plus its own FLAGS (parsed from its source)."""
    flags = set(schema().values) | {"config_path"}
    tree = ast.parse(_read(script))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "FLAGS" for t in node.targets):
            flags |= {key.value for key in node.value.keys}
    return flags


def _check_path(word, problems):
    path = word.split("=", 1)[-1]
    if not re.match(r"^(\./)?(configs|data|scripts|tools|src|docs)/", path) or path.startswith(PRODUCED):
        return
    if not os.path.exists(os.path.join(ROOT, path)):
        problems.append(f"no such file: {path}")


def check_command(line):
    """-> the problems of one README command line (empty when it would run as written)."""
    problems = []
    words = shlex.split(line)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pytest", "-q"]:
        return problems
    if words[0] == "bash":
        if not os.path.isfile(os.path.join(ROOT, words[1])):
            problems.append(f"no script {words[1]}")
    elif words[0] == "python" and words[1] == "-m":
        module = words[2]
        path = os.path.join(ROOT, *module.split("."))
        if not (os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__main__.py"))):
            problems.append(f"no module {module}")
        else:
            source = _read(path[len(ROOT) + 1:] + ".py") if os.path.isfile(path + ".py") else ""
            for flag in (w.split("=")[0] for w in words[3:] if w.startswith("--")):
                if f'"{flag}"' not in source:
                    problems.append(f"{module} has no {flag}")
    elif words[0] == "python":
        script = words[1]
        if not os.path.isfile(os.path.join(ROOT, script)):
            problems.append(f"no script {script}")
        else:
            allowed = _entry_flags(script)
            for flag in (w.split("=")[0][2:] for w in words[2:] if w.startswith("--")):
                if flag not in allowed and flag != "help":
                    problems.append(f"{script} has no --{flag}")
    else:
        problems.append(f"unknown command {words[0]}")
    for word in words[1:]:
        if word.endswith(USER_FILES):
            continue
        _check_path(word, problems)
    return problems


@pytest.mark.parametrize("readme", ["README.md", "README_CN.md"])
def test_every_command_names_what_exists(readme):
    """Mutation caught: a README naming utils/hccl_tools/hccl_tools.py (not in this repository) or
    a flag the entry point lacks."""
    problems = {line: check_command(line) for line in commands(_read(readme))}
    assert not {line: p for line, p in problems.items() if p}


def test_the_checker_refuses_what_does_not_exist():
    assert check_command("python utils/hccl_tools/hccl_tools.py --device_num 8") == \
        ["no script utils/hccl_tools/hccl_tools.py"]
    assert check_command("python train.py --no_such_key=1") == ["train.py has no --no_such_key"]
    assert check_command("bash scripts/run_eval.sh CPU 0 configs/missing.yaml") == ["no such file: configs/missing.yaml"]
    assert check_command("python -m tools.convert_weights --inptu a.pth") == ["tools.convert_weights has no --inptu"]


def _prose(text):
    """The README without code blocks, tables and headings."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.startswith(("|", "#", "-  [", "    - [")))


def test_the_english_readme_is_short_and_plain():
    """At most 15 KB, no sentence over 40 words, no date in prose (dates belong in table captions)."""
    text = _read("README.md")
    assert len(text.encode()) <= 15 * 1024
    prose = _prose(text)
    sentences = re.split(r"(?<=[.!?:])\s+(?=[A-Z`(\[])|\n\n|\n- ", prose)
    long = [s for s in sentences if len(s.split()) > 40]
    assert not long, long
    dated = [line for line in prose.splitlines() if re.search(r"\b20\d\d-\d\d-\d\d\b", line)
             and not re.search(r"(measured|conditions)", line, re.I)]
    assert not dated, dated


def test_scripts_and_configs_named_in_the_readmes_exist():
    for readme in ("README.md", "README_CN.md"):
        for path in set(re.findall(r"(scripts/\w+\.sh|configs/\w+\.yaml)", _read(readme))):
            assert os.path.isfile(os.path.join(ROOT, path)), path
