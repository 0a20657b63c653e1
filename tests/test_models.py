"""Networks, the Barlow Twins loss and LARS (SPEC 1, 4, 5)."""
import pytest
import torch
import torch.nn as nn
import torchvision

import models


@pytest.mark.parametrize("res", [32, 64])
def test_resnet18_cifar_features(res):
    net = models.resnet18_cifar().eval()
    with torch.no_grad():
        f = net(torch.randn(2, 3, res, res))
    assert f.shape == (2, 512) and torch.isfinite(f).all()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)


def test_resnet18_cifar_loads_into_torchvision():
    """A saved backbone loads (strict) into torchvision's resnet18 after the same stem swap."""
    torch.manual_seed(0)
    ours = models.resnet18_cifar().eval()
    ref = torchvision.models.resnet18()
    ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool = nn.Identity()
    ref.fc = nn.Identity()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ref.eval()(x), ours(x))
    plain = torchvision.models.resnet18()  # without the swap the stem's shape differs
    with pytest.raises(RuntimeError):
        plain.load_state_dict(ours.state_dict(), strict=False)


@pytest.mark.parametrize("width", [8, 16])
def test_narrow_resnet18_has_width_times_8_features(width):
    """network.width rebuilds the stages at w, 2w, 4w, 8w channels; 64 is the standard ResNet-18."""
    net = models.resnet18_cifar(width).eval()
    with torch.no_grad():
        f = net(torch.randn(2, 3, 16, 16))
    assert f.shape == (2, models.resnet18_dim(width)) == (2, 8 * width) and torch.isfinite(f).all()
    assert net.conv1.out_channels == width and net.layer4[1].conv2.out_channels == 8 * width
    assert models.num_params(net) < models.num_params(models.resnet18_cifar()) / 10
    assert set(net.state_dict()) == set(models.resnet18_cifar().state_dict())  # same names, smaller tensors


def test_regressor():
    net = models.Regressor(models.resnet18_cifar(), 512, 16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert net.embed(x).shape == (2, 512) and net(x).shape == (2, 16)


@pytest.mark.parametrize("widths,res", [([128, 256, 512], 32), ([64, 128, 256, 512], 64)])
def test_convnet_dims(widths, res):
    """The KRR features are the flattened last block: 8192-d for the spec's two pools."""
    net = models.ConvNet(widths=widths, resolution=res, out_dim=512)
    x = torch.randn(2, 3, res, res)
    assert net.embed_dim == 8192 and net.embed(x).shape == (2, 8192) and net(x).shape == (2, 512)
    kinds = [type(m) for m in net.features[:4]]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d]


def test_convnet_too_many_blocks():
    with pytest.raises(ValueError, match="6 pooling blocks"):
        models.ConvNet(widths=[8] * 6, resolution=32, out_dim=4)
    assert models.ConvNet(widths=[8] * 5, resolution=32, out_dim=4).embed_dim == 8


def test_approx_mlp_params():
    """V -> hidden -> V: 200*4 + 4 + 4*200 + 200 = 1804 floats (SPEC 3's three nets: 5,412)."""
    net = models.ApproxMLP(V=200, hidden=4)
    assert models.num_params(net) == 1804
    assert net(torch.randn(3, 200)).shape == (3, 200)


def test_projector_layout():
    p = models.projector(512, [2048, 2048, 2048])
    assert [type(m) for m in p] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert p[0].bias is None and p[-1].out_features == 2048


def test_off_diagonal():
    c = torch.arange(16.0).view(4, 4)
    ref = c[~torch.eye(4, dtype=torch.bool)]
    assert torch.equal(models.off_diagonal(c), ref)


