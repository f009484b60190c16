"""Starting JAX on several processes: `initialize()`, called first thing in the `main` of every program.

A run gets its processes in one of three ways, tried in this order:

1. Explicit (Kubernetes, manual launches, `launch/local.sh`): `--num_processes` > 1 with `--coordinator_address`
   (`host:port` of process 0, reachable from every process) and `--process_id` (0 .. num_processes - 1). Each flag
   falls back to an environment variable (`LM_NUM_PROCESSES`, `LM_COORDINATOR_ADDRESS`, `LM_PROCESS_ID`), so a
   Kubernetes pod template or a launcher can set them without touching the command. Every process uses all of its
   local devices.
2. Detected: a cluster environment that describes itself and has more than one process: Cloud TPU VM slices (the
   same command on every worker), SLURM (`srun` with several tasks), Open MPI (`mpirun`). JAX reads the addresses,
   the process count and this process's id from the environment (`jax.distributed.initialize()` without arguments).
   Under SLURM with one task per GPU, JAX gives each process the GPU numbered by its local task id.
3. Otherwise, one process: nothing to do.

Processes on CPU (tests, `launch/local.sh`) run their cross-process collectives over gloo.
"""

from __future__ import annotations

import os

from absl import flags, logging
import jax

from lm.errors import DistributedError

_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 for a multi-process run (else $LM_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a multi-process run (else $LM_NUM_PROCESSES; default 1).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id, 0 .. num_processes - 1 (else $LM_PROCESS_ID).")

# Cluster environments that JAX bootstraps from their own description (names of jax's cluster types). Kubernetes is
# left to the explicit flags: JAX's detection there queries the API server and needs extra permissions.
_SELF_DESCRIBING_CLUSTERS = ("gcetpu", "gketpu", "slurm", "ompi")


def _setting(flag: flags.FlagHolder, env: str) -> str | int | None:
    """The flag's value when given, else the environment variable's, else None (flags unparsed count as not given)."""
    value = flag.value if flags.FLAGS.is_parsed() else None
    return (os.environ.get(env) or None) if value is None else value


def _int_setting(flag: flags.FlagHolder, env: str) -> int | None:
    value = _setting(flag, env)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise DistributedError(f"${env}={value!r} must be an integer (it stands for --{flag.name})") from None
    return value


def detected_cluster() -> tuple[str, int] | None:
    """(name, process count) of the self-describing cluster this process runs in, or None outside one.

    Asks the same cluster detectors `jax.distributed.initialize()` uses; JAX has no public way to ask without
    initialising. Cheap outside clusters: each detector first checks environment variables or local files.
    """
    try:
        from jax._src import clusters
        cluster_types = clusters.ClusterEnv._cluster_types
    except (ImportError, AttributeError) as error:  # A JAX whose internals moved: say so rather than guess.
        logging.warning("cannot ask JAX for a cluster environment (%s); starting as a single process", error)
        return None
    for cluster in cluster_types:
        if cluster.name in _SELF_DESCRIBING_CLUSTERS and cluster.is_env_present():
            return cluster.name, cluster.get_process_count()
    return None


def initialize() -> None:
    """Joins this process to its multi-process run (module docstring); does nothing for a single process.

    Must run before anything touches a JAX backend (`jax.devices()`, any computation). Calling it again is a no-op.
    Raises `DistributedError` for inconsistent settings.
    """
    if jax.distributed.is_initialized():
        return
    num_processes = _int_setting(_NUM_PROCESSES, "LM_NUM_PROCESSES")
    coordinator_address = _setting(_COORDINATOR_ADDRESS, "LM_COORDINATOR_ADDRESS")
    process_id = _int_setting(_PROCESS_ID, "LM_PROCESS_ID")
    if num_processes is None and (coordinator_address is not None or process_id is not None):
        raise DistributedError("--coordinator_address and --process_id need --num_processes (the number of processes)")
    if num_processes is not None:
        if num_processes < 1:
            raise DistributedError(f"--num_processes must be at least 1, got {num_processes}")
        if num_processes > 1:
            if coordinator_address is None or not coordinator_address.rpartition(":")[2].isdigit():
                raise DistributedError(
                    f"--num_processes={num_processes} needs --coordinator_address=HOST:PORT (process 0's address), "
                    f"got {coordinator_address!r}")
            if process_id is None:
                raise DistributedError(f"--num_processes={num_processes} needs --process_id (0 .. {num_processes - 1})")
        if not 0 <= (process_id or 0) < num_processes:
            raise DistributedError(f"--process_id={process_id} must be in 0 .. {num_processes - 1} "
                                   f"(--num_processes={num_processes})")
        if num_processes == 1:
            return
        _use_gloo_on_cpu()
        # "deactivate": the explicit values are the whole truth; JAX's detection would otherwise narrow each process
        # to one GPU under SLURM (one process per node with all its GPUs is a valid explicit launch).
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   cluster_detection_method="deactivate")
        return
    cluster = detected_cluster()
    if cluster is not None and cluster[1] > 1:
        _use_gloo_on_cpu()
        jax.distributed.initialize(cluster_detection_method=cluster[0])


def _use_gloo_on_cpu() -> None:
    """CPU processes need a cross-process collectives implementation, chosen before the CPU backend starts."""
    platforms = jax.config.jax_platforms or ""
    if platforms.split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
