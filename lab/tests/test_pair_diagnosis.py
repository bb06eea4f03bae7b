"""lab/pair_diagnosis.py: its variants, and the whole diagnosis at the tiniest settings on a small hard demo world."""

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lab's scripts import each other by name

from pair_diagnosis import PRESETS, main, parse_variant  # noqa: E402

from skindual.finetune_config import FinetuneConfig  # noqa: E402
from skindual.prompts import CLASS_CODES  # noqa: E402


def test_a_variant_splits_into_the_fine_tune_and_the_sampling_and_steps_multiply():
    v = parse_variant("lora_targets=attention+resnet, guidance=2,steps=x2", 300)
    assert v.finetune == {"lora_targets": "attention+resnet", "steps": 600} and v.sampling == {"guidance": 2.0}
    assert v.name == "guidance-2_lora_targets-attention+resnet_steps-x2"
    assert v.run_name == "lora_targets-attention+resnet_steps-x2"  # what the guidance variants share
    assert parse_variant("", 300).name == parse_variant("guidance=3", 300).run_name == "demo"
    for text in PRESETS["issue"]:  # every preset variant is a valid fine-tune
        FinetuneConfig(**parse_variant(text, 400).finetune)
    with pytest.raises(SystemExit, match="no field 'lora_target'"):
        parse_variant("lora_target=all", 300)


@pytest.fixture(scope="module")
def hard_world(tmp_path_factory):
    """A small hard demo world (6 pairs a class, 12 nv; a test set of 3 a class) prepared into WORLD/real and
    WORLD/real-test, as --world takes it."""
    from skindual.demo import render
    from skindual.prepare import PrepareConfig, prepare_here

    root = tmp_path_factory.mktemp("world")
    for name, per_class, seed in (("real", 6, 1), ("real-test", 3, 2)):
        render.write_demo_dataset(root / f"data-{name}", {c: 2 * per_class if c == "nv" else per_class
                                                          for c in CLASS_CODES}, seed=seed, difficulty="hard")
        prepare_here(PrepareConfig(ham10000=str(root / f"data-{name}"), output=str(root / name),
                                   samples_per_shard=100))
    (root / "demo_world.json").write_text(json.dumps({"difficulty": "hard"}))
    return root


def tiny_args(world: Path, out: Path) -> list[str]:
    return ["--world", str(world), "--output", str(out), "--real-fraction", "1", "--finetune-steps", "1",
            "--per-class", "2", "--classes", "df,vasc", "--sample-steps", "2", "--qc-attempts", "2", "--judge-steps",
            "2", "--qc-steps", "2", "--extractor-steps", "2", "--sheet-per-class", "2", "--device", "cpu"]


