"""The demo bases' pretraining recipe (lab/demo_base.py): its losses, and a shortened rebuild of each kind."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

LAB = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(LAB))  # the lab's scripts import each other by name (they run as `python lab/<script>.py`)

import demo_base as demo_model  # noqa: E402
from skindual import base_models, quality
from skindual.demo import render
from skindual.demo.world import vae_round_trip
from skindual.model import load_pipeline

SMALL = {"akiec": 6, "bcc": 6, "bkl": 8, "df": 5, "mel": 8, "nv": 20, "vasc": 5}


def folder_arrays(root, size):
    from skindual import data

    table = data.read_ham10000(str(root)).table
    pairs = [data.load_pair(i, m, size) for i, m in zip(table.column("image_path").to_pylist(),
                                                        table.column("mask_path").to_pylist())]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return render.write_demo_dataset(tmp_path_factory.mktemp("ham") / "HAM10000", SMALL, seed=3)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return base_models.demo_base_path(cache=tmp_path_factory.mktemp("cache"))


def test_the_vae_loss_adds_the_colour_term_linearly_and_the_round_trip_keeps_the_shape(base_folder, demo_root):
    vae = load_pipeline(base_folder).vae
    images, masks = folder_arrays(demo_root, 64)
    data_ = quality.images_to_tensor(images)

    def loss(weight: float) -> float:  # the same draw each time: the generator fixes batch, flip and sample
        with torch.no_grad():
            return demo_model.vae_batch_loss(vae, data_, 4, torch.Generator().manual_seed(5), weight).item()

    plain, four, eight = loss(0.0), loss(4.0), loss(8.0)
    assert four > plain and eight - plain == pytest.approx(2 * (four - plain), rel=1e-4)
    trip = vae_round_trip(vae, images[:6])
    assert trip.dtype == np.uint8 and trip.shape == images[:6].shape
    assert np.abs(trip.astype(float) - images[:6]).mean() < 20  # a reconstruction, not noise


def test_rebuild_recipe_still_runs_shortened(tmp_path):
    recipe = demo_model.PretrainRecipe(per_class=2, vae_steps=2, unet_steps=2, batch_size=4, vae_batch_size=4)
    pipe, configs = demo_model.pretrain_demo_base(recipe)
    artifact = tmp_path / "base.safetensors"
    demo_model.save_artifact(pipe, recipe, artifact, configs)
    folder = base_models.demo_base_path(artifact, cache=tmp_path / "cache")
    again = load_pipeline(folder)
    assert again.vae.config.scaling_factor == pytest.approx(pipe.vae.config.scaling_factor)
    for name in ("unet", "vae", "text_encoder"):
        for (k, a), b in zip(getattr(pipe, name).state_dict().items(), getattr(again, name).state_dict().values()):
            torch.testing.assert_close(a.half().float(), b, msg=f"{name}.{k}")


def test_a_rebuild_with_other_vae_widths_continues_from_a_base_with_a_fresh_vae(tmp_path):
    """The hard recipe's shape: text encoder and UNet from the easy base, a fresh VAE of other widths
    trained with the colour term, recorded in the artifact's configs and recipe."""
    recipe = demo_model.PretrainRecipe(per_class=2, vae_steps=2, unet_steps=2, batch_size=4, vae_batch_size=4,
                                       difficulty="hard", start_from=str(base_models.ARTIFACT),
                                       vae_channels="16,32,32", vae_colour_weight=4.0, vae_lesion_weight=8.0,
                                       vae_lesion_smooth=True)
    pipe, configs = demo_model.pretrain_demo_base(recipe)
    assert list(pipe.vae.config.block_out_channels) == [16, 32, 32] == configs["vae"]["block_out_channels"]
    easy = load_pipeline("demo")
    for a, b in zip(pipe.text_encoder.state_dict().values(), easy.text_encoder.state_dict().values()):
        torch.testing.assert_close(a, b)  # frozen: exactly the easy base's
    artifact = tmp_path / "hard.safetensors"
    demo_model.save_artifact(pipe, recipe, artifact, configs)
    again = load_pipeline(base_models.demo_base_path(artifact, cache=tmp_path / "cache"))
    assert list(again.vae.config.block_out_channels) == [16, 32, 32]
    recorded = json.loads(base_models.artifact_metadata(artifact)["recipe"])
    assert recorded["vae_channels"] == [16, 32, 32] and recorded["vae_colour_weight"] == 4.0
    assert recorded["vae_lesion_weight"] == 8.0 and recorded["vae_lesion_smooth"] is True
    # the command that rebuilds it names every flag the recipe differs in (not --start-from: recorded by sha256)
    assert base_models.artifact_metadata(artifact)["rebuild_command"] == (
        "python lab/build_demo_base.py --per-class 2 --vae-steps 2 --vae-batch-size 4 --unet-steps 2 --batch-size 4 "
        "--difficulty hard --vae-channels 16,32,32 --vae-colour-weight 4 --vae-lesion-weight 8 --vae-lesion-smooth")