def test_barlow_loss_reference():
    """Matches a direct evaluation of the formula with a hand-written cross-correlation."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(32, 8), torch.randn(32, 8)
    n1 = (z1 - z1.mean(0)) / z1.std(0, unbiased=False)
    n2 = (z2 - z2.mean(0)) / z2.std(0, unbiased=False)
    c = torch.einsum("bi,bj->ij", n1, n2) / 32
    eye = torch.eye(8, dtype=torch.bool)
    ref = 0.1 * (((c[eye] - 1) ** 2).sum() + 0.0051 * (c[~eye] ** 2).sum())
    torch.testing.assert_close(models.barlow_twins_loss(z1, z2, 0.0051, 0.1), ref)


def test_barlow_loss_prefers_agreement():
    torch.manual_seed(0)
    z1 = torch.randn(64, 16, requires_grad=True)
    same = models.barlow_twins_loss(z1, z1, 0.0051, 1.0)
    other = models.barlow_twins_loss(z1, torch.randn(64, 16), 0.0051, 1.0)
    assert same < 0.5 and other > 10 * same
    other.backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


@pytest.fixture
def one_thread():
    """Tiny ops: a second OpenMP thread only adds synchronisation (seconds on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_barlow_loss_falls_with_training(one_thread):
    """A few Adam steps on a small projector and two noisy views lower the loss a lot."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(128, 32)
    proj = models.projector(32, [64, 64, 16])
    opt = torch.optim.Adam(proj.parameters(), lr=1e-3)

    def loss():
        a = X + 0.1 * torch.randn(X.shape, generator=gen)
        b = X + 0.1 * torch.randn(X.shape, generator=gen)
        return models.barlow_twins_loss(proj(a), proj(b), 0.0051, 1.0)
    initial = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.3 * initial


def test_lars_param_groups():
    """Biases and norm parameters: no LARS adaptation, no weight decay."""
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2, bias=False))
    groups = models.lars_param_groups(net)
    assert [p.shape for p in groups[0]["params"]] == [(8, 4), (2, 8)]
    assert sorted(p.shape for p in groups[1]["params"]) == [(8,)] * 3
    assert groups[1]["lars"] is False and groups[1]["weight_decay"] == 0.0
    opt = models.LARS(groups, lr=0.3, momentum=0.9, weight_decay=1e-4, eta=0.02)
    assert opt.param_groups[0]["lars"] is True and opt.param_groups[0]["weight_decay"] == 1e-4
    assert opt.param_groups[1]["lars"] is False and opt.param_groups[1]["weight_decay"] == 0.0


def test_lars_step():
    """One step follows solo-learn's LARS update and lowers a quadratic loss."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(10, 10)), nn.Parameter(torch.randn(10))
    target = torch.randn(10, 10)
    lr, wd, eta = 0.5, 1e-4, 0.02
    opt = models.LARS([{"params": [w]}, {"params": [b], "lars": False, "weight_decay": 0.0}],
                      lr=lr, momentum=0.9, weight_decay=wd, eta=eta)

    def loss():
        return ((w - target) ** 2).sum() + (b ** 2).sum()
    before = loss()
    before.backward()
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt.step()
    ratio = min(eta * w0.norm() / (gw.norm() + wd * w0.norm()) / lr, 1.0)
    torch.testing.assert_close(w.detach(), w0 - lr * ratio * (gw + wd * w0))
    torch.testing.assert_close(b.detach(), b0 - lr * gb)
    assert loss() < before


def test_lars_allocates_its_momentum_buffers_once(monkeypatch):
    """After the first step, a step allocates no per-parameter buffer (it used to zero-fill a copy of every
    parameter on every step, only to throw it away)."""
    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    opt = models.LARS(models.lars_param_groups(net), lr=0.1, momentum=0.9, weight_decay=1e-4, eta=0.02)
    x = torch.randn(16, 8)

    def step():
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()

    step()
    mu = [opt.state[p]["mu"] for p in net.parameters()]
    calls = []
    real = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: calls.append(1) or real(*a, **k))
    step()
    assert calls == [] and all(opt.state[p]["mu"] is m for p, m in zip(net.parameters(), mu))


@pytest.mark.parametrize("name", list(models.STUDENTS))
@pytest.mark.parametrize("res", [8, 32, 64])
def test_every_student_builds_and_takes_a_regression_step(name, res):
    """Each evaluation student at 8, 32 and 64 px: its feature width read off the network, one SGD step of
    the regression head's MSE lowers that batch's loss (width 16: the CPU-scale students)."""
    torch.manual_seed(0)
    backbone, dim = models.student(name, 16, res)
    net = models.Regressor(backbone, dim, 32)
    x, y = torch.randn(8, 3, res, res), torch.randn(8, 32)
    assert net.embed(x).shape == (8, dim) and net(x).shape == (8, 32)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        loss = models.mse(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert losses[1] < losses[0], losses


def test_student_widths_follow_the_network():
    assert models.student("resnet10", 64, 32)[1] == 512 and models.student("vgg11_bn", 64, 32)[1] == 512
    assert models.student("vgg11_bn", 64, 64)[1] == 2048  # flattened 2x2 after five pools, as KRR-ST's VGG
    assert models.student("alexnet", 64, 32)[1] == 192 * 4 * 4 and models.student("mobilenetv2", 16, 8)[1] == 1280
    assert len(models.resnet18_cifar(64, blocks=1).layer1) == 1  # ResNet-10
