"""Session fixture `slurm_cluster`: a real single-node SLURM (tests/cluster/local-slurm.sh) for tests.

Use in tests/conftest.py:  ``from slurm_cluster import slurm_cluster  # noqa: F401`` (with
tests/cluster/ on sys.path, as conftest puts it).

Skips when not root or when the Debian packages cannot be installed, unless
HPC_BKD_REQUIRE_SLURM=1 (then it fails). HPC_BKD_SKIP_SLURM=1 skips on purpose.
The cluster is stopped (not purged) at session end only if this fixture started it.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().with_name("local-slurm.sh")  # the cluster itself, next to this file
START_TIMEOUT = float(os.environ.get("HPC_BKD_SLURM_START_TIMEOUT", "900"))  # apt included
CMD_TIMEOUT = 60.0  # any single sbatch/scontrol/sacct call
TERMINAL = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})
# variables of an outer allocation / MPI launcher that would confuse sbatch, srun or MPICH
_STRIP = re.compile(r"^(SLURM_|SBATCH_|SRUN_|SALLOC_|PMI_|PMIX_|HYDRA_|OMPI_)")
# sbatch options whose value is the next argument when given without "="
_TAKES_VALUE = {
    "-A", "-a", "-b", "-c", "-D", "-d", "-e", "-i", "-J", "-L", "-M", "-m", "-N", "-n", "-o",
    "-p", "-q", "-S", "-t", "-w", "-x", "-G", "--account", "--array", "--begin", "--chdir",
    "--comment", "--constraint", "--cpus-per-task", "--dependency", "--error", "--export",
    "--gres", "--gpus", "--input", "--job-name", "--mem", "--mem-per-cpu", "--nodes",
    "--ntasks", "--ntasks-per-node", "--output", "--partition", "--qos", "--signal", "--time",
    "--wrap", "--nodelist", "--exclude", "--time-min", "--distribution", "--licenses",
}


class SlurmJobTimeout(TimeoutError):
    """`SlurmCluster.wait` ran out of time; the job has been scancel'ed."""


