"""Run many `python -m intruder ARGS` invocations as forked children of one warm interpreter.

    python tests/cli_batch.py JOBS.json RESULTS.json

JOBS.json: [{"argv": [...], "cwd": DIR, "timeout": SECONDS}]. Each child is a copy of this process
after it has imported intruder, click and torch (start-up is paid once, not per case); it runs
intruder/__main__.py through runpy exactly as `python -m intruder ARGS` does, with file
descriptors 1 and 2 redirected to files, and ends the way the interpreter would: with SystemExit's
code, or a printed traceback and status 1 for any other exception. A child still running after its
timeout is killed and reported as timed out: a read blocked on a FIFO shows up that way.
RESULTS.json: [{"rc", "stdout", "stderr", "timed_out", "seconds"}], in the order of JOBS.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time


def _child(job: dict, out_path: str, err_path: str) -> None:
    code = 1
    try:
        os.chdir(job["cwd"])
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(f, fd)
            os.close(f)
        import runpy
        import traceback

        import intruder

        sys.argv = [os.path.join(os.path.dirname(intruder.__file__), "__main__.py")] + job["argv"]
        try:
            runpy.run_module("intruder", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # the interpreter prints the traceback and exits 1
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_jobs(jobs) -> list:
    results = []
    tmp = tempfile.mkdtemp(prefix="cli-batch-")
    for i, job in enumerate(jobs):
        out_path = os.path.join(tmp, f"{i}.out")
        err_path = os.path.join(tmp, f"{i}.err")
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(job, out_path, err_path)
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - t0 > job.get("timeout", 30):
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.002)
        rc = os.waitstatus_to_exitcode(status)
        res = {"rc": rc, "timed_out": timed_out, "seconds": time.monotonic() - t0}
        for key, path in (("stdout", out_path), ("stderr", err_path)):
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    res[key] = fh.read()
                os.unlink(path)
            except FileNotFoundError:
                res[key] = ""
        results.append(res)
    os.rmdir(tmp)
    return results


def main() -> int:
    jobs_path, results_path = sys.argv[1], sys.argv[2]
    with open(jobs_path) as fh:
        jobs = json.load(fh)
    # warm imports: what every scan would import anyway
    import click  # noqa: F401
    import torch  # noqa: F401

    import intruder.cli  # noqa: F401
    import intruder.io.adapter  # noqa: F401
    import intruder.report.schema  # noqa: F401
    import intruder.run.driver  # noqa: F401
    import intruder.scan  # noqa: F401
    import intruder.spectral.engine  # noqa: F401

    results = run_jobs(jobs)
    with open(results_path, "w") as fh:
        json.dump(results, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
