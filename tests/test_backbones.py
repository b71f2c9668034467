"""ucad.model.backbones.FeatureExtractor on small randomly initialised timm models (no downloads).

ViT: our block-by-block forward with re-implemented (prefix-capable) attention equals timm's own forward; a
prefix prompt equals a reference prefix attention written with an explicit softmax; gradients reach only the
prompt; blocks after the deepest extracted one never run.
CNN: timm ResNet-18 stages by name and by index, strides 8/16, channel prompts, errors."""
from __future__ import annotations

import functools
import math

import pytest
import timm
import torch

import ucad.model.backbones as backbones
from ucad.model.backbones import FeatureExtractor
from ucad.runtime.errors import UcadError
from ucad.data.decode import normalize
from ucad.model.prompt import ChannelPrompt, PrefixPrompt
from ucad.model.weights import create_backbone

IMG = 64  # vit_tiny with patch 16 -> a 4 x 4 grid

VIT_VARIANTS = {
    "plain": {},
    "layerscale_qknorm": {"init_values": 0.5, "qk_norm": True},
    "register_tokens": {"reg_tokens": 2, "no_embed_class": True},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds spin-waits (worse on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, layers, **timm_kwargs) -> FeatureExtractor:
    """A FeatureExtractor whose backbone is created with random weights and extra timm kwargs."""
    def random_backbone(backbone_name, weights="auto"):
        return create_backbone(backbone_name, weights="random", **timm_kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbones, "create_backbone", random_backbone)
        extractor = FeatureExtractor(name, layers, weights="random")
    return extractor


def tiny_vit(layers=("1", "3"), depth=4, **kwargs) -> FeatureExtractor:
    torch.manual_seed(0)
    extractor = build("vit_tiny_patch16_224", list(layers), img_size=IMG, depth=depth, **kwargs)
    # timm's init (std 0.02) makes attention almost uniform; sharpen it so a wrong scale or a wrong
    # key/value layout would show in the outputs
    with torch.no_grad():
        for block in extractor.model.blocks:
            block.attn.qkv.weight.mul_(8.0)
    return extractor


@functools.lru_cache(maxsize=None)
def shared_vit(variant: str) -> FeatureExtractor:
    """One extractor per variant for the tests that neither hook nor modify the model."""
    return tiny_vit(**VIT_VARIANTS[variant])


def images(batch=2, size=IMG, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)


def to_map(tokens: torch.Tensor, model) -> torch.Tensor:
    grid = model.patch_embed.grid_size
    patches = tokens[:, model.num_prefix_tokens:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


# ----------------------------------------------------------------------------- ViT
@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
def test_vit_without_prompt_equals_timm(variant):
    extractor = shared_vit(variant)
    model = extractor.model
    x = images()
    with torch.no_grad():
        ours = extractor(x)
        normalised = normalize(x, extractor.mean, extractor.std)
        # timm's own API
        theirs = model.forward_intermediates(normalised, indices=[1, 3], norm=False, output_fmt="NCHW",
                                             intermediates_only=True)
        # and timm's blocks run one after the other
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(normalised))))
        manual = []
        for index, block in enumerate(model.blocks):
            tokens = block(tokens)
            if index in (1, 3):
                manual.append(to_map(tokens, model))
    assert extractor.layer_names == ["blocks.1", "blocks.3"]
    assert [tuple(o.shape) for o in ours] == [(2, 192, 4, 4)] * 2
    for a, b, c in zip(ours, theirs, manual):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert extractor.mean == (0.485, 0.456, 0.406)  # ImageNet mean/std for every backbone, as released


