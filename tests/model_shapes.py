"""Layer shapes of well-known networks, for benchmarks and tests that need a model's size without torch."""

from __future__ import annotations

RESNET50_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))  # (bottleneck blocks, middle width) per stage


def resnet50_layers() -> list[dict]:
    """torchvision ResNet-50's 53 conv layers and its fc, in forward order, with torchvision's module names.

    Each entry: ``{"name", "out", "in", "k"}`` (``k`` the square kernel size, None for the fc): 26,560 conv filters
    plus 1,000 fc outputs.
    """
    layers = [{"name": "conv1", "out": 64, "in": 3, "k": 7}]
    inplanes = 64
    for stage, (blocks, mid) in enumerate(RESNET50_STAGES, start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            layers += [{"name": f"{prefix}.conv1", "out": mid, "in": inplanes, "k": 1},
                       {"name": f"{prefix}.conv2", "out": mid, "in": mid, "k": 3},
                       {"name": f"{prefix}.conv3", "out": mid * 4, "in": mid, "k": 1}]
            if block == 0:
                layers.append({"name": f"{prefix}.downsample.0", "out": mid * 4, "in": inplanes, "k": 1})
            inplanes = mid * 4
    layers.append({"name": "fc", "out": 1000, "in": 2048, "k": None})
    return layers


def hf_resnet50_layers(prefix: str = "model.", classes: int = 10) -> list[dict]:
    """transformers' ResNet-50 (``ResNetConfig()`` defaults, ``classes`` labels) as tests/zoo.py's ``resnet50()``
    names its layers: 53 conv layers and the classifier in forward order (a stage-opening block's shortcut first,
    as the module registers it), 26,560 conv filters plus ``classes``. Entries as ``resnet50_layers``'."""
    enc = f"{prefix}resnet.encoder.stages"
    layers = [{"name": f"{prefix}resnet.embedder.embedder.convolution", "out": 64, "in": 3, "k": 7}]
    inplanes = 64
    for stage, (blocks, mid) in enumerate(RESNET50_STAGES):
        for block in range(blocks):
            at = f"{enc}.{stage}.layers.{block}"
            if block == 0:
                layers.append({"name": f"{at}.shortcut.convolution", "out": mid * 4, "in": inplanes, "k": 1})
            layers += [{"name": f"{at}.layer.0.convolution", "out": mid, "in": inplanes, "k": 1},
                       {"name": f"{at}.layer.1.convolution", "out": mid, "in": mid, "k": 3},
                       {"name": f"{at}.layer.2.convolution", "out": mid * 4, "in": mid, "k": 1}]
            inplanes = mid * 4
    layers.append({"name": f"{prefix}classifier.1", "out": classes, "in": 2048, "k": None})
    return layers
