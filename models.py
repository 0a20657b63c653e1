"""Networks, the Barlow Twins loss, LARS, and the torch execution helpers. Stands alone: torch only, sizes as
arguments."""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision


# --------------------------------------------------------------------------------------------
# ResNet-18 with the CIFAR stem (teacher g and the evaluation network)
# --------------------------------------------------------------------------------------------
def resnet18_dim(width=64):
    """Feature width of a ResNet-18 whose stages are width, 2w, 4w, 8w channels: d_y = 8 * width."""
    return 8 * width


def resnet18_cifar(width=64, blocks=2):
    """torchvision ResNet-18 with a 3x3 stride-1 stem, no max-pool, fc = Identity -> 8*width features. Another width
    or `blocks` (1: ResNet-10) rebuilds the stages with torchvision's blocks and initialisation (SPEC 1)."""
    net = torchvision.models.resnet18()
    if width != 64 or blocks != 2:
        block = torchvision.models.resnet.BasicBlock
        net.inplanes, net.bn1 = width, nn.BatchNorm2d(width)
        for i in range(4):
            setattr(net, f"layer{i + 1}", net._make_layer(block, width * 2**i, blocks, stride=1 if i == 0 else 2))
        for mod in net.modules():  # torchvision's ResNet initialisation, for the rebuilt stages
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


