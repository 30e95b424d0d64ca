"""selfflow-sample at scale: chunks on disk shared out over the processes of a launch, the
same samples for any number of processes, resume after a kill, settings pinned per out_dir,
launcher ranks."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from selfflow.sampling.chunks import ChunkStore
from selfflow.sampling.ranks import Ranks, launcher_ranks, rendezvous_environment
from tests.helpers.commands import ROOT, check_command, logical_lines, shell_commands
from tests.helpers.runs import run_sample

JOB = [
    "num_samples=7",
    "chunk_size=2",
    "batch_size=2",
    "steps=2",
    "sampler=sde",
    "per_sample_files=false",
]


def arrays(out_dir):
    with np.load(out_dir / "samples.npz") as npz:
        return npz["arr_0"], npz["labels"]


@pytest.fixture(scope="module")
def one_process(tiny_checkpoint, tmp_path_factory):
    """The job sampled in one go by one process: (samples [7, 16, 16, 3], labels [7])."""
    out_dir = tmp_path_factory.mktemp("one")
    run_sample(tiny_checkpoint, out_dir, *JOB)
    return arrays(out_dir)


@pytest.mark.slow
def test_two_processes_sample_disjoint_chunks_into_the_same_samples_as_one(
    tiny_checkpoint, one_process, tmp_path
):
    out_dir = tmp_path / "two"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "selfflow.cli.sample",
            f"ckpt={tiny_checkpoint}",
            f"out_dir={out_dir}",
            "progress=false",
            "device=cpu",
            *JOB,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out_dir / "sampling.json").read_text())
    # 4 chunks sampled in all, none twice (each process's count is added up), by 2 processes
    assert summary["processes"] == 2 and summary["chunks"] == 4 and summary["chunks_sampled"] == 4
    samples, labels = arrays(out_dir)
    np.testing.assert_array_equal(samples, one_process[0])
    np.testing.assert_array_equal(labels, one_process[1])


def test_a_killed_job_resumes_with_the_missing_chunks_only_and_ends_with_the_same_samples(
    tiny_checkpoint, one_process, tmp_path, monkeypatch
):
    out_dir = tmp_path / "killed"
    written, original = [], ChunkStore.write

    def write_then_die(store, chunk, labels, samples):
        if len(written) == 2:
            raise KeyboardInterrupt  # killed while sampling the third chunk
        written.append(chunk)
        return original(store, chunk, labels, samples)

    monkeypatch.setattr(ChunkStore, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_sample(tiny_checkpoint, out_dir, *JOB)
    monkeypatch.setattr(ChunkStore, "write", original)
    assert sorted(p.name for p in (out_dir / "parts").glob("chunk_*.npz")) == [
        "chunk_000000.npz",
        "chunk_000001.npz",
    ]
    assert not (out_dir / "samples.npz").exists()
    (out_dir / "parts" / "chunk_000003.npz").write_bytes(
        b"PK\x03\x04 cut short"
    )  # a file cut short is redone

    summary = run_sample(tiny_checkpoint, out_dir, *JOB)
    assert summary["chunks_sampled"] == 2  # chunks 2 and 3; 0 and 1 were on disk
    samples, labels = arrays(out_dir)
    np.testing.assert_array_equal(samples, one_process[0])
    np.testing.assert_array_equal(labels, one_process[1])
    assert (
        run_sample(tiny_checkpoint, out_dir, *JOB)["chunks_sampled"] == 0
    )  # done: a rerun samples nothing


def test_a_job_with_other_settings_in_the_same_out_dir_is_refused_naming_them(
    tiny_checkpoint, tmp_path
):
    run_sample(tiny_checkpoint, tmp_path, *JOB, "keep_parts=false")
    assert not (tmp_path / "parts").exists() and (tmp_path / "samples.npz").is_file()
    with pytest.raises(
        ValueError,
        match=r"holds samples of other settings \(seed: 0 -> 1\); choose another out_dir",
    ):
        run_sample(tiny_checkpoint, tmp_path, *JOB, "seed=1")
    run_sample(
        tiny_checkpoint, tmp_path, *JOB, "batch_size=3"
    )  # batch_size does not change the samples: accepted


def test_metrics_fid_without_its_files_stops_before_sampling_naming_the_key(
    tiny_checkpoint, tmp_path
):
    with pytest.raises(ValueError, match="metrics=fid needs fid_ref=..."):
        run_sample(tiny_checkpoint, tmp_path, *JOB, "metrics=fid")
    assert not (tmp_path / "parts").exists()


def test_ranks_come_from_torchrun_or_slurm_and_a_slurm_node_gets_a_rendezvous():
    assert launcher_ranks({}) == Ranks()
    assert launcher_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Ranks(
        3, 8, 1, "torchrun"
    )
    slurm = launcher_ranks({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"})
    assert slurm == Ranks(1, 2, 1, "SLURM")
    assert rendezvous_environment(slurm, {"SLURM_JOB_ID": "123456", "SLURM_NNODES": "1"}) == {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(15000 + 3456),
    }
    with pytest.raises(ValueError, match="needs MASTER_ADDR"):
        rendezvous_environment(slurm, {"SLURM_NNODES": "2"})
    with pytest.raises(ValueError, match="RANK=4 outside 0..WORLD_SIZE-1=1"):
        launcher_ranks({"RANK": "4", "WORLD_SIZE": "2"})


def evaluation_doc_commands() -> list[str]:
    """The selfflow / torchrun / srun command lines of docs/evaluation.md's bash blocks."""
    text = (ROOT / "docs" / "evaluation.md").read_text()
    lines = [
        line
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in logical_lines(block)
    ]
    return [line for line in lines if re.match(r"(selfflow-|torchrun |srun )", line)]


@pytest.mark.parametrize("line", evaluation_doc_commands())
def test_the_commands_of_the_evaluation_guide_parse_as_printed(line, monkeypatch):
    for words in shell_commands(line):
        check_command(words, monkeypatch)


def test_the_evaluation_guide_shows_sharded_sampling_and_the_fid_callback():
    commands = evaluation_doc_commands()
    assert any(c.startswith("torchrun") and "selfflow.cli.sample" in c for c in commands)
    assert any("callbacks.fid.every_n_steps=" in c for c in commands) and len(commands) >= 8
