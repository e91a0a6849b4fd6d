"""Random CNN DAGs for property tests: a hypothesis strategy for *specs* and a builder that turns a spec into a model.

A spec is plain data (dicts, lists, ints), so hypothesis shrinks it and prints it readably::

    {"size": 8, "classes": 3, "seed": 0,
     "blocks": [{"kind": "conv", "src": 0, "out": 4, "k": 1, ...}, ...],
     "head": {"kind": "gap", ...}}

The model's forward is a DAG over a list of tensors, the *stream*: ``stream[0]`` is the input and every block
reads one or two earlier stream entries (``src`` / ``srcs``: absolute indices) and appends one or more
tensors. The head reads the last entry. All branching in `forward` is on Python data fixed at construction,
so the models are symbolically traceable by torch.fx (no fallback needed).

Blocks (``KINDS``): conv(+BN)(+act), depthwise conv, grouped conv, residual (identity / 1x1 conv+BN projection),
inverted residual (MBConv, optional SE), transposed-conv upsampling (×2, optionally grouped, +BN), add of two
same-shape entries, concat of two same-resolution entries,
chunk(2), torch.split with constant sizes (list or int), slicing / narrow, channel shuffle (view/transpose/view
with sizes from ``x.size()`` or constants, permute+flatten, F.channel_shuffle, nn.ChannelShuffle), SE gate,
index_select with a constant index buffer (permutation, subset, duplicates), reductions over the channel dim
(mean/max/sum/amax/norm, any spelling, into a conv used as a gate or a new map: issue 15), activations (relu, relu6,
hardswish, silu, leaky_relu; module or functional), dropout, max/avg pooling, layer-scale parameter multiply,
standalone BatchNorm, functional layers (``fconv``: an nn.Conv2d subclass calling F.conv2d on its weight, maybe
times a fixed mask buffer, or F.linear on channels-last, then an nn.BatchNorm2d subclass calling F.batch_norm).
Heads: global pool (+ optional hidden linear) → linear, or flatten of a ≤ 4x4 map → linear.

Every parameter and BN statistic is drawn from a generator seeded by the spec (non-trivial BN statistics and
affine parameters, random biases and layer scales), so a spec always builds the same model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = ["KINDS", "cnn_specs", "build_model", "RandomCNN"]

ACTS = ("relu", "relu6", "hardswish", "silu", "leaky_relu")
KINDS = ("conv", "dw", "gconv", "res", "mbconv", "up", "add", "cat", "chunk", "split", "slice", "shuffle", "se",
         "perm", "act", "dropout", "pool", "scale", "bn", "fconv",
         "reduce")
MAX_CAT = 48  # widest concat output
MAX_MID = 64  # widest inverted-residual expansion


# ───────────────────────────── building blocks ─────────────────────────────
class Act(nn.Module):
    def __init__(self, name: str, style: str = "module", inplace: bool = False):
        super().__init__()
        self.name, self.style, self.inplace = name, style, inplace
        if style == "module":
            self.mod = {"relu": lambda: nn.ReLU(inplace), "relu6": lambda: nn.ReLU6(inplace),
                        "hardswish": lambda: nn.Hardswish(inplace), "silu": lambda: nn.SiLU(inplace),
                        "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace)}[name]()

    def forward(self, x):
        if self.style == "module":
            return self.mod(x)
        if self.name == "relu":
            return F.relu(x, inplace=self.inplace)
        if self.name == "relu6":
            return F.relu6(x, inplace=self.inplace)
        if self.name == "hardswish":
            return F.hardswish(x, inplace=self.inplace)
        if self.name == "silu":
            return F.silu(x, inplace=self.inplace)
        return F.leaky_relu(x, 0.1, inplace=self.inplace)


def _act(name, style="module", inplace=False):
    return Act(name, style, inplace) if name else None


class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, k=1, stride=1, groups=1, bias=False, bn=True, act=None, style="module",
                 inplace=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout) if bn else None
        self.act = _act(act, style, inplace)

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x


class Block(nn.Module):
    """Base: `srcs` are the stream indices read, `n_out` how many tensors are appended."""

    srcs: tuple[int, ...] = ()
    n_out = 1


class Conv(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.body = ConvBNAct(c, p["out"], p["k"], p["stride"], p.get("groups", 1), p["bias"], p["bn"], p["act"],
                              p["style"], p.get("inplace", False))

    def forward(self, x):
        return self.body(x)


class Up(Block):
    """Decoder-style upsampling: ConvTranspose2d with stride 2 (weight [in, out/groups, k, k]), then BN."""

    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.up = nn.ConvTranspose2d(c, p["out"], p["k"], 2, (p["k"] - 2) // 2, groups=p["groups"], bias=p["bias"])
        self.bn = nn.BatchNorm2d(p["out"])

    def forward(self, x):
        return self.bn(self.up(x))


class Residual(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        cout, s = p["out"], p["stride"]
        self.conv1 = ConvBNAct(c, cout, 3, s, act=p["act"], style=p["style"])
        self.conv2 = ConvBNAct(cout, cout, p["k2"], 1, act=None)
        self.shortcut = ConvBNAct(c, cout, 1, s, act=None) if (c != cout or s != 1) else None
        self.act = _act(p["act"], p["style"])
        self.functional_add = p["functional_add"]

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        short = x if self.shortcut is None else self.shortcut(x)
        y = torch.add(y, short) if self.functional_add else y + short
        return y if self.act is None else self.act(y)


class SE(nn.Module):
    def __init__(self, c, r, act, gate, pool):
        super().__init__()
        self.reduce = nn.Conv2d(c, r, 1)
        self.act = Act(act)
        self.expand = nn.Conv2d(r, c, 1)
        self.gate, self.pool = gate, pool

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1) if self.pool == "adaptive" else x.mean((2, 3), keepdim=True)
        s = self.expand(self.act(self.reduce(s)))
        s = torch.sigmoid(s) if self.gate == "sigmoid" else F.hardsigmoid(s)
        return x * s


class SEBlock(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.se = SE(c, p["r"], p["act"], p["gate"], p["pool"])

    def forward(self, x):
        return self.se(x)


class MBConv(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        mid, cout, s = p["mid"], p["out"], p["stride"]
        self.expand = ConvBNAct(c, mid, 1, act=p["act"]) if mid != c else None
        self.dw = ConvBNAct(mid, mid, 3, s, groups=mid, act=p["act"])
        self.se = SE(mid, p["se"], "relu", "hardsigmoid", "adaptive") if p["se"] else None
        self.project = ConvBNAct(mid, cout, 1, act=None)
        self.identity = s == 1 and cout == c

    def forward(self, x):
        y = x if self.expand is None else self.expand(x)
        y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.identity else y


class Add(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = tuple(p["srcs"])
        self.act = _act(p["act"])

    def forward(self, a, b):
        y = a + b
        return y if self.act is None else self.act(y)


class Cat(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = tuple(p["srcs"])
        self.style = p["style"]

    def forward(self, a, b):
        return torch.cat([a, b], 1) if self.style == "list" else torch.cat((a, b), dim=1)


class Chunk(Block):
    n_out = 2

    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.style = p["style"]

    def forward(self, x):
        parts = x.chunk(2, dim=1) if self.style == "method" else torch.chunk(x, 2, 1)
        return parts[0], parts[1]


class Split(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.sizes = p["sizes"]  # list of ints, or one int (split_size)
        self.style = p["style"]
        self.n_out = len(p["sizes"]) if isinstance(p["sizes"], list) else math.ceil(c / p["sizes"])

    def forward(self, x):
        parts = torch.split(x, self.sizes, 1) if self.style == "function" else x.split(self.sizes, dim=1)
        return tuple(parts[i] for i in range(self.n_out))


class Slice(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.a, self.b, self.step, self.style = p["a"], p["b"], p["step"], p["style"]
        self.na, self.nb = self.a - c, (self.b - c) or None  # the negative-index style

    def forward(self, x):
        if self.style == "narrow":
            return x.narrow(1, self.a, self.b - self.a)
        if self.style == "negative":
            return x[:, self.na:self.nb:self.step]
        return x[:, self.a:self.b:self.step]


class Shuffle(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.g, self.c, self.hw, self.style = p["g"], c, p["hw"], p["style"]
        if self.style == "module":
            self.mod = nn.ChannelShuffle(self.g)

    def forward(self, x):
        g = self.g
        if self.style == "size":
            b, c, h, w = x.size()
            return x.view(b, g, c // g, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        if self.style == "const":
            c, h = self.c, self.hw
            return x.view(-1, g, c // g, h, h).transpose(1, 2).reshape(-1, c, h, h)
        if self.style == "permute":
            c, h = self.c, self.hw
            return x.reshape(x.size(0), g, c // g, h, h).permute(0, 2, 1, 3, 4).flatten(1, 2)
        if self.style == "function":
            return F.channel_shuffle(x, g)
        return self.mod(x)


class Perm(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.register_buffer("index", torch.tensor(p["index"], dtype=torch.int64))
        self.style = p["style"]

    def forward(self, x):
        return torch.index_select(x, 1, self.index) if self.style == "function" else x.index_select(1, self.index)


class ActBlock(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.act = Act(p["act"], p["style"])

    def forward(self, x):
        return self.act(x)


class Dropout(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.style = p["style"]
        self.mod = nn.Dropout(0.3) if self.style == "module" else nn.Dropout2d(0.3)

    def forward(self, x):
        if self.style == "function":
            return F.dropout(x, 0.3, self.training)
        return self.mod(x)


class Pool(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.kind, self.style = p["pool"], p["style"]
        k, s, pad = (2, 2, 0) if p["k"] == 2 else (3, 1, 1)
        self.kernel = (k, s, pad)
        self.mod = (nn.MaxPool2d if self.kind == "max" else nn.AvgPool2d)(k, s, pad)

    def forward(self, x):
        if self.style == "module":
            return self.mod(x)
        k, s, pad = self.kernel
        return F.max_pool2d(x, k, s, pad) if self.kind == "max" else F.avg_pool2d(x, k, s, pad)


class Scale(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.style = p["style"]
        shape = {"4d": (1, c, 1, 1), "1d": (c,), "3d": (c, 1, 1)}[self.style]
        self.gamma = nn.Parameter(torch.ones(shape))

    def forward(self, x):
        if self.style == "1d":
            return x * self.gamma.view(1, -1, 1, 1)
        if self.style == "3d":
            return self.gamma * x
        return x * self.gamma


class BN(Block):
    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.bn = nn.BatchNorm2d(c, affine=p["affine"])

    def forward(self, x):
        return self.bn(x)


class FunctionalConv2d(nn.Conv2d):
    """A user conv calling F.conv2d on its own weight, times a fixed 0/1 mask ("masked"), or that plus a
    per-filter trainable gain ("gain": w + w * gain, with w = weight * mask used twice)."""

    def __init__(self, *args, weight: str = "plain", **kwargs):
        super().__init__(*args, **kwargs)
        pattern = torch.arange(self.weight.numel()).reshape(self.weight.shape) % 3 != 0
        self.register_buffer("mask", pattern.float() if weight != "plain" else None)
        gain = torch.linspace(-0.5, 0.5, self.out_channels).reshape(-1, 1, 1, 1)
        self.gain = nn.Parameter(gain) if weight == "gain" else None

    def forward(self, x):
        weight = self.weight if self.mask is None else self.weight * self.mask
        if self.gain is not None:
            weight = weight + weight * self.gain
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FunctionalLinear(nn.Linear):
    """A pointwise layer as F.linear over channels-last (ConvNeXt's pwconv)."""

    def forward(self, x):
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


class FunctionalBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


class FunctionalConv(Block):
    """Functional layers on the module's own tensors (lifted into layers by passes/functional.py)."""

    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        if p["layer"] == "linear":
            self.layer = FunctionalLinear(c, p["out"], bias=p["bias"])
        else:
            self.layer = FunctionalConv2d(c, p["out"], p["k"], p["stride"], p["k"] // 2, groups=p["groups"],
                                          bias=p["bias"], weight=p["layer"])
        self.bn = FunctionalBatchNorm2d(p["out"]) if p["bn"] else None
        self.act = _act(p["act"])

    def forward(self, x):
        x = self.layer(x)
        x = x if self.bn is None else self.bn(x)
        return x if self.act is None else self.act(x)


class ChannelReduce(Block):
    """Issue 15: one or two reductions over the channel dim (CBAM's spatial attention and kin), concatenated and
    fed to a 3x3 conv, used as a sigmoid gate on the input ("gate") or as a new map ("conv")."""

    def __init__(self, p, c):
        super().__init__()
        self.srcs = (p["src"],)
        self.ops, self.dim, self.keepdim, self.style, self.use = p["ops"], p["dim"], p["keepdim"], p["style"], p["use"]
        self.offset = p["offset"]
        self.conv = nn.Conv2d(len(self.ops), 1 if self.use == "gate" else p["out"], 3, padding=1)

    def reduce(self, x, op):
        d, keep = self.dim, self.keepdim
        function = self.style == "function"
        if op == "max":
            r = (torch.max(x, d, keepdim=keep) if function else x.max(dim=d, keepdim=keep))[0]
        elif op == "norm":
            r = torch.linalg.vector_norm(x, dim=d, keepdim=keep) if function else x.norm(dim=d, keepdim=keep)
        else:
            r = getattr(torch, op)(x, dim=d, keepdim=keep) if function else getattr(x, op)(d, keepdim=keep)
        return r if keep else r.unsqueeze(1)

    def forward(self, x):
        x = x - self.offset  # values below 0 (after a ReLU too): a masked channel's 0 can win a max
        r = torch.cat([self.reduce(x, op) for op in self.ops], 1) if len(self.ops) > 1 else self.reduce(x, self.ops[0])
        y = self.conv(r)
        return x * torch.sigmoid(y) if self.use == "gate" else y


BLOCKS = {"conv": Conv, "dw": Conv, "gconv": Conv, "res": Residual, "mbconv": MBConv, "up": Up, "add": Add, "cat": Cat,
          "chunk": Chunk, "split": Split, "slice": Slice, "shuffle": Shuffle, "se": SEBlock, "perm": Perm,
          "act": ActBlock, "dropout": Dropout, "pool": Pool, "scale": Scale, "bn": BN,
          "fconv": FunctionalConv, "reduce": ChannelReduce}


class Head(nn.Module):
    def __init__(self, p, c, hw, classes):
        super().__init__()
        self.kind, self.style = p["kind"], p["style"]
        if self.kind == "gap":
            features = c
            if self.style == "module":
                self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            self.hw = min(hw, 2) if hw > 4 else hw  # pool a large map down to 2x2 first
            self.pooled = self.hw != hw
            features = c * self.hw * self.hw
        hidden = p["hidden"]
        self.hidden = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(0.2)) if hidden else None
        self.fc = nn.Linear(hidden or features, classes)

    def forward(self, x):
        if self.kind == "gap":
            if self.style == "module":
                x = self.pool(x)
            elif self.style == "mean":
                x = x.mean((2, 3))
            elif self.style == "max":
                x = torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
            else:
                x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        else:
            if self.pooled:
                x = F.adaptive_avg_pool2d(x, self.hw)
            if self.style == "view":
                x = x.view(x.size(0), -1)
            elif self.style == "reshape":
                x = x.reshape(x.shape[0], -1)
            else:
                x = torch.flatten(x, 1)
        if self.hidden is not None:
            x = self.hidden(x)
        return self.fc(x)