# --------------------------------------------------------------------------------------------
# Evaluation students (KRR-ST's cross-architecture set), CIFAR-size variants
# --------------------------------------------------------------------------------------------
def vgg11_bn_cifar(width=64, resolution=32):
    """torchvision's VGG-11 (BatchNorm) layers, channels x width/64, flattened after the last pool (KRR-ST's
    CIFAR VGG). Below 32 px only the max-pools that fit are kept (8 px: the first three)."""
    pools = min(5, max(0, resolution.bit_length() - 1))
    cfg, kept = [], 0
    for v in torchvision.models.vgg.cfgs["A"]:
        if v == "M":
            kept += 1
            if kept > pools:
                continue
        cfg.append(v if v == "M" else max(1, v * width // 64))
    return nn.Sequential(torchvision.models.vgg.make_layers(cfg, batch_norm=True), nn.Flatten())


def alexnet_cifar(width=64, resolution=32):
    """AlexNet for small images (KRR-ST's CIFAR AlexNet: 5x5 and 3x3 convs with BatchNorm, three max-pools),
    channels x width/64, flattened; torchvision's ImageNet AlexNet (11x11 stride 4) does not fit 8-64 px."""
    c = [max(1, v * width // 64) for v in (128, 192, 256, 192, 192)]
    layers, prev = [], 3
    for i, (ch, k) in enumerate(zip(c, (5, 5, 3, 3, 3))):
        layers += [nn.Conv2d(prev, ch, k, padding=k // 2), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        if i in (0, 1, 4) and resolution >= 2 ** (1 + (0, 1, 4).index(i)):
            layers.append(nn.MaxPool2d(2))
        prev = ch
    return nn.Sequential(*layers, nn.Flatten())


def mobilenetv2_cifar(width=64):
    """torchvision's MobileNetV2 (width_mult = width/64) with the CIFAR strides: stem and first down-sampling
    stage at stride 1 (8x down-sampling in all), global average pool, classifier removed."""
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
               [6, 320, 1, 1]]
    net = torchvision.models.mobilenet_v2(width_mult=width / 64, inverted_residual_setting=setting)
    net.features[0][0].stride = (1, 1)
    net.classifier = nn.Identity()
    return net


STUDENTS = {
    "resnet18": lambda width, res: resnet18_cifar(width),
    "resnet10": lambda width, res: resnet18_cifar(width, blocks=1),
    "vgg11_bn": vgg11_bn_cifar,
    "alexnet": alexnet_cifar,
    "mobilenetv2": lambda width, res: mobilenetv2_cifar(width),
}


def student(name, width, resolution):
    """(backbone, feature width) of an evaluation student; the width is read off the network at `resolution`."""
    net = STUDENTS[name](width, resolution)
    with torch.no_grad():
        dim = net.eval()(torch.zeros(2, 3, resolution, resolution)).shape[1]
    return net.train(), dim


class Regressor(nn.Module):
    """backbone + Linear(feat_dim -> out_dim): the pre-training network of SPEC 6.1."""

    def __init__(self, backbone, feat_dim, out_dim):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, out_dim)

    def embed(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.head(self.backbone(x))


# --------------------------------------------------------------------------------------------
# Barlow Twins
# --------------------------------------------------------------------------------------------
def projector(in_dim, dims):
    """Linear-BN-ReLU for every hidden layer, then a plain Linear (solo-learn's 2048-2048-2048)."""
    layers, d = [], in_dim
    for h in dims[:-1]:
        layers += [nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
        d = h
    layers.append(nn.Linear(d, dims[-1]))
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    """Backbone + projector applied to both views in one forward (one DDP forward per step under torchrun)."""

    def __init__(self, backbone, projector):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, v1, v2):
        return self.projector(self.backbone(v1)), self.projector(self.backbone(v2))


def off_diagonal(c):
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_loss(z1, z2, lambd, scale):
    """z1, z2: (B, D) projections of two views. scale * (sum (1 - C_ii)^2 + lambd sum_{i!=j} C_ij^2),
    C the (D, D) cross-correlation of the batch-standardised projections, computed in float32."""
    z1, z2 = z1.float(), z2.float()
    B = z1.shape[0]
    z1 = (z1 - z1.mean(0)) / z1.std(0, unbiased=False).clamp_min(1e-6)
    z2 = (z2 - z2.mean(0)) / z2.std(0, unbiased=False).clamp_min(1e-6)
    c = z1.T @ z2 / B
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return scale * (on_diag + lambd * off_diag)


# --------------------------------------------------------------------------------------------
# Several processes (torchrun): the global batch's embeddings and BatchNorm statistics
# --------------------------------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    """Every rank's rows, in rank order; backward returns this rank's rows of the gradient summed over ranks."""

    @staticmethod
    def forward(ctx, z):
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        ctx.rows = slice(dist.get_rank() * len(z), (dist.get_rank() + 1) * len(z))
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather_rows(z):
    """(world x b, ...) from every rank's (b, ...), differentiable; z in one process. Every rank computes the global
    batch's loss; summed here, averaged by DDP, the step is the single-process step."""
    return _GatherRows.apply(z) if dist.is_initialized() and dist.get_world_size() > 1 else z


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the batch of every rank, for CPU process groups (gloo), where PyTorch's SyncBatchNorm does
    not run: per-channel sums all-reduced with autograd. Same parameters and buffers as BatchNorm1d/2d, any input
    of 2 or more dimensions."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims, C = [0] + list(range(2, x.dim())), x.shape[1]
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() / C)])
        stats = _AllReduceSum.apply(stats)
        n = stats[-1]
        mean, var = stats[:C] / n, stats[C:2 * C] / n - (stats[:C] / n) ** 2
        with torch.no_grad():  # running statistics as BatchNorm keeps them (unbiased variance)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        shape = [1, C] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module, device):
    """Every BatchNorm of `module` normalised over the global batch of all ranks: PyTorch's SyncBatchNorm on
    CUDA, GlobalBatchNorm on the CPU. The state_dict keys stay those of BatchNorm (checkpoints load plainly)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            sync_batchnorm(child, device)
    return module


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (solo-learn's LARS, clip_lr=True); groups with `lars=False`
    (biases and norm parameters, SPEC 1) get neither weight decay nor adaptation."""

    def __init__(self, params, lr, momentum, weight_decay, eta):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self):
        """Multi-tensor (foreach) update: a handful of kernels per group instead of ~10 per parameter."""
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if g["lars"]:
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                ratio = g["eta"] * p_norm / (g_norm + p_norm * g["weight_decay"] + 1e-8)
                ratio = torch.where((p_norm > 0) & (g_norm > 0), (ratio / g["lr"]).clamp(max=1), 1.0)
                grads = torch._foreach_add(grads, params, alpha=g["weight_decay"])
                torch._foreach_mul_(grads, list(ratio.unbind()))
            for p in params:  # momentum buffers allocated once (setdefault would zero-fill a copy every step)
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            bufs = [self.state[p]["mu"] for p in params]
            torch._foreach_mul_(bufs, g["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-g["lr"])


def lars_param_groups(*modules):
    """Split parameters: weights (LARS + wd) and biases / norm parameters (neither)."""
    decay, plain = [], []
    for m in modules:
        for p in m.parameters():
            (plain if p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": plain, "lars": False, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------
# KRR-ST model pool ConvNet and the approximation MLP
# --------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """KRR-ST pool network: [Conv3x3 -> BatchNorm -> ReLU -> AvgPool2] per width, then Linear; embed(x), the
    flattened last block, gives the KRR features."""

    def __init__(self, widths, resolution, out_dim, in_ch=3):
        super().__init__()
        blocks, c = [], in_ch
        for w in widths:
            blocks += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c = w
        self.features = nn.Sequential(*blocks)
        side = resolution // 2 ** len(widths)
        if side < 1:
            raise ValueError(f"{len(widths)} pooling blocks do not fit {resolution} px images")
        self.embed_dim = c * side * side
        self.head = nn.Linear(self.embed_dim, out_dim)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.head(self.embed(x))


class ApproxMLP(nn.Sequential):
    """V -> hidden -> V: predicts the coefficient shift c^{y,k} - c^y of one rotation (SPEC 5)."""

    def __init__(self, V, hidden):
        super().__init__(nn.Linear(V, hidden), nn.ReLU(), nn.Linear(hidden, V))


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def mse(pred, target):
    return F.mse_loss(pred.float(), target.float())


# --------------------------------------------------------------------------------------------
# Execution: torchrun's ranks, generators, numerics (autocast, TF32, precision, channels_last)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    """This process among torchrun's (utils.init_ranks): rank 0 of 1 when a script is started plainly."""
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        """Rank 0 alone writes files, logs and prints."""
        return self.rank == 0

    def say(self, *args, **kwargs):
        if self.main:
            print(*args, **kwargs)


def shard(x, ranks):
    """Rank r's equal share of x's rows: r, r + W, r + 2W, ... (the last len(x) mod W rows are left out)."""
    return x[ranks.rank:len(x) // ranks.world * ranks.world:ranks.world]


def gather_objects(obj, ranks):
    """[rank 0's obj, rank 1's obj, ...] on every rank (picklable objects; [obj] in a single process)."""
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ranks):
    if ranks.world > 1:
        dist.barrier()


@contextmanager
def rank0_first(ranks):
    """The block runs on rank 0 first (it computes and caches), then on the others (which read the cache)."""
    if not ranks.main:
        barrier(ranks)
    yield
    if ranks.main:
        barrier(ranks)


def make_generator(device, seed):
    """A torch.Generator on `device`: all augmentation randomness is drawn from it."""
    return torch.Generator(device=device).manual_seed(seed)


def autocast(device, enabled=True):
    """bf16 autocast on CUDA, a no-op on CPU (CPU bf16 convs are slower than fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@contextmanager
def tf32(enabled):
    """TF32 for float32 convs and matmuls on CUDA, set explicitly (PyTorch's defaults differ), restored on exit. The
    legacy allow_tf32 flags only: torch.compile reads them, and mixing them with fp32_precision raises."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@contextmanager
def precision(device, name):
    """A forward pass in one of utils.PRECISIONS: float32, TF32 or bf16 autocast (all float32 on the CPU). Backward
    passes take `tf32(name == "tf32")` alone."""
    with tf32(name == "tf32"), autocast(device, enabled=name == "bfloat16"):
        yield


def to_channels_last(x, device):
    """channels_last on CUDA; contiguous NCHW on the CPU, where a channels_last batch sends a 1x1 stride-2 conv's
    backward into a oneDNN kernel that corrupts the heap (torch 2.14.1)."""
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x.contiguous()


def channels_last_module(net, device):
    """Weights in channels_last once on CUDA (else cuDNN converts them on every call); unchanged on the CPU."""
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net
