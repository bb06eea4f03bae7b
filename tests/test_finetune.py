"""The real fine-tuning job (jobs/finetune.py) on the demo data, on the shared local Ray cluster."""

import json
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import job_runs as jobs
from fixture_data import real_batch

from skindual import model
from skindual.errors import UserError
from skindual.finetune import (check_memory, finetune_settings, plan_finetune, step_memory_gb, training_rows,
                               training_selection)
from skindual.finetune_config import FinetuneConfig, resolve_precision
from skindual.fingerprint import config_fingerprint, settings_diff
from skindual.joint_trainer import JointTrainer, lr_factor
from skindual.storage import open_storage, ray_storage

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "4", "--checkpoint-every", "2", "--batch-size", "4", "--validation-per-class", "1",
        "--validation-steps", "2", "--lora-rank", "4", "--cpus-per-worker", "0.5"]


def start_job(args, ray_cluster):
    return jobs.start_job("finetune", args, ray_cluster)


def run_job(args, ray_cluster, timeout=600) -> tuple[int, str]:
    """The fine-tuning job to its end: (exit status, its stdout and stderr together)."""
    proc = start_job(args, ray_cluster)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


RESUMED = [*TINY, "--num-workers", "2"]
RESUMED[RESUMED.index("--steps") + 1] = "8"


def adapter_digests(folder: Path | str) -> dict[str, str]:
    """sha256 of the adapter's tensor files (its json also holds the run's name, which differs)."""
    files = json.loads(open_storage(str(folder)).read_bytes(model.ADAPTER_JSON))["files"]
    return {name: digest for name, digest in files.items() if name.endswith(".safetensors")}


