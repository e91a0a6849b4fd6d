"""In-repo model zoo: plain ``torch.nn`` CNNs, one module per architecture family, used to exercise the
converter on the channel-coupling patterns real networks contain.

The models know nothing about dyncompile. Each entry of `ZOO` names a factory as ``"module:function"``
(importable as ``dyncompile.zoo.<module>:<function>``), the input shape it expects at batch 1, and the
coupling features it exercises (tags from `FEATURES`). Model modules are imported only by `build`.

CIFAR variants (input 1x3x32x32) classify 10 classes; ImageNet variants (1x3x224x224, real ImageNet
stems, tiny widths) classify 1000. `ZooEntry.num_classes` says which. Dense-prediction entries (segmentation,
detection) declare their outputs instead; `ZooEntry.output_shapes` answers for every entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

__all__ = ["FEATURES", "ZOO", "ZooEntry", "build"]

FEATURES: dict[str, str] = {
    # channel coupling
    "residual": "elementwise add of two branches (identity or projected shortcut)",
    "projection": "1x1 conv shortcut where the width or stride changes",
    "preact": "pre-activation blocks (BN -> ReLU -> conv); nothing after the residual add",
    "concat": "torch.cat along channels: producers at fixed channel offsets",
    "dense_concat": "DenseNet-style growing concatenation of all earlier features",
    "grouped": "grouped conv with 1 < groups < channels",
    "depthwise": "depthwise conv (groups == channels)",
    "se": "squeeze-excitation gate: pooled 1x1 convs produce a per-channel multiplier",
    "chunk": "Tensor.chunk along channels",
    "split": "torch.split along channels",
    "const_split": "split sizes written as int constants in code",
    "dynamic_split": "split sizes computed from x.size(1) at run time",
    "shuffle": "channel shuffle (view/reshape -> transpose/permute -> view/reshape)",
    "const_view": "view/reshape with channel sizes written as literal numbers",
    "slice": "channel slicing x[:, a:b]",
    "index_select": "torch.index_select on channels with a constant index buffer",
    "layer_scale": "per-channel nn.Parameter multiplied onto a feature map",
    "instance_norm": "InstanceNorm2d on part of the channels",
    "flatten_linear": "flatten of a spatial map (> 1x1) into a linear layer",
    "mlp_classifier": "more than one linear layer in the classifier",
    "conv_classifier": "1x1 conv to the classes, then pooling (no linear)",
    "dropout": "dropout (identity in eval mode)",
    "python_loop": "Python iteration over a tensor-valued proxy (defeats torch.fx symbolic tracing)",
    # activations
    "relu": "ReLU",
    "relu6": "ReLU6",
    "leaky_relu": "LeakyReLU",
    "hardswish": "Hardswish",
    "silu": "SiLU / swish",
    "gelu": "GELU",
    "sigmoid_gate": "sigmoid used as a multiplicative gate",
    "hardsigmoid_gate": "hard sigmoid used as a multiplicative gate",
    # pooling
    "maxpool": "max pooling",
    "avgpool": "fixed-size average pooling inside the network",
    "adaptive_pool": "adaptive (global) pooling",
    "mean_pool": "global pooling written as x.mean over H, W",
    # issue 15: static python (untraceable by torch.fx, static once the input shape is known)
    "shape_assert": "assert on shapes in forward (x.shape[1] % 2 == 0, out.shape == x.shape)",
    "size_factory": "a tensor factory sized from the input (torch.zeros(b, c, h, w) padding a shortcut)",
    "forward_flag": "a non-tensor forward argument with a default (forward(x, only_last=True))",
    "batch_python": "Python arithmetic on the batch size (int(x.size(0) * p) for a training-only drop-path)",
    "prelu": "PReLU",
    # issue 15: dense prediction
    "upsample": "bilinear or nearest upsampling (nn.Upsample, F.interpolate)",
    "conv_transpose": "ConvTranspose2d upsampling",
    "atrous": "dilated (atrous) convs, e.g. an atrous spatial pyramid",
    "skip_concat": "encoder-decoder skips: an encoder map concatenated with the upsampled decoder map",
    "per_pixel_output": "a per-pixel class map as the output (segmentation)",
    "multi_output": "a tuple of output tensors (detection: class logits and box deltas)",
    "shared_weights": "one module called on several inputs (a head shared by every pyramid level)",
    # issue 15: functional layers
    "functional_conv": "an nn.Conv2d subclass whose forward calls F.conv2d on its own parameters",
    "weight_mask": "a fixed 0/1 mask buffer multiplied onto a conv weight (weight * mask)",
    "functional_norm": "norm subclasses calling F.batch_norm / F.group_norm (+ activation) in forward",
    "functional_linear": "an nn.Linear subclass whose forward calls F.linear",
    "layer_norm": "LayerNorm over the channels (F.layer_norm on a channels-last permute)",
    "fixed_filter": "a depthwise F.conv2d whose weight is a fixed filter buffer (blur-pool anti-aliasing)",
    # issue 15: channel reductions, octave and dimension-wise convs
    "channel_reduce": "mean / max over the channel dim (spatial attention) feeding a conv",
    "shared_module": "one module called more than once (a shared MLP on two pooled maps)",
    "keyword_data": "data passed by keyword to a builtin (F.avg_pool2d(input=x, ...))",
    "two_resolutions": "octave conv: high/low-frequency maps at two resolutions, pooled/upsampled and added across",
    "dimension_wise": "convs along height and width: the map permuted so a spatial axis takes the channels' place",
}


@dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: str  # "dyncompile.zoo.resnet:resnet20_cifar"
    input_shape: tuple[int, ...]  # at batch 1, e.g. (1, 3, 32, 32)
    features: tuple[str, ...]  # tags from FEATURES, e.g. ("residual", "projection")
    needs_fallback: bool = False  # torch.fx.symbolic_trace fails on purpose
    outputs: tuple[tuple[int, ...], ...] | None = None  # a dense-prediction model's output shapes at batch 1

    @property
    def num_classes(self) -> int:
        """A classifier's classes: 10 for CIFAR-sized inputs, 1000 for ImageNet-sized ones."""
        return 10 if self.input_shape[-1] <= 64 else 1000

    @property
    def output_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shape of every output at batch 1: the declared maps, or a classifier's (1, num_classes)."""
        return self.outputs if self.outputs is not None else ((1, self.num_classes),)


