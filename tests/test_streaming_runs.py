"""Streamed pre-training runs with real `accelerate launch` processes (gloo, CPU) over webdataset shards.

Each run logs the key of every pair it trains on (``--log_seen_samples``: one file per rank, one key per line, in
training order), which is what the assertions read. The resume test fails when the stream position is not restored
(no resume message, and the skip counts restart from zero); that nothing trained is decoded again is counted in
tests/test_streaming.py, in one process."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE, assert_close_to_scale, free_port
from PIL import Image

from modeling_msclip import train_msclip_tokenizer
from modeling_msclip.webdataset_msclip import WebDatasetShardWriter

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "pretrain_preemptible.py"


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), ((value * 7) % 256, (value * 3) % 256, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def write_shards(folder: Path, count: int, per_shard: int, prefix: str) -> Path:
    with WebDatasetShardWriter(folder, samples_per_shard=per_shard) as writer:
        for index in range(count):
            writer.write(png(index), "png", f"a photo of a red cat {prefix} {index}")
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming_runs")
    train_msclip_tokenizer(TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE).save_pretrained(root / "tokenizer")
    return root


def launch(workspace: Path, name: str, processes: int, data: str, *extra: str, streaming: bool = True):
    output = workspace / name
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configuration" / "accelerate" / "multi_process.yaml"),
        "--num_processes", str(processes), "--main_process_port", str(free_port()),
    ] if processes > 1 else [sys.executable]  # fmt: skip
    command = [
        *launcher,
        str(SCRIPT),
        "--model_preset", "msclip-s-tiny",
        "--tokenizer_name_or_path", str(workspace / "tokenizer"),
        "--train_data", data,
        *(["--streaming"] if streaming else []),
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-4",
        "--logging_steps", "1",
        "--report_to", "none",
        "--seed", "0",
        "--output_dir", str(output),
        "--log_seen_samples", str(output / "seen"),
        *extra,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return output, result


def seen(output: Path, processes: int) -> list[list[str]]:
    return [(output / "seen" / f"seen_rank{rank}.txt").read_text().split() for rank in range(processes)]


def final_log(output: Path) -> dict:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return next(entry for entry in reversed(history) if "data_seen" in entry)


@pytest.mark.parametrize(("processes", "workers"), [(2, 2), (3, 0)])
def test_every_sample_once_per_epoch_across_ranks(workspace, processes, workers):
    slots = processes * max(1, workers)
    shards = write_shards(workspace / f"once-{processes}", count=8 * slots, per_shard=8, prefix=f"p{processes}")
    output, _ = launch(
        workspace, f"once-{processes}-run", processes, str(shards),
        "--num_train_epochs", "2", "--dataloader_num_workers", str(workers), "--save_strategy", "no",
    )  # fmt: skip
    per_rank = seen(output, processes)
    per_epoch = len(per_rank[0]) // 2
    assert per_epoch == 8 * slots // processes and all(len(keys) == 2 * per_epoch for keys in per_rank)
    expected = sorted(f"{shard:05d}{index}" for shard in range(slots) for index in range(8))
    for epoch in range(2):
        keys = [key for rank_keys in per_rank for key in rank_keys[epoch * per_epoch : (epoch + 1) * per_epoch]]
        assert sorted(keys) == expected, f"epoch {epoch + 1}"
    assert all(keys[:per_epoch] != keys[per_epoch:] for keys in per_rank)
    assert final_log(output)["data_kept"] == 2 * len(expected)


def write_damaged_shards(folder: Path) -> Path:
    """Two shards of 16 records; the first has, in its middle, a truncated image, a record without an image and an
    empty caption."""
    folder.mkdir()
    for shard in range(2):
        with tarfile.open(folder / f"{shard:06d}.tar", "w") as archive:
            for index in range(16):
                key = f"s{shard}k{index:02d}"
                members = {f"{key}.png": png(index), f"{key}.txt": f"a red cat {shard} {index}".encode()}
                if shard == 0 and index == 4:
                    members[f"{key}.png"] = png(index)[:50]
                if shard == 0 and index == 5:
                    del members[f"{key}.png"]
                if shard == 0 and index == 6:
                    members[f"{key}.txt"] = b"  "
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return folder


def test_bad_records_in_a_two_rank_stream_are_skipped_counted_and_named(workspace):
    shards = write_damaged_shards(workspace / "damaged")
    # 12 pairs per rank: each rank reads one shard front to back (no sample buffer), so rank 0 meets all three.
    output, result = launch(
        workspace, "damaged-run", 2, str(shards), "--train_num_samples", "24", "--shuffle_buffer_size", "0",
        "--num_train_epochs", "1", "--dataloader_num_workers", "0", "--save_strategy", "no",
    )  # fmt: skip
    per_rank = seen(output, 2)
    assert [len(keys) for keys in per_rank] == [12, 12]  # three full batches of 4 on each rank
    assert not {"s0k04", "s0k05", "s0k06"} & {key for keys in per_rank for key in keys}
    log = final_log(output)
    assert (log["data_seen"], log["data_kept"]) == (27, 24)
    assert (log["data_skipped_corrupt_image"], log["data_skipped_empty_caption"]) == (2, 1)
    for key in ("s0k04", "s0k05", "s0k06"):
        assert f"{key} in " in result.stderr, key
    assert "data: seen 27, kept 24, skipped 3" in result.stderr


def test_mixing_two_sources_three_to_one(workspace):
    first = write_shards(workspace / "mix-a", count=64, per_shard=16, prefix="a")
    second = write_shards(workspace / "mix-b", count=64, per_shard=16, prefix="b")
    output, result = launch(
        workspace, "mix-run", 2, f"{first}::{second}", "--train_data_weights", "3::1",
        "--train_num_samples", "320", "--num_train_epochs", "1", "--dataloader_num_workers", "0",
        "--save_strategy", "no",
    )  # fmt: skip
    shares = final_log(output)["data_source_shares"]
    # 320 draws at p = 3/4: four standard deviations is 0.097
    assert abs(shares[str(first)] - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 320), shares
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert "data mix (achieved / asked)" in result.stderr and "/ 0.750" in result.stderr
    assert sum(len(keys) for keys in seen(output, 2)) == 320


def test_resampled_mode_runs_the_given_sample_count_per_epoch(workspace):
    shards = write_shards(workspace / "resampled", count=24, per_shard=6, prefix="r")
    output, _ = launch(
        workspace, "resampled-run", 2, str(shards), "--dataset_resampled", "--train_num_samples", "40",
        "--num_train_epochs", "2", "--dataloader_num_workers", "0", "--save_strategy", "no",
    )  # fmt: skip
    per_rank = seen(output, 2)
    assert [len(keys) for keys in per_rank] == [40, 40]  # 2 epochs x 40 / 2 ranks
    log = json.loads((output / "trainer_state.json").read_text())
    assert log["global_step"] == 10  # 5 batches of 4 per rank and epoch


def kill_after_checkpoint(command_args: tuple, workspace: Path, name: str, shards: Path) -> Path:
    """Start the run, wait until every rank blocks in the forward pass after checkpoint 4, SIGKILL them all."""
    output = workspace / name
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configuration" / "accelerate" / "multi_process.yaml"),
        "--num_processes", "2", "--main_process_port", str(free_port()), str(SCRIPT),
        "--model_preset", "msclip-s-tiny", "--tokenizer_name_or_path", str(workspace / "tokenizer"),
        "--train_data", str(shards), "--streaming", "--per_device_train_batch_size", "4", "--learning_rate", "1e-4",
        "--logging_steps", "1", "--report_to", "none", "--seed", "0", "--output_dir", str(output),
        "--log_seen_samples", str(output / "seen"), *command_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALL_AFTER_STEP": "4"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not (output / "stalled").exists():
        assert process.poll() is None, process.stderr.read().decode()[-4000:]
        assert time.monotonic() < deadline, "the run never reached step 5"
        time.sleep(0.5)
    time.sleep(2.0)  # let the other rank reach the same forward pass
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    (output / "stalled").unlink()
    return output


def test_a_killed_streamed_run_resumes_with_the_same_sample_sequence(workspace):
    shards = write_shards(workspace / "resume", count=64, per_shard=8, prefix="k")
    options = (
        "--num_train_epochs", "2", "--dataloader_num_workers", "2", "--shuffle_buffer_size", "5",
        "--save_strategy", "steps", "--save_steps", "2",
    )  # fmt: skip
    full, _ = launch(workspace, "resume-full", 2, str(shards), *options)
    full_keys = seen(full, 2)
    assert [len(keys) for keys in full_keys] == [64, 64]  # 16 steps: 8 per epoch

    cut = kill_after_checkpoint(options, workspace, "resume-cut", shards)
    assert (cut / "checkpoint-4").is_dir() and not (cut / "checkpoint-6").exists()
    assert all((cut / "checkpoint-4" / f"stream_state_rank{rank}.json").is_file() for rank in range(2))
    before = [keys[:16] for keys in seen(cut, 2)]  # steps 1-4; step 5 was in flight when killed
    for path in (cut / "seen").glob("*.txt"):
        path.write_text("".join(f"{key}\n" for key in path.read_text().split()[:16]))

    _, resumed = launch(workspace, "resume-cut", 2, str(shards), *options, "--resume_from_checkpoint", "latest")
    assert "rank 1 worker 1: the data stream resumes in epoch 0 after batch 2, re-reading" in resumed.stderr
    assert final_log(cut)["data_kept"] == final_log(full)["data_kept"] == 128  # counts restored, not restarted
    after = seen(cut, 2)
    for rank in range(2):
        assert after[rank][:16] == before[rank]
        assert after[rank] == full_keys[rank], f"rank {rank}: the resumed run trained on other samples"
    history = {
        name: {
            e["step"]: e["loss"]
            for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
            if "loss" in e
        }
        for name, out in (("full", full), ("cut", cut))
    }
    for step in range(5, 17):
        assert_close_to_scale(history["cut"][step], history["full"][step], 1e-5, f"loss at step {step}")


def test_map_style_bad_records_without_the_pre_scan_keep_every_batch_full(workspace):
    """With --skip_record_check nothing drops bad records before training; each is replaced in its batch by a record
    drawn from the dataset. Without the replacement the short batch ends the run ("same local batch size")."""
    folder = workspace / "table"
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(32):
        if index not in (3, 17):  # 3 and 17 name files that do not exist
            (folder / "images" / f"{index}.png").write_bytes(png(index))
        rows.append({"file_name": f"images/{index}.png", "caption": "" if index == 9 else f"a red cat {index}"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output, result = launch(
        workspace, "table-run", 2, str(folder / "pairs.jsonl"), "--skip_record_check",
        "--num_train_epochs", "1", "--dataloader_num_workers", "0", "--save_strategy", "no", streaming=False,
    )  # fmt: skip
    log = final_log(output)
    assert log["data_kept"] == 32  # 4 steps x 2 ranks x 4 pairs: every batch full
    assert log["data_skipped_empty_caption"] >= 1 and log["data_skipped_corrupt_image"] >= 2
    assert log["data_seen"] == log["data_kept"] + log["data_skipped_empty_caption"] + log["data_skipped_corrupt_image"]
    assert "3.png" in result.stderr and "17.png" in result.stderr


def test_the_seen_samples_log_lists_what_was_trained_not_what_was_read_ahead(workspace):
    folder = workspace / "readahead"
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(64):
        (folder / "images" / f"{index}.png").write_bytes(png(index))
        rows.append({"file_name": f"images/{index}.png", "caption": f"a red cat {index}"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for streaming in (False, True):
        output, _ = launch(
            workspace, f"readahead-{streaming}", 1, str(folder / "pairs.jsonl"), "--max_steps", "5",
            "--dataloader_num_workers", "2", "--save_strategy", "no", streaming=streaming,
        )  # fmt: skip
        [keys] = seen(output, 1)
        assert len(keys) == 20 and len(set(keys)) == 20, (streaming, len(keys))  # 5 steps x 4 pairs, 2 workers
