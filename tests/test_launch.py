"""launch/ scripts: the commands they print (--dry-run) and run, and their errors.

Nothing here needs gcloud, SLURM or a GPU: dry runs only print, and the real-mode
tests put stub `gcloud`/`srun`/`python` programs first on PATH that record their
arguments.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

TPU = REPO_ROOT / "launch" / "tpu_vm.sh"
GPU = REPO_ROOT / "launch" / "gpu_host.sh"
SBATCH = REPO_ROOT / "launch" / "slurm_gpu.sbatch"
TARGET = ["--project=my-proj", "--zone=us-west4-a", "--name=dmfnet-tpu"]
# An override that needs quoting twice on its way through gcloud ssh.
TRICKY = "--config.data.tasks=('MRI-CT', \"MRI-PET\")"


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("DMFNET_", "CLOUDSDK_", "SLURM_", "DRY_RUN"))}
  env.update(extra)
  return env


def run_script(script, *args, env=None, check=True):
  result = subprocess.run(["bash", str(script), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env=env or _clean_env())
  if check:
    assert result.returncode == 0, result.stderr
  return result


def dry_run(script, *args, env=None):
  """The printed commands, each split into words as a shell would."""
  out = run_script(script, "--dry-run", *args, env=env).stdout
  return [shlex.split(line) for line in out.splitlines()]


def option(words, name):
  values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
  assert len(values) == 1, (name, words)
  return values[0]


def remote_command(words):
  """The words of the command a `gcloud ... ssh --command=...` runs on the workers."""
  return shlex.split(option(words, "--command"))


def after(words, first):
  return words[words.index(first):]


# --- Cloud TPU VM ---------------------------------------------------------------------


@pytest.mark.parametrize("accelerator, runtime", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_tpu_create(accelerator, runtime):
  (words,) = dry_run(TPU, "create", *TARGET, f"--accelerator={accelerator}")
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "dmfnet-tpu"]
  assert option(words, "--accelerator-type") == accelerator
  assert option(words, "--zone") == "us-west4-a"
  assert option(words, "--project") == "my-proj"
  assert option(words, "--version") == runtime
  assert "--spot" not in words


def test_tpu_create_spot_and_explicit_runtime():
  (words,) = dry_run(TPU, "create", *TARGET, "--accelerator=v4-8", "--runtime=my-runtime",
                     "--spot")
  assert option(words, "--version") == "my-runtime"
  assert "--spot" in words


def test_tpu_train_runs_one_command_on_all_workers():
  (words,) = dry_run(TPU, "train", *TARGET, "--bucket=my-bucket", "--", TRICKY,
                     "--config.train.batch_size=32")
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dmfnet-tpu"]
  assert "--worker=all" in words
  assert option(words, "--zone") == "us-west4-a"
  command = option(words, "--command")
  assert ("python3 -m dmfnet_jax.main --config=configs/stage1.py "
          "--workdir=gs://my-bucket/runs/stage1") in command
  remote = remote_command(words)
  assert remote[:3] == ["cd", "~/dmfnet-jax", "&&"]
  assert after(remote, "python3") == [
      "python3", "-m", "dmfnet_jax.main", "--config=configs/stage1.py",
      "--workdir=gs://my-bucket/runs/stage1", "--config.distributed.initialize=on",
      "--config.mesh.data=-1", "--config.mesh.fsdp=1", TRICKY, "--config.train.batch_size=32"]


def test_tpu_train_workdir_run_name_data_and_preset():
  (words,) = dry_run(TPU, "train", *TARGET, "--bucket=gs://b", "--run=exp7",
                     "--config=configs/stage2.py:tiny", "--data=gs://b/harvard", "--fsdp=4")
  remote = remote_command(words)
  assert "gcloud storage rsync --recursive gs://b/harvard ~/dmfnet-data &&" in " ".join(remote)
  train = after(remote, "python3")
  assert "--config=configs/stage2.py:tiny" in train
  assert "--workdir=gs://b/runs/exp7" in train
  assert "--config.data.root=$HOME/dmfnet-data" in train
  assert "--config.mesh.fsdp=4" in train
  (words,) = dry_run(TPU, "train", *TARGET, "--workdir=gs://other/x", "--bucket=b")
  assert "--workdir=gs://other/x" in remote_command(words)


def test_tpu_train_detached_writes_log_and_pid():
  (words,) = dry_run(TPU, "train", *TARGET, "--bucket=b", "--detach")
  command = option(words, "--command")
  assert "nohup python3 -m dmfnet_jax.main --config=configs/stage1.py --workdir=gs://b/runs/stage1" \
      in command
  assert "> ~/dmfnet-train.log 2>&1 < /dev/null & echo $! > ~/dmfnet-train.pid" in command
  (stop,) = dry_run(TPU, "stop", *TARGET)
  assert "--worker=all" in stop and "kill -TERM" in option(stop, "--command")


def test_tpu_setup_copies_and_installs_on_all_workers():
  archive, scp, ssh = dry_run(TPU, "setup", *TARGET)
  assert archive[:4] == ["git", "-C", str(REPO_ROOT), "archive"] and archive[-1] == "HEAD"
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "--worker=all" in scp and scp[6] == "dmfnet-tpu:dmfnet-jax.tar.gz"
  assert "--worker=all" in ssh
  command = option(ssh, "--command")
  assert "python3 -m pip install -q -e ." in command
  assert "'jax[tpu]'" in command

  (ssh,) = dry_run(TPU, "setup", *TARGET, "--repo-url=https://example.org/dmfnet-jax.git",
                   "--ref=v0.1.0")
  command = option(ssh, "--command")
  assert "git clone --quiet https://example.org/dmfnet-jax.git ~/dmfnet-jax" in command
  assert "checkout --quiet --force v0.1.0" in command
  assert "pip install -q -e ." in command and "jax[tpu]" in command


def test_tpu_up_is_create_setup_train_in_order():
  lines = dry_run(TPU, "up", *TARGET, "--accelerator=v4-32", "--bucket=b")
  assert [w[4] if w[0] == "gcloud" else w[0] for w in lines] == [
      "create", "git", "scp", "ssh", "ssh"]
  assert "dmfnet_jax.main" in option(lines[-1], "--command")


def test_tpu_delete_and_bucket():
  (words,) = dry_run(TPU, "delete", *TARGET)
  assert words == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "dmfnet-tpu",
                   "--project=my-proj", "--zone=us-west4-a", "--quiet"]
  (words,) = dry_run(TPU, "bucket", *TARGET, "--bucket=my-bucket")
  assert words[:4] == ["gcloud", "storage", "buckets", "create"]
  assert "gs://my-bucket" in words and option(words, "--location") == "us-west4"


def test_tpu_settings_from_environment_and_flags_win():
  env = _clean_env(DRY_RUN="1", DMFNET_PROJECT="env-proj", DMFNET_ZONE="europe-west4-a",
                   DMFNET_TPU_NAME="env-tpu", DMFNET_TPU_ACCELERATOR="v4-8")
  (words,) = [shlex.split(l) for l in run_script(TPU, "create", env=env).stdout.splitlines()]
  assert words[5] == "env-tpu"
  assert option(words, "--project") == "env-proj"
  assert option(words, "--zone") == "europe-west4-a"
  assert option(words, "--accelerator-type") == "v4-8"
  (words,) = [shlex.split(l) for l in
              run_script(TPU, "create", "--zone=us-central2-b", env=env).stdout.splitlines()]
  assert option(words, "--zone") == "us-central2-b"


@pytest.mark.parametrize("args, message", [
    (["create", "--zone=z", "--name=n", "--accelerator=v4-8"], "--project"),
    (["create", "--project=p", "--name=n", "--accelerator=v4-8"], "--zone"),
    (["delete", "--project=p", "--zone=z"], "--name"),
    (["create", *TARGET], "--accelerator"),
    (["create", *TARGET, "--accelerator=v99-8"], "--runtime"),
    (["train", *TARGET], "--bucket"),
    (["up", *TARGET, "--accelerator=v4-8"], "--bucket"),
    (["train", *TARGET, "--workdir=/local/dir"], "must be a gs:// path"),
    (["train", *TARGET, "--bucket=b", "--fsdp=0"], "--fsdp=0"),
    (["launch", *TARGET], "unknown command"),
    (["train", *TARGET, "--bukket=b"], "unknown option"),
])
def test_tpu_missing_or_bad_settings(args, message):
  result = run_script(TPU, "--dry-run", *args, check=False)
  assert result.returncode == 2
  assert message in result.stderr and "error:" in result.stderr
  assert result.stdout == ""  # nothing printed (or run) before the check


def test_help_texts():
  for script in (TPU, GPU, SBATCH):
    result = run_script(script, "--help")
    assert "--dry-run" in result.stdout


def _stubs(tmp_path, names):
  """Programs that append {"argv": [...], "env": {...}} as a JSON line to calls.jsonl."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.jsonl"
  for name in names:
    stub = bin_dir / name
    stub.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "  env = {k: v for k, v in os.environ.items() if k.startswith(('DMFNET_', 'SLURM_',"
        " 'CUDA_'))}\n"
        "  f.write(json.dumps({'argv': [os.path.basename(sys.argv[0])] + sys.argv[1:],"
        " 'env': env}) + '\\n')\n")
    stub.chmod(0o755)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", log


