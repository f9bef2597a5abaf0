"""The own-data experiments (README "Train on your own images", docs/own_data.md): what they leave to
the user is named at start-up, and the scaled-up combinations docs/own_data.md gives validate."""
from __future__ import annotations

import pytest

from ldm_scale import config as C
from ldm_scale.data.caption_vocab import MAX_TOKENS

CKPT = ["checkpoint.root=s3://b/ckpt"]


def composed(*overrides: str) -> C.Config:
    return C.to_object(C.compose(list(overrides)))


def test_txt2img_own_data_names_what_it_needs():
    with pytest.raises(C.ConfigError, match="required values are not set: data.urls"):
        composed("experiment=txt2img_own_data")
    # The vocabulary is a typed field (an experiment cannot mark it `???`): validate() asks for it.
    cfg = composed("experiment=txt2img_own_data", "data.urls=['s3://b/lat/*.tar']", "model.first_stage_ckpt=s3://b/ae.pt",
                   "eval.prompts=[a caption]")
    with pytest.raises(C.ConfigError, match="model.ldm.cond_stage.text.tokenizer.vocab_path is not set"):
        C.validate(cfg, world_size=2, check_files=False)
    cfg = composed("experiment=txt2img_own_data", "data.urls=['s3://b/lat/*.tar']", "model.first_stage_ckpt=s3://b/ae.pt",
                   "model.ldm.cond_stage.text.tokenizer.vocab_path=/v.txt")
    with pytest.raises(C.ConfigError, match="eval.prompts"):  # the quickstart's shapes prompts are not inherited
        C.validate(cfg, world_size=2, check_files=False)


def test_own_data_recipe_is_the_quickstart_on_latents_with_a_word_vocabulary():
    cfg = composed("experiment=txt2img_own_data", "data.urls=['s3://b/lat/*.tar']", "model.first_stage_ckpt=s3://b/ae.pt",
                   "model.ldm.cond_stage.text.tokenizer.vocab_path=/v.txt", "eval.prompts=[a caption]")
    quickstart = composed("experiment=quickstart", "data.urls=['s3://b/img/*.tar']", "model.first_stage_ckpt=s3://b/ae.pt")
    plan = C.validate(cfg, world_size=2, check_files=False)
    text = plan.spec.cond_stage.text
    assert text.vocab_size == MAX_TOKENS and text.tokenizer.kind == "wordpiece"  # build_vocab.py's largest file
    assert cfg.data.input == "latent" and cfg.data.filters.min_width is None
    assert cfg.eval.prompt_adherence_samples == 0 and cfg.eval.prompts == ["a caption"]
    assert (cfg.train, cfg.optim, cfg.diffusion) == (quickstart.train, quickstart.optim, quickstart.diffusion)

    ae = composed("experiment=autoencoder_own_data", "data.urls=['s3://b/img/*.tar']")
    tiny = composed("experiment=autoencoder_tiny", "data.urls=['s3://b/img/*.tar']")
    assert ae.model == tiny.model and ae.autoencoder_loss == tiny.autoencoder_loss and ae.train == tiny.train
    assert ae.data.resolution == 32 and ae.data.urls == ["s3://b/img/*.tar"]


def test_scaled_up_combinations_validate():
    ae = composed("experiment=autoencoder_kl_f8", "data=captioned_images", "data.urls=['s3://b/mine/*.tar']", *CKPT)
    plan = C.validate(ae, world_size=8, check_files=False)
    assert plan.image_size == 256 and ae.data.filters.min_width is None and ae.data.conditioning == "none"
    ldm = composed("experiment=txt2img_kl8", "data=captioned_images", "data.input=latent",
                   "data.urls=['s3://b/lat/*.tar']", "model.first_stage_ckpt=s3://b/ae.pt", *CKPT,
                   "model.ldm.cond_stage.text.tokenizer.vocab_path=/bert/vocab.txt")
    plan = C.validate(ldm, world_size=8, check_files=False)
    assert plan.latent_size == 32 and plan.spec.cond_stage.text.tokenizer.vocab_path == "/bert/vocab.txt"
