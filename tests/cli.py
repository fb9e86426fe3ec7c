"""`python -m MODULE ARGS...` run in this process: the same argv, exit code, stdout and stderr as the command line,
without a new interpreter importing torch again (about 3 s a run), so the CLI error tests fit the fast tier."""

import contextlib
import importlib.util
import io
import os
import runpy
import subprocess
import sys
import warnings
from unittest import mock

from scripts.server import ROOT

CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
"""The environment of a subprocess that must run on the CPU on any machine, GPUs hidden (e.g. a torchrun job a test
compares with a CPU run)."""


def run_module(module, *args, env=None):
    """The ``subprocess.CompletedProcess`` of ``python -m module *args`` from the repo root (``env``: variables to
    set meanwhile). An exception that escapes the module propagates, as a traceback would end the command."""
    argv = [importlib.util.find_spec(module).origin, *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", argv), mock.patch.dict("os.environ", env or {}), contextlib.chdir(ROOT), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before, as tests do
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exited:
            if isinstance(exited.code, str):  # sys.exit("message"): printed to stderr, status 1
                print(exited.code, file=sys.stderr)
            code = exited.code if isinstance(exited.code, int) else int(exited.code is not None)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