def _calls(log):
  return [json.loads(line) for line in log.read_text().splitlines()]


def test_tpu_real_mode_runs_what_dry_run_prints(tmp_path):
  path, log = _stubs(tmp_path, ["gcloud"])
  args = ["train", *TARGET, "--bucket=b", "--", TRICKY]
  printed = dry_run(TPU, *args)
  result = run_script(TPU, *args, env=_clean_env(PATH=path))
  assert [call["argv"] for call in _calls(log)] == printed
  assert result.stderr.startswith("+ gcloud compute tpus tpu-vm ssh")


# --- GPU host and SLURM ---------------------------------------------------------------


def test_gpu_train_one_process_all_local_gpus():
  cd, words = dry_run(GPU, "--config=configs/stage1.py:tiny", "--workdir=runs/s1", "--",
                      TRICKY)
  assert cd == ["cd", str(REPO_ROOT)]
  assert words == ["python", "-m", "dmfnet_jax.main", "--config=configs/stage1.py:tiny",
                   "--workdir=runs/s1", "--config.distributed.initialize=off",
                   "--config.mesh.data=-1", "--config.mesh.fsdp=1", TRICKY]


def test_gpu_train_selected_gpus_fsdp_and_default_workdir():
  _, words = dry_run(GPU, "train", "--gpus=0,1,2,3", "--fsdp=2", "--config=configs/stage2.py")
  assert words[:2] == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3"]
  assert "--config.mesh.fsdp=2" in words and "--config.mesh.data=-1" in words
  assert "--workdir=runs/stage2" in words