def test_vit_non_fused_timm_attention_agrees_too():
    extractor = tiny_vit()
    for block in extractor.model.blocks:
        block.attn.fused_attn = False  # timm's explicit softmax path
    x = images(seed=1)
    with torch.no_grad():
        ours = extractor(x)
        theirs = extractor.model.forward_intermediates(normalize(x, extractor.mean, extractor.std), indices=[1, 3],
                                                       output_fmt="NCHW", intermediates_only=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def reference_prefix_block(block, x, key_prefix, value_prefix):
    """One ViT block with DualPrompt-style prefix tuning, written with an explicit softmax:
    per head, keys = [prefix keys; token keys], values = [prefix values; token values]."""
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, dim = h.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    qkv = attn.qkv(h).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = attn.q_norm(q), attn.k_norm(k)
    pk = key_prefix.reshape(1, -1, heads, head_dim).permute(0, 2, 1, 3).expand(batch, -1, -1, -1)
    pv = value_prefix.reshape(1, -1, heads, head_dim).permute(0, 2, 1, 3).expand(batch, -1, -1, -1)
    k = torch.cat([pk, k], dim=2)
    v = torch.cat([pv, v], dim=2)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
    x = x + block.ls1(attn.proj(attn.norm(out)))
    return x + block.ls2(block.mlp(block.norm2(x)))


@pytest.mark.parametrize("variant", ["plain", "layerscale_qknorm"])
@pytest.mark.parametrize("length", [1, 3])
def test_vit_prefix_prompt_equals_reference(variant, length):
    extractor = shared_vit(variant)
    model = extractor.model
    prompt = extractor.new_prompt(length, generator=torch.Generator().manual_seed(4))
    assert isinstance(prompt, PrefixPrompt)
    assert prompt.tokens.shape == (4, 2, length, 192)  # blocks 0..3 (deepest extracted is 3)
    assert prompt.tokens.min() >= -1 and prompt.tokens.max() <= 1
    x = images(seed=2)
    with torch.no_grad():
        plain = extractor(x)
        prompted = extractor(x, prompt)
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(normalize(x, extractor.mean, extractor.std))))
        expected = []
        for index, block in enumerate(model.blocks):
            tokens = reference_prefix_block(block, tokens, *prompt.tokens[index])
            if index in (1, 3):
                expected.append(to_map(tokens, model))
    for p, e, u in zip(prompted, expected, plain):
        # fused SDPA vs an explicit softmax over sharpened attention: equal to float32 rounding
        torch.testing.assert_close(p, e, atol=5e-5, rtol=1e-4)
        assert (p - u).abs().max() > 1e-2  # the prompt changes the features


def test_vit_gradient_reaches_only_the_prompt():
    extractor = shared_vit("plain")
    prompt = extractor.new_prompt(1, generator=torch.Generator().manual_seed(5))
    maps = extractor(images(seed=3), prompt)
    (maps[0].square().mean() + maps[1].square().mean()).backward()
    assert prompt.tokens.grad is not None
    assert torch.isfinite(prompt.tokens.grad).all()
    for layer in range(4):  # every prompted layer up to the deepest extracted block gets a gradient
        assert prompt.tokens.grad[layer].abs().sum() > 0, layer
    for name, parameter in extractor.model.named_parameters():
        assert not parameter.requires_grad, name
        assert parameter.grad is None, name


def test_vit_stops_at_the_deepest_extracted_block():
    extractor = tiny_vit(layers=("1",), depth=4)
    model = extractor.model
    assert extractor.prompt_layers == 2

    def explode(module, args):
        raise AssertionError(f"{type(module).__name__} after the deepest extracted block was run")

    for module in [*model.blocks[2:].modules(), model.norm, model.fc_norm, model.head]:
        module.register_forward_pre_hook(explode)
    x = images(seed=4)
    with torch.no_grad():
        maps = extractor(x)
        prompted = extractor(x, extractor.new_prompt(1))
    assert maps[0].shape == prompted[0].shape == (2, 192, 4, 4)


@pytest.mark.parametrize("layer", ["4", "12", "-1", "block5", "layer2", ""])
def test_vit_bad_layer_raises(layer):
    with pytest.raises(UcadError, match="layers_to_extract_from"):
        tiny_vit(layers=(layer,), depth=4)


