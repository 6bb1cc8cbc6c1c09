"""Rank/world/master discovery from torchrun and SLURM variables."""
import pytest

from conftest import REPO
from parallel.env import detect_launch_env, expand_hostlist


@pytest.mark.parametrize("spec,hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("gpu-[1-2]-x[8-9]", ["gpu-1-x8", "gpu-1-x9", "gpu-2-x8", "gpu-2-x9"]),
    ("n[009-011]", ["n009", "n010", "n011"]),
    ("solo", ["solo"]),
])
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("bad", ["n[1-", "n]1[", "n[3-1]"])
def test_bad_hostlist_raises(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_slurm_tasks():
    env = detect_launch_env({
        "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_NODELIST": "node[01-03,07]", "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
        "SLURM_JOB_ID": "123456",
    })
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 2)
    assert env.master_addr == "node01" and env.launcher == "slurm"
    assert env.master_port == 20000 + 123456 % 10000


def test_torchrun_wins_inside_srun():
    env = detect_launch_env({
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
        "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2",
    })
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (
        3, 4, 1, "10.0.0.1", "torchrun")


def test_batch_script_without_srun_is_single():
    # Inside an sbatch script SLURM_NTASKS is set, but no step tasks: one process.
    env = detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"})
    assert env.world_size == 1 and env.launcher == "single"


def test_default_threads_respects_binding():
    import os

    from pretrain.train import default_threads

    total = os.cpu_count()
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, set(range(total)))  # unbound: share the node
        assert default_threads(1) == total
        assert default_threads(2) == max(1, total // 2)
        os.sched_setaffinity(0, {0})  # bound to one core, as srun --cpu-bind would
        assert default_threads(1) == 1
    finally:
        os.sched_setaffinity(0, before)


def test_submitit_local_tasks():
    """hydra/launcher=local: submitit's local executor numbers the point's tasks itself."""
    env = detect_launch_env({"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
                             "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_ID": "31337"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == (
        1, 2, 1, 2, "submitit_local")
    assert env.master_addr == "127.0.0.1" and env.master_port == 20000 + 31337 % 10000


def test_batch_scripts_give_gloo_the_interfaces_of_nccl_socket_ifname(tmp_path):
    """slurm/net.sh: NCCL_SOCKET_IFNAME's prefixes resolve to this host's interfaces (gloo
    takes exact names), '=' names pass as they are, an exclusion list is not passed on,
    and a GLOO_SOCKET_IFNAME the user set wins."""
    import subprocess

    for dev in ("ib0", "ib1", "eth0", "lo"):
        (tmp_path / dev).mkdir()
    cases = {"ib": "ib0", "eth0,ib": "eth0,ib0", "=ib7": "ib7", "^docker,lo": "", "nope": "", "": ""}
    script = "source slurm/net.sh\n" + "".join(
        f'echo "[$(gloo_ifname_from_nccl {spec!r})]"\n' for spec in cases)
    script += ('unset GLOO_SOCKET_IFNAME; NCCL_SOCKET_IFNAME=ib default_gloo_ifname >/dev/null; '
               'echo "[$GLOO_SOCKET_IFNAME]"\n'
               'export GLOO_SOCKET_IFNAME=mine; NCCL_SOCKET_IFNAME=ib default_gloo_ifname; echo "[$GLOO_SOCKET_IFNAME]"\n')
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env={"PATH": "/usr/bin:/bin", "NET_SYSFS": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [f"[{v}]" for v in cases.values()] + ["[ib0]", "[mine]"]
