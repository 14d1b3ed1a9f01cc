"""open_clip_train's model flags (ModelOptions) in build_model: each flag's effect on real open_clip models,
and a one-line error for each combination that open_clip would ignore or fail on obscurely."""

from __future__ import annotations

import importlib.util
import json
import logging
import math

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from open_clip_train.params import parse_args
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms import InterpolationMode, Normalize, RandomResizedCrop, Resize

from fastclip.models import ModelOptions, build_model, register_model_configs
from training.params import build_parser
from fastclip.train.optim import build_optimizer

VIT = "ViT-Tiny-32px"
RESNET = "RN-Tiny-options-test"
TEXT_TOWER = ("token_embedding", "positional_embedding", "transformer.", "ln_final", "text_projection")


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ModifiedResNet CLIP small enough to build in a blink: the image tower with BatchNorm."""
    folder = tmp_path_factory.mktemp("configs")
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / f"{RESNET}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return RESNET


def trainable(model: torch.nn.Module, prefixes: tuple[str, ...]) -> set[str]:
    return {n for n, p in model.named_parameters() if n.startswith(prefixes) and p.requires_grad}


def names(model: torch.nn.Module, prefixes: tuple[str, ...]) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def first(transform, kind: type):
    return next(t for t in transform.transforms if isinstance(t, kind))


def test_defaults_are_open_clip_trains() -> None:
    args = parse_args([])
    assert ModelOptions.from_record(vars(args)) == ModelOptions()
    own = {"init_logit_bias"}
    assert {f for f in ModelOptions.__dataclass_fields__ if f not in own} <= set(vars(args))


def test_from_record_reads_open_clip_trains_dests() -> None:
    args = parse_args(["--force-image-size", "40", "--force-context-length", "20", "--force-quick-gelu",
                       "--force-patch-dropout", "0.0", "--image-mean", "0.5", "--image-std", "0.2", "0.3", "0.4",
                       "--image-interpolation", "bilinear", "--image-resize-mode", "squash",
                       "--aug-cfg", "scale=(0.5,1.0)", "--lock-image", "--lock-image-unlocked-groups", "2",
                       "--lock-text", "--lock-text-unlocked-layers", "1", "--lock-text-freeze-layer-norm",
                       "--cache-dir", "/tmp/cache"])
    options = ModelOptions.from_record(vars(args))  # open_clip_train's own flags
    assert options.force_image_size == (40,) and options.force_context_length == 20
    assert options.force_quick_gelu and options.force_patch_dropout == 0.0
    assert options.image_mean == (0.5,) and options.image_std == (0.2, 0.3, 0.4)
    assert (options.image_interpolation, options.image_resize_mode) == ("bilinear", "squash")
    assert options.aug_cfg == {"scale": (0.5, 1.0)} and options.cache_dir == "/tmp/cache"
    assert (options.lock_image, options.lock_image_unlocked_groups) == (True, 2)
    assert (options.lock_text, options.lock_text_unlocked_layers, options.lock_text_freeze_layer_norm) == (True, 1, True)
    assert options.forced() == ["--force-image-size 40", "--force-context-length 20", "--force-quick-gelu",
                                "--force-patch-dropout 0.0"]


def test_from_record_missing_names_keep_defaults() -> None:
    assert ModelOptions.from_record({"lock_image": True}) == ModelOptions(lock_image=True)


def test_aug_cfg_flag_reads_literals_else_strings(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    parsed = parser.parse_args(["--aug-cfg", "scale=(0.5,1)", "use_timm=True", "re_prob=0.25", "color_jitter=strong",
                                "ratio=(1,"]).aug_cfg
    assert parsed == {"scale": (0.5, 1), "use_timm": True, "re_prob": 0.25, "color_jitter": "strong", "ratio": "(1,"}
    assert parser.parse_args([]).aug_cfg == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--aug-cfg", "scale"])
    assert "KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown key.*bogus"):
        ModelOptions(aug_cfg={"bogus": 1})


@pytest.mark.parametrize("fields, message", [
    ({"force_image_size": (32, 32, 32)}, "give one size"),
    ({"force_image_size": (0,)}, "all > 0"),
    ({"force_context_length": 0}, "--force-context-length 0: must be > 0"),
    ({"force_patch_dropout": 1.0}, r"must be in \[0, 1\)"),
    ({"image_mean": (0.5, 0.5)}, "--image-mean: give 1 value"),
    ({"image_std": (0.2, 0.2, 0.2, 0.2)}, "--image-std: give 1 value"),
    ({"image_std": (0.0,)}, "--image-std: every value must be > 0"),
    ({"image_interpolation": "nearest"}, "choose one of"),
    ({"image_resize_mode": "crop"}, "choose one of"),
    ({"aug_cfg": {"color_jitter_prob": 0.5}}, "color_jitter with 4 values"),
    ({"lock_image_unlocked_groups": 1}, "no effect without --lock-image"),
    ({"lock_text_freeze_layer_norm": True}, "no effect without --lock-text"),
    ({"lock_image": True, "lock_image_unlocked_groups": -1}, "must be >= 0"),
])
def test_contradictory_options_fail_in_one_line(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        ModelOptions(**fields)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("model, fields, message", [
    (VIT, {"lock_image": True, "lock_image_freeze_bn_stats": True}, "image tower has no BatchNorm"),
    (RESNET, {"lock_image": True, "lock_image_unlocked_groups": 1}, "ResNet image tower only as a whole"),
    (VIT, {"lock_text": True}, "needs --lock-text-freeze-layer-norm"),
    (VIT, {"pretrained_image": True}, "image tower is not a timm model"),
    (VIT, {"force_image_size": (30,)}, "--force-image-size 30: ViT-Tiny-32px's patches are 4x4 px"),
])
def test_options_the_model_cannot_take(resnet: str, model: str, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(model, options=ModelOptions(**fields))


def test_pretrained_image_with_pretrained_weights_fails_before_building() -> None:
    with pytest.raises(ValueError, match="--pretrained-image has no effect with --pretrained"):
        build_model("no-such-model", pretrained="weights.pt", options=ModelOptions(pretrained_image=True))


def test_forced_size_the_weights_do_not_fit_names_the_flag(resnet: str, tmp_path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(build_model(resnet).model.state_dict(), weights)
    with pytest.raises(ValueError, match="cannot be built with --force-image-size 64: .*size mismatch") as error:
        build_model(resnet, pretrained=str(weights), options=ModelOptions(force_image_size=(64,)))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("unlocked, expected", [
    (0, set()),
    (1, {"visual.proj"}),
    (2, {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"}),
])
def test_lock_image_leaves_the_last_groups_trainable(unlocked: int, expected: set[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    fastclip_logger = logging.getLogger("fastclip")
    fastclip_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="fastclip"):
            model = build_model(VIT, options=ModelOptions(lock_image=True, lock_image_unlocked_groups=unlocked)).model
    finally:
        fastclip_logger.removeHandler(caplog.handler)
    if unlocked == 2:
        expected |= names(model, ("visual.transformer.resblocks.1.",))
    assert trainable(model, ("visual.",)) == expected
    assert trainable(model, TEXT_TOWER + ("logit_scale",)) == names(model, TEXT_TOWER + ("logit_scale",))
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"towers locked: {count} of" in caplog.text


@pytest.mark.parametrize("unlocked, extra", [(0, ()), (1, ("text_projection",)),
                                             (2, ("text_projection", "ln_final", "transformer.resblocks.1."))])
def test_lock_text_leaves_the_last_layers_trainable(unlocked: int, extra: tuple[str, ...]) -> None:
    options = ModelOptions(lock_text=True, lock_text_unlocked_layers=unlocked, lock_text_freeze_layer_norm=True)
    model = build_model(VIT, options=options).model
    assert trainable(model, TEXT_TOWER) == names(model, extra)
    assert trainable(model, ("visual.", "logit_scale")) == names(model, ("visual.", "logit_scale"))


def test_optimizer_leaves_locked_parameters_out() -> None:
    options = ModelOptions(lock_image=True, lock_text=True, lock_text_freeze_layer_norm=True)
    model = build_model(VIT, options=options).model
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6)
    assert [p for g in optimizer.param_groups for p in g["params"]] == [model.logit_scale]


def test_freeze_bn_stats_keeps_running_statistics_in_train_mode(resnet: str) -> None:
    frozen = build_model(resnet, options=ModelOptions(lock_image=True, lock_image_freeze_bn_stats=True)).model
    plain = build_model(resnet, options=ModelOptions(lock_image=True)).model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.visual.modules())
    for model, changes in ((frozen, False), (plain, True)):
        before = [b.clone() for n, b in model.visual.named_buffers() if "running_mean" in n]
        model.train()
        model.encode_image(torch.randn(4, 3, 32, 32))
        after = [b for n, b in model.visual.named_buffers() if "running_mean" in n]
        assert any(not torch.equal(x, y) for x, y in zip(before, after)) == changes
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.visual.modules())


def test_preprocessing_overrides_reach_the_transforms() -> None:
    options = ModelOptions(image_mean=(0.1, 0.2, 0.3), image_std=(0.5,), image_interpolation="bilinear",
                           image_resize_mode="squash", aug_cfg={"scale": (0.5, 1.0)})
    bundle = build_model(VIT, options=options)
    normalize = first(bundle.preprocess_val, Normalize)
    assert (tuple(normalize.mean), tuple(normalize.std)) == ((0.1, 0.2, 0.3), (0.5,))
    resize = first(bundle.preprocess_val, Resize)
    assert resize.interpolation == InterpolationMode.BILINEAR and tuple(resize.size) == (32, 32)
    assert first(bundle.preprocess_train, RandomResizedCrop).scale == (0.5, 1.0)
    assert tuple(first(bundle.preprocess_train, Normalize).mean) == (0.1, 0.2, 0.3)


@pytest.mark.parametrize("size, shape", [((48,), (48, 48)), ((32, 48), (32, 48))])
def test_force_image_size_resizes_model_and_transforms(size: tuple[int, ...], shape: tuple[int, int]) -> None:
    bundle = build_model(VIT, options=ModelOptions(force_image_size=size))
    assert bundle.model.visual.image_size == shape
    image = Image.new("RGB", (64, 40))
    for transform in (bundle.preprocess_train, bundle.preprocess_val):
        assert transform(image).shape == (3, *shape)
    assert bundle.model.encode_image(torch.randn(1, 3, *shape)).shape == (1, 64)


def test_force_context_length_sets_tokenizer_and_positional_embedding() -> None:
    bundle = build_model(VIT, options=ModelOptions(force_context_length=20))
    tokens = bundle.tokenizer(["a photo of a cat"])
    assert tokens.shape == (1, 20) and bundle.model.positional_embedding.shape[0] == 20
    assert bundle.model.encode_text(tokens).shape == (1, 64)


def test_architecture_switches() -> None:
    plain = build_model(VIT).model
    forced = build_model(VIT, options=ModelOptions(force_quick_gelu=True, force_patch_dropout=0.5,
                                                   force_custom_text=True)).model
    assert not any(isinstance(m, QuickGELU) for m in plain.modules())
    assert any(isinstance(m, QuickGELU) for m in forced.visual.modules())
    assert forced.visual.patch_dropout.prob == 0.5
    assert isinstance(forced, open_clip.CustomTextCLIP) and not isinstance(plain, open_clip.CustomTextCLIP)


def test_init_logit_bias_with_temperature_for_siglip() -> None:
    model = build_model(VIT, temperature=0.1, options=ModelOptions(init_logit_bias=-10.0)).model
    assert model.logit_bias.item() == -10.0 and model.logit_scale.item() == pytest.approx(math.log(10))
    output = model(torch.randn(2, 3, 32, 32), torch.zeros(2, 32, dtype=torch.long))
    assert output["logit_bias"].item() == -10.0
    assert getattr(build_model(VIT).model, "logit_bias", None) is None


def test_every_open_clip_model_trains_here_or_is_refused_in_one_line() -> None:
    """The whole open_clip.list_models(): CoCa (its decoder needs a captioning loss) and, without transformers,
    Hugging Face text towers and tokenizers are refused at start in one line; every other model passes."""
    from training.preflight import check_model_name

    register_model_configs()
    refused = {}
    for name in open_clip.list_models():
        try:
            check_model_name(name)
        except SystemExit as stop:
            message = str(stop.code)
            assert message.startswith(f"error: --model {name} ") and "\n" not in message
            refused[name] = message
    configs = {name: open_clip.get_model_config(name) or {} for name in open_clip.list_models()}
    coca = {name for name, config in configs.items() if "multimodal_cfg" in config}
    hugging_face = {name for name, config in configs.items() if {"hf_model_name", "hf_tokenizer_name"} &
                    {key for key, value in config.get("text_cfg", {}).items() if value}}
    assert coca and all("is a CoCa model" in refused[name] for name in coca)
    if importlib.util.find_spec("transformers") is None:
        assert hugging_face and all("pip install transformers" in refused[name] for name in hugging_face - coca)
        assert set(refused) == coca | hugging_face
    else:
        assert set(refused) == coca
    assert len(configs) - len(refused) > 50


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32", "convnext_base"])  # open_clip's ResNet, ViT and timm towers
def test_accepted_model_families_build_with_every_weight_initialised(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).model
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if "mask" not in n)]  # -inf masks
    assert all(torch.isfinite(t).all() for _, t in tensors if t.is_floating_point())
