"""Training data sources on real-layout bases (SD 1.5 and SDXL, random weights): image folders, prompts (teacher
trajectories in resumable shards), both stages, SDXL conditioning, and bad data refused before any model loads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from pnpguide import distill_guidance, distill_steps, sources
from pnpguide.cli import main
from pnpguide.conditioning import encode_negative, encode_prompts
from pnpguide.distill_guidance import GuidanceDistillConfig
from pnpguide.guide import GuideModel, OutputGuide
from pnpguide.loading import load_pipeline
from pnpguide.shards import INDEX, ShardPool
from pnpguide.training import make_accelerator

PROMPTS = ["a red cat", "a cat on red", "red"]
FAST = ["--max-steps", "2", "--batch-size", "2", "--lr-warmup-steps", "0", "--trajectories", "2", "--trajectory-steps", "2"]


def _distill(base, output_dir, *flags) -> list[str]:
    return ["--threads", "1", "distill", "--base", str(base), "--output-dir", str(output_dir), *FAST, *flags]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _image_folder(folder, sizes=((80, 64), (64, 96), (64, 64)), lines=None):
    """PNGs of several aspect ratios and their metadata.jsonl (diffusers' imagefolder layout)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if lines is None:
        lines = [json.dumps({"file_name": f"{i}.png", "text": PROMPTS[i % 3]}) for i in range(len(sizes))]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _shard(path, name):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name) if name in f.keys() else None


def test_stage1_trains_on_an_image_folder(sd15_dir, tmp_path):
    run = tmp_path / "run"
    assert main(_distill(sd15_dir, run, "--images", str(_image_folder(tmp_path / "images")))) == 0
    assert GuideModel.from_pretrained(run / "guide").config.trained_guidance_range == [2.0, 9.0]
    latents = _shard(run / "image-latents" / "shard-00000.safetensors", "latents")
    assert latents.shape == (3, 4, 8, 8)  # 64 px (the default) / the VAE's factor 8, every aspect ratio cropped square
    assert json.loads((run / "config.json").read_text())["source"] == "images"


def test_mix_on_a_real_base_is_images_plus_trajectories_over_their_captions(sd15_dir, tmp_path):
    run = tmp_path / "run"
    assert main(_distill(sd15_dir, run, "--source", "mix", "--images", str(_image_folder(tmp_path / "images")))) == 0
    assert (run / "image-latents" / INDEX).is_file() and (run / "guide" / "config.json").is_file()
    ids = _shard(run / "trajectories" / "shard-00000.safetensors", "prompt_ids")
    assert len(ids) == 2 * 2 and int(ids.max()) < 3  # indices into the three images' captions


def test_stage1_from_prompts_at_another_resolution(sd15_dir, prompts, tmp_path):
    run = tmp_path / "run"
    assert main(_distill(sd15_dir, run, "--prompts", str(prompts), "--resolution", "128")) == 0
    shard = run / "trajectories" / "shard-00000.safetensors"
    assert _shard(shard, "latents").shape == (2 * 2, 4, 16, 16)  # 2 trajectories x 2 steps, 128 px / 8
    assert (run / "guide" / "config.json").is_file()


def test_stage2_from_prompts_noises_teacher_samples(sd15_dir, prompts, tmp_path):
    OutputGuide.from_unet(load_pipeline(sd15_dir).unet).save_pretrained(tmp_path / "stage1")
    run = tmp_path / "steps"
    flags = ["--threads", "1", "distill-steps", "--base", str(sd15_dir), "--guide", str(tmp_path / "stage1"), "--prompts", str(prompts),
             "--teacher-steps", "4", "--student-steps", "2", "--output-dir", str(run), *FAST]
    assert main(flags) == 0
    assert len(GuideModel.from_pretrained(run / "guide-2").config.trained_timesteps) == 2
    shard = run / "trajectories" / "shard-00000.safetensors"
    assert _shard(shard, "latents").shape == (2, 4, 8, 8) and _shard(shard, "timesteps") is None  # final latents only


def test_stage2_on_sdxl_from_prompts(sdxl_dir, prompts, tmp_path):
    OutputGuide.from_unet(load_pipeline(sdxl_dir).unet).save_pretrained(tmp_path / "stage1")
    run = tmp_path / "steps"
    flags = ["--threads", "1", "distill-steps", "--base", str(sdxl_dir), "--guide", str(tmp_path / "stage1"), "--prompts", str(prompts),
             "--teacher-steps", "4", "--student-steps", "2", "--output-dir", str(run), "--resolution", "48", *FAST]
    assert main(flags) == 0
    assert (run / "guide-2" / "config.json").is_file()
    assert _shard(run / "trajectories" / "shard-00000.safetensors", "latents").shape == (2, 4, 6, 6)  # 48 px / 8


