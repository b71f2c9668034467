"""Running out of memory: on a GPU the batch is halved once and retried with one line saying so; a second time,
or out of host memory, the run ends with one line naming the option that sets the batch."""
from __future__ import annotations

import pytest
import torch

from ucad.runtime.device import OutOfMemoryRetry, out_of_memory_kind
from ucad.runtime.errors import UcadError
from ucad.model.ucad_model import ModelConfig, UcadModel

from test_training import train


def gpu_out_of_memory() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_the_kinds_of_memory_error():
    assert out_of_memory_kind(gpu_out_of_memory()) == "gpu"
    assert out_of_memory_kind(MemoryError()) == "cpu"
    assert out_of_memory_kind(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried")) == "cpu"
    assert out_of_memory_kind(RuntimeError("shapes do not match")) is None


def test_retry_halves_once_then_names_the_option():
    notes = []
    retry = OutOfMemoryRetry(8, "feature extraction", "--feature_batch_size", warn=notes.append)
    sizes = []

    def step(size):
        sizes.append(size)
        if size > 4:
            raise gpu_out_of_memory()
        return size

    assert retry.run(step) == 4 and retry.run(step) == 4  # later batches keep the halved size
    assert sizes == [8, 4, 4]
    assert notes == ["note: out of GPU memory in feature extraction with batches of 8 (--feature_batch_size 8); "
                     "retrying with batches of 4"]
    with pytest.raises(UcadError) as info:
        retry.run(lambda size: (_ for _ in ()).throw(gpu_out_of_memory()))
    assert "out of GPU memory in feature extraction with batches of 4 (--feature_batch_size 8)" in str(info.value)
    assert "smaller --feature_batch_size" in str(info.value)
    with pytest.raises(ValueError):  # anything else passes through untouched
        OutOfMemoryRetry(8, "x", "--y").run(lambda size: (_ for _ in ()).throw(ValueError("not memory")))


def tiny_model() -> UcadModel:
    config = ModelConfig(backbone="resnet18", layers=("layer2",), weights="random", patchsize=1, imagesize=32,
                         resize=32, pretrain_embed_dimension=16, target_embed_dimension=16)
    return UcadModel(config, torch.device("cpu"))


def fail_above(model: UcadModel, largest: int, error) -> list[int]:
    """model.embed and model.training_features (what feature extraction and prompt training call) raise `error`
    for batches larger than `largest`; returns the batch sizes they were called with."""
    calls = []

    def failing(original):
        def forward(images, prompt=None, *args, **kwargs):
            calls.append(images.shape[0])
            if images.shape[0] > largest:
                raise error()
            return original(images, prompt, *args, **kwargs)
        return forward

    model.embed, model.training_features = failing(model.embed), failing(model.training_features)
    return calls


def test_feature_extraction_halves_the_batch_on_gpu_out_of_memory(capsys):
    model = tiny_model()
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    expected = model.features(images, batch_size=4)
    calls = fail_above(model, 4, gpu_out_of_memory)
    got = model.features(images, batch_size=8)
    assert torch.allclose(got, expected, atol=1e-5)
    assert calls == [8, 4, 4, 2]
    assert capsys.readouterr().out.count("out of GPU memory in feature extraction") == 1
    model.features(images, batch_size=8)  # the next call starts with the halved batch: no second note
    assert calls[4:] == [4, 4, 2] and "out of GPU memory" not in capsys.readouterr().out


def test_host_out_of_memory_in_features_names_feature_batch_size():
    model = tiny_model()
    fail_above(model, 0, MemoryError)
    with pytest.raises(UcadError, match="out of host \\(CPU\\) memory in feature extraction with batches of 8 "
                                        "\\(--feature_batch_size 8\\): rerun with a smaller --feature_batch_size"):
        model.features(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), batch_size=8)


def test_prompt_training_halves_the_batch_on_gpu_out_of_memory(capsys):
    model = tiny_model()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.ones(6, 32, 32, dtype=torch.long)
    labels[:, :, 16:] = 2
    prompt = model.new_prompt(0)
    calls = fail_above(model, 2, gpu_out_of_memory)
    history = train(model, prompt, images, labels, epochs_num=2, batch_size=4)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
    assert calls == [4, 2, 2, 2, 2, 2, 2]  # one failed batch, then every batch of every epoch at 2
    assert capsys.readouterr().out.count("out of GPU memory in prompt training with batches of 4 "
                                         "(dataset --batch_size 4); retrying with batches of 2") == 1
    fail_above(model, 0, MemoryError)
    with pytest.raises(UcadError, match="smaller dataset --batch_size"):
        train(model, model.new_prompt(1), images, labels, epochs_num=1, batch_size=4)
