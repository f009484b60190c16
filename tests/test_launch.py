"""Multi-process runs: lm.distributed, the default multi-host mesh, and the launch/ scripts.

The multi-process tests start real local processes (CPU, gloo collectives, a free port on 127.0.0.1) through the
launch scripts, with stand-ins for SLURM's `srun` and `scontrol`; launch/tpu_pod.sh runs end to end against a
stand-in `gcloud` and fake TPU workers (directories); every run has a timeout.
"""

import json
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from conftest import environment
from lm import config as lm_config
from lm import distributed
from lm import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/slurm.sbatch", "launch/gpu_check.sh"]

# Joins the run, builds the default mesh, gathers every process's index; each process prints its line and writes it
# to $PROBE_OUT/<index>.txt (the processes share one stdout, where gloo's messages can land mid-line).
PROBE = textwrap.dedent("""\
    import os

    from absl import app
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from lm import config as lm_config, distributed, sharding


    def main(argv):
        distributed.initialize()
        distributed.initialize()  # A second call is a no-op.
        mesh = sharding.make_mesh(lm_config.base_config().mesh)
        owners = np.vectorize(lambda d: d.process_index)(mesh.devices)[:, :, 0, 0].tolist()
        gathered = multihost_utils.process_allgather(np.array([jax.process_index()])).ravel().tolist()
        line = (f"process {jax.process_index()}/{jax.process_count()} mesh {dict(mesh.shape)} owners {owners} "
                f"gathered {gathered}")
        print(line)
        with open(os.path.join(os.environ["PROBE_OUT"], f"{jax.process_index()}.txt"), "w") as f:
            f.write(line)


    app.run(main)
    """)


def run(args, env=None, timeout=120):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return str(path)


def cpu_env(devices_per_process, probe_out):
    """The environment of a child process: this Python's directory first, CPU devices, lm importable, and where the
    probe writes its lines."""
    return {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}", "PYTHONPATH": ROOT,
            "PROBE_OUT": str(probe_out)}


def assert_two_processes_formed_one_run(probe_out, output):
    """Two processes of two devices: the data axis across them, fsdp within each, a collective across both."""
    lines = [(probe_out / f"{i}.txt").read_text() if (probe_out / f"{i}.txt").exists() else None for i in range(2)]
    assert lines == [f"process {i}/2 mesh {{'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 1}} owners [[0, 0], [1, 1]] "
                     f"gathered [0, 1]" for i in range(2)], output


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_parses_and_prints_usage_without_gcloud_or_slurm(script):
    assert run(["bash", "-n", script]).returncode == 0
    usage = run(["bash", script, "--help"], env={"PATH": "/usr/bin:/bin"})
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith("Usage: ") and "Example" in usage.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_passes_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (CI installs it: .ci/run)")
    check = run(["shellcheck", script])
    assert check.returncode == 0, check.stdout


def test_local_sh_runs_one_two_process_run(probe, tmp_path):
    result = run(["launch/local.sh", "--processes=2", "--devices_per_process=2", "--", "python", probe],
                 env=cpu_env(1, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_two_processes_formed_one_run(tmp_path, result.stdout)
    assert "[0] " in result.stdout and "[1] " in result.stdout


def test_local_sh_stops_the_others_and_exits_with_the_failure(tmp_path):
    script = tmp_path / "fail_or_wait.py"
    script.write_text("import sys, time\n"
                      "if '--process_id=1' in sys.argv: sys.exit(3)\n"
                      "time.sleep(60)\n")
    result = run(["launch/local.sh", "--processes=3", "--", sys.executable, str(script)], timeout=30)
    assert result.returncode == 3
    assert "a process exited with status 3; stopping the others" in result.stderr


def test_local_sh_rejects_bad_options_in_one_line():
    result = run(["launch/local.sh", "--processes=two", "--", "true"])
    assert result.returncode == 2 and result.stderr == "local.sh: expected a positive integer, got 'two'\n"


def fake_slurm(tmp_path, *, nodes, tasks):
    """`srun` and `scontrol` stand-ins on PATH and the variables sbatch sets: srun starts `tasks` local processes
    with the per-task variables, every node is 127.0.0.1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        while [[ "$1" == --* ]]; do shift; done
        pids=()
        for ((i = 0; i < SLURM_NTASKS; i++)); do
          SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" &
          pids+=("$!")
        done
        status=0
        for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
        exit "$status"
        """))
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    env = cpu_env(2, tmp_path)
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="127.0.0.1",
               SLURM_NNODES=str(nodes), SLURM_NTASKS=str(tasks), JAX_COORDINATOR_PORT=str(free_port()))
    return env