def test_stage2_on_sdxl_keeps_a_negative_head_and_drops_the_first_steps(sdxl_dir, prompts, tmp_path):
    """SDXL's empty negative is zeros, not an encoded prompt: the head still trains on the samples with a negative."""
    guide = OutputGuide.from_unet(load_pipeline(sdxl_dir).unet).with_negative_head()
    guide.register_to_config(trained_first_steps=2)
    guide.save_pretrained(tmp_path / "stage1")
    run = tmp_path / "steps"
    flags = ["--threads", "1", "distill-steps", "--base", str(sdxl_dir), "--guide", str(tmp_path / "stage1"), "--prompts", str(prompts),
             "--teacher-steps", "4", "--student-steps", "2", "--output-dir", str(run), "--resolution", "48", "--negative-rate", "1.0",
             "--learning-rate", "1e-2", *FAST]
    assert main(flags) == 0
    student = GuideModel.from_pretrained(run / "guide-2")
    assert student.config.negative_head and student.config.trained_first_steps is None
    assert student.negative_output_head.conv_out.weight.any()


def test_stage1_on_sdxl_from_prompts(sdxl_dir, prompts, tmp_path):
    run = tmp_path / "run"
    assert main(_distill(sdxl_dir, run, "--prompts", str(prompts))) == 0
    guide = GuideModel.from_pretrained(run / "guide")
    assert guide.config.addition_embed_type == "text_time"


def test_sdxl_conditioning_is_the_pipelines(sdxl_dir):
    """Both encoders, the pooled embedding, size/crop time ids; the negative is zeros (force_zeros_for_empty_prompt)."""
    pipe = load_pipeline(sdxl_dir)
    conditioning = encode_prompts(pipe, PROMPTS[:2], "cpu", 48)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[:2], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(conditioning.prompt_embeds, embeds)
    torch.testing.assert_close(conditioning.text_embeds, pooled)
    assert conditioning.time_ids.tolist() == [[48, 48, 0, 0, 48, 48]] * 2
    negative = encode_negative(pipe, "cpu", 48)
    assert len(negative) == 1 and not negative.prompt_embeds.any() and not negative.text_embeds.any()


def test_sdxl_teacher_samples_match_the_sdxl_pipelines_cfg(sdxl_dir, tmp_path):
    """A recorded teacher run lands where StableDiffusionXLPipeline (DDIM, same noise and w) lands."""
    from diffusers import DDIMScheduler

    pipe = load_pipeline(sdxl_dir)
    config = GuidanceDistillConfig(base=str(sdxl_dir), prompts="unused.txt", trajectories=1, trajectory_steps=3, output_dir=str(tmp_path))
    pool = sources.teacher_trajectories(pipe, ["a red cat"], tmp_path / "t", config, make_accelerator(config), record="samples")
    rows = pool.rows(torch.tensor([0]))
    generator = torch.Generator().manual_seed(hash((config.seed + 11, 0)) & sources.SEED_MASK)  # as the first shard draws them
    torch.randint(1, (1,), generator=generator)
    w = config.w_min + (config.w_max - config.w_min) * torch.rand(1, generator=generator)
    noise = torch.randn((1, 4, 8, 8), generator=generator)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    expected = pipe("a red cat", num_inference_steps=3, guidance_scale=float(w), latents=noise, output_type="latent").images
    torch.testing.assert_close(rows.latents, expected, atol=1e-5, rtol=1e-4)


def test_finished_shards_are_not_computed_again(tiny_base_dir, tmp_path, monkeypatch):
    pipe = load_pipeline(tiny_base_dir)
    calls = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    monkeypatch.setattr(sources, "TRAJECTORIES_PER_SHARD", 2)
    config = GuidanceDistillConfig(base=str(tiny_base_dir), prompts="unused.txt", trajectories=4, trajectory_steps=3, output_dir=str(tmp_path))
    folder, accelerator = tmp_path / "trajectories", make_accelerator(config)
    first = sources.teacher_trajectories(pipe, PROMPTS, folder, config, accelerator)
    assert len(calls) == 2 * 3 and len(first) == 4 * 3  # two shards of two runs, three steps each
    everything = first.rows(torch.arange(len(first)))
    (folder / "shard-00001.safetensors").unlink()  # as if the run died while writing it
    second = sources.teacher_trajectories(pipe, PROMPTS, folder, config, accelerator)
    assert len(calls) == 2 * 3 + 3  # only the missing shard was sampled again
    again = second.rows(torch.arange(len(second)))
    assert torch.equal(again.latents, everything.latents) and again.prompts == everything.prompts
    assert json.loads((folder / INDEX).read_text())["shards"] == [{"file": f"shard-0000{i}.safetensors", "rows": 6} for i in (0, 1)]


def test_a_shard_pool_reads_rows_across_shards_in_the_order_asked(tiny_base_dir, tmp_path):
    from pnpguide.shards import write_shards

    config = GuidanceDistillConfig(base=str(tiny_base_dir), prompts="p.txt", output_dir=str(tmp_path))
    make = lambda n: {"latents": torch.arange(3.0).add(10 * n).view(3, 1, 1, 1), "prompt_ids": torch.tensor([n, n, n])}  # noqa: E731
    pool = ShardPool(write_shards(tmp_path / "s", 3, make, {"kind": "test"}, make_accelerator(config)), ["zero", "one", "two"])
    rows = pool.rows(torch.tensor([8, 0, 4, 3]))
    assert rows.latents.flatten().tolist() == [22.0, 0.0, 11.0, 10.0] and rows.prompts == ["two", "zero", "one", "one"]