class RandomCNN(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        channels = [3]
        hws = [spec["size"]]
        blocks = []
        for p in spec["blocks"]:
            block = BLOCKS[p["kind"]](p, channels[block_src(p)])
            blocks.append(block)
            for c, hw in p["outs"]:
                channels.append(c)
                hws.append(hw)
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(spec["head"], channels[-1], hws[-1], spec["classes"])
        randomise(self, spec["seed"])

    def forward(self, x):
        stream = [x]
        for block in self.blocks:
            out = block(*[stream[i] for i in block.srcs])
            if block.n_out == 1:
                stream.append(out)
            else:
                stream.extend(out)
        return self.head(stream[-1])


def block_src(p: dict) -> int:
    return p["src"] if "src" in p else p["srcs"][0]


def randomise(model: nn.Module, seed: int) -> None:
    """Non-trivial weights, biases, layer scales, BN affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.5 / math.sqrt(fan_in)))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            elif isinstance(m, Scale):
                m.gamma.copy_(torch.randn(m.gamma.shape, generator=g))


def build_model(spec: dict) -> RandomCNN:
    return RandomCNN(spec).eval()


# ───────────────────────────── the strategy ─────────────────────────────
def _divisors(c: int, candidates) -> list[int]:
    return [g for g in candidates if c % g == 0 and g <= c]


def _cat_partners(src: int, shapes: list[tuple[int, int]]) -> list[int]:
    c, hw = shapes[src]
    return [i for i in range(len(shapes)) if shapes[i][1] == hw and shapes[i][0] + c <= MAX_CAT][::-1]


def _applicable(kind: str, src: int, shapes: list[tuple[int, int]]) -> bool:
    c, hw = shapes[src]
    if kind == "cat":
        return bool(_cat_partners(src, shapes))
    if kind == "chunk":
        return c % 2 == 0
    if kind in ("split", "slice"):
        return c >= 2
    if kind == "shuffle":
        return bool(_divisors(c, (2, 3, 4)))
    if kind == "gconv":
        return bool(_divisors(c, (2, 3, 4, 6, 8)))
    if kind == "up":
        return hw <= 8  # maps stay at most 16x16
    return True


@st.composite
def _src(draw, n: int) -> int:
    """A stream index, shrinking towards the most recent entry."""
    return n - 1 - draw(st.integers(0, n - 1))


def _stride(draw, hw: int) -> int:
    return draw(st.sampled_from([1, 2])) if hw >= 3 else 1


def _half(hw: int, stride: int) -> int:
    return (hw + 1) // 2 if stride == 2 else hw


@st.composite
def _block(draw, kind: str, src: int, shapes: list[tuple[int, int]]) -> dict:
    c, hw = shapes[src]
    n = len(shapes)
    p: dict = {"kind": kind, "src": src}
    act = st.sampled_from(ACTS)
    maybe_act = st.sampled_from((None,) + ACTS)
    style_ma = st.sampled_from(["module", "function"])
    if kind in ("conv", "dw", "gconv"):
        k = draw(st.sampled_from([1, 3]))
        if kind == "conv":
            groups, out = 1, draw(st.integers(4, 32))
        elif kind == "dw":
            k, groups = 3, c
            out = c * draw(st.sampled_from([1, 2]))
        else:
            groups = draw(st.sampled_from(_divisors(c, (2, 3, 4, 6, 8))))
            out = groups * draw(st.integers(max(1, 4 // groups), max(1, 32 // groups)))
        stride = _stride(draw, hw)
        p.update(out=out, k=k, stride=stride, groups=groups, bias=draw(st.booleans()), bn=draw(st.booleans()),
                 act=draw(maybe_act), style=draw(style_ma), inplace=draw(st.booleans()))
        p["outs"] = [(out, _half(hw, stride))]
    elif kind == "fconv":
        layer = draw(st.sampled_from(["plain", "masked", "gain", "linear"]))
        groups = 1 if layer == "linear" else draw(st.sampled_from([1] + _divisors(c, (2, 4))))
        out = groups * draw(st.integers(max(1, 4 // groups), max(1, 24 // groups)))
        k, stride = (1, 1) if layer == "linear" else (draw(st.sampled_from([1, 3])), _stride(draw, hw))
        p.update(layer=layer, out=out, k=k, stride=stride, groups=groups, bias=draw(st.booleans()),
                 bn=draw(st.booleans()), act=draw(maybe_act))
        p["outs"] = [(out, _half(hw, stride))]
    elif kind == "up":
        groups = draw(st.sampled_from([1] + _divisors(c, (2, 4))))
        out = groups * draw(st.integers(max(1, 4 // groups), max(1, 24 // groups)))
        p.update(out=out, k=draw(st.sampled_from([2, 4])), groups=groups, bias=draw(st.booleans()))
        p["outs"] = [(out, 2 * hw)]
    elif kind == "res":
        stride = _stride(draw, hw)
        out = c if draw(st.booleans()) else draw(st.integers(4, 32))
        p.update(out=out, stride=stride, k2=draw(st.sampled_from([3, 1])), act=draw(maybe_act), style=draw(style_ma),
                 functional_add=draw(st.booleans()))
        p["outs"] = [(out, _half(hw, stride))]
    elif kind == "mbconv":
        stride = _stride(draw, hw)
        mid = min(MAX_MID, c * draw(st.sampled_from([1, 2, 3, 4])))
        out = c if draw(st.booleans()) else draw(st.integers(4, 32))
        se = draw(st.sampled_from([0, max(1, mid // 4)]))
        p.update(mid=mid, out=out, stride=stride, se=se, act=draw(act))
        p["outs"] = [(out, _half(hw, stride))]
    elif kind == "add":
        same = [i for i in range(n) if shapes[i] == (c, hw)]
        p = {"kind": kind, "srcs": [src, draw(st.sampled_from(same[::-1]))], "act": draw(maybe_act)}
        p["outs"] = [(c, hw)]
    elif kind == "cat":
        other = draw(st.sampled_from(_cat_partners(src, shapes)))
        p = {"kind": kind, "srcs": [src, other], "style": draw(st.sampled_from(["list", "tuple"]))}
        p["outs"] = [(c + shapes[other][0], hw)]
    elif kind == "chunk":
        p.update(style=draw(st.sampled_from(["method", "function"])))
        p["outs"] = [(c // 2, hw)] * 2
    elif kind == "split":
        if draw(st.booleans()):
            size = draw(st.integers(1, c - 1))
            p["sizes"] = size
            p["outs"] = [(min(size, c - i), hw) for i in range(0, c, size)]
        else:
            cuts = sorted(draw(st.lists(st.integers(1, c - 1), min_size=1, max_size=min(2, c - 1), unique=True)))
            sizes = [b - a for a, b in zip([0] + cuts, cuts + [c])]
            p["sizes"] = sizes
            p["outs"] = [(s, hw) for s in sizes]
        p["style"] = draw(st.sampled_from(["function", "method"]))
    elif kind == "slice":
        a = draw(st.integers(0, c - 1))
        b = draw(st.integers(a + 1, c))
        style = draw(st.sampled_from(["getitem", "narrow", "negative"]))
        step = 1 if style == "narrow" else draw(st.sampled_from([1, 2]))
        p.update(a=a, b=b, step=step, style=style)
        p["outs"] = [(len(range(a, b, step)), hw)]
    elif kind == "shuffle":
        p.update(g=draw(st.sampled_from(_divisors(c, (2, 3, 4)))), hw=hw,
                 style=draw(st.sampled_from(["size", "const", "permute", "function", "module"])))
        p["outs"] = [(c, hw)]
    elif kind == "se":
        p.update(r=draw(st.integers(1, max(1, c // 2))), act=draw(act),
                 gate=draw(st.sampled_from(["sigmoid", "hardsigmoid"])), pool=draw(st.sampled_from(["adaptive", "mean"])))
        p["outs"] = [(c, hw)]
    elif kind == "perm":
        mode = draw(st.sampled_from(["permutation", "subset"]))
        if mode == "permutation":
            index = draw(st.permutations(list(range(c))))
        else:
            index = draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=min(c + 4, 32)))
        p.update(index=list(index), style=draw(st.sampled_from(["function", "method"])))
        p["outs"] = [(len(index), hw)]
    elif kind == "act":
        p.update(act=draw(act), style=draw(style_ma))
        p["outs"] = [(c, hw)]
    elif kind == "dropout":
        p.update(style=draw(st.sampled_from(["module", "module2d", "function"])))
        p["outs"] = [(c, hw)]
    elif kind == "pool":
        k = draw(st.sampled_from([2, 3])) if hw >= 4 else 3
        p.update(pool=draw(st.sampled_from(["max", "avg"])), k=k, style=draw(style_ma))
        p["outs"] = [(c, hw // 2 if k == 2 else hw)]
    elif kind == "scale":
        p.update(style=draw(st.sampled_from(["4d", "1d", "3d"])))
        p["outs"] = [(c, hw)]
    elif kind == "bn":
        p.update(affine=draw(st.booleans()))
        p["outs"] = [(c, hw)]
    elif kind == "reduce":
        p.update(draw(_channel_reduce(c)))
        p["outs"] = [(p["out"] if p["use"] == "conv" else c, hw)]
    else:  # pragma: no cover
        raise ValueError(kind)
    return p


REDUCE_OPS = ("mean", "max", "sum", "amax", "norm")  # sum and norm are exact across channels, the others fix them


@st.composite
def _channel_reduce(draw, c: int) -> dict:
    """Issue 15: parameters of a `ChannelReduce` block (every spelling of the channel dim, keepdim both ways)."""
    ops = draw(st.lists(st.sampled_from(REDUCE_OPS), min_size=1, max_size=2))
    dims = [1, -3] if "max" in ops else [1, -3, (1,)]
    return {"ops": ops, "dim": draw(st.sampled_from(dims)), "keepdim": draw(st.booleans()),
            "style": draw(st.sampled_from(["function", "method"])), "use": draw(st.sampled_from(["gate", "conv"])),
            "out": draw(st.integers(4, 16)), "offset": draw(st.sampled_from([0.0, 1.0]))}


@st.composite
def cnn_specs(draw, min_blocks: int = 2, max_blocks: int = 8, first: str | None = None,
              kinds: tuple[str, ...] = KINDS) -> dict:
    """A random CNN spec. `first`: force that block kind right after a conv stem (12 or 24 channels)."""
    size = draw(st.sampled_from([8, 16, 12]))
    shapes: list[tuple[int, int]] = [(3, size)]
    blocks: list[dict] = []
    if first is not None:
        stem = {"kind": "conv", "src": 0, "out": draw(st.sampled_from([12, 24])), "k": 3, "stride": 1, "groups": 1,
                "bias": False, "bn": True, "act": "relu", "style": "module", "inplace": False}
        stem["outs"] = [(stem["out"], size)]
        blocks.append(stem)
        shapes += stem["outs"]
    count = draw(st.integers(min_blocks, max_blocks))
    for i in range(count):
        src = len(shapes) - 1 if (first is not None and i == 0) else draw(_src(len(shapes)))
        if first is not None and i == 0:
            kind = first
        else:
            kind = draw(st.sampled_from([k for k in kinds if _applicable(k, src, shapes)]))
        p = draw(_block(kind, src, shapes))
        blocks.append(p)
        shapes += p["outs"]
    head = {"kind": draw(st.sampled_from(["gap", "flat"])), "hidden": draw(st.sampled_from([0, 16]))}
    head["style"] = draw(st.sampled_from(["function", "module", "mean", "max"] if head["kind"] == "gap"
                                         else ["flatten", "view", "reshape"]))
    return {"size": size, "classes": draw(st.integers(2, 10)), "seed": draw(st.integers(0, 2**16)),
            "blocks": blocks, "head": head}
