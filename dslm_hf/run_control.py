"""What keeps a pretraining run safe from other runs and from its scheduler: the output-folder lock, stop signals,
and the launcher's death.

- `RunLock`: an exclusive `fcntl.flock` on OUTPUT_DIR/.dslm-pretrain.lock, held by rank 0 for the whole run. The file
  names the holder (pid, host, start time) so a second run can say who has the folder. The kernel drops the lock
  when its holder dies, however it dies, so a lock file whose lock is free belonged to a dead run: it is taken over,
  with a message naming that run. (flock on network file systems depends on the server; run folders on local disks
  or a cluster file system that supports it.)
- `StopSignals`: SIGTERM (what SLURM and Kubernetes send before killing) or SIGINT (Ctrl-C) asks the loop to stop
  after the current step, write a checkpoint and exit 0; a repeated signal exits at once.
- `stop_when_the_launcher_dies`: a worker started by a launcher gets SIGTERM when the launcher process dies, so a
  killed `accelerate launch` leaves no orphan that keeps writing into the run folder. The worker's stdout/stderr may
  be pipes into the dead launcher (accelerate >= 1.16 tees a single-process worker's stderr through a pipe), where
  the next write raises BrokenPipeError; once the launcher is gone they are pointed at the null device, so the stop
  still ends in a checkpoint (what the run records goes to files in the run folder anyway).
- `launch_workers` (`dslm-pretrain --num_processes N`): starts and supervises the ranks. A rank's user error or crash
  goes to the launcher (`failures_reported_to_the_launcher`), which says once what went wrong: a rank's peers fail
  too, in their next collective, and would otherwise add one message and one gloo traceback per rank.
"""

import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from .cli import EXIT_USER_ERROR, UserError, debug_requested
from .files import write_text_atomically

LOCK_NAME = ".dslm-pretrain.lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Set in a worker's environment by accelerate launch (every mode), torchrun, and dslm-pretrain --num_processes.
LAUNCHER_ENVIRONMENT = ("ACCELERATE_DYNAMO_MODE", "TORCHELASTIC_RUN_ID", "DSLM_PRETRAIN_WORKER")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
REPORTS_ENVIRONMENT = "DSLM_PRETRAIN_REPORTS"  # the folder where launch_workers' ranks leave their failure reports
TRUE_VALUES = ("1", "true", "yes", "y", "t", "on")  # what accelerate's flags accept as true


def describe_holder(record: str) -> str:
    try:
        holder = json.loads(record)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (json.JSONDecodeError, TypeError, KeyError):
        return "a process that left no readable record"


class RunLock:
    """Exclusive use of a run folder by one run at a time (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.handle = None

    def acquire(self, say=print) -> None:
        """Take the lock or raise UserError naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = describe_holder(handle.read())
            handle.close()
            raise UserError(f"--output_dir {self.path.parent} is in use by another dslm-pretrain run ({holder}): "
                            "wait for it to finish, stop it, or choose another --output_dir") from None
        handle.seek(0)
        previous = handle.read().strip()
        if previous:
            say(f"taking over the lock of {self.path.parent} left by a run that is gone ({describe_holder(previous)})")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()  # an empty file: the run ended cleanly, nothing to take over
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class StopSignals:
    """Within `with StopSignals(...) as stop:`, the first SIGTERM/SIGINT sets `stop.received` (its name) for the loop
    to act on; one more, later than `grace_seconds` after the first, exits at once with status 128 + signal.

    Signals within the grace period count as one: a launcher that forwards the terminal's Ctrl-C to a worker which
    the terminal also reached delivers two at once, and that must not skip the checkpoint."""

    def __init__(self, announce: bool, grace_seconds: float = 2.0):
        self.announce, self.grace_seconds = announce, grace_seconds
        self.received, self.received_at, self.previous = None, None, {}

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        outlive_the_launchers_pipes()
        if self.received is None:
            self.received, self.received_at = name, time.monotonic()
            if self.announce:
                print(f"dslm-pretrain: {name} received: finishing this step, then writing a checkpoint "
                      f"(send {name} again to stop at once, without one)", file=sys.stderr, flush=True)
        elif time.monotonic() - self.received_at > self.grace_seconds:
            if self.announce:
                print(f"dslm-pretrain: second {name}: stopping at once without a checkpoint; resume from the last "
                      "one with --resume_from_checkpoint latest", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)