@pytest.mark.slow  # a whole diagnosis: fine-tunes, draws, judges (the slow tier's "whole chains")
def test_the_diagnosis_gives_one_table_of_every_variant_with_its_sheets(hard_world, tmp_path, capsys):
    out = tmp_path / "run"
    tiny = tiny_args(hard_world, out)
    lever = "lora_targets=attention+resnet,prior_min_t=600,steps=x2"
    line = main([*tiny, "--variants", lever, f"{lever},guidance=2"])
    table = line["table"]
    run = "lora_targets-attention+resnet_prior_min_t-600_steps-x2"
    fixed = ["real pairs (train cut)", "real test pairs (held out from the judge)",
             "real test pairs through the base's VAE (the decoder's ceiling)"]
    names = [*fixed, run, f"guidance-2_{run}"]
    assert list(table) == names
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == line  # the last line: the table
    for name in names:
        row = table[name]
        assert 0 <= row["judge_raw"]["mean"] <= 1 and 0 <= row["judge_kept"]["mean"] <= 1
        assert 0 <= row["class_fidelity"]["mean"] <= 1
        assert [c for c, v in row["diversity"].items() if v is not None] == ["df", "vasc"]  # the classes drawn
        assert row["diversity_min"] == min(row["diversity"]["df"], row["diversity"]["vasc"]) > 0
        sheet_name = {fixed[0]: "real", fixed[1]: None, fixed[2]: "real-test-vae"}.get(name, name)
        if sheet_name is None:
            continue
        with Image.open(out / "sheets" / f"{sheet_name}.png") as sheet:
            assert sheet.size == (2 * 2 * (2 * 64 + 2), 2 * 2 * (64 + 2))  # a row a class drawn, 2 pairs, scaled 2×
    # the decoder's ceiling: the same held-out pairs, their images through the base's VAE (so not the same figures)
    assert table[fixed[1]]["judge_raw"] != table[fixed[2]]["judge_raw"] or \
        table[fixed[1]]["diversity"] != table[fixed[2]]["diversity"]
    assert table[run]["seconds_per_step"]["mean"] > 0 and table[run]["peak_memory_gb"]["mean"] > 0
    # the guidance variant samples the same fine-tune again: one fine-tune (2 steps), the same step figures
    assert [p.name for p in (out / "runs").iterdir() if p.is_dir()] == [f"{run}-seed0"]
    assert table[f"guidance-2_{run}"]["seconds_per_step"] == table[run]["seconds_per_step"]
    adapter = json.loads((out / "runs" / f"{run}-seed0" / "adapter" / "skindual_adapter.json").read_text())
    assert adapter["lora"]["targets"] == "attention+resnet"
    assert adapter["training_config"]["prior_min_t"] == 600 and adapter["training_config"]["steps"] == 2
    md = (out / "pair_diagnosis.md").read_text()
    assert all(f"| {name} |" in md for name in names)
    saved = json.loads((out / "pair_diagnosis.json").read_text())
    assert saved["table"] == table and len(saved["variants"][run]) == 1
    # a rerun keeps what the table holds (nothing measured again) and loads the judges it trained; other settings
    # are refused before any work
    trained = {p: (out / p).stat().st_mtime_ns for p in ("judge.safetensors", "qc/segmenter.safetensors")}
    again = main([*tiny, "--variants", lever])["table"]
    assert list(again) == names and again[run] == table[run] and again[names[-1]] == table[names[-1]]
    assert {p: (out / p).stat().st_mtime_ns for p in trained} == trained
    resaved = json.loads((out / "pair_diagnosis.json").read_text())
    assert [resaved[k] for k in ("judge_on_real_val", "qc_val_dice")] == [saved[k] for k in ("judge_on_real_val",
                                                                                             "qc_val_dice")]
    with pytest.raises(SystemExit, match=r"other settings \(per_class 2 now 3\)"):
        main([*tiny, "--per-class", "3"])


@pytest.mark.slow  # three fine-tunes and their draws
def test_a_controlnet_variant_draws_images_for_the_real_masks_and_for_the_joint_models(hard_world, tmp_path):
    """``train=controlnet``: one ControlNet, its images drawn for the real cut's masks and for the masks the demo
    variant's joint model samples first (that fine-tune trained for it)."""
    out = tmp_path / "run"
    line = main([*tiny_args(hard_world, out), "--variants", "train=controlnet", "train=controlnet,masks=joint",
                 "train=controlnet,base_lora=4"])
    table = line["table"]
    assert list(table)[3:] == ["train-controlnet", "masks-joint_train-controlnet", "base_lora-4_train-controlnet"]
    for row in list(table.values())[3:]:
        assert 0 <= row["judge_raw"]["mean"] <= 1 and 0 <= row["class_fidelity"]["mean"] <= 1
    assert sorted(p.name for p in (out / "runs").iterdir() if p.is_dir()) == [
        "base_lora-4_train-controlnet-seed0", "demo-seed0", "train-controlnet-seed0"]
    meta = json.loads((out / "runs" / "train-controlnet-seed0" / "adapter" / "skindual_adapter.json").read_text())
    assert meta["train"] == "controlnet" and meta["training_config"]["w_prior"] == 0
    # base_lora=4: the ControlNet trained beside a LoRA on the base; that base, LoRA fused, written beside it and
    # recorded as the ControlNet's base (generation drew with it)
    run = out / "runs" / "base_lora-4_train-controlnet-seed0"
    meta = json.loads((run / "adapter" / "skindual_adapter.json").read_text())
    assert meta["train"] == "controlnet" and meta["base_model"] == str(run / "base")
    assert (run / "base" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((run / "train_figures.json").read_text())["base_lora"] == 4
    with pytest.raises(SystemExit, match="masks= is a setting of a train=controlnet variant"):
        main([*tiny_args(hard_world, out), "--variants", "masks=joint"])
    with pytest.raises(SystemExit, match="base_lora= is a setting of a train=controlnet variant"):
        main([*tiny_args(hard_world, out), "--variants", "base_lora=4"])