def test_gpu_printed_command_is_accepted_by_the_cli():
  """The overrides the script adds exist: an invalid batch size is the only complaint."""
  _, words = dry_run(GPU, "--config=configs/stage1.py:tiny", "--workdir=unused", "--",
                     "--config.train.batch_size=3")
  result = subprocess.run([sys.executable, *words[1:]], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "config.train.batch_size=3" in result.stderr


def test_gpu_install():
  lines = dry_run(GPU, "install")
  assert ["python", "-m", "pip", "install", "-e", "."] in lines
  assert ["python", "-m", "pip", "install", "jax[cuda12]"] in lines


def test_gpu_slurm_submits_the_sbatch_script():
  (words,) = dry_run(GPU, "slurm", "--nodes=4", "--gpus-per-node=4", "--partition=gpu",
                     "--workdir=/shared/runs/s1", "--", "--config.train.batch_size=16")
  assert words[0] == "sbatch"
  assert option(words, "--nodes") == "4"
  assert option(words, "--gpus-per-node") == "4"
  assert option(words, "--ntasks-per-node") == "1"
  assert option(words, "--partition") == "gpu"
  script = words.index(str(SBATCH))
  assert words[script + 1:] == ["--config=configs/stage1.py", "--workdir=/shared/runs/s1",
                                "--fsdp=1", "--", "--config.train.batch_size=16"]


@pytest.mark.parametrize("args, message", [
    (["slurm"], "--workdir"),
    (["slurm", "--workdir=/w", "--nodes=zero"], "--nodes=zero"),
    (["train", "--gpus=first"], "--gpus=first"),
    (["train", "--fsdp=-1"], "--fsdp=-1"),
    (["train", "--wokdir=/w"], "unknown option"),
])
def test_gpu_missing_or_bad_settings(args, message):
  result = run_script(GPU, "--dry-run", *args, check=False)
  assert result.returncode == 2
  assert message in result.stderr and "error:" in result.stderr
  assert result.stdout == ""


def _slurm_env(**extra):
  return _clean_env(**{"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[007-009],cpu1",
                       **extra})


def test_sbatch_starts_one_task_per_host():
  (words,) = dry_run(SBATCH, "--workdir=/w", "--", TRICKY,
                     env=_slurm_env(SLURM_CPUS_PER_TASK="16"))
  assert words[0] == "srun"
  assert "--ntasks-per-node=1" in words and "--cpus-per-task=16" in words
  assert after(words, "bash") == ["bash", str(SBATCH), "--task", "--config=configs/stage1.py",
                                  "--workdir=/w", "--fsdp=1", "--", TRICKY]


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[007-009],cpu1", "gpu007"), ("node12,node13", "node12"), ("a100", "a100"),
    ("n[3,5-6]", "n3"),
])
def test_sbatch_task_sets_coordinator_and_keeps_all_gpus(nodelist, host):
  env = _slurm_env(SLURM_JOB_NODELIST=nodelist, SLURM_NTASKS="3", SLURM_PROCID="2",
                   SLURM_LOCALID="0")
  (words,) = dry_run(SBATCH, "--task", "--workdir=/w", "--fsdp=2", env=env)
  assert words[:3] == ["env", "-u", "SLURM_LOCALID"]
  assert f"DMFNET_COORDINATOR_ADDRESS={host}:{4242 % 4096 + 61440}" in words
  assert "DMFNET_NUM_PROCESSES=3" in words and "DMFNET_PROCESS_ID=2" in words
  assert after(words, "python") == [
      "python", "-m", "dmfnet_jax.main", "--config=configs/stage1.py", "--workdir=/w",
      "--config.distributed.initialize=on", "--config.mesh.data=-1", "--config.mesh.fsdp=2"]