_launcher_pid = None  # set by stop_when_the_launcher_dies in a launched worker


def outlive_the_launchers_pipes() -> None:
    """If this worker's launcher has died, point stdout and stderr (possibly pipes only it read) at the null device, so
    that writing a message cannot raise BrokenPipeError (or block) in the middle of the final checkpoint."""
    if _launcher_pid is None or os.getppid() == _launcher_pid:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    for descriptor in (1, 2):
        os.dup2(null, descriptor)
    os.close(null)


class _StreamThatOutlivesItsReader:
    """sys.stdout/sys.stderr of a launched worker: a write or flush that meets a pipe whose reader (the launcher) has
    died points both descriptors at the null device and carries on, so a progress bar or log line written between the
    launcher's death and the SIGTERM it triggers cannot end the run without its checkpoint."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            outlive_the_launchers_pipes()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            outlive_the_launchers_pipes()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def stop_when_the_launcher_dies() -> None:
    """In a worker started by a launcher (Linux): have the kernel send SIGTERM when the launcher dies, which
    `StopSignals` turns into a checkpoint and a clean stop."""
    global _launcher_pid
    if not sys.platform.startswith("linux") or not any(name in os.environ for name in LAUNCHER_ENVIRONMENT):
        return
    launcher = _launcher_pid = os.getppid()
    if not isinstance(sys.stdout, _StreamThatOutlivesItsReader):
        sys.stdout, sys.stderr = _StreamThatOutlivesItsReader(sys.stdout), _StreamThatOutlivesItsReader(sys.stderr)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def write_report(folder: str, **report) -> bool:
    """Leave this rank's failure report for the launcher (atomically); False when no launcher will read it."""
    if _launcher_pid is not None and os.getppid() != _launcher_pid:
        return False
    path = Path(folder) / f"rank{os.environ.get('RANK', '0')}.json"
    try:
        write_text_atomically(path, json.dumps({**report, "time": time.time()}))
    except OSError:
        return False
    return True


@contextmanager
def failures_reported_to_the_launcher():
    """In a rank started by `launch_workers`: a user error or a crash becomes a report the launcher reads, and the rank
    exits quietly (2 for a user error, else 1). Outside `launch_workers`, or with DSLM_DEBUG set, nothing changes."""
    folder = os.environ.get(REPORTS_ENVIRONMENT)
    if folder is None or debug_requested([]):
        yield
        return
    try:
        yield
    except UserError as error:
        if not write_report(folder, user_error=str(error)):
            raise
        raise SystemExit(EXIT_USER_ERROR) from None
    except Exception:
        if not write_report(folder, traceback=traceback.format_exc()):
            raise
        raise SystemExit(1) from None


def read_reports(folder: Path) -> dict[int, dict]:
    reports = {}
    for path in folder.glob("rank*.json"):
        try:
            reports[int(path.stem.removeprefix("rank"))] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return reports


def cpu_process_group_environment(environment) -> dict:
    """What accelerate needs to join the ranks into one process group when the machine has no accelerator that can
    form one (none at all, or Apple's MPS): ACCELERATE_USE_CPU=true, for gloo on the CPU. Without it accelerate gives
    every rank a one-process run of its own, and the ranks train side by side, fighting over the run folder."""
    import torch

    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if device is not None and device.type != "mps":
        return {}
    value = environment.get("ACCELERATE_USE_CPU")
    if value is None:
        return {"ACCELERATE_USE_CPU": "true"}
    if value.strip().lower() not in TRUE_VALUES:
        raise UserError(f"ACCELERATE_USE_CPU={value} keeps the ranks off the CPU, and this machine has no accelerator "
                        "that can join processes into a group: unset ACCELERATE_USE_CPU to run --num_processes ranks "
                        "on the CPU (gloo)")
    return {}


