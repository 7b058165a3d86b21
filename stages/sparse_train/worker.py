"""The sparse-train stage on several processes: `sparse_train_processes` (the parent: launches torchrun in its own
process group, forwards rank 0's lines, reads the TrainResult back) and `main`, the worker entry point that torchrun
runs in each process (`python -m stages.sparse_train.worker RUN_DIR`; the launch names this module by its own
`__name__`, so a rename cannot leave a stale string behind), which calls `sparse_train` with the parent's inputs.

Imports pipeline and stages.sparse_train.training only (no prefect, no click, no flows).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import errors
from pipeline.artifacts import write_bytes_atomic, write_json_atomic
from pipeline.config import CompressConfig, ConfigView, make_config
from pipeline.devices import resolve_device
from pipeline.errors import BadInputError, ForceCompressError
from pipeline.progress import say
from stages.sparse_train.training import sparse_train

REQUEST = "train_request.json"  # the parent's inputs for the workers: graph, masks, the config fields the stage reads
RESULT = "train_result.pkl"  # rank 0's TrainResult, pickled, read back by the parent
LOG_DIR = "train_logs"  # torchrun's per-rank stdout/stderr of the last launch (--tee), beside the run's files
ERROR_MARK = "force-compress worker error: "  # a worker's ForceCompressError, as one JSON line on stderr
ROOT = Path(__file__).resolve().parents[2]  # the project root: the workers import this package from it
_TEE = re.compile(r"^\[[A-Za-z_]*?(\d+)\]:(.*)$")  # torchrun --tee prefixes each worker line with [<role><local rank>]:
_KEEP_LINES = 12
_LAUNCHER_PID = "FORCE_COMPRESS_TORCHRUN_PID"  # the torchrun a launch started: its workers die with it
WORKER_MODULE = __spec__.name  # what torchrun runs in each process: this module, by the name it was imported under


# ------------------------------------------------------------------------------------------ checks


def check_nproc(nproc: int, device: str) -> None:
    """BadInputError when `nproc` processes do not fit this machine: on CUDA one process per GPU. On CPU more
    processes than cores is allowed (gloo), with a warning."""
    if nproc <= 1:
        return
    if resolve_device(device).type == "cuda":
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise BadInputError(f"--nproc {nproc} asks for {nproc} training processes on CUDA, one per GPU, but "
                                f"this machine has {gpus} GPU(s); use --nproc {gpus} or fewer, or --device cpu")
        return
    cores = os.cpu_count() or 1
    if nproc > cores:
        warnings.warn(f"--nproc {nproc} on {cores} CPU core(s): the training processes share cores and run slower "
                      "than fewer would", stacklevel=2)


def multi_node() -> bool:
    """True when torchrun's own environment (PET_NNODES) asks for more than one node: the launch then joins that
    rendezvous (PET_RDZV_BACKEND, PET_RDZV_ENDPOINT, PET_RDZV_ID) instead of starting a standalone one."""
    nnodes = os.environ.get("PET_NNODES", "1").strip()
    return nnodes not in ("", "1", "1:1")


def launches(nproc: int) -> bool:
    """Whether the sparse-train stage runs under torchrun: more than one process here, or a multi-node job."""
    return nproc > 1 or multi_node()


# ------------------------------------------------------------------------------------------ the parent


def sparse_train_processes(normalized_path: str | os.PathLike, masks_path: str | os.PathLike,
                           config: CompressConfig | ConfigView, run_dir: str | os.PathLike, *,
                           nproc: int | None = None, preprocessing: dict | None = None,
                           output_kind: str = "logits"):
    """Stage: `sparse_train` data-parallel on `nproc` (default `config.nproc`) processes of this machine under
    `torchrun --standalone`; returns rank 0's TrainResult. Rank 0's lines (the per-epoch progress) go to this
    process's stderr as they come. A worker's ForceCompressError is raised here as the same class (exit 2 stays
    exit 2); any other failure raises RuntimeError with the workers' last lines. The torchrun runs in its own
    session and dies with this process: an exception or Ctrl-C here stops it and its workers, and so does a kill
    of this process (the parent-death signal, on Linux). `preprocessing`: the mean, std and geometry of the run's
    opened data (`preprocessing_of`), which each process applies to the data it loads."""
    nproc = int(nproc or config.nproc)
    check_nproc(nproc, config.device)
    run_dir_path = Path(run_dir)
    run_dir_path.mkdir(parents=True, exist_ok=True)
    result_path, log_dir = run_dir_path / RESULT, run_dir_path / LOG_DIR
    result_path.unlink(missing_ok=True)
    if log_dir.exists():
        shutil.rmtree(log_dir, ignore_errors=True)
    if isinstance(config, ConfigView):
        values, fields = config.values(), sorted(config.declared_fields)
    else:
        values, fields = config.model_dump(), None
    write_json_atomic(run_dir_path / REQUEST, {
        "normalized_path": str(normalized_path), "masks_path": str(masks_path), "run_dir": str(run_dir),
        "cwd": os.getcwd(), "config": json.loads(json.dumps(values, default=list)), "fields": fields,
        "preprocessing": preprocessing, "output_kind": output_kind,
    })
    rendezvous = [] if multi_node() else ["--standalone"]
    # The shim sets the parent-death signal, then becomes torchrun: a killed parent leaves no torchrun behind.
    # SIGKILL, not SIGTERM: torchrun's own SIGTERM shutdown can hang once its output pipe has no reader (seen here).
    # The workers then die with torchrun (_die_with_parent), which they recognise by the pid the shim leaves.
    shim = ("import ctypes, os, signal, sys\n"
            "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
            "except (AttributeError, OSError):\n    pass\n"
            "if os.getppid() != int(sys.argv[1]):\n    sys.exit(1)  # the parent is gone already\n"
            f"os.environ['{_LAUNCHER_PID}'] = str(os.getpid())\n"
            "os.execv(sys.executable, [sys.executable, '-m', 'torch.distributed.run', *sys.argv[2:]])\n")
    cmd = [sys.executable, "-c", shim, str(os.getpid()), *rendezvous, "--nproc-per-node", str(nproc),
           "--tee", "3", "--log-dir", str(log_dir), "-m", WORKER_MODULE, str(run_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", bufsize=1, start_new_session=True, env=_child_env(nproc))
    worker_lines: collections.deque = collections.deque(maxlen=_KEEP_LINES)
    agent_lines: collections.deque = collections.deque(maxlen=400)  # torchrun's failure report is ~30 lines
    marks: list[dict] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:  # the main thread reads: under Prefect's log_prints the lines reach the run's log
            line = raw.rstrip("\n")
            m = _TEE.match(line)
            if m is None:  # torchrun's own lines: shown only when it fails
                agent_lines.append(line)
                continue
            local_rank, text = int(m.group(1)), m.group(2)
            if not text.strip():
                continue
            if text.startswith(ERROR_MARK):
                with contextlib.suppress(ValueError):
                    marks.append(json.loads(text[len(ERROR_MARK):]))
                continue
            worker_lines.append(text if local_rank == 0 else f"[rank {local_rank}] {text}")
            say(worker_lines[-1])
        rc = proc.wait()
    except BaseException:  # an error here, Ctrl-C, a Prefect cancellation: stop torchrun and its workers
        _stop(proc)
        raise
    if rc != 0:
        if marks:
            first = marks[0]
            cls = getattr(errors, str(first.get("type")), None)
            if not (isinstance(cls, type) and issubclass(cls, ForceCompressError)):
                cls = {1: errors.GateFailedError, 2: BadInputError, 3: errors.EnvironmentProblem}.get(
                    first.get("exit_code"), ForceCompressError)
            raise cls(first.get("message", "a training process failed"))
        raise RuntimeError(_failure_message(nproc, rc, list(worker_lines), list(agent_lines), log_dir))
    if not result_path.exists():
        raise RuntimeError(f"sparse-train on {nproc} processes ended without {result_path}; workers' logs in "
                           f"{log_dir}")
    # Our own file, written by rank 0 a moment ago in our own run directory (as the stage records are).
    return pickle.loads(result_path.read_bytes())


def _child_env(nproc: int) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # rank 0's lines arrive as they are printed, not when a buffer fills
    # One core's share each, unless the user chose: torchrun's own default is 1 thread with a warning.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to torchrun's process group (torchrun then stops its workers, each in its own session), SIGKILL to
    whatever is left after `grace_s`."""
    if proc.poll() is not None:
        return
    workers = _children(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        for pid in (proc.pid, *workers):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        proc.wait()


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc; [] elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _failure_message(nproc: int, rc: int, worker_lines: list[str], agent_lines: list[str], log_dir: Path) -> str:
    """One message: the workers' last lines, and torchrun's root-cause lines (which rank, which exit code or
    signal) that say more than they do when a worker was killed."""
    cause = []
    if "Root Cause (first observed failure):" in agent_lines:
        tail = agent_lines[agent_lines.index("Root Cause (first observed failure):") + 1:]
        cause = [re.sub(r"\s+", " ", re.sub(r"\s*:\s+", " ", ln.strip(), count=1))
                 for ln in tail if ln.strip().startswith(("rank", "exitcode"))][:2]
    shown = worker_lines or [ln for ln in agent_lines if ln.strip()][-_KEEP_LINES:]
    message = f"sparse-train on {nproc} processes failed (torchrun exit {rc})"
    if cause:
        message += "; first failure: " + ", ".join(cause)
    if shown:
        message += "; last lines of the training processes:\n  " + "\n  ".join(shown)
    return message + f"\n(per-rank logs in {log_dir})"


# ------------------------------------------------------------------------------------------ the worker


def read_request(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / REQUEST
    if not path.exists():
        raise BadInputError(f"{path} does not exist: run `force-compress compress ... --nproc N` (it writes it), "
                            "or give the run directory of such a request")
    return json.loads(path.read_text())


def _config(request: dict) -> CompressConfig | ConfigView:
    values = {"model": "(sparse-train worker)", **request["config"]}
    config = make_config(**values)
    return ConfigView(config, request["fields"]) if request.get("fields") is not None else config


def _share_request(request: dict | None) -> dict | None:
    """Across nodes: every process gets the request of the first process that has one (the node whose parent
    launched torchrun with the run directory; the other nodes may start the worker without it)."""
    if not dist.is_initialized():  # gloo carries the request (and CPU tensors), NCCL the CUDA tensors
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, request)
    return next((r for r in gathered if r is not None), None)


def _die_with_parent() -> None:
    """Linux: this process is killed when the torchrun that a launch started dies, however it dies (no training
    process is orphaned); if it died before this line, exit now. A torchrun started by hand is left to itself."""
    launcher = os.environ.get(_LAUNCHER_PID)
    if launcher is None:
        return
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """`python -m stages.sparse_train.worker [RUN_DIR]` under torchrun: one process of the data-parallel sparse-train
    stage. Reads RUN_DIR/train_request.json (written by the parent), trains (rank 0 writes trained.pt and
    train_result.pkl). Exit code: 0, or a ForceCompressError's exit code after one marked line on stderr."""
    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}",
                                     description="One process of the data-parallel sparse-train stage (run it under "
                                                 "torchrun).")
    parser.add_argument("run_dir", nargs="?", default=None,
                        help="the run directory holding train_request.json; on the other nodes of a multi-node run it "
                             "may be left out: they get the request from the node that has it")
    args = parser.parse_args(argv)
    _die_with_parent()
    rank = int(os.environ.get("RANK", 0))
    spans_nodes = int(os.environ.get("WORLD_SIZE", 1)) > int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    try:
        request = read_request(args.run_dir) if args.run_dir else None
        if spans_nodes:
            request = _share_request(request)
        if request is None:
            raise BadInputError("no RUN_DIR given to any process of this job; give it on one node at least")
        if request.get("cwd") and Path(request["cwd"]).is_dir():
            os.chdir(request["cwd"])  # the parent's relative paths (runs/…) mean the same here
        result = sparse_train(request["normalized_path"], request["masks_path"], _config(request),
                              request["run_dir"], progress=rank == 0, preprocessing=request.get("preprocessing"),
                              output_kind=request.get("output_kind", "logits"))
        if rank == 0:
            write_bytes_atomic(Path(request["run_dir"]) / RESULT, pickle.dumps(result))
    except ForceCompressError as e:
        print(ERROR_MARK + json.dumps({"type": type(e).__name__, "exit_code": e.exit_code, "message": str(e)}),
              file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        if dist.is_available() and dist.is_initialized():  # the group _share_request started
            dist.destroy_process_group()
    return 0


__all__ = ["check_nproc", "launches", "main", "multi_node", "read_request", "sparse_train_processes"]

if __name__ == "__main__":
    sys.exit(main())
