"""Fault tests of training: ``kill -9`` at random moments of a run, and a full disk during a checkpoint save.

The kill test runs ``llavakit train`` many times on one run folder and kills each launch with SIGKILL at a time
drawn from a seeded RNG: during start-up and resume, during optimizer steps and during checkpoint saves. After every
kill, the newest complete checkpoint must load and hold exactly what the uninterrupted run saved at that step (model,
optimizer, scheduler, torch RNG stream, loss history); the last launch must finish with the uninterrupted run's losses
and weights, bit for bit.

Why launches are forked from a pre-imported "zygote" process instead of started as ``python -m llavakit.cli.main``:
importing torch, transformers and bitsandbytes takes ~7 s of a ~10 s launch, which would put a dozen trials far
beyond the test's time budget. Each fork runs the CLI's own ``main(["train", ...])`` in a process of its own, so the
kill hits exactly what a ``kill -9`` of ``llavakit train`` hits; one real ``python -m llavakit.cli.main`` launch
(the uninterrupted reference) covers the start-up path the forks skip.

The full-disk test makes a save fail partway with ``OSError(ENOSPC)`` (in a DCP shard or DCP's metadata, in the
per-rank safetensors or JSON file, in ``trainer_state.json``) and checks for a clear `CheckpointError`, the previous checkpoint
untouched, and a resume from it that reproduces the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch.distributed.checkpoint.filesystem import FileSystem
from training_helpers import debug_config, debug_stage

from llavakit.distributed import init_distributed
from llavakit.errors import CheckpointError
from llavakit.training import checkpoint as checkpoint_module
from llavakit.training.checkpoint import CheckpointManager, complete_checkpoints
from llavakit.training.config_loading import config_from_dict
from llavakit.training.data import build_train_data
from llavakit.training.trainer import Trainer, train

KILL_STEPS = 48  # 4 epochs of the 48-sample synthetic set at 4 samples per step
KILL_TRIALS = 16
KILL_SEED = 20240605
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}

# Reads one JSON request per line ({"argv": [...], "log": path}), forks, runs the CLI in the child with its output
# in ``log``, and answers two lines: the child's pid, then its exit code (negative: the signal that ended it).
_ZYGOTE = """
import json, os, sys, traceback
import llavakit.cli.main, llavakit.cli.train, llavakit.training.trainer
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        try:
            code = llavakit.cli.main.main(request["argv"])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def _kill_config(run_dir: Path, synth, keep: int) -> dict:
    stage = debug_stage(synth, max_steps=KILL_STEPS, optim={"lr": 1e-3, "warmup_ratio": 0.1})
    return debug_config(run_dir, [stage], logging={"save_every": 1, "save_total_limit": keep})