def describe_outcome(workers, reports: dict[int, dict], signalled: list[set]) -> int:
    """Say once why the ranks failed, and return the exit status (0 when none did): a user error is raised as such
    (every rank usually meets it; a peer of the rank that did fails in a collective, which is no news); else a rank
    killed by a signal the launcher did not send (the out-of-memory killer, `kill`); else the first crash's traceback."""
    errors = [reports[rank]["user_error"] for rank in sorted(reports) if "user_error" in reports[rank]]
    if errors:
        raise UserError(errors[0])
    statuses = [128 - worker.returncode if worker.returncode < 0 else worker.returncode for worker in workers]
    for rank, worker in enumerate(workers):
        if worker.returncode < 0 and -worker.returncode not in signalled[rank]:
            print(f"dslm-pretrain: rank {rank} was killed by {signal.Signals(-worker.returncode).name} (not by "
                  "dslm-pretrain: the out-of-memory killer, a kill command or the scheduler); the other ranks were "
                  "stopped. Resume from the last checkpoint with --resume_from_checkpoint latest",
                  file=sys.stderr, flush=True)
            return statuses[rank]
    crashes = sorted((report["time"], rank) for rank, report in reports.items() if "traceback" in report)
    if crashes:
        rank = crashes[0][1]
        print(f"dslm-pretrain: rank {rank} failed (the other ranks were stopped):\n{reports[rank]['traceback']}",
              end="", file=sys.stderr, flush=True)
        return statuses[rank] or 1
    return 2 if EXIT_USER_ERROR in statuses else next((status for status in statuses if status), 0)


SHUTDOWN_GRACE_SECONDS = 60.0


def launch_workers(module: str, argv: list[str], num_processes: int, failure_grace_seconds: float = 10.0) -> int:
    """Run `python -m module *argv` as `num_processes` ranks of one process group on this machine and supervise them.

    SIGTERM/SIGINT sent to this process are forwarded to every rank (the workers run in their own session, so a
    terminal's Ctrl-C reaches them once, through here). When a rank fails, the others get SIGTERM, then SIGKILL
    after `failure_grace_seconds` (a rank blocked in a collective cannot act on SIGTERM). A rank's user error is
    raised here, once (UserError); a killed rank or a crash is described once on stderr (`describe_outcome`). Returns
    the exit status: the failure's (128 + signal for a killed rank), else 0.
    """
    with tempfile.TemporaryDirectory(prefix="dslm-pretrain-ranks-") as reports:
        return supervise(module, argv, num_processes, failure_grace_seconds, Path(reports))


def supervise(module: str, argv: list[str], num_processes: int, failure_grace_seconds: float, reports: Path) -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = {**os.environ, **cpu_process_group_environment(os.environ), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port), "WORLD_SIZE": str(num_processes), "LOCAL_WORLD_SIZE": str(num_processes),
              "DSLM_PRETRAIN_WORKER": "1", REPORTS_ENVIRONMENT: str(reports)}
    # The cores divided among the ranks (torchrun's rule) unless the user set OMP_NUM_THREADS: N ranks each taking
    # torch's default of every core oversubscribe the machine N-fold, which made small-model steps many times slower.
    common.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    workers = [subprocess.Popen([sys.executable, "-m", module, *argv], start_new_session=True,
                                env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)})
               for rank in range(num_processes)]
    signalled = [set() for _ in workers]  # the signals this launcher sent each rank

    def forward(signum, frame=None):
        for worker, sent in zip(workers, signalled):
            if worker.poll() is None:
                sent.add(signum)
                worker.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    finished_cleanly_at, stragglers = None, []
    try:
        failed_at = None
        while any(worker.poll() is None for worker in workers):
            if failed_at is None and any(worker.returncode not in (None, 0) for worker in workers):
                failed_at = time.monotonic()
                forward(signal.SIGTERM)
            elif failed_at is not None and time.monotonic() - failed_at > failure_grace_seconds:
                forward(signal.SIGKILL)
            if finished_cleanly_at is None and any(worker.returncode == 0 for worker in workers):
                finished_cleanly_at = time.monotonic()
            elif (finished_cleanly_at is not None and failed_at is None
                  and time.monotonic() - finished_cleanly_at > SHUTDOWN_GRACE_SECONDS):
                # Every rank leaves training at the same step (an all-reduce decides it) and writes the same
                # checkpoint; a rank still alive this long after a peer ended cleanly is stuck in its interpreter's
                # shutdown, not in training: end it rather than wait forever.
                stragglers = [rank for rank, worker in enumerate(workers) if worker.poll() is None]
                forward(signal.SIGKILL)
                for worker in workers:
                    worker.wait()
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stragglers:
        print(f"dslm-pretrain: rank(s) {stragglers} had not exited {SHUTDOWN_GRACE_SECONDS:.0f} s after another rank "
              "ended cleanly; they were killed (their work was already saved)", file=sys.stderr, flush=True)
        return 0
    return describe_outcome(workers, read_reports(reports), signalled)
