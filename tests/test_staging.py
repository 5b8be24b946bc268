"""The staging-then-swap helper that save_model, convert and training
checkpoints write through: the swap, cleanup on failure, permissions, and
directories left behind by killed writers."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_diffusiongemma.staging import claimed, staged

ROOT = Path(__file__).resolve().parents[1]


def hidden(destination: Path) -> list:
    return sorted(p.name for p in destination.parent.iterdir() if p.name.startswith(f".{destination.name}."))


def child(script: str) -> subprocess.Popen:
    """A Python process running `script` with `staged` imported, stdout piped."""
    code = "from pathlib import Path\nfrom mlx_diffusiongemma.staging import staged\n" + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def umask():
    """Sets the process umask for a test, then restores it."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def test_swaps_in_the_new_directory(tmp_path):
    out = tmp_path / "a" / "out"
    with staged(out) as staging:
        assert staging.parent == out.parent and staging.name.startswith(".out.staging-")
        assert list(staging.iterdir()) == []
        (staging / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and hidden(out) == []
    with staged(out) as staging:
        (staging / "newer.txt").write_text("newer")
        assert (out / "new.txt").read_text() == "new"  # the old one stays until the new one is complete
    assert [p.name for p in out.iterdir()] == ["newer.txt"] and hidden(out) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt(), SystemExit(143)], ids=repr)
def test_failure_removes_the_staging_and_keeps_the_old(tmp_path, error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(type(error)):
        with staged(out) as staging:
            (staging / "half.txt").write_text("half")
            raise error
    assert [p.name for p in out.iterdir()] == ["old.txt"] and hidden(out) == []


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_directories_get_the_umask(tmp_path, umask, mask):
    umask(mask)
    out = tmp_path / "out"
    with staged(out) as staging:
        (staging / "file").write_text("x")
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "file").stat().st_mode) == 0o666 & ~mask


def test_stale_staging_of_a_dead_writer_is_removed_a_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    live = child(f"""
        import time
        with staged(Path({str(out)!r})) as staging:
            print(staging.name, flush=True)
            time.sleep(120)
    """)
    try:
        live_name = live.stdout.readline().strip()
        dead = child(f"""
            import os, signal
            with staged(Path({str(out)!r})) as staging:
                (staging / "half.txt").write_text("half")
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs
        """)
        assert dead.wait(timeout=60) == -signal.SIGKILL
        left = hidden(out)
        assert len(left) == 2 and live_name in left
        with staged(out) as staging:
            assert hidden(out) == sorted([live_name, staging.name])  # the dead writer's is gone
        assert hidden(out) == [live_name]
    finally:
        live.kill()
        live.wait(timeout=60)
    with staged(out):
        pass
    assert hidden(out) == []  # its writer is dead now


def test_writer_killed_between_its_renames_leaves_the_old_output_restored(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    killed = child(f"""
        import os, signal
        replace = os.replace
        def replace_then_die(src, dst):
            replace(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)
        with staged(Path({str(out)!r})) as staging:
            (staging / "new.txt").write_text("new")
            os.replace = replace_then_die
    """)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists() and len(hidden(out)) == 2  # the old output aside, the new one staged
    with staged(tmp_path / "other"):
        pass
    assert not out.exists()  # another destination's run leaves them alone
    with pytest.raises(RuntimeError):
        with staged(out):
            raise RuntimeError("this run fails too")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and hidden(out) == []


def test_failed_final_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    from mlx_diffusiongemma import staging as staging_module

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    replace = os.replace

    def refuse_into_out(src, dst):
        if Path(dst) == out and not Path(src).name.endswith(".old"):  # the staging, not the old one put back
            raise OSError("rename refused")
        replace(src, dst)

    monkeypatch.setattr(staging_module.os, "replace", refuse_into_out)
    with pytest.raises(OSError, match="rename refused"):
        with staged(out) as staging:
            (staging / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and hidden(out) == []


def lock_of(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}-lock")


def test_claim_refuses_a_second_writer_until_its_holder_is_gone(tmp_path):
    """The lock is the kernel's: held while its process runs, SIGKILL included,
    free once it is gone (the lock file it left is reused, then removed)."""
    out = tmp_path / "out"
    holder = child(f"""
        import time
        from mlx_diffusiongemma.staging import claimed
        with claimed(Path({str(out)!r})):
            print("claimed", flush=True)
            time.sleep(120)
    """)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(BlockingIOError) as refused:
            with claimed(out):
                pass
        message = str(refused.value)
        assert "\n" not in message and str(out) in message and f"pid {holder.pid} " in message
        with pytest.raises(BlockingIOError):  # staged writes under a claim are refused as well
            with claimed(out), staged(out):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert lock_of(out).exists() and hidden(out) == []  # what SIGKILL left: a lock file nobody holds
    with claimed(out) as claimed_out, staged(out) as staging:
        assert claimed_out == out and f"pid {os.getpid()} " in lock_of(out).read_text()
        (staging / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not lock_of(out).exists() and hidden(out) == []


def test_claim_never_writes_through_a_planted_link(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_text("precious")
    lock_of(out).symlink_to(victim)
    with pytest.raises(OSError, match=str(lock_of(out))):
        with claimed(out):
            pass
    assert victim.read_text() == "precious" and not out.exists()


@pytest.mark.parametrize("what", ["directory", "file", "into-empty"])
def test_staged_without_replace_keeps_what_appeared_meanwhile(tmp_path, what):
    out = tmp_path / "out"
    if what == "into-empty":
        out.mkdir()
    with pytest.raises(FileExistsError) as refused:
        with staged(out, replace=False) as staging:
            (staging / "new.txt").write_text("new")
            if what == "file":
                out.write_text("theirs")
            else:
                out.mkdir(exist_ok=True)
                (out / "theirs.txt").write_text("theirs")
    assert "\n" not in str(refused.value) and str(out) in str(refused.value)
    kept = out if what == "file" else out / "theirs.txt"
    assert kept.read_text() == "theirs" and hidden(out) == []


def test_staged_without_replace_takes_an_empty_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with staged(out, replace=False) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and hidden(out) == []


@pytest.mark.parametrize("cwd", ["out", "out/sub"])
def test_the_working_directory_and_its_parents_are_refused_up_front(tmp_path, monkeypatch, cwd):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "old.txt").write_text("old")
    monkeypatch.chdir(tmp_path / cwd)
    for destination in (out, Path(".") if cwd == "out" else Path("..")):
        for claim in (claimed, staged):
            with pytest.raises(ValueError, match="current directory"):
                with claim(destination):
                    raise AssertionError("not reached")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt", "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