@pytest.mark.parametrize("args, env, message", [
    (["--workdir=/w"], _clean_env(), "SLURM_JOB_ID is not set"),
    ([], _slurm_env(), "--workdir"),
    (["--task", "--workdir=/w"], _slurm_env(), "SLURM_NTASKS is not set"),
])
def test_sbatch_errors(args, env, message):
  result = run_script(SBATCH, "--dry-run", *args, env=env, check=False)
  assert result.returncode == 2 and message in result.stderr
  assert result.stdout == ""


def test_sbatch_real_mode_through_stub_srun(tmp_path):
  """srun (stubbed: runs its command as task 1 of 2) -> the task -> python."""
  path, log = _stubs(tmp_path, ["python"])
  srun = tmp_path / "bin" / "srun"
  srun.write_text("#!/usr/bin/env bash\n"
                  "while [[ $1 == --* ]]; do shift; done\n"
                  "SLURM_NTASKS=2 SLURM_PROCID=1 SLURM_LOCALID=0 exec \"$@\"\n")
  srun.chmod(0o755)
  run_script(SBATCH, "--workdir=/w", "--", TRICKY, env=_slurm_env(PATH=path))
  (call,) = _calls(log)
  assert call["argv"][-2:] == ["--config.mesh.fsdp=1", TRICKY]
  assert call["env"]["DMFNET_COORDINATOR_ADDRESS"] == f"gpu007:{4242 % 4096 + 61440}"
  assert call["env"]["DMFNET_NUM_PROCESSES"] == "2"
  assert call["env"]["DMFNET_PROCESS_ID"] == "1"
  assert "SLURM_LOCALID" not in call["env"]