class FakeRank:
    """What write_shards asks of an Accelerator, for one rank of a data-parallel run."""

    def __init__(self, rank, world_size):
        self.process_index, self.num_processes, self.is_main_process = rank, world_size, rank == 0

    def wait_for_everyone(self):
        pass


def test_ranks_write_disjoint_shards_and_rank_0_indexes_them(tmp_path):
    from pnpguide.shards import write_shards

    written = {0: [], 1: []}

    def make(rank):
        return lambda n: written[rank].append(n) or {"latents": torch.zeros(2, 1, 1, 1), "prompt_ids": torch.zeros(2, dtype=torch.long)}

    write_shards(tmp_path, 5, make(1), {"kind": "test"}, FakeRank(1, 2))  # the second rank first: it must not write the index
    assert written[1] == [1, 3] and not (tmp_path / INDEX).exists()
    write_shards(tmp_path, 5, make(0), {"kind": "test"}, FakeRank(0, 2))
    assert written[0] == [0, 2, 4] and len(ShardPool(tmp_path, ["p"])) == 10


# ----------------------------------------------------------------------------------------------------------------
# bad data: one line, exit code 2, nothing written, no model loaded


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module in (distill_guidance, distill_steps):
        monkeypatch.setattr(module, "load_pipeline", refuse)


def _missing_file(tmp):
    return ["--images", str(_image_folder(tmp / "images", lines=['{"file_name": "0.png", "text": "a"}', '{"file_name": "gone.png", "text": "b"}']))]


BAD_DATA = [
    (lambda tmp: ["--source", "shapes"], "source 'shapes' is the embedded model's own training data"),
    (lambda tmp: [], "pass --prompts FILE (teacher trajectories) or --images DIR"),
    (lambda tmp: ["--images", str(tmp)], "has no metadata.jsonl"),
    (_missing_file, "metadata.jsonl:2: image 'gone.png' does not exist in"),
    (lambda tmp: ["--images", str(_image_folder(tmp / "images", lines=["{not json"]))], "metadata.jsonl:1: not JSON"),
    (lambda tmp: ["--images", str(_image_folder(tmp / "images", lines=['{"file_name": "0.png"}']))], "string 'file_name' and 'text'"),
    (lambda tmp: ["--images", str(_image_folder(tmp / "images")), "--resolution", "100"], "resolution 100 is not a multiple of 64"),
    (lambda tmp: ["--images", str(_image_folder(tmp / "images")), "--source", "trajectories"], "--images is read by source 'images' or 'mix'"),
    (lambda tmp: ["--images", str(tmp / "nowhere")], "does not exist"),
]


@pytest.mark.parametrize("flags, message", BAD_DATA)
def test_bad_data_is_refused_before_loading_or_writing(sd15_dir, tmp_path, capsys, no_model_loading, flags, message):
    run = tmp_path / "run"
    assert main(_distill(sd15_dir, run, *flags(tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.startswith("pnpguide distill: error:") and message in err and err.count("\n") == 1
    assert not run.exists()


@pytest.mark.parametrize("flags, message", [
    (["--source", "mix"], "source must be one of ('shapes', 'trajectories', 'images'), got 'mix'"),
    (["--source", "shapes"], "source 'shapes' is the embedded model's own training data"),
    (["--resolution", "96"], "resolution 96 is not a multiple of 64"),
])
def test_bad_stage2_data_is_refused_before_loading_or_writing(sd15_dir, prompts, tmp_path, capsys, no_model_loading, flags, message):
    run = tmp_path / "run"
    argv = ["distill-steps", "--base", str(sd15_dir), "--output-dir", str(run)] + (["--prompts", str(prompts)] if "--resolution" in flags else [])
    assert main(argv + flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not run.exists()


def test_the_embedded_base_defaults_to_trajectories_in_stage_1_and_shapes_in_stage_2(prompts):
    from pnpguide.distill_steps import StepDistillConfig

    assert GuidanceDistillConfig().source == "trajectories" and StepDistillConfig().source == "shapes"
    assert GuidanceDistillConfig().trajectory_first_steps == 5  # an output guide learns the first 5 steps, then carries
    assert GuidanceDistillConfig(design="residual").trajectory_first_steps is None  # a residual guide: every step
    assert GuidanceDistillConfig(source="shapes").source == "shapes"
    assert GuidanceDistillConfig(prompts=str(prompts)).source == "trajectories"
    assert GuidanceDistillConfig(images="x").source == "images"
    with pytest.raises(ValueError, match="leave out --resolution"):
        GuidanceDistillConfig(source="shapes", resolution=128)
