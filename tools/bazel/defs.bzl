"""Small macros over Bazel's native Python rules.

`py_pytest` is a plain `py_test` whose main runs pytest on its test files; moving to rules_python means
loading `py_test` from there in this one file.
"""

def py_pytest(name, srcs, deps = [], data = [], args = [], **kwargs):
    """One py_test that runs pytest over `srcs` (test files that sit beside the code)."""
    native.py_test(
        name = name,
        srcs = srcs + ["//tools/bazel:pytest_main.py"],
        main = "//tools/bazel:pytest_main.py",
        args = ["$(rootpath %s)" % s for s in srcs] + args,
        deps = deps,
        data = data,
        python_version = "PY3",
        srcs_version = "PY3",
        **kwargs
    )
