"""Two nodes simulated on one machine: two torchrun agents (``--nnodes 2``, one process each, c10d rendezvous on
localhost, gloo) train to the losses of one process with the same global batch.

This is the launch the README documents for several machines: the agents find each other through the rendezvous
endpoint alone, and the only thing both must see is the run folder (rank 0 writes the preset's parts, the config and
the export there; every rank writes its checkpoint shards there).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest
import yaml
from training_helpers import debug_config, debug_stage

from llavakit.training.config_loading import config_from_dict
from llavakit.training.trainer import train

STEPS = 3


def _stage(synth):
    return debug_stage(
        synth,
        max_steps=STEPS,
        global_batch_size=4,
        micro_batch_size=1,
        optim={"lr": 2e-3, "warmup_ratio": 0.0, "schedule": "constant"},
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agent(node_rank: int, config_file, endpoint: str, run_id: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        f"--node_rank={node_rank}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={run_id}",
        "-m",
        "llavakit.cli.main",
        "train",
        "--config",
        str(config_file),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_two_simulated_nodes_match_one_process(tmp_path, synth):
    single = train(config_from_dict(debug_config(tmp_path / "single", [_stage(synth)]))).stages[0].losses
    config = debug_config(tmp_path / "two-nodes", [_stage(synth)], strategy={"name": "fsdp2"})
    config_file = tmp_path / "two-nodes.yaml"
    config_file.write_text(yaml.safe_dump(config))
    endpoint, run_id = f"127.0.0.1:{_free_port()}", uuid.uuid4().hex[:8]
    agents = [_agent(rank, config_file, endpoint, run_id) for rank in (0, 1)]
    outputs = [agent.communicate(timeout=300) for agent in agents]
    for agent, (_, stderr) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, stderr[-4000:]
    rows = (tmp_path / "two-nodes" / "finetune" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(row)["loss"] for row in rows]
    assert len(losses) == STEPS
    assert losses == pytest.approx(single, rel=1e-4)
    assert (tmp_path / "two-nodes" / "finetune" / "final" / "config.json").is_file()
