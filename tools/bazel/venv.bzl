"""A Python toolchain whose interpreter is the project's own venv.

Bazel 4's native py_runtime needs an absolute interpreter path. This repository rule finds
<workspace>/.venv/bin/python3 on the machine that runs Bazel, so nothing machine-specific is committed.
With rules_python on a newer Bazel, this file gives way to `python_register_toolchains` or a
`py_runtime` from rules_python pointing at the same venv (README, "Bazel").
"""

_BUILD = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

package(default_visibility = ["//visibility:public"])

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "python_toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)

# For genrules that run Python tools from the venv (protoc, pybind11 includes).
sh_binary(
    name = "python",
    srcs = ["python.sh"],
)
"""

def _venv_python_impl(rctx):
    root = rctx.path(Label("//:WORKSPACE")).dirname
    python = "%s/.venv/bin/python3" % root
    if not rctx.path(python).exists:
        print("tinylm: %s does not exist yet; run ./tinylm setup" % python)
    rctx.file("python.sh", "#!/bin/sh\nexec \"%s\" \"$@\"\n" % python, executable = True)
    rctx.file("BUILD", _BUILD.format(python = python))

venv_python = repository_rule(
    implementation = _venv_python_impl,
    local = True,
)