CIFAR = (1, 3, 32, 32)
IMAGENET = (1, 3, 224, 224)
DENSE = (1, 3, 64, 64)  # dense prediction: segmentation and detection


def _entry(name: str, factory: str, input_shape, features: str, needs_fallback: bool = False,
           outputs=None) -> ZooEntry:
    return ZooEntry(name, f"dyncompile.zoo.{factory}", tuple(input_shape), tuple(features.split()), needs_fallback,
                    None if outputs is None else tuple(tuple(shape) for shape in outputs))


_ENTRIES = [
    # VGG
    _entry("vgg11-bn-cifar", "vgg:vgg11_bn_cifar", CIFAR,
           "flatten_linear mlp_classifier dropout maxpool relu"),
    _entry("vgg11-imagenet", "vgg:vgg11_tiny_imagenet", IMAGENET,
           "flatten_linear mlp_classifier dropout maxpool adaptive_pool relu"),
    # ResNet
    _entry("resnet20-cifar", "resnet:resnet20_cifar", CIFAR, "residual projection adaptive_pool relu"),
    _entry("resnet29-bottleneck-cifar", "resnet:resnet29_bottleneck_cifar", CIFAR,
           "residual projection adaptive_pool relu"),
    _entry("resnet18-imagenet", "resnet:resnet18_tiny_imagenet", IMAGENET,
           "residual projection maxpool adaptive_pool relu"),
    _entry("resnet26-bottleneck-imagenet", "resnet:resnet26_bottleneck_tiny_imagenet", IMAGENET,
           "residual projection maxpool adaptive_pool relu"),
    _entry("preact-resnet14-cifar", "preact_resnet:preact_resnet14_cifar", CIFAR,
           "residual projection preact adaptive_pool relu"),
    _entry("preact-resnet18-imagenet", "preact_resnet:preact_resnet18_tiny_imagenet", IMAGENET,
           "residual projection preact maxpool adaptive_pool relu"),
    _entry("wrn16-2-cifar", "wide_resnet:wrn16_2_cifar", CIFAR,
           "residual projection preact dropout avgpool relu"),
    _entry("wide-resnet-imagenet", "wide_resnet:wide_resnet_tiny_imagenet", IMAGENET,
           "residual projection maxpool adaptive_pool relu"),
    _entry("resnext20-8x4d-cifar", "resnext:resnext20_8x4d_cifar", CIFAR,
           "residual projection grouped adaptive_pool relu"),
    _entry("resnext14-8x2d-imagenet", "resnext:resnext14_8x2d_tiny_imagenet", IMAGENET,
           "residual projection grouped maxpool adaptive_pool relu"),
    # DenseNet
    _entry("densenet-bc-k12-cifar", "densenet:densenet_bc_k12_cifar", CIFAR,
           "concat dense_concat avgpool adaptive_pool relu"),
    _entry("densenet-imagenet", "densenet:densenet_tiny_imagenet", IMAGENET,
           "concat dense_concat maxpool avgpool adaptive_pool relu"),
    # MobileNets / EfficientNet
    _entry("mobilenetv1-cifar", "mobilenet_v1:mobilenet_v1_cifar", CIFAR, "depthwise avgpool relu"),
    _entry("mobilenetv1-imagenet", "mobilenet_v1:mobilenet_v1_tiny_imagenet", IMAGENET,
           "depthwise dropout adaptive_pool relu"),
    _entry("mobilenetv2-cifar", "mobilenet_v2:mobilenet_v2_cifar", CIFAR,
           "residual depthwise dropout adaptive_pool relu6"),
    _entry("mobilenetv2-imagenet", "mobilenet_v2:mobilenet_v2_tiny_imagenet", IMAGENET,
           "residual depthwise dropout adaptive_pool relu6"),
    _entry("mobilenetv3-small-cifar", "mobilenet_v3:mobilenet_v3_small_cifar", CIFAR,
           "residual depthwise se hardsigmoid_gate hardswish relu mlp_classifier dropout adaptive_pool"),
    _entry("mobilenetv3-small-imagenet", "mobilenet_v3:mobilenet_v3_small_tiny_imagenet", IMAGENET,
           "residual depthwise se hardsigmoid_gate hardswish relu mlp_classifier dropout adaptive_pool"),
    _entry("efficientnet-b0-cifar", "efficientnet:efficientnet_b0_cifar", CIFAR,
           "residual depthwise se sigmoid_gate silu dropout adaptive_pool"),
    _entry("efficientnet-b0-imagenet", "efficientnet:efficientnet_b0_tiny_imagenet", IMAGENET,
           "residual depthwise se sigmoid_gate silu dropout adaptive_pool"),
    # ShuffleNets, GhostNet, SqueezeNet
    _entry("shufflenetv2-cifar", "shufflenet_v2:shufflenet_v2_cifar", CIFAR,
           "chunk concat shuffle depthwise mean_pool relu"),
    _entry("shufflenetv2-imagenet", "shufflenet_v2:shufflenet_v2_tiny_imagenet", IMAGENET,
           "chunk concat shuffle depthwise maxpool mean_pool relu"),
    _entry("shufflenetv1-g2-cifar", "shufflenet_v1:shufflenet_v1_g2_cifar", CIFAR,
           "grouped shuffle depthwise residual concat avgpool adaptive_pool relu"),
    _entry("shufflenetv1-g3-cifar", "shufflenet_v1:shufflenet_v1_g3_cifar", CIFAR,
           "grouped shuffle depthwise residual concat avgpool adaptive_pool relu"),
    _entry("shufflenetv1-g8-cifar", "shufflenet_v1:shufflenet_v1_g8_cifar", CIFAR,
           "grouped shuffle depthwise residual concat avgpool adaptive_pool relu"),
    _entry("shufflenetv1-g3-imagenet", "shufflenet_v1:shufflenet_v1_tiny_imagenet", IMAGENET,
           "grouped shuffle depthwise residual concat maxpool avgpool adaptive_pool relu"),
    _entry("ghostnet-cifar", "ghostnet:ghostnet_cifar", CIFAR,
           "concat slice depthwise residual projection se hardsigmoid_gate dropout adaptive_pool relu"),
    _entry("ghostnet-imagenet", "ghostnet:ghostnet_tiny_imagenet", IMAGENET,
           "concat slice depthwise residual projection se hardsigmoid_gate dropout adaptive_pool relu"),
    _entry("squeezenet1_1-cifar", "squeezenet:squeezenet1_1_cifar", CIFAR,
           "concat conv_classifier dropout maxpool adaptive_pool relu"),
    _entry("squeezenet1_1-imagenet", "squeezenet:squeezenet1_1_imagenet", IMAGENET,
           "concat conv_classifier dropout maxpool adaptive_pool relu"),
    # RegNet, DarkNet
    _entry("regnetx-cifar", "regnet:regnetx_cifar", CIFAR, "residual projection grouped adaptive_pool relu"),
    _entry("regnety-imagenet", "regnet:regnety_tiny_imagenet", IMAGENET,
           "residual projection grouped se sigmoid_gate adaptive_pool relu"),
    _entry("darknet-cifar", "darknet:darknet_cifar", CIFAR, "residual leaky_relu adaptive_pool"),
    _entry("cspdarknet-cifar", "darknet:cspdarknet_cifar", CIFAR,
           "residual split const_split concat leaky_relu adaptive_pool"),
    _entry("cspdarknet-imagenet", "darknet:cspdarknet_tiny_imagenet", IMAGENET,
           "residual split const_split concat leaky_relu adaptive_pool"),
    # special constructs
    _entry("ibn-const-split-cifar", "ibn:ibn_const_split_cifar", CIFAR,
           "split const_split concat instance_norm residual projection adaptive_pool relu"),
    _entry("ibn-dynamic-split-cifar", "ibn:ibn_dynamic_split_cifar", CIFAR,
           "split dynamic_split concat instance_norm residual projection adaptive_pool relu"),
    _entry("ibn-half-split-cifar", "ibn:ibn_half_split_cifar", CIFAR,
           "split const_split concat instance_norm residual projection adaptive_pool relu"),
    _entry("mixnet-loop-cifar", "mixnet:mixnet_loop_cifar", CIFAR,
           "split const_split concat depthwise python_loop residual silu relu maxpool adaptive_pool",
           needs_fallback=True),
    _entry("mixnet-indexed-cifar", "mixnet:mixnet_indexed_cifar", CIFAR,
           "split const_split concat depthwise residual silu relu maxpool adaptive_pool"),
    _entry("dpn-cifar", "dual_path:dpn_tiny_cifar", CIFAR,
           "slice concat residual projection grouped flatten_linear maxpool avgpool relu"),
    _entry("channel-permute-cifar", "channel_permute:channel_permute_cifar", CIFAR,
           "index_select residual flatten_linear maxpool relu"),
    _entry("const-shuffle-cifar", "const_shuffle:const_shuffle_cifar", CIFAR,
           "shuffle const_view grouped depthwise residual dropout avgpool adaptive_pool relu"),
    _entry("layer-scale-cifar", "layer_scale:layer_scale_cifar", CIFAR,
           "layer_scale depthwise residual gelu mean_pool"),
    # issue 15: static python (traced by the concrete fallback: shapes and flags are constants at the input shape)
    _entry("shape-assert-cifar", "static_python:shape_assert_cifar", CIFAR,
           "shape_assert chunk concat residual sigmoid_gate adaptive_pool relu", needs_fallback=True),
    _entry("enet-cifar", "static_python:enet_cifar", CIFAR,
           "size_factory concat residual maxpool adaptive_pool prelu", needs_fallback=True),
    _entry("multi-exit-cifar", "static_python:multi_exit_cifar", CIFAR,
           "forward_flag adaptive_pool relu", needs_fallback=True),
    _entry("fractalnet-cifar", "static_python:fractalnet_cifar", CIFAR,
           "batch_python maxpool mean_pool relu", needs_fallback=True),
    # issue 15: dense prediction
    _entry("unet-aspp-seg", "unet:unet_small", DENSE,
           "skip_concat concat upsample conv_transpose atrous per_pixel_output maxpool adaptive_pool relu",
           outputs=[(1, 5, 64, 64)]),
    _entry("fpn-two-head-det", "detector:two_head_detector", DENSE,
           "residual upsample shared_weights multi_output relu", outputs=[(1, 240, 6), (1, 240, 4)]),
    # issue 15: functional layers
    _entry("masked-densenet-cifar", "functional_layers:masked_densenet_cifar", CIFAR,
           "functional_conv weight_mask concat dense_concat avgpool adaptive_pool relu"),
    _entry("timm-style-cifar", "functional_layers:timm_style_cifar", CIFAR,
           "functional_norm functional_linear fixed_filter layer_norm residual projection silu mean_pool"),
    # issue 15: channel reductions, octave and dimension-wise convs
    _entry("cbam-resnet14-cifar", "cbam_resnet:cbam_resnet14_cifar", CIFAR,
           "residual projection se sigmoid_gate channel_reduce shared_module concat adaptive_pool relu"),
    _entry("octave-resnet8-cifar", "octave_resnet:octave_resnet8_cifar", CIFAR,
           "residual projection two_resolutions keyword_data avgpool adaptive_pool relu"),
    _entry("dicenet-cifar", "dicenet:dicenet_cifar", CIFAR,
           "dimension_wise depthwise grouped se sigmoid_gate residual avgpool adaptive_pool relu"),
]

ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}
assert len(ZOO) == len(_ENTRIES), "duplicate zoo names"


def build(name: str) -> nn.Module:
    """Import the factory of ``ZOO[name]`` and call it (fresh, randomly initialised, in training mode)."""
    module_name, _, function_name = ZOO[name].factory.partition(":")
    return getattr(importlib.import_module(module_name), function_name)()