def test_vit_layer_aliases_and_order():
    extractor = tiny_vit(layers=("blocks.3", "1", "3"), depth=4)
    assert extractor.layer_names == ["blocks.1", "blocks.3"]
    assert extractor.channels == [192, 192]
    assert "blocks 0..3" in extractor.describe() and "RANDOM" in extractor.describe()


# ----------------------------------------------------------------------------- CNN
@pytest.fixture(scope="module")
def resnets():
    torch.manual_seed(0)
    by_name = build("resnet18", ["layer2", "layer3"])
    torch.manual_seed(0)
    by_index = build("resnet18", ["2", "3"])
    return by_name, by_index


def test_cnn_stages_by_name_and_index(resnets):
    by_name, by_index = resnets
    assert by_name.layer_names == by_index.layer_names == ["layer2", "layer3"]
    assert by_name.channels == [128, 256]
    x = images(size=96)
    with torch.no_grad():
        a = by_name(x)
        b = by_index(x)
    assert [tuple(m.shape) for m in a] == [(2, 128, 12, 12), (2, 256, 6, 6)]  # strides 8 and 16
    for m, n in zip(a, b):
        torch.testing.assert_close(m, n, atol=0, rtol=0)  # same seed, same weights, same maps
    # equal to timm's own feature extraction of the same weights (on a separate copy: the extractor's model
    # carries hooks that stop its forward after layer3)
    reference = timm.create_model("resnet18", pretrained=False).eval()
    reference.load_state_dict(by_name.model.state_dict())
    with torch.no_grad():
        normalised = normalize(x, by_name.mean, by_name.std)
        theirs = reference.forward_intermediates(normalised, indices=[2, 3], intermediates_only=True)
    for m, t in zip(a, theirs):
        torch.testing.assert_close(m, t, atol=1e-5, rtol=1e-5)


def test_cnn_channel_prompt(resnets):
    extractor, _ = resnets
    prompt = extractor.new_prompt(1)
    assert isinstance(prompt, ChannelPrompt)
    x = images(size=64, seed=6)
    with torch.no_grad():
        plain = extractor(x)
        zero = extractor(x, prompt)
    for p, z in zip(plain, zero):
        torch.testing.assert_close(p, z, atol=0, rtol=0)  # zero init = identity
    with torch.no_grad():
        for scale, shift in zip(prompt.scale, prompt.shift):
            scale.normal_(0, 0.5)
            shift.normal_(0, 0.5)
    with torch.no_grad():
        changed = extractor(x, prompt)
    for p, c in zip(plain, changed):
        assert (p - c).abs().max() > 1e-3
    # the prompt is only active for that call
    with torch.no_grad():
        again = extractor(x)
    for p, a in zip(plain, again):
        torch.testing.assert_close(p, a, atol=0, rtol=0)


def test_cnn_gradient_reaches_only_the_prompt(resnets):
    extractor, _ = resnets
    prompt = extractor.new_prompt(1)
    maps = extractor(images(size=64, seed=7), prompt)
    sum(m.mean() for m in maps).backward()
    grads = [p.grad for p in prompt.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    for name, parameter in extractor.model.named_parameters():
        assert parameter.grad is None, name


def test_cnn_stops_at_the_deepest_stage():
    torch.manual_seed(0)
    extractor = build("resnet18", ["layer2"])

    def explode(module, args):
        raise AssertionError("layer3/layer4/head ran")

    for name in ("layer3", "layer4", "fc"):
        getattr(extractor.model, name).register_forward_pre_hook(explode)
    with torch.no_grad():
        maps = extractor(images(size=64))
    assert [tuple(m.shape) for m in maps] == [(2, 128, 8, 8)]


@pytest.mark.parametrize("layer", ["layer9", "conv9", "7", "Layer2"])
def test_cnn_bad_layer_lists_stages(layer):
    with pytest.raises(UcadError) as info:
        build("resnet18", [layer])
    message = str(info.value)
    assert layer in message
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert stage in message