def _job_env(extra: dict | None = None) -> dict:
    """os.environ without foreign SLURM/PMI variables, venv bin/ first on PATH (jobs inherit it
    through sbatch's default --export=ALL, so srun'd tasks find this python and its MPICH)."""
    env = {k: v for k, v in os.environ.items() if not _STRIP.match(k)}
    vbin = os.path.dirname(sys.executable)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != vbin]
    env["PATH"] = os.pathsep.join([vbin, *path, "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def _run_script(action: str, log: Path, timeout: float, script: Path = SCRIPT,
                env: dict | None = None) -> tuple[int, str]:
    """Run local-slurm.sh (or ``script``) ACTION with output to a file (never a pipe: daemons
    could inherit it) in its own process group, killed as a whole on timeout. Returns (rc, output)."""
    with open(log, "wb") as out:
        p = subprocess.Popen(["bash", str(script), *action.split()], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = 124
    return rc, log.read_text(errors="replace")


class SlurmCluster:
    """Handle on the running local cluster. Job ids are strings (as sbatch prints them)."""

    def __init__(self, state_dir: Path, partition: str, cpus: int, workdir: Path, started_here: bool):
        self.state_dir = state_dir      # HPC_BKD_SLURM_DIR (DB, logs under log/, pid files)
        self.partition = partition      # "debug", the default partition
        self.cpus = cpus                # CPUs the node declares (>= 4: srun -n 4 works)
        self.workdir = workdir          # per-session dir: job scripts and slurm-<id>.out logs
        self.started_here = started_here
        self.env = _job_env()           # environment sbatch & co. run with (and jobs inherit)
        self.start_seconds = 0.0        # how long the fixture's `start` took
        self._out: dict[str, Path] = {}
        self._nscripts = 0

    # -- plain commands -------------------------------------------------------------------
    def run(self, *cmd: str, env: dict | None = None, check: bool = True,
            timeout: float = CMD_TIMEOUT, cwd: str | os.PathLike | None = None
            ) -> subprocess.CompletedProcess:
        """Run a command (e.g. "squeue", "-h") with the cluster env; text output captured."""
        e = dict(self.env, **{k: str(v) for k, v in (env or {}).items()})
        return subprocess.run(list(cmd), env=e, check=check, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, cwd=cwd)

    # -- jobs -------------------------------------------------------------------------------
    def sbatch(self, script: str | os.PathLike | None, *args: str, env: dict | None = None,
               cwd: str | os.PathLike | None = None) -> str:
        """Submit and return the job id.

        script: a path to a batch script (relative to cwd), the text of one (starts with "#!"),
        or None when args carry --wrap. args: extra sbatch options, e.g. "-n", "2", "--wrap",
        "hostname". Defaults added unless given: --partition, --time=5 (minutes; never
        unbounded), --output=<workdir>/slurm-%j.out (stdout+stderr; see `output`).
        env: variables added to the job's environment (on top of `self.env`).
        cwd: where sbatch runs = the job's working directory (default: `workdir`).
        """
        opts = [str(a) for a in args]
        flags, skip = set(), False
        for a in opts:  # option names given, ignoring option values such as --wrap's command
            if skip or not a.startswith("-"):
                skip = False
                continue
            name = a.split("=", 1)[0] if a.startswith("--") else a[:2]
            flags.add(name)
            skip = "=" not in a and (a.startswith("--") or len(a) == 2) and name in _TAKES_VALUE
        pre = ["--parsable"]
        if not flags & {"-p", "--partition"}:
            pre.append(f"--partition={self.partition}")
        if not flags & {"-t", "--time"}:
            pre.append("--time=5")
        if not flags & {"-o", "--output"}:
            pre.append(f"--output={self.workdir}/slurm-%j.out")
        cmd = ["sbatch", *pre, *opts]
        if script is not None:
            if isinstance(script, str) and script.startswith("#!"):
                self._nscripts += 1
                path = self.workdir / f"job-{self._nscripts}.sh"
                path.write_text(script)
                script = path
            cmd.append(str(script))
        cwd = Path(cwd or self.workdir)
        r = self.run(*cmd, env=env, check=False, cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {shlex.join(cmd)}\n{r.stderr}")
        job_id = r.stdout.strip().split(";")[0]
        out = self._output_option(opts)
        if out:
            out = out.replace("%j", job_id).replace("%A", job_id)
            self._out[job_id] = cwd / out
        return job_id

    @staticmethod
    def _output_option(opts: list[str]) -> str | None:
        for i, a in enumerate(opts):
            if a in ("-o", "--output") and i + 1 < len(opts):
                return opts[i + 1]
            if a.startswith("--output="):
                return a.split("=", 1)[1]
            if a.startswith("-o") and len(a) > 2:
                return a[2:]
        return None

    def output_path(self, job_id: str) -> Path:
        return self._out.get(str(job_id), self.workdir / f"slurm-{job_id}.out")

    def output(self, job_id: str) -> str:
        """The job's output file ("" while it does not exist)."""
        p = self.output_path(job_id)
        return p.read_text(errors="replace") if p.exists() else ""

    def state(self, job_id: str) -> str:
        """Current state word, e.g. PENDING, RUNNING, COMPLETED, CANCELLED ("UNKNOWN" if neither
        slurmctld nor sacct know the job). slurmctld first (exact while the job is in memory,
        MinJobAge=300 s), then sacct."""
        r = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        m = re.search(r"\bJobState=(\S+)", r.stdout)
        if r.returncode == 0 and m:
            return m.group(1)
        return self.sacct_state(job_id) or "UNKNOWN"

    def sacct_state(self, job_id: str) -> str | None:
        """State of the job's allocation as accounting (sacct) has it, e.g. "CANCELLED"
        (sacct's "CANCELLED by 0" is cut to its first word); None if not recorded yet."""
        r = self.run("sacct", "-X", "-n", "-P", "-o", "State", "-j", str(job_id), check=False)
        words = r.stdout.split()
        return words[0].rstrip("+") if r.returncode == 0 and words else None

    def wait(self, job_id: str, timeout: float = 60.0, until: frozenset[str] | set[str] = TERMINAL,
             poll: float = 0.2) -> str:
        """Poll until the job's state is in `until` (default: any final state) and return it.
        After `timeout` seconds: scancel the job and raise SlurmJobTimeout with its output tail."""
        deadline = time.monotonic() + timeout
        st = "UNKNOWN"
        while time.monotonic() < deadline:
            st = self.state(job_id)
            if st in until:
                return st
            if st in TERMINAL:  # ended, but not in a state we wait for
                break
            time.sleep(poll)
        self.cancel(job_id)
        tail = "\n".join(self.output(job_id).splitlines()[-30:])
        why = "timed out" if st not in TERMINAL else f"ended as {st}"
        raise SlurmJobTimeout(
            f"job {job_id} {why} after {timeout:.0f}s waiting for {sorted(until)} (last state {st});"
            f" output {self.output_path(job_id)}:\n{tail}")

    def cancel(self, job_id: str, *args: str) -> None:
        self.run("scancel", *args, str(job_id), check=False)


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("HPC_BKD_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM required (HPC_BKD_REQUIRE_SLURM=1) but: {reason}", pytrace=False)
    pytest.skip(f"no local SLURM: {reason}")


def _script_env() -> dict:
    r = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True, timeout=30)
    return dict(re.findall(r"^export (\w+)=(.*)$", r.stdout, re.M))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Start (or reuse) the local cluster; yields a SlurmCluster."""
    if os.environ.get("HPC_BKD_SKIP_SLURM") == "1":
        pytest.skip("HPC_BKD_SKIP_SLURM=1")
    if not hasattr(os, "geteuid"):
        _fail_or_skip("not a POSIX system")
    if not Path("/usr/bin/apt-get").exists() and not Path("/usr/sbin/slurmctld").exists():
        _fail_or_skip("no apt-get to install SLURM with (Debian/Ubuntu only)")
    work = tmp_path_factory.mktemp("slurm")
    conf = _script_env()
    up = _run_script("status", work / "status.log", 30)[0] == 0
    if not up and os.geteuid() != 0:
        _fail_or_skip("not running, and local-slurm.sh start needs root")
    t0 = time.monotonic()
    if up and os.geteuid() != 0:
        rc, out = 0, ""  # someone else's running cluster: use it as it is
    else:  # idempotent: ~0.5 s when up, seconds from stopped, + apt on a bare machine
        rc, out = _run_script("start", work / "start.log", START_TIMEOUT)
    if rc in (3, 4):  # not root / packages not installable
        _fail_or_skip(f"local-slurm.sh start exited {rc}:\n{out[-2000:]}")
    if rc != 0:
        what = f"timed out after {START_TIMEOUT:.0f}s" if rc == 124 else f"exited {rc}"
        pytest.fail(f"tests/cluster/local-slurm.sh start {what}:\n{out[-4000:]}", pytrace=False)
    cluster = SlurmCluster(Path(conf["HPC_BKD_SLURM_DIR"]), conf["HPC_BKD_SLURM_PARTITION"],
                           int(conf["HPC_BKD_SLURM_CPUS"]), work, started_here=not up)
    cluster.start_seconds = time.monotonic() - t0
    try:
        yield cluster
    finally:
        if cluster.started_here:
            _run_script("stop", work / "stop.log", 120)


def hard_timeout(seconds: float):
    """Per-test hard timeout on the test body: pytest-timeout's mark when installed (func_only,
    so a cold cluster start in the session fixture, bounded by HPC_BKD_SLURM_START_TIMEOUT, does
    not count), else SIGALRM."""
    try:
        import pytest_timeout  # noqa: F401
        return pytest.mark.timeout(seconds, func_only=True)
    except ImportError:
        pass
    import functools

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            def on_alarm(signum, frame):
                raise TimeoutError(f"{fn.__name__} exceeded its hard timeout of {seconds}s")
            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                return fn(*a, **kw)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
        return wrapper
    return deco