@pytest.fixture(scope="module")
def uninterrupted(demo_real, ray_cluster, tmp_path_factory) -> Path:
    """The adapter of an 8-step run of two workers nothing interrupted: what a killed and resumed run must
    reproduce (each worker draws its own noise, timesteps and flips, and reads its own share of the pairs)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    args = ["--training-data", str(demo_real), "--output", str(out), "--name", "u", *RESUMED]
    code, log = run_job(args, ray_cluster)
    assert code == 0, log[-4000:]
    return out / "u" / "adapter"


def test_a_run_of_two_workers_on_s3_survives_a_killed_worker_and_a_killed_driver(demo_real, ray_cluster, s3_env,
                                                                                  uninterrupted):
    """Two workers write their checkpoints, the adapter, the grid and the loss curve to S3 (Ray Train's
    storage_path).  A preempted spot node takes training worker 1 with it: Ray Train (--max-failures, 3 by
    default) starts the workers again from the last registered checkpoint, each with its own RNG streams and place
    in its share of the pairs.  Then the driver is killed after a later checkpoint: the rerun resumes from the
    last one registered.  The run ends with the bytes of a local run nothing interrupted."""
    args = ["--training-data", str(demo_real), "--output", s3_env, "--name", "r", *RESUMED]
    proc = start_job(args, ray_cluster)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    run = f"{s3_env}/r"

    def wait_for(what: str, found) -> object:
        deadline = time.time() + 400
        while not (value := found()) and time.time() < deadline:
            assert proc.poll() is None, f"the job ended waiting for {what}: " + "".join(lines)[-4000:]
            time.sleep(0.2)
        assert value, f"no {what} in 400 s: " + "".join(lines)[-4000:]
        return value

    def worker_pid() -> int | None:
        found = [re.search(r"worker 1 of 2 on cpu, pid (\d+)", line) for line in list(lines)]
        return next((int(m.group(1)) for m in found if m), None)

    pid = wait_for("worker 1", worker_pid)
    wait_for("registered checkpoint", lambda: jobs.registered_steps(run))
    os.kill(pid, signal.SIGKILL)
    restarted = wait_for("restart", lambda: re.search(r"resumed from step ([1-7])\b", "".join(lines)))
    # the driver killed once the restarted workers registered a later checkpoint
    wait_for("checkpoint after the restart",
             lambda: [s for s in jobs.registered_steps(run) if s > int(restarted.group(1))])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(timeout=10)
    # the step Ray Train resumes from: the last checkpoint its manager registered before the kill
    first = jobs.registered_steps(run)[-1]
    assert int(restarted.group(1)) < first < 8, "".join(lines)[-4000:]

    code, out = run_job(args, ray_cluster)
    assert code == 0, out[-4000:]
    assert f"resumed from step {first}" in out and "step 8/8" in out and "steps/s" in out and "ETA" in out
    # the RNG streams, the data order and the EMA came back with the checkpoint, both times: the same bytes as a
    # run nothing interrupted
    assert adapter_digests(f"{run}/adapter") == adapter_digests(uninterrupted)
    storage = open_storage(s3_env)
    names = storage.list("r/")
    assert {f"r/adapter/{n}" for n in (model.LORA_FILE, model.CONVS_FILE, model.ADAPTER_JSON)} <= set(names)
    assert {"r/validation_grid.png", "r/loss_curve.png"} <= set(names)
    final = sorted(n.split("/")[1] for n in names if re.fullmatch(r"r/checkpoint_[^/]+/progress\.json", n))[-1]
    progress = json.loads(storage.read_bytes(f"r/{final}/progress.json"))
    assert progress["step"] == 8 and [h["step"] for h in progress["history"]] == list(range(1, 9))
    # each worker's share of a checkpoint lands in the same folder on S3
    assert {f"r/{final}/rng-rank{r}.safetensors" for r in (0, 1)} | {f"r/{final}/trainable.safetensors"} <= set(names)
    meta = json.loads(storage.read_bytes("r/adapter/" + model.ADAPTER_JSON))
    assert meta["layout"] == "channels" and meta["base_model"] == "demo"


def test_bad_flags_are_one_clear_line(ray_cluster, tmp_path):
    code, out = run_job(["--training-data", str(tmp_path / "missing"), "--output", str(tmp_path)],
                        ray_cluster)
    assert code == 2 and "--training-data" in out and str(tmp_path / "missing") in out and "Traceback" not in out
    code, out = run_job(["--steps", "0"], ray_cluster)
    assert code == 2 and "--steps 0" in out


def test_balanced_rows_even_out_classes(demo_real):
    from skindual.pairs import read_index

    rows = training_rows(read_index(str(demo_real)))
    balanced = training_selection(rows, True, 0)
    by_key = dict(zip(rows.column("key").to_pylist(), rows.column("class_index").to_pylist()))
    counts = np.bincount([by_key[k] for keys in balanced.values() for k, n in keys.items() for _ in range(n)])
    assert counts.min() == counts.max()
    raw = np.bincount(np.asarray(rows.column("class_index")))
    assert raw.max() == counts.max() and raw.min() < raw.max()
    assert set(rows.column("split").to_pylist()) == {"train"}
    cut = training_rows(read_index(str(demo_real)), real_fraction=0.3)
    assert np.bincount(np.asarray(cut.column("class_index"))).tolist() == [int(np.ceil(0.3 * n)) for n in raw]
    with pytest.raises(UserError):
        FinetuneConfig(batch_size=0)


def test_learning_rate_warms_up_then_holds_or_decays_to_zero():
    assert [lr_factor(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(10, 4, 20, "constant") == 1.0
    assert lr_factor(4, 4, 20, "cosine") == 1.0
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0)


def test_prior_term_starts_at_zero_and_ema_lags_the_weights(demo_real):
    """Plain PyTorch (no Ray): at step 0 the widened UNet's image prediction IS the base model's, so the
    prior-preservation term is 0; the EMA moves more slowly than the weights and is swapped in only
    inside `ema_weights()`."""

    cfg = FinetuneConfig(training_data=str(demo_real), steps=3, batch_size=2, lora_rank=4, w_prior=1.0,
                         ema_decay=0.9, lr=1e-3, warmup_steps=1)
    trainer = JointTrainer(cfg, torch.device("cpu"))
    batch = real_batch(demo_real, 64)
    first = trainer.train_step(batch)
    assert first["prior"] < 1e-10 and first["img"] > 0
    later = trainer.train_step(batch)
    assert later["prior"] > 1e-6  # the image branch moved; the term now pulls it back
    raw = {k: v.clone() for k, v in trainer.state().items()}  # on a CPU `state()` aliases the live weights
    name = next(k for k in raw if "lora_B" in k)
    assert not torch.equal(trainer.ema[name], raw[name])
    # both moved from B=0 at the same sign, the EMA a shorter way
    assert 0 < trainer.ema[name].abs().sum() < raw[name].abs().sum()
    with trainer.ema_weights():
        torch.testing.assert_close(trainer.state()[name], trainer.ema[name])
    assert all(torch.equal(v, raw[k]) for k, v in trainer.state().items())  # the trained weights back, exactly


def test_each_worker_resumes_its_own_rng_streams_and_data_order(demo_real, tmp_path):
    """Plain PyTorch (no Ray): two ranks write their shares of one checkpoint folder, as the Ray Train loop
    does; restored, each draws on from where it stood -- its own noise, timesteps and flips, its own place
    in its share of the pairs -- and a checkpoint of two workers is refused to three."""
    from safetensors import safe_open

    from skindual.joint_trainer import load_checkpoint, save_checkpoint

    cfg = FinetuneConfig(training_data=str(demo_real), steps=3, batch_size=2, lora_rank=4, ema_decay=0.9,
                         name="two")
    batch = real_batch(demo_real, 64)
    ranks = [JointTrainer(cfg, torch.device("cpu"), rank, 2) for rank in (0, 1)]
    torch_states = []
    for trainer in ranks:
        trainer.train_step(batch)
        trainer.epoch_seed, trainer.epoch_batches = 7, 1 + trainer.rank  # where the loop stands in its shard
        torch.manual_seed(100 + trainer.rank)  # each worker process's own global stream
        torch_states.append(torch.get_rng_state())
        save_checkpoint(trainer, str(tmp_path))
    assert not torch.equal(ranks[0].generator.get_state(), ranks[1].generator.get_state())
    with safe_open(str(tmp_path / "rng-rank1.safetensors"), "pt") as f:  # tensors and text: nothing unpickled
        assert f.metadata()["epoch_batches"] == "2"
    for trainer, torch_state in zip(ranks, torch_states):
        restored = JointTrainer(cfg, torch.device("cpu"), trainer.rank, 2)
        load_checkpoint(restored, str(tmp_path))
        assert torch.equal(restored.generator.get_state(), trainer.generator.get_state())
        assert torch.equal(torch.get_rng_state(), torch_state)
        assert (restored.step, restored.epoch_seed, restored.epoch_batches) == (1, 7, 1 + trainer.rank)
        # rank 0's weights and EMA (what DDP keeps equal on every rank) on every rank
        assert all(torch.equal(v, ranks[0].state()[k]) for k, v in restored.state().items())
    with pytest.raises(UserError, match=r"^run two's last checkpoint was written by 2 worker\(s\), this run has 3: "
                                        r"resume it with --num-workers 2, or start another --name$"):
        restored.world_size = 3  # as if this worker were one of three
        load_checkpoint(restored, str(tmp_path))


def test_a_rerun_with_other_steps_or_cpu_threads_is_refused_naming_the_flag(demo_real, tmp_path):
    """The settings that change the trained weights are fingerprinted: --steps (the cosine schedule decays to 0
    at it: more steps are another run, not a continuation), and on CPU workers --cpus-per-worker (their torch
    threads); --checkpoint-every is not (a resume is exact), nor --cpus-per-worker beside GPUs."""
    cfg = FinetuneConfig(training_data=str(demo_real), output=str(tmp_path), name="r", steps=4)
    plan = plan_finetune(cfg)
    (tmp_path / "r").mkdir()
    # the run.json run_finetune writes as the run starts
    (tmp_path / "r" / "run.json").write_text(json.dumps({"fingerprint": plan.fingerprint, "settings": plan.settings}))
    with pytest.raises(UserError, match=rf"^run r at {tmp_path} was started with --steps 4, now --steps 8; .*"
                                        r"another --name$"):
        plan_finetune(replace(cfg, steps=8))
    with pytest.raises(UserError, match=r"was started with --cpus-per-worker 1.0, now --cpus-per-worker 2.0; "):
        plan_finetune(replace(cfg, cpus_per_worker=2.0))
    assert plan_finetune(replace(cfg, checkpoint_every=2)).fingerprint == plan.fingerprint
    on_gpus = replace(cfg, use_gpu=True)
    assert plan_finetune(replace(on_gpus, name="g", cpus_per_worker=2.0)).fingerprint == \
        plan_finetune(replace(on_gpus, name="g")).fingerprint


def test_lora_on_the_resnet_blocks_and_the_prior_at_high_noise_only(demo_real):
    """Plain PyTorch (no Ray): --lora-targets attention+resnet trains LoRA on the ResNet convolutions too, and the
    prior's teacher (the UNet with every LoRA switched off, its original convs) stays the base exactly; with
    --prior-min-t the prior counts only the samples at or above it, the base predicting only theirs."""
    cfg = FinetuneConfig(training_data=str(demo_real), steps=3, batch_size=8, lora_rank=4,
                         lora_targets="attention+resnet", w_prior=1.0, prior_min_t=500, ema_decay=0, lr=1e-3,
                         warmup_steps=1)
    trainer = JointTrainer(cfg, torch.device("cpu"))
    batch = real_batch(demo_real, 64, n=8)
    first = trainer.train_step(batch)
    assert first["prior"] < 1e-10 and 0 < first["high_t"] < 8  # step 0 is the base; some samples below 500
    later = [trainer.train_step(batch) for _ in range(2)]
    assert all(0 < m["high_t"] < 8 for m in later) and all(m["prior"] > 1e-8 for m in later)
    state = trainer.state()
    convs = [k for k in state if ".resnets." in k and ".conv1.lora_B" in k]
    assert convs and all(state[k].abs().sum() > 0 for k in convs)  # the ResNet convolutions' LoRA trained

    base = model.load_pipeline(cfg.base_model).unet
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, base.config.cross_attention_dim, generator=g)
    t = torch.tensor([900, 600])
    with torch.no_grad():
        with trainer.base_unet() as teacher:
            torch.testing.assert_close(teacher(x, t, emb).sample, base(x, t, emb).sample)
        adapted = trainer.unet(torch.cat([x, torch.zeros_like(x)], 1), t, emb).sample[:, :4]
        assert not torch.allclose(adapted, base(x, t, emb).sample, atol=1e-4)
    # both shape the weights: the run's fingerprint covers them, and a refused rerun names them
    settings = finetune_settings(cfg, "data")
    for change in ({"lora_targets": "attention"}, {"prior_min_t": 0}):
        other = finetune_settings(replace(cfg, **change), "data")
        assert config_fingerprint(other) != config_fingerprint(settings)
        assert settings_diff(settings, other).startswith(f"--{next(iter(change)).replace('_', '-')} ")
    with pytest.raises(UserError, match=r"^--prior-min-t 1000: must be in 0..999$"):
        FinetuneConfig(prior_min_t=1000)
    with pytest.raises(UserError, match=r"^--lora-targets 'all': choose one of attention, attention\+resnet$"):
        FinetuneConfig(lora_targets="all")
    with pytest.raises(UserError, match=r"^--lora-targets attention\+resnet: only with --train lora"):
        FinetuneConfig(train="full", lora_targets="attention+resnet")


def test_config_built_in_code_is_checked_like_flags():
    with pytest.raises(UserError, match=r"^--layout 'tiles': choose one of channels, side-by-side$"):
        FinetuneConfig(layout="tiles")
    with pytest.raises(UserError, match=r"^--lr-schedule 'linear': choose one of constant, cosine$"):
        FinetuneConfig(lr_schedule="linear")
    with pytest.raises(UserError, match=r"^--grad-accum 0: must be at least 1$"):
        FinetuneConfig(grad_accum=0)


def test_gradient_accumulation_all_reduces_on_the_last_micro_batch_only(demo_real, tmp_path):
    """DDP's all-reduce (here a counting comm hook on a one-process gloo group) runs once per optimiser step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = FinetuneConfig(training_data=str(demo_real), steps=2, batch_size=2, lora_rank=4, grad_accum=3,
                             ema_decay=0)
        trainer = JointTrainer(cfg, torch.device("cpu"))
        reduced_at: list[int] = []

        def count(state, bucket):
            reduced_at.append(trainer.micro)
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        trainer.model = DistributedDataParallel(trainer.unet)
        trainer.model.register_comm_hook(None, count)
        batch = real_batch(demo_real, 64)
        taken = [trainer.train_step(batch) is not None for _ in range(6)]
        assert taken == [False, False, True, False, False, True]
        assert sorted(set(reduced_at)) == [2, 5]  # during the backward of micro-batches 3 and 6 only
    finally:
        dist.destroy_process_group()