def test_the_lesion_colour_term_weighs_the_lesions_cells_only():
    """`lesion_colour_loss`: 0 where no mask has a lesion; with masks covering the whole image, the plain
    mean L1 of the pooled round trip; with the lesion in one quadrant, that quadrant's error alone."""
    import torch.nn.functional as F

    vae = load_pipeline("demo").vae
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    quadrant = torch.zeros(4, 64, 64, dtype=torch.bool)
    quadrant[:, :32, :32] = True

    def loss(lesions):
        return demo_model.lesion_colour_loss(vae, images, lesions, 4, torch.Generator().manual_seed(1))

    def pooled_error():  # the same draw as `loss`: batch indices, then the posterior sample
        g = torch.Generator().manual_seed(1)
        batch = images[torch.randint(4, (4,), generator=g)]
        recon = vae.decode(vae.encode(batch).latent_dist.sample(generator=g)).sample
        return (F.avg_pool2d(recon, 4) - F.avg_pool2d(batch, 4)).abs().mean(1)

    with torch.no_grad():
        assert loss(torch.zeros(4, 64, 64, dtype=torch.bool)).item() == 0.0
        error = pooled_error()
        torch.testing.assert_close(loss(torch.ones(4, 64, 64, dtype=torch.bool)), error.mean())
        torch.testing.assert_close(loss(quadrant), error[:, :8, :8].mean())
        assert not torch.isclose(error[:, :8, :8].mean(), error.mean())


def test_the_smooth_low_band_has_no_cell_grid():
    """`low_band(smooth=True)`: a normalised Gaussian blur at full resolution, so a constant image stays
    constant and a one-pixel shift of the input shifts the output by one pixel (the 4 × 4 pooling cannot:
    its cells are fixed), which leaves a decoder no cell borders to fit colour offsets to."""
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(demo_model.low_band(torch.full_like(x, 0.3), 4, smooth=True), torch.full_like(x, 0.3))
    shifted = demo_model.low_band(torch.roll(x, 1, dims=-1), 4, smooth=True)
    torch.testing.assert_close(shifted[..., 8:-8], demo_model.low_band(x, 4, smooth=True)[..., 7:-9])
    assert demo_model.low_band(x, 4).shape == (2, 3, 8, 12)  # the default: the pooled cells
    # the lesion term on it still weighs nothing where no lesion is
    vae = load_pipeline("demo").vae
    with torch.no_grad():
        none = torch.zeros(2, 32, 48, dtype=torch.bool)
        assert demo_model.lesion_colour_loss(vae, x * 2 - 1, none, 2, torch.Generator().manual_seed(0),
                                             smooth=True).item() == 0.0


@pytest.mark.parametrize("flags, needle", [
    ({"vae_channels": "64,x"}, "--vae-channels 64,x"), ({"vae_channels": "64,60"}, "multiple of 16"),
    ({"vae_colour_weight": -1.0}, "--vae-colour-weight -1"), ({"vae_lesion_weight": -0.5}, "--vae-lesion-weight -0.5"),
])
def test_the_rebuild_command_refuses_bad_flags(flags, needle):
    from build_demo_base import BuildBaseConfig

    from skindual.errors import UserError

    with pytest.raises(UserError, match=needle):
        BuildBaseConfig(**flags)


def test_a_bad_flag_of_the_rebuild_command_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(LAB / "build_demo_base.py"), "--output", str(tmp_path / "w"),
                             "--vae-channels", "64,x"], capture_output=True, text=True, cwd=LAB.parent, timeout=300)
    assert result.returncode == 2 and "--vae-channels 64,x" in result.stderr and "Traceback" not in result.stderr