def _losses(stage_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl repeats or reorders steps: {steps}"
    return {row["step"]: row["loss"] for row in rows}


class _Zygote:
    """A pre-imported Python process that forks one ``llavakit`` CLI run per request."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV
        )

    def start(self, argv: list[str], log: Path) -> int:
        self.process.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def exit_code(self) -> int:
        return int(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a launch still running after a failed assertion
            self.process.kill()
            self.process.wait()


class _Snapshot:
    """Everything a checkpoint restores, as loaded by a `Trainer` built in this process."""

    def __init__(self, trainer: Trainer, path: Path) -> None:
        state = trainer.checkpoints.load(path, trainer.model, trainer.optimizer, trainer.scheduler)
        self.state = state
        self.model = {key: value.clone() for key, value in trainer.model.state_dict().items()}
        optim = trainer.optimizer.state_dict()
        self.optim = [
            (key, name, value.clone()) for key, per in optim["state"].items() for name, value in per.items()
        ]
        self.param_groups = optim["param_groups"]
        self.scheduler = trainer.scheduler.state_dict()
        # Python's and numpy's global generators are never seeded by llavakit (nothing in training draws from
        # them), so two uninterrupted runs save different states of them: only torch's stream is compared.
        self.rng = torch.get_rng_state()

    def assert_equal(self, other: _Snapshot) -> None:
        assert self.state == other.state
        assert self.model.keys() == other.model.keys()
        for key, value in self.model.items():
            assert torch.equal(value, other.model[key]), key
        assert [(key, name) for key, name, _ in self.optim] == [(key, name) for key, name, _ in other.optim]
        for (_, name, mine), (_, _, theirs) in zip(self.optim, other.optim):
            assert torch.equal(mine, theirs), name
        assert self.param_groups == other.param_groups
        assert self.scheduler == other.scheduler
        assert torch.equal(self.rng, other.rng)


@pytest.fixture
def keep_global_rng():
    """Loading a checkpoint sets the global RNGs; give them back to the rest of the test session."""
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(python)
    np.random.set_state(numpy_state)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_new_save(checkpoints: Path, after: int, pid: int) -> None:
    """Poll until launch ``pid`` begins saving a step after ``after`` (its first step is done), or ends.

    A ``.partial-step-*`` folder left by an earlier kill is not a sign: only names absent at the start count.
    """
    stale = set(os.listdir(checkpoints)) if checkpoints.is_dir() else set()
    deadline = time.monotonic() + 120
    while _alive(pid):
        assert time.monotonic() < deadline, f"launch {pid} made no step in 120 s"
        names = set(os.listdir(checkpoints)) if checkpoints.is_dir() else set()
        if any(int(name.rsplit("-", 1)[1]) > after for name in names - stale if "step-" in name):
            return
        time.sleep(0.002)


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _kill_once(
    zygote: _Zygote, argv: list[str], checkpoints: Path, log: Path, rng: random.Random, step_s: float
):
    """One launch killed with SIGKILL at a seeded moment; returns (moment, exit code, saves it was killed in)."""
    newest = complete_checkpoints(checkpoints)
    before = _step_of(newest[-1]) if newest else 0
    stale = set(os.listdir(checkpoints)) if checkpoints.is_dir() else set()
    pid = zygote.start(argv, log)
    if rng.random() < 0.25:
        moment = "start-up"  # model build, resume, metrics.jsonl rewrite (or already the first steps)
        time.sleep(rng.uniform(0.0, 1.0))
    else:
        moment = "training"  # within the next few steps and saves after this launch's first step
        _wait_for_new_save(checkpoints, before, pid)
        time.sleep(rng.uniform(0.0, 2.5 * step_s))
    with contextlib.suppress(ProcessLookupError):  # it may have finished the run meanwhile
        os.kill(pid, signal.SIGKILL)
    code = zygote.exit_code()
    assert code in (-signal.SIGKILL, 0), log.read_text()[-4000:]
    names = set(os.listdir(checkpoints)) if checkpoints.is_dir() else set()
    return moment, code, sorted(name for name in names - stale if name.startswith(".partial-"))


def _reference_run(tmp_path: Path, synth) -> subprocess.Popen:
    """The uninterrupted run as a real ``python -m llavakit.cli.main`` launch; it keeps every checkpoint."""
    config_file = tmp_path / "reference.yaml"
    config_file.write_text(yaml.safe_dump(_kill_config(tmp_path / "reference", synth, keep=KILL_STEPS)))
    command = [sys.executable, "-m", "llavakit.cli.main", "train", "--config", str(config_file)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


@pytest.mark.slow
@pytest.mark.timeout(600)  # a hung launch fails the test instead of the CI job
def test_kill_9_at_random_moments_then_resume_reproduces_the_run(tmp_path, synth, keep_global_rng):
    reference = _reference_run(tmp_path, synth)
    zygote = _Zygote()
    try:
        config = _kill_config(tmp_path / "killed", synth, keep=2)
        config_file = tmp_path / "killed.yaml"
        config_file.write_text(yaml.safe_dump(config))
        checker = Trainer(
            config_from_dict(config), 0, init_distributed(needs_process_group=False), build_train_data
        )
        checker.build()
        output, _ = reference.communicate(timeout=300)
        assert reference.returncode == 0, output[-4000:]
        reference_stage = tmp_path / "reference" / "finetune"
        reference_losses = _losses(reference_stage)
        assert sorted(reference_losses) == list(range(1, KILL_STEPS + 1))
        times = [json.loads(line)["time"] for line in (reference_stage / "metrics.jsonl").open()]
        step_s = (times[-1] - times[0]) / (KILL_STEPS - 1)  # one step and its save

        checkpoints = tmp_path / "killed" / "finetune" / "checkpoints"
        argv = ["train", "--config", str(config_file)]
        rng = random.Random(KILL_SEED)
        outcomes = []
        for trial in range(KILL_TRIALS):
            outcomes.append(
                _kill_once(zygote, argv, checkpoints, tmp_path / f"launch-{trial}.log", rng, step_s)
            )
            if outcomes[-1][1] == 0:
                break  # the run finished before the kill
            newest = complete_checkpoints(checkpoints)
            if newest:
                # The newest complete checkpoint loads and holds what the uninterrupted run saved at that step.
                loaded = _Snapshot(checker, newest[-1])
                assert loaded.state.step == _step_of(newest[-1])
                assert loaded.state.losses == [
                    reference_losses[step] for step in range(1, loaded.state.step + 1)
                ]
                loaded.assert_equal(_Snapshot(checker, reference_stage / "checkpoints" / newest[-1].name))
        kills = [outcome for outcome in outcomes if outcome[1] == -signal.SIGKILL]
        assert len(kills) >= 10, outcomes
        assert any(saves for _, _, saves in kills), f"no kill landed inside a checkpoint save: {outcomes}"

        zygote.start(argv, tmp_path / "last.log")
        assert zygote.exit_code() == 0, (tmp_path / "last.log").read_text()[-4000:]
    finally:
        zygote.close()
        reference.kill()
    assert _losses(tmp_path / "killed" / "finetune") == reference_losses
    exported = (tmp_path / "killed" / "finetune" / "final" / "model.safetensors").read_bytes()
    assert exported == (reference_stage / "final" / "model.safetensors").read_bytes()


DISK_STEPS = 3
FULL_AT_STEP = 2  # the save after step 2 fails; step 1's checkpoint must survive it


def _disk_config(run_dir: Path, synth):
    stage = debug_stage(synth, max_steps=DISK_STEPS, optim={"lr": 1e-3, "warmup_ratio": 0.0})
    return config_from_dict(debug_config(run_dir, [stage], logging={"save_every": 1, "save_total_limit": 2}))


class _FullFile(io.FileIO):
    """A file on a disk with ``room`` bytes left: the write that does not fit writes what fits, then fails."""

    room = 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > _FullFile.room:
            super().write(data[: _FullFile.room])
            _FullFile.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        _FullFile.room -= len(data)
        return super().write(data)


def _fill_disk(monkeypatch, where: str) -> dict[str, bytes]:
    """From the save of step ``FULL_AT_STEP`` on, the disk is full at ``where``; returns the checkpoints' files as
    they were when the failing save began (filled in then)."""
    before: dict[str, bytes] = {}
    save = CheckpointManager.save
    fault = {"armed": False}

    def watched_save(self, model, optimizer, scheduler, state, grad_scaler=None):
        if state.step == FULL_AT_STEP:
            fault["armed"] = True
            before.update(_files(self.directory))
        return save(self, model, optimizer, scheduler, state, grad_scaler)

    create_stream = FileSystem.create_stream

    @contextlib.contextmanager
    def full_stream(self, path, mode):
        if fault["armed"] and Path(path).name.endswith(where):
            _FullFile.room = 1000
            with _FullFile(path, "wb") as stream:
                yield stream
        else:
            with create_stream(self, path, mode) as stream:
                yield stream

    def full_save_file(tensors, filename, metadata=None):
        if fault["armed"] and filename.endswith(where):
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return save_file(tensors, filename, metadata)

    write_text = Path.write_text

    def full_write_text(self, text, *args, **kwargs):
        if fault["armed"] and self.name.endswith(where):
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", watched_save)
    monkeypatch.setattr(FileSystem, "create_stream", full_stream)
    monkeypatch.setattr(checkpoint_module, "save_file", full_save_file)
    monkeypatch.setattr(Path, "write_text", full_write_text)
    return before


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()
    }


@pytest.fixture(scope="module")
def disk_reference(tmp_path_factory, synth):
    return train(_disk_config(tmp_path_factory.mktemp("full-disk-reference"), synth)).stages[0].losses


@pytest.mark.parametrize(
    "where",
    [
        ".distcp",  # a DCP shard of model and optimizer state
        pytest.param(".metadata.tmp", marks=pytest.mark.slow),  # DCP's metadata, written last
        "rank-00000.safetensors",  # this rank's RNG state
        pytest.param("rank-00000.json", marks=pytest.mark.slow),  # scheduler state
        "trainer_state.json",
    ],
)
def test_full_disk_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path, synth, monkeypatch, disk_reference, where
):
    config = _disk_config(tmp_path / "run", synth)
    before = _fill_disk(monkeypatch, where)
    with pytest.raises(CheckpointError) as raised:
        train(config)
    monkeypatch.undo()
    message = str(raised.value)
    checkpoints = tmp_path / "run" / "finetune" / "checkpoints"
    assert "No space left on device" in message and f"step-{FULL_AT_STEP:06d}" in message, message
    assert f"step-{FULL_AT_STEP - 1:06d}" in message, message  # the checkpoint a resume will continue from
    assert before and _files(checkpoints) == before  # untouched, and nothing half-written left behind
    assert [path.name for path in complete_checkpoints(checkpoints)] == [f"step-{FULL_AT_STEP - 1:06d}"]

    resumed = train(config).stages[0].losses
    assert resumed == disk_reference
    assert list(_losses(tmp_path / "run" / "finetune").values()) == disk_reference


def test_export_swap_never_leaves_the_stage_without_an_export(tmp_path, monkeypatch):
    from llavakit.training import export

    out = tmp_path / "final"
    out.mkdir()
    (out / "config.json").write_text("old")
    partial = tmp_path / "final.partial"
    partial.mkdir()
    (partial / "config.json").write_text("new")
    export._swap_in(partial, out)
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]

    partial.mkdir()
    (partial / "config.json").write_text("newer")
    real_rename = type(out).rename

    def killed_after_first_rename(self, target):
        if self == partial:
            raise KeyboardInterrupt("killed between the renames")
        return real_rename(self, target)

    monkeypatch.setattr(type(out), "rename", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        export._swap_in(partial, out)
    assert (tmp_path / "final.old" / "config.json").read_text() == "new"