def test_checkpoints_on_aws_s3_use_the_buckets_region(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    asked: list[str] = []
    path, filesystem = ray_storage("s3://my-bucket/runs", None, region_of=lambda b: asked.append(b) or "eu-west-2")
    assert path == "my-bucket/runs" and asked == ["my-bucket"] and filesystem.region == "eu-west-2"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-1")
    _, on_endpoint = ray_storage("s3://b/runs", "http://127.0.0.1:9000")
    assert on_endpoint.region == "us-west-1"


def test_the_defaults_fit_a_24_gb_gpu_and_settings_that_do_not_are_refused():
    sd2, cfg = [320, 640, 1280, 1280], FinetuneConfig(use_gpu=True)
    assert resolve_precision(cfg.mixed_precision, True) == "bf16" and resolve_precision("auto", False) == "no"
    assert step_memory_gb(cfg, sd2, 512) <= 24 and cfg.max_failures > 0
    check_memory(cfg, sd2, 512, "A10G")
    fp32 = replace(cfg, mixed_precision="no")
    with pytest.raises(UserError, match=r"^--batch-size 8 --mixed-precision no at 512²: one training step needs "
                                        r"about [\d.]+ GB, more than the 24 GB of an A10G; use --mixed-precision bf16 "
                                        r"or --batch-size \d or --gradient-checkpointing \(README"):
        check_memory(fp32, sd2, 512, "A10G")
    check_memory(fp32, sd2, 512, "H100")  # 80 GB
    check_memory(fp32, sd2, 512, "")  # a GPU of unknown memory: not refused here
    assert step_memory_gb(cfg, [32, 64], 64) is None  # other bases (the demo's): no estimate
    # the consistency reward on every sample (its worst case) adds a little, and the defaults with it still fit
    reward = replace(cfg, w_consistency=1.0, consistency_segmenter="qc")
    assert step_memory_gb(cfg, sd2, 512) < step_memory_gb(reward, sd2, 512) <= 24
    check_memory(reward, sd2, 512, "A10G")
    # LoRA on the ResNet blocks too: more activations a sample, the defaults still fit; the whole UNet adds its fp32
    # weights, gradients, AdamW moments, EMA and autocast's bf16 copies (20 bytes a parameter) and is refused there
    resnet = replace(cfg, lora_targets="attention+resnet")
    assert step_memory_gb(cfg, sd2, 512) < step_memory_gb(resnet, sd2, 512) <= 24
    full = replace(cfg, train="full")
    assert step_memory_gb(full, sd2, 512) - step_memory_gb(resnet, sd2, 512) == pytest.approx(
        865_910_724 * 20 / 1024**3 - 0.08, abs=0.15)
    with pytest.raises(UserError, match=r"^--batch-size 8 --mixed-precision bf16 at 512²: one training step needs "
                                        r"about [\d.]+ GB, more than the 24 GB of an A10G; use --batch-size 1 "):
        check_memory(full, sd2, 512, "A10G")
    check_memory(full, sd2, 512, "H100")


def test_the_consistency_reward_trains_the_image_through_a_frozen_segmenter(demo_real, tmp_path):
    """Plain PyTorch (no Ray): with --w-consistency the step logs the reward, the segmenter stays frozen, and the
    gradient reaches the trained weights through the decoded image (a run with only the reward moves them)."""
    from skindual.downstream import SmallUNet
    from skindual.qc_model import QCModelConfig, write_segmenter

    torch.manual_seed(0)
    write_segmenter(QCModelConfig(output=str(tmp_path / "qc"), size=32, width=8), SmallUNet(8), {"val_dice": None})
    cfg = FinetuneConfig(training_data=str(demo_real), steps=2, batch_size=2, lora_rank=4, w_img=0, w_mask=0,
                         w_geo=0, w_consistency=1.0, consistency_segmenter=str(tmp_path / "qc"),
                         consistency_max_t=1000, ema_decay=0, lr=1e-3, warmup_steps=0)
    trainer = JointTrainer(cfg, torch.device("cpu"))
    frozen = {k: v.clone() for k, v in trainer.segmenter.state_dict().items()}
    before = {k: v.clone() for k, v in trainer.state().items()}
    batch = real_batch(demo_real, 64)
    metrics = trainer.train_step(batch)
    assert metrics["consistency"] > 0 and metrics["low_t"] == 2 and metrics["img"] > 0
    after = trainer.state()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the reward alone moved the weights
    assert all(torch.equal(frozen[k], v) for k, v in trainer.segmenter.state_dict().items())
    with pytest.raises(UserError, match="--w-consistency 1.0: .* needs --consistency-segmenter"):
        FinetuneConfig(w_consistency=1.0)
    with pytest.raises(UserError, match="--consistency-segmenter .*: no segmenter.json there"):
        plan_finetune(replace(cfg, consistency_segmenter=str(tmp_path), output=str(tmp_path / "runs")))