def test_slurm_script_one_process_per_node_passes_the_run_to_lm_distributed(tmp_path, probe):
    result = run(["bash", "launch/slurm.sbatch", "python", probe], env=fake_slurm(tmp_path, nodes=2, tasks=2))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_two_processes_formed_one_run(tmp_path, result.stdout)


def test_slurm_script_one_process_per_gpu_is_detected_by_jax(tmp_path, probe):
    result = run(["bash", "launch/slurm.sbatch", "python", probe], env=fake_slurm(tmp_path, nodes=1, tasks=2))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_two_processes_formed_one_run(tmp_path, result.stdout)


def test_slurm_xla_flags_are_known_to_this_jaxlib():
    """XLA aborts on a flag it does not know: a renamed flag would stop every GPU run at start."""
    exports = run(["bash", "launch/slurm.sbatch", "--print_env"])
    assert exports.returncode == 0
    env = dict(line.removeprefix("export ").split("=", 1) for line in exports.stdout.splitlines())
    xla_flags = env["XLA_FLAGS"].replace("\\ ", " ")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla_flags
    check = run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                env={"XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"})
    assert check.returncode == 0 and check.stdout == "3.0\n", check.stderr[-2000:]


def _sizes(data, fsdp, tensor):
    """`mesh_shape`'s answer: (ICI, DCN) sizes of each axis, `expert` unused (1, 1)."""
    return {"data": data, "fsdp": fsdp, "expert": (1, 1), "tensor": tensor}


def test_default_mesh_puts_hosts_on_the_data_axis():
    mesh = lm_config.base_config().mesh  # data=1, fsdp=-1, tensor=1, dcn_* = 1
    assert sharding.mesh_shape(mesh, 8) == _sizes((1, 1), (8, 1), (1, 1))
    # Two hosts of 8: data crosses them, fsdp stays inside each.
    assert sharding.mesh_shape(mesh, 16, granules=2) == _sizes((1, 2), (8, 1), (1, 1))
    # One device per process (one process per GPU): no host structure to exploit, sizes as given.
    assert sharding.mesh_shape(mesh, 16, granules=16) == _sizes((1, 1), (16, 1), (1, 1))
    explicit = lm_config.base_config().mesh
    explicit.update(data=2, fsdp=4, tensor=2)  # Per-host sizes: 2 hosts of 16.
    assert sharding.mesh_shape(explicit, 32, granules=2) == _sizes((2, 2), (4, 1), (2, 1))
    explicit.update(data=2, fsdp=8, tensor=2)  # Sizes of the whole run are taken as given.
    assert sharding.mesh_shape(explicit, 32, granules=2) == _sizes((2, 1), (8, 1), (2, 1))
    explicit.update(data=1, fsdp=-1, tensor=1, dcn_fsdp=2)  # dcn_* given: followed.
    assert sharding.mesh_shape(explicit, 16, granules=2) == _sizes((1, 1), (8, 2), (1, 1))


