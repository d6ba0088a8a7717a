"""What orch reads off /proc/mounts: whether a run folder's flock() holds across nodes, and whether ORCH_HOME is on
a network file system. The cluster file systems' lines are in the kernel's own /proc/mounts format, as their
clients show them; this machine's own mount table is read as well."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import filesystems
from orchestrator.filesystems import check_runs_dir, flock_scope, mount_of, parse_mounts, warn_if_shared
from tests.conftest import env_for

CLUSTER_MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
nfs1:/export/home /home nfs4 rw,relatime,vers=4.2,rsize=1048576,hard,proto=tcp,sec=sys,local_lock=none,addr=10.0.0.5 0 0
nfs1:/export/scratch /scratch nfs rw,relatime,vers=3,hard,proto=tcp,local_lock=all,addr=10.0.0.5 0 0
nfs2:/old /old nfs rw,relatime,vers=3,nolock,proto=udp,addr=10.0.0.6 0 0
10.0.1.1@o2ib:/lus /lustre/flock lustre rw,flock,lazystatfs 0 0
10.0.1.1@o2ib:/lus /lustre/local lustre rw,localflock,lazystatfs 0 0
10.0.1.1@o2ib:/lus /lustre/none lustre rw,noflock,lazystatfs 0 0
beegfs_nodev /mnt/beegfs beegfs rw,relatime,cfgFile=/etc/beegfs/beegfs-client.conf 0 0
/dev/sdb1 /home/alice/my\\040runs xfs rw,relatime 0 0
"""


@pytest.fixture
def mounts(tmp_path):
    path = tmp_path / "mounts"
    path.write_text(CLUSTER_MOUNTS)
    return str(path)


def test_the_mount_of_a_path_is_the_deepest_one_above_it(mounts):
    assert mount_of("/home/bob/runs/not-yet-made", mounts).point == "/home"
    assert mount_of("/home/alice/my runs/r1", mounts).fstype == "xfs"  # \040 in /proc/mounts is a space
    assert mount_of("/lustre/local", mounts).option("localflock") == ""
    assert mount_of("/tmp/x", mounts).point == "/"
    assert mount_of("/anywhere", "/no/such/mounts") is None


@pytest.mark.parametrize(
    "point, scope",
    [
        ("/home", "cluster"),
        ("/scratch", "node"),
        ("/old", "node"),
        ("/lustre/flock", "cluster"),
        ("/lustre/local", "node"),
        ("/lustre/none", "none"),
        ("/mnt/beegfs", "node"),
        ("/", "cluster"),
    ],
)
def test_how_far_an_flock_reaches_on_each_cluster_file_system(mounts, point, scope):
    assert flock_scope(mount_of(point, mounts))[0] == scope


def test_a_runs_dir_where_flock_fails_is_refused_and_a_node_local_one_warned_about(mounts, capsys):
    with pytest.raises(ValueError) as e:
        check_runs_dir("/lustre/none/runs", "jobs/pretrain.yaml", across_nodes=False, mounts_file=mounts)
    assert "jobs/pretrain.yaml: runs_dir='/lustre/none/runs'" in str(e.value) and "ENOSYS" in str(e.value)

    warning = check_runs_dir("/scratch/runs", "jobs/pretrain.yaml", across_nodes=True, mounts_file=mounts)
    assert "runs_dir='/scratch/runs'" in warning and "local_lock=all" in warning
    assert warning in capsys.readouterr().err
    # one machine (the local executor): a node-local lock is all it needs
    assert check_runs_dir("/scratch/runs", "jobs/pretrain.yaml", across_nodes=False, mounts_file=mounts) is None
    assert check_runs_dir("/home/runs", "jobs/pretrain.yaml", across_nodes=True, mounts_file=mounts) is None


def test_orch_home_on_a_network_file_system_is_warned_about_once(mounts, capsys):
    assert warn_if_shared(Path("/home/alice/.orch"), mounts) is not None
    assert "ORCH_HOME=/home/alice/.orch is on /home, a nfs4 file system" in capsys.readouterr().err
    assert warn_if_shared(Path("/home/alice/.orch"), mounts) is None  # once a process
    assert warn_if_shared(Path("/home/alice/my runs/.orch"), mounts) is None  # a local disk


def test_this_machines_mounts_pass_and_orch_says_nothing(tmp_path):
    assert mount_of(tmp_path) is not None and parse_mounts(open(filesystems.MOUNTS).read())
    assert check_runs_dir(str(tmp_path / "runs"), "job.yaml", across_nodes=True) is None
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "runs"],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
