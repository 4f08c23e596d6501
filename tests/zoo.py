"""The model zoo for steering and telemetry tests: modern CNNs built from `transformers` configs (random init, no
download) and hand-written blocks, each wrapped so it takes an image batch and returns logits.

Every entry is small enough for CPU tests (32×32 inputs) but keeps its architecture's layer roles: stem, expand,
depthwise, project, squeeze-excitation, residual stream, MLP hidden, head. Not a test module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

IMAGE = (3, 32, 32)
CLASSES = 10


class PixelValues(nn.Module):
    """A `transformers` image classifier called as ``net(images) -> logits`` (they take ``pixel_values=``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _transformers():
    # transformers logs one line per image processor that would like torchvision; none is used here.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers
    return transformers


def _reset(model: nn.Module) -> nn.Module:
    """PyTorch's default init for conv/linear/norm layers: HF's std-0.02 init makes logits nearly input-independent."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            module.reset_parameters()
    return model


def mobilenet_v2() -> nn.Module:
    """HF MobileNetV2 at its default config (tf_padding=True: a ConstantPad2d before its convs), 32×32 input."""
    t = _transformers()
    return PixelValues(_reset(t.MobileNetV2ForImageClassification(
        t.MobileNetV2Config(image_size=32, num_labels=CLASSES))))


def mobilenet_v2_small() -> nn.Module:
    """MobileNetV2 at depth multiplier 0.35 (the same roles, ~0.4 M parameters): for DDP and browser tests."""
    t = _transformers()
    return PixelValues(_reset(t.MobileNetV2ForImageClassification(
        t.MobileNetV2Config(image_size=32, num_labels=CLASSES, depth_multiplier=0.35))))


def efficientnet() -> nn.Module:
    """HF EfficientNet-B0 scaled to a quarter width and depth: MBConv blocks with squeeze-excitation."""
    t = _transformers()
    return PixelValues(_reset(t.EfficientNetForImageClassification(t.EfficientNetConfig(
        image_size=32, num_labels=CLASSES, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320))))


def regnet(layer_type: str) -> nn.Module:
    """HF RegNet X (grouped 3×3 convs) or Y (grouped convs plus squeeze-excitation), two small stages."""
    t = _transformers()
    return PixelValues(_reset(t.RegNetForImageClassification(t.RegNetConfig(
        num_labels=CLASSES, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2], groups_width=8,
        layer_type=layer_type))))


def convnext() -> nn.Module:
    """HF ConvNeXt, two stages: 4×4 patchify stem + LayerNorm, 7×7 depthwise, channels-last LayerNorm, token MLP
    (Linear C→4C → GELU → Linear 4C→C), layer-scale, 2×2 downsampling conv."""
    t = _transformers()
    return PixelValues(_reset(t.ConvNextForImageClassification(t.ConvNextConfig(
        num_labels=CLASSES, hidden_sizes=[16, 32], depths=[1, 2], num_stages=2, image_size=32))))


def resnet_bottleneck() -> nn.Module:
    """HF ResNet with bottleneck blocks (the ResNet-50 block), two small stages."""
    t = _transformers()
    return PixelValues(_reset(t.ResNetForImageClassification(t.ResNetConfig(
        num_labels=CLASSES, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck"))))


def resnet50() -> nn.Module:
    """HF ResNet-50 at ``ResNetConfig()`` defaults (54 layers, 26,570 filters, 23.5 M parameters), 10 classes."""
    t = _transformers()
    return PixelValues(t.ResNetForImageClassification(t.ResNetConfig(num_labels=CLASSES)))


TOKENS = (8, 32)  # a text model's input here: 8 token embeddings of width 32


class InputsEmbeds(nn.Module):
    """A `transformers` text classifier called as ``net(embeddings) -> logits`` on float token embeddings
    ``[batch, *TOKENS]`` (``inputs_embeds=``): the steering trace needs a float input, not token ids."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=x).logits


def squeezebert() -> nn.Module:
    """HF SqueezeBERT, one layer of width 32: its feed-forward block is two grouped 1×1 Conv1d (intermediate
    32 → 64 and output 64 → 32, 4 groups each) — the transformers config found with grouped convs whose output
    channels are not their input channels. Takes ``[batch, *TOKENS]`` embeddings (not part of ``ZOO``: no images)."""
    t = _transformers()
    return InputsEmbeds(_reset(t.SqueezeBertForSequenceClassification(t.SqueezeBertConfig(
        vocab_size=64, hidden_size=TOKENS[1], embedding_size=TOKENS[1], num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=TOKENS[0], num_labels=CLASSES))))


class SqueezeExcite(nn.Module):
    """x · sigmoid(expand(relu(reduce(mean(x))))), the SE block of MobileNetV3/EfficientNet."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * gate


class InvertedResidual(nn.Module):
    """Hand-written MBConv: 1×1 expand → BN → ReLU6 → 3×3 depthwise → BN → ReLU6 → SE → 1×1 project → BN (+ x)."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, max(4, hidden // 8))
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        h = self.se(nn.functional.relu6(self.bn2(self.depthwise(h))))
        return x + self.bn3(self.project(h))


class GroupedNet(nn.Module):
    """Hand-written: stem → grouped 3×3 conv (4 groups) with GroupNorm → pointwise → head; no transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.norm = nn.GroupNorm(4, 32)
        self.pointwise = nn.Conv2d(32, 24, 1)
        self.fc = nn.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.norm(self.grouped(h)))
        h = torch.relu(self.pointwise(h))
        return self.fc(h.mean((2, 3)))


class GroupedStackNet(nn.Module):
    """Hand-written: stem → BN → depthwise conv with channel multiplier 2 (16 → 32, 16 groups) → BN → grouped conv
    (32 → 48, 4 groups) → BN → pointwise → head: grouped convs whose output channels are not their input channels,
    as readers and as producers, with BatchNorm (no GroupNorm), so Net2Net copies keep the function."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.multiplier = nn.Conv2d(16, 32, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 48, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(48)
        self.pointwise = nn.Conv2d(48, 24, 1)
        self.fc = nn.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(self.bn1(self.multiplier(h)))
        h = torch.relu(self.bn2(self.grouped(h)))
        return self.fc(torch.relu(self.pointwise(h)).mean((2, 3)))


class MobileBlockNet(nn.Module):
    """Hand-written: stem → BN → ReLU → two inverted residual blocks with SE → head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = InvertedResidual(16)
        self.block2 = InvertedResidual(16)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(torch.relu(self.bn(self.stem(x)))))
        return self.fc(h.mean((2, 3)))


# name → builder; every builder is deterministic given torch.manual_seed.
ZOO: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v2": mobilenet_v2,
    "efficientnet": efficientnet,
    "regnet_x": lambda: regnet("x"),
    "regnet_y": lambda: regnet("y"),
    "convnext": convnext,
    "resnet_bottleneck": resnet_bottleneck,
    "grouped": GroupedNet,
    "grouped_stack": GroupedStackNet,
    "mobile_block": MobileBlockNet,
}


def calibrate(net: nn.Module, batches: int = 4, batch: int = 16) -> nn.Module:
    """Set every BatchNorm's running statistics from random images (cumulative average), so eval outputs depend on
    the input: with the default running mean 0 / var 1 deep nets give nearly constant logits, and a test of "the
    output did not change" could not fail."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was = net.training
    net.train()
    with torch.no_grad():
        for _ in range(batches):
            net(torch.randn(batch, *IMAGE))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return net.train(was)


def build(name: str, seed: int = 0) -> nn.Module:
    """The zoo model ``name`` with deterministic weights and calibrated BatchNorm statistics."""
    torch.manual_seed(seed)
    return calibrate(ZOO[name]())


def layer_names(net: nn.Module) -> list[str]:
    """Every Conv2d and Linear of ``net``, in registration order."""
    return [name for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