@pytest.mark.parametrize("env,message", [
    ({"LM_NUM_PROCESSES": "2"}, "--num_processes=2 needs --coordinator_address=HOST:PORT"),
    ({"LM_NUM_PROCESSES": "2", "LM_COORDINATOR_ADDRESS": "10.0.0.1"}, "needs --coordinator_address=HOST:PORT"),
    ({"LM_NUM_PROCESSES": "2", "LM_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "needs --process_id"),
    ({"LM_NUM_PROCESSES": "2", "LM_COORDINATOR_ADDRESS": "10.0.0.1:1234", "LM_PROCESS_ID": "2"},
     r"--process_id=2 must be in 0 \.\. 1"),
    ({"LM_NUM_PROCESSES": "two"}, r"\$LM_NUM_PROCESSES='two' must be an integer"),
    ({"LM_PROCESS_ID": "1"}, "need --num_processes"),
    ({"LM_NUM_PROCESSES": "0"}, "must be at least 1"),
])
def test_inconsistent_process_settings_fail_in_one_line(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.DistributedError, match=message) as error:
        distributed.initialize()
    assert "\n" not in str(error.value)


def test_single_process_settings_and_a_one_task_slurm_job_start_nothing(monkeypatch):
    monkeypatch.setenv("LM_NUM_PROCESSES", "1")
    distributed.initialize()
    monkeypatch.delenv("LM_NUM_PROCESSES")
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node001", "SLURM_NTASKS": "1",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.detected_cluster() == ("slurm", 1)
    distributed.initialize()
    assert not jax.distributed.is_initialized()


def test_no_cluster_is_detected_on_a_plain_machine(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_")):
            monkeypatch.delenv(name)
    assert distributed.detected_cluster() is None


# A `gcloud` stand-in for launch/tpu_pod.sh: every call is appended to $GCLOUD_LOG as one JSON list of its
# arguments. `tpu-vm describe` prints $FAKE_TPU_STATE (absent: the TPU VM does not exist, exit 1, as gcloud does);
# `tpu-vm scp --worker=all` copies the file into the home of every fake worker ($FAKE_WORKERS, one directory per
# worker) and `tpu-vm ssh --worker=all --command=CMD` runs CMD with bash in each of them (HOME = that directory), so
# the remote commands are really evaluated by a shell, quoting included.
FAKE_GCLOUD = textwrap.dedent("""\
    import json, os, shutil, subprocess, sys

    args = sys.argv[1:]
    with open(os.environ["GCLOUD_LOG"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    if args[:3] != ["compute", "tpus", "tpu-vm"]:
        sys.exit(f"fake gcloud: unexpected command {args}")
    verb, options = args[3], [a for a in args[4:] if a.startswith("--")]
    workers = os.environ["FAKE_WORKERS"].split(os.pathsep)
    if verb == "describe":
        if "FAKE_TPU_STATE" not in os.environ:
            sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
        print(os.environ["FAKE_TPU_STATE"])
    elif verb == "scp":
        assert "--worker=all" in options, args
        source, target = [a for a in args[4:] if not a.startswith("--")]
        for home in workers:
            shutil.copy(source, os.path.join(home, target.split(":", 1)[1]))
    elif verb == "ssh":
        assert "--worker=all" in options, args
        command = [a for a in options if a.startswith("--command=")][0].removeprefix("--command=")
        for home in workers:
            status = subprocess.run(["bash", "-c", command], cwd=home, env={**os.environ, "HOME": home}).returncode
            if status:
                sys.exit(status)
    elif verb != "create":
        sys.exit(f"fake gcloud: unexpected command {args}")
    """)

# A worker's environment: `~/lm/.venv/bin/{activate,python,pip}` stand-ins; python and pip append their arguments
# (one JSON list per call) to ~/python.log and ~/pip.log. `python3.11` on PATH so the setup finds an interpreter.
FAKE_TOOL = "#!{python}\nimport json, os, sys\nwith open(os.path.expanduser('~/{name}.log'), 'a') as f:\n" \
            "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"


def fake_tpu_pod(tmp_path, workers=2, state=None):
    """The environment for running launch/tpu_pod.sh against a fake gcloud and `workers` fake TPU workers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    (bin_dir / "python3.11").write_text(FAKE_TOOL.format(python=sys.executable, name="python3.11"))
    for tool in ("gcloud", "python3.11"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    homes = []
    for i in range(workers):
        venv = tmp_path / f"worker{i}" / "lm" / ".venv" / "bin"
        venv.mkdir(parents=True)
        (venv / "activate").write_text('PATH="$HOME/lm/.venv/bin:$PATH"\n')
        for name in ("python", "pip"):
            (venv / name).write_text(FAKE_TOOL.format(python=sys.executable, name=name))
            (venv / name).chmod(stat.S_IRWXU)
        homes.append(tmp_path / f"worker{i}")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GCLOUD_LOG": str(tmp_path / "gcloud.log"),
           "FAKE_WORKERS": os.pathsep.join(map(str, homes))}
    if state is not None:
        env["FAKE_TPU_STATE"] = state
    return env, homes


def json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


TRAIN = ["python", "-m", "lm.train", "--config=configs/llama_8b.py", "--workdir=gs://my-bucket/runs/llama8b",
         "--config.optim.learning_rate=1e-4", "--config.model.norm=layernorm",
         "--config.data.files=/data/my corpus/*.jsonl"]  # A space and a glob: quoting must survive the remote shell.


def test_tpu_pod_creates_copies_installs_and_runs_the_command_on_every_worker(tmp_path):
    env, homes = fake_tpu_pod(tmp_path)
    result = run(["bash", "launch/tpu_pod.sh", "--name=lm-v5p", "--zone=us-east5-a", "--accelerator_type=v5p-64",
                  "--project=my-project", "--spot", "--", *TRAIN], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "creating TPU VM lm-v5p (v5p-64, v2-alpha-tpuv5) in us-east5-a" in result.stderr
    calls = json_lines(tmp_path / "gcloud.log")
    tpu_vm, where = ["compute", "tpus", "tpu-vm"], ["--zone=us-east5-a", "--project=my-project"]
    assert [call[3] for call in calls] == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
    assert all(call[:3] == tpu_vm for call in calls)
    describe, create, scp, extract, install, train = calls
    assert describe == tpu_vm + ["describe", "lm-v5p", *where, "--format=value(state)"]
    assert create == tpu_vm + ["create", "lm-v5p", *where, "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5",
                               "--spot"]
    assert scp[4].endswith("/lm.tar.gz") and scp[5:] == ["lm-v5p:lm.tar.gz", *where, "--worker=all"]
    for ssh in (extract, install, train):
        assert ssh[5:8] == [*where, "--worker=all"] and ssh[8].startswith("--command=") and len(ssh) == 9
    assert "tar -xzf ~/lm.tar.gz -C ~/lm" in extract[8]
    assert ".venv/bin/pip install -q -e '.[tpu]'" in install[8]
    assert train[8].startswith("--command=cd ~/lm && . .venv/bin/activate && python -m lm.train "
                               "--config=configs/llama_8b.py --workdir=gs://my-bucket/runs/llama8b "
                               "--config.optim.learning_rate=1e-4 --config.model.norm=layernorm ")
    for home in homes:
        # The checkout arrived (what git tracks or does not ignore: not this machine's .venv) and the archive is gone.
        with open(os.path.join(ROOT, "launch/tpu_pod.sh")) as script:
            assert (home / "lm" / "launch" / "tpu_pod.sh").read_text() == script.read()
        assert (home / "lm" / "lm" / "train.py").exists() and not (home / "lm.tar.gz").exists()
        assert not (home / "lm" / ".venv" / "pyvenv.cfg").exists()
        assert json_lines(home / "pip.log") == [["install", "-q", "--upgrade", "pip"],
                                                ["install", "-q", "-e", ".[tpu]"]]
        # The worker's shell ran exactly the command given, every argument intact.
        assert json_lines(home / "python.log") == [TRAIN[1:]]


def test_tpu_pod_on_a_ready_vm_with_skip_setup_only_runs_the_command(tmp_path):
    env, homes = fake_tpu_pod(tmp_path, state="READY")
    result = run(["bash", "launch/tpu_pod.sh", "--name=my-tpu", "--zone=europe-west4-a", "--skip_setup", "--",
                  *TRAIN[:6]], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    tpu_vm = ["compute", "tpus", "tpu-vm"]
    assert json_lines(tmp_path / "gcloud.log") == [
        tpu_vm + ["describe", "my-tpu", "--zone=europe-west4-a", "--format=value(state)"],
        tpu_vm + ["ssh", "my-tpu", "--zone=europe-west4-a", "--worker=all",
                  "--command=cd ~/lm && . .venv/bin/activate && python -m lm.train --config=configs/llama_8b.py "
                  "--workdir=gs://my-bucket/runs/llama8b --config.optim.learning_rate=1e-4 "]]
    for home in homes:
        assert json_lines(home / "python.log") == [TRAIN[1:6]]
        assert not (home / "pip.log").exists()


def test_tpu_pod_detach_starts_the_command_under_nohup_logging_to_run_log(tmp_path):
    env, homes = fake_tpu_pod(tmp_path, state="READY")
    result = run(["bash", "launch/tpu_pod.sh", "--name=my-tpu", "--zone=z", "--skip_setup", "--detach", "--", *TRAIN],
                 env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started on every worker of my-tpu; output in ~/lm/run.log there" in result.stderr
    ssh = json_lines(tmp_path / "gcloud.log")[-1]
    assert ssh[3:7] == ["ssh", "my-tpu", "--zone=z", "--worker=all"] and "nohup bash -c" in ssh[7]
    assert "> ~/lm/run.log 2>&1 < /dev/null &" in ssh[7]
    for home in homes:  # The background command finishes on its own; wait for it to have run.
        for _ in range(100):
            if (home / "python.log").exists() and (home / "lm" / "run.log").exists():
                break
            time.sleep(0.1)
        assert json_lines(home / "python.log") == [TRAIN[1:]]
        assert (home / "lm" / "run.log").exists()


@pytest.mark.parametrize("args,state,message,gcloud_calls", [
    (["--name=t", "--zone=z", "--", "python", "-m", "lm.train", "--workdir=workdirs/local"], "READY",
     "--workdir=workdirs/local: the workers share no disk, use a bucket", 0),
    (["--name=t", "--zone=z", "--", "python", "-m", "lm.train", "--workdir=gs://b/r"], None,
     "TPU VM t does not exist in z: give --accelerator_type to create it", 1),
    (["--name=t", "--zone=z", "--", "python", "-m", "lm.train", "--workdir=gs://b/r"], "CREATING",
     "TPU VM t is CREATING, not READY", 1),
], ids=["local_workdir", "missing_vm_without_type", "vm_not_ready"])
def test_tpu_pod_stops_before_touching_workers(tmp_path, args, state, message, gcloud_calls):
    env, homes = fake_tpu_pod(tmp_path, state=state)
    result = run(["bash", "launch/tpu_pod.sh", *args], env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    calls = json_lines(tmp_path / "gcloud.log")
    assert len(calls) == gcloud_calls and all(call[3] == "describe" for call in calls)
    assert not any((home / "python.log").exists() for home in homes)


def test_gpu_check_smoke_runs_every_section_and_writes_its_figures(tmp_path):
    """launch/gpu_check.sh --smoke: the GPU check's logic at tiny shapes on the CPU (one device, compiled as the
    suite's lm programs are: it is mostly compiling)."""
    out = tmp_path / "out"
    result = run(["bash", "launch/gpu_check.sh", "--smoke", f"--out={out}"], timeout=600, env=environment())
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["environment"]["smoke"] and results["environment"]["jax"] == jax.__version__
    sections = results["sections"]
    assert sorted(sections) == ["attention", "decode", "loss", "train"]
    assert all("error" not in content for content in sections.values()), sections
    train = {row["model"]: row for row in sections["train"]["rows"]}
    assert sorted(train) == ["gpt2_124m", "llama_1b"]
    assert all(row["tokens_per_second"] > 0 and 0 < row["mfu"] < 1 and row["compiled_bytes"] > 0
               for row in train.values())
    loss = sections["loss"]["rows"][0]
    assert loss["ratio"] > 0 and loss["chunked_peak_over_outputs"] > 1
    assert {(row["seq_len"], row["implementation"]) for row in sections["attention"]["rows"]} == {
        (128, "xla"), (256, "xla")}
    assert all(row["seconds"] > 0 and row["temp_bytes"] > 0 and row["documents"] > 1
               for row in sections["attention"]["rows"])
    assert [row["batch"] for row in sections["decode"]["rows"]] == [1, 4]
    # Tiny decode steps are within the host's noise here: the figures must exist, not be meaningful.
    assert all(math.isfinite(row["tokens_per_second"]) and row["bytes_per_step"] > 0
               for row in sections["decode"]["rows"])
    table = (out / "gpu_check.md").read_text()
    assert "SMOKE" in table and "| gpt2_124m |" in table and "tokens/s" in table
