"""Multi-host start for both CLIs: flags or environment -> jax.distributed, plus a watchdog.

Every host of a pod slice runs the same command. `--distributed` lets JAX find the cluster itself
(TPU VMs, SLURM, Open MPI); `--coordinator/--num-processes/--process-id` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) name it explicitly.

JAX alone turns a dead peer into a hang: a survivor waits in a collective or a barrier until the
coordination service's heartbeat timeout (100 s by default) and then aborts with a screen of logs.
So each process also runs a watchdog thread that beats in the coordination service's key-value
store and watches its peers' beats and an error key: when a peer stops beating for
`--distributed-timeout` seconds, the coordinator vanishes, or a peer reports an error, every process
prints one `error: ...` line and exits 1. A failing process publishes its error before exiting, so
its peers say what went wrong instead of only that something did.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from jaxvocab.errors import UsageError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
BEAT_S = 0.5
ERROR_KEY = "jaxvocab/error"


def add_args(p) -> None:
    g = p.add_argument_group("multi-host (run the same command on every host)")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-host job, auto-detected by jax.distributed.initialize() (TPU VM, SLURM, MPI)",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the job (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (env JAX_PROCESS_ID)")
    g.add_argument(
        "--distributed-timeout",
        type=int,
        default=60,
        metavar="S",
        help="seconds without a sign of life from a peer before the whole job stops (default 60)",
    )


def _resolve(args) -> dict | None:
    """The explicit values (flags over environment), or None when this is a single-process run."""
    env = {k: os.environ.get(k) for k in ENV}
    coord = args.coordinator or env["JAX_COORDINATOR_ADDRESS"]
    n = args.num_processes if args.num_processes is not None else env["JAX_NUM_PROCESSES"]
    pid = args.process_id if args.process_id is not None else env["JAX_PROCESS_ID"]
    explicit = any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    if not (args.distributed or explicit):
        return None
    try:
        n = int(n) if n is not None else None
        pid = int(pid) if pid is not None else None
    except ValueError:
        raise UsageError("JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers") from None
    if args.distributed_timeout < 1:
        raise UsageError(f"--distributed-timeout {args.distributed_timeout}: must be at least 1 second")
    if explicit or n is not None or pid is not None:
        missing = [f for f, v in (("--coordinator", coord), ("--num-processes", n), ("--process-id", pid)) if v is None]
        if missing:
            raise UsageError(
                f"{', '.join(missing)} missing: pass all of --coordinator HOST:PORT --num-processes N "
                "--process-id I (or their JAX_* variables), or only --distributed to auto-detect"
            )
        if n < 1 or not 0 <= pid < n:
            raise UsageError(f"--process-id {pid} / --num-processes {n}: need 0 <= process-id < num-processes")
        if ":" not in coord:
            raise UsageError(f"--coordinator {coord!r}: expected HOST:PORT")
    return {"coordinator_address": coord, "num_processes": n, "process_id": pid}


def start(args) -> bool:
    """Join the job the flags/environment describe; True when this is a multi-process run."""
    spec = _resolve(args)
    if spec is None:
        return False
    import jax

    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    timeout = args.distributed_timeout
    try:
        # JAX's own heartbeat is the backstop; the watchdog, at `timeout`, fires first with one line.
        jax.distributed.initialize(
            **{k: v for k, v in spec.items() if v is not None},
            initialization_timeout=max(timeout, 30),
            heartbeat_timeout_seconds=2 * timeout + 10,
            shutdown_timeout_seconds=timeout,
        )
    except (RuntimeError, ValueError) as e:
        raise UsageError(
            f"--distributed: could not join the job ({str(e).splitlines()[0]}); pass --coordinator "
            "HOST:PORT --num-processes N --process-id I"
        ) from None
    if jax.process_count() > 1:
        Watchdog.start(timeout)
    return True


def run_job(command, interrupted: str) -> int:
    """`run_command` for a command that may join a job: a failure on this process stops every process
    (one `error:` line each, the failing one's message); success leaves the job together."""
    from jaxvocab.errors import run_command

    failure = []

    def guarded():
        try:
            command()
        except BaseException as e:
            failure.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise

    try:
        code = run_command(guarded, interrupted)
    except BaseException:
        if Watchdog.current is None:
            raise
        # In a job an unexpected failure is mostly a collective broken by a dead peer: one line, stop all.
        failure[0] = f"{failure[0]} (a peer process may have died; {interrupted})"
        print(f"error: {failure[0]}", file=sys.stderr)
        fail(failure[0])
        raise
    if failure:
        fail(failure[0], code)  # peers stop too, with this message; never returns in a job
    elif code == 0:
        finish()
    return code


def is_main() -> bool:
    import jax

    return jax.process_index() == 0


def say(*a, **kw) -> None:
    """print() on process 0 only: one summary per job, not one per host."""
    if is_main():
        print(*a, **kw)


def fail(message: str, code: int = 1) -> None:
    """Tell the peers this process failed (they print it and stop), then leave without JAX's shutdown
    barrier, which would wait for peers that are stuck waiting for us."""
    dog = Watchdog.current
    if dog is None:
        return
    import jax

    dog.stopped.set()  # our own beat thread must not report our error a second time
    with contextlib.suppress(Exception):  # the coordinator may already be gone; exiting is all that is left
        dog.client.key_value_set(ERROR_KEY, f"process {jax.process_index()}: {message}", allow_overwrite=True)
    if jax.process_index() == 0:
        time.sleep(4 * BEAT_S)  # the coordination service lives here: let the peers read the error first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def finish() -> None:
    """Normal end: meet every peer (still watched), then stop watching and leave the job."""
    dog = Watchdog.current
    if dog is None:
        return
    dog.client.wait_at_barrier("jaxvocab/finish", dog.timeout * 1000 + 60_000)
    dog.stop()
    import jax

    jax.distributed.shutdown()


class Watchdog:
    """Beats in the key-value store; ends the process with one line when the job is broken."""

    current: Watchdog | None = None

    def __init__(self, client, me: int, n: int, timeout: int):
        self.client, self.me, self.n, self.timeout = client, me, n, timeout
        self.stopped = threading.Event()
        self.last_ok = time.monotonic()
        self.seen = {p: (None, time.monotonic()) for p in range(n) if p != me}

    @classmethod
    def start(cls, timeout: int) -> None:
        import jax
        from jax._src import distributed as jd

        dog = cls(jd.global_state.client, jax.process_index(), jax.process_count(), timeout)
        cls.current = dog
        threading.Thread(target=dog._beat, name="jaxvocab-beat", daemon=True).start()
        threading.Thread(target=dog._judge, name="jaxvocab-watchdog", daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        Watchdog.current = None

    def _beat(self) -> None:
        count = 0
        while not self.stopped.is_set():
            count += 1
            # An RPC error means the coordinator is gone: last_ok stops advancing and the judge decides.
            with contextlib.suppress(Exception):
                self.client.key_value_set(f"jaxvocab/alive/{self.me}", str(count), allow_overwrite=True)
                err = self._try_get(ERROR_KEY)
                if err is not None:
                    self._die(f"{err} (stopping this process too)")
                now = time.monotonic()
                for p, (old, _) in self.seen.items():
                    beat = self._try_get(f"jaxvocab/alive/{p}")
                    if beat != old:
                        self.seen[p] = (beat, now)
                self.last_ok = now
            self.stopped.wait(BEAT_S)

    def _try_get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as e:
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def _judge(self) -> None:
        while not self.stopped.wait(BEAT_S):
            now = time.monotonic()
            if now - self.last_ok > self.timeout:
                self._die(
                    f"lost contact with the coordinator (process 0) for {self.timeout} s; it died or the "
                    "network failed. Rerun with --resume to continue from the last checkpoint"
                )
            for p, (_, since) in self.seen.items():
                if now - since > self.timeout:
                    self._die(
                        f"process {p} gave no sign of life for {self.timeout} s (killed or hung); stopping "
                        "the job. Rerun with --resume to continue from the last checkpoint"
                    )

    def _die(self, message: str) -> None:
        if self.stopped.is_set():
            return
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
