"""main_distill.py: storage accounting, parameterization, KRR, gradients, a short run, resume."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

import main_distill
import models
import utils
from tiny import REPO, write_config, write_teacher


def cifar_cfg(**overrides):
    return utils.load_config(REPO / "configs" / "cifar10.yaml", overrides)


# ---------------------------------------------------------------------------------- SPEC 3
def test_storage_matches_spec_example():
    t = main_distill.storage_accounting(cifar_cfg())
    assert t["budget"] == 358_400
    assert t["rows"]["B_x"] + t["rows"]["mu_x"] + t["rows"]["B_y"] + t["rows"]["mu_y"] == 257_280
    assert t["rows"]["approximation nets"] == 5_412
    assert t["m"] == 239 and t["stored"] <= t["budget"]
    assert t["stored"] == sum(t["rows"].values())


@pytest.mark.parametrize("N,U,V,hidden,store", [(1, 8, 8, 4, False), (10, 50, 20, 2, True), (100, 200, 200, 4, True),
                                                (240, 100, 300, 16, False), (50, 64, 64, 8, False)])
def test_storage_never_exceeds_budget_and_m_is_maximal(N, U, V, hidden, store):
    cfg = cifar_cfg(**{"storage.budget_N": N, "parameterization.U": U, "parameterization.V": V,
                       "approximation.hidden": hidden, "storage.store_augmented_targets": store})
    per_m = U + V + (3 * V if store else 0)
    fixed = U * 768 + 768 + V * 512 + 512 + (0 if store else 3 * (2 * V * hidden + hidden + V))
    if fixed + per_m > N * 3584:  # the bases alone do not fit: a clear error, not a negative m
        with pytest.raises(utils.ConfigError, match="cannot hold the bases"):
            main_distill.storage_accounting(cfg)
        return
    t = main_distill.storage_accounting(cfg)
    assert t["stored"] <= t["budget"] and t["m"] >= 1
    assert t["stored"] + per_m > t["budget"]  # one more distilled image would not fit


def test_fixed_m_over_budget_is_an_error_with_the_numbers():
    with pytest.raises(utils.ConfigError, match=r"m=240 needs 358,692 floats > budget 358,400.*largest m within budget is 239"):
        main_distill.storage_accounting(cifar_cfg(**{"storage.m": 240}))
    assert main_distill.storage_accounting(cifar_cfg(**{"storage.m": 100}))["m"] == 100


def test_krr_st_storage_is_exactly_the_budget():
    t = main_distill.storage_accounting(cifar_cfg(**{"distillation.method": "krr_st"}))
    assert t["m"] == 100 and t["stored"] == t["budget"]


# ---------------------------------------------------------------------------------- SPEC 2
def tiny_data(n=40, res=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    mean, std = utils.channel_stats(x)
    return utils.ImageData("DIGITS", x, y, x[:8], y[:8], mean, std, 10)


def test_pca_parameterization_round_trip(tmp_path):
    """With a full basis (U = 3 r_b^2) the initial images decode to up(down(real)) exactly."""
    data, r_b, m = tiny_data(), 4, 12
    cfg = utils.load_config(write_config(tmp_path), {"parameterization.U": 3 * r_b * r_b, "parameterization.V": 8})
    T = torch.randn(len(data.train_x), 4, 512)
    gen = torch.Generator().manual_seed(0)
    d = main_distill.init_distilled(cfg, data, T, m, gen)
    idx = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))[:m]
    real = utils.normalize(data.train_x[idx], data.mean, data.std)
    low = main_distill.downsample(real, r_b).view(m, 3, r_b, r_b)
    expected = F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(d.images(), expected, atol=1e-4)
    views, Y = d()
    assert views.shape == (4 * m, 3, 8, 8) and Y.shape == (4 * m, 512)
    assert torch.equal(views[m:2 * m], torch.rot90(views[:m], 1, (2, 3)))
    # targets: projections onto V=8 PCA directions of T, reconstructed without the discarded part
    mu_y, B_y = main_distill.pca(T[:, 0], 8)
    assert torch.allclose(Y[:m], mu_y + (T[idx, 0] - mu_y) @ B_y.T @ B_y, atol=1e-4)


def test_pca_reconstructs_with_its_mean():
    X = torch.randn(100, 6) @ torch.randn(6, 6)
    mu, B = main_distill.pca(X, 6)
    assert torch.allclose(B @ B.T, torch.eye(6), atol=1e-5)
    assert torch.allclose(mu + (X - mu) @ B.T @ B, X, atol=1e-4)


def test_pca_in_chunks_is_the_one_shot_pca(monkeypatch):
    """pca() sums the mean and the centred covariance chunk by chunk in float64 (a million-image source never
    exists whole in float64): with chunks of 7 rows it gives the one-shot float64 PCA's mean and basis."""
    X = (torch.randn(100, 6, generator=torch.Generator().manual_seed(0)) @ torch.randn(6, 6)).float() + 3.0
    Xd = X.double()
    mu_ref = Xd.mean(0)
    evecs = torch.linalg.eigh((Xd - mu_ref).T @ (Xd - mu_ref) / len(X))[1]
    B_ref = evecs[:, -4:].flip(1).T.float()
    monkeypatch.setattr(main_distill, "PCA_ROWS", 7)
    for source in (X, lambda: X.split(7)):
        mu, B = main_distill.pca(source, 4)
        assert torch.allclose(mu, mu_ref.float(), atol=1e-6) and torch.allclose(B, B_ref, atol=1e-5)


# ---------------------------------------------------------------------------------- SPEC 4
def test_krr_prediction_matches_direct_solve():
    torch.manual_seed(0)
    Phi_s, Phi_t, Y_s = torch.randn(30, 50), torch.randn(70, 50), torch.randn(30, 5)
    got = main_distill.krr_predict(Phi_s, Phi_t, Y_s, 1e-6)
    Ps = torch.cat([Phi_s, torch.ones(30, 1)], 1).double()
    Pt = torch.cat([Phi_t, torch.ones(70, 1)], 1).double()
    K = Ps @ Ps.T
    A = torch.linalg.lstsq(K + 1e-6 * torch.trace(K) * torch.eye(30, dtype=torch.float64), Y_s.double()).solution
    assert torch.allclose(got.double(), Pt @ Ps.T @ A, rtol=1e-3, atol=1e-3)


def lu_predict(Phi_s, Phi_t, Y_s, ridge):
    """krr_predict as it was until 2026-12 (an LU solve, torch.linalg.solve_ex): the reference the Cholesky
    solve replaced."""
    Ps = torch.cat([Phi_s, torch.ones_like(Phi_s[:, :1])], 1)
    Pt = torch.cat([Phi_t, torch.ones_like(Phi_t[:, :1])], 1)
    K = Ps @ Ps.T
    A = K + ridge * torch.trace(K).detach() * torch.eye(len(K), dtype=K.dtype)
    return Pt @ Ps.T @ torch.linalg.solve_ex(A, Y_s)[0]


def test_cholesky_solve_matches_float64_as_well_as_the_lu_solve_did():
    """At a condition number above the one the GPU check measured at cifar10 sizes (4e4 for the solved matrix;
    2e5 here), the float32 prediction and its gradients (features and targets) are within 2e-3 of float64 and no
    further from it than float32 LU's (measured: about half LU's error)."""
    torch.manual_seed(0)
    n, d, b = 120, 300, 200
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    spectrum = 10 ** (-1.5 * torch.arange(n, dtype=torch.float64) / n)  # singular values 1 .. 0.03
    Phi_s = U @ torch.diag(spectrum) @ torch.randn(n, d, dtype=torch.float64) / d ** 0.5
    Phi_t = torch.randn(b, n, dtype=torch.float64) @ Phi_s / n ** 0.5 + 0.01 * torch.randn(b, d, dtype=torch.float64)
    Y_s, y_t = torch.randn(n, 5, dtype=torch.float64), torch.randn(b, 5, dtype=torch.float64)
    K = torch.cat([Phi_s, torch.ones(n, 1, dtype=torch.float64)], 1)
    K = K @ K.T
    eig = torch.linalg.eigvalsh(K + 1e-6 * torch.trace(K) * torch.eye(n, dtype=torch.float64))
    assert 1e4 < eig[-1] / eig[0] < 1e6

    def run(predict, dtype):
        inputs = [t.to(dtype).clone().requires_grad_() for t in (Phi_s, Phi_t, Y_s)]
        pred = predict(*inputs, 1e-6)
        F.mse_loss(pred, y_t.to(dtype)).backward()
        return pred.double(), torch.cat([t.grad.flatten() for t in inputs]).double()

    ref_pred, ref_grad = run(main_distill.krr_predict, torch.float64)
    lu_pred, lu_grad = run(lu_predict, torch.float64)
    assert torch.allclose(ref_pred, lu_pred, rtol=1e-8, atol=1e-10)  # the same math in float64
    assert torch.allclose(ref_grad, lu_grad, rtol=1e-6, atol=1e-10)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    chol = [rel(x, r) for x, r in zip(run(main_distill.krr_predict, torch.float32), (ref_pred, ref_grad))]
    lu = [rel(x, r) for x, r in zip(run(lu_predict, torch.float32), (ref_pred, ref_grad))]
    assert chol[0] < 2e-3 and chol[1] < 2e-3, chol
    assert chol[0] <= 1.5 * lu[0] and chol[1] <= 1.5 * lu[1], (chol, lu)


def test_a_failed_factorisation_makes_the_prediction_nan():
    """No host check of the Cholesky's info: a matrix that is not positive definite (a negative ridge here)
    turns the prediction into NaN on the device, which the loop's finiteness check stops on."""
    torch.manual_seed(0)
    Phi_s, Phi_t, Y_s = torch.randn(10, 20), torch.randn(6, 20), torch.randn(10, 3)
    assert torch.isfinite(main_distill.krr_predict(Phi_s, Phi_t, Y_s, 1e-6)).all()
    assert torch.isnan(main_distill.krr_predict(Phi_s, Phi_t, Y_s, -1.0)).all()


def trained_convnet(widths=(8, 16), res=8, steps=3):
    """A pool ConvNet whose BatchNorm statistics and affine parameters are no longer their initial values."""
    torch.manual_seed(0)
    f = models.ConvNet(list(widths), res, 12)
    opt = torch.optim.SGD(f.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(32, 3, res, res) * 2 + 0.5
        opt.zero_grad()
        models.mse(f(x), torch.randn(32, 12)).backward()
        opt.step()
    return f.eval().requires_grad_(False)


def test_folded_batchnorm_is_the_same_function_with_the_same_gradient():
    """distillation.fold_bn: the frozen eval-mode ConvNet with BatchNorm folded into its convs gives f.embed's
    features and input gradient (float rounding apart), and the unfolded functional form as well."""
    f, dc = trained_convnet(), cifar_cfg()["distillation"]
    x = torch.randn(20, 3, 8, 8, requires_grad=True)
    ref = f.embed(x)
    g_ref, = torch.autograd.grad(ref.square().sum(), x)
    for fold in (True, False):
        got = main_distill.blocks_embed(x, main_distill.frozen_blocks(f, fold))
        g, = torch.autograd.grad(got.square().sum(), x)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5) and torch.allclose(g, g_ref, rtol=1e-4, atol=1e-4)
    assert main_distill.feature_pass(dc, torch.device("cpu"))(f) == f.embed  # every lever off: f.embed itself
    folded = main_distill.feature_pass({**dc, "fold_bn": True}, torch.device("cpu"))(f)
    assert torch.allclose(folded(x), ref, rtol=1e-5, atol=1e-5)


def test_compiled_features_trace_as_one_graph_and_fall_back_on_the_cpu():
    """distillation.compile_features: blocks_embed traces without a graph break (dynamo, eager backend: no compiler
    needed on the CPU) and one graph serves two models; on the CPU the key selects the eager function."""
    from torch._dynamo.testing import CompileCounter
    f1, f2 = trained_convnet(), trained_convnet(steps=5)
    torch._dynamo.reset()
    counts = CompileCounter()
    traced = torch.compile(main_distill.blocks_embed, backend=counts, fullgraph=True, dynamic=False)
    x = torch.randn(6, 3, 8, 8)
    for f in (f1, f2):
        blocks = main_distill.frozen_blocks(f, True)
        assert torch.allclose(traced(x, blocks), f.embed(x), rtol=1e-5, atol=1e-5)
    assert counts.frame_count == 1  # the second model reuses the graph: weights are inputs, not constants
    dc = {**cifar_cfg()["distillation"], "compile_features": True}
    assert main_distill.feature_pass(dc, torch.device("cpu"))(f1) == f1.embed  # the CPU runs f.embed itself


def built(cfg, data, T, m=6):
    """main_distill.build's State at seed 0 on the CPU, as main() builds it."""
    torch.manual_seed(0)
    return main_distill.build(cfg, data, T, m, torch.device("cpu"), torch.Generator().manual_seed(0), random.Random(0))


def test_every_lever_off_on_the_cpu_gives_the_default_step(tmp_path):
    """The CPU ignores the CUDA-only levers (compile_features, a bf16 real_features) bit for bit; fold_bn changes
    only rounding (amplified by the KRR solve at these random sizes; the features themselves:
    test_folded_batchnorm_is_the_same_function_with_the_same_gradient)."""
    data = tiny_data()
    T = torch.randn(len(data.train_x), 4, 32, generator=torch.Generator().manual_seed(0))

    def one_step(**levers):
        cfg = utils.load_config(write_config(tmp_path), {f"distillation.{k}": v for k, v in levers.items()})
        state = built(cfg, data, T)
        losses = [main_distill.outer_step(state, data, T, cfg["distillation"]) for _ in range(2)]
        return torch.stack(losses), state.distilled.C_x.detach().clone()

    ref_loss, ref_C = one_step()
    for lever in ({"compile_features": True}, {"real_features": "bfloat16"}):
        loss, C = one_step(**lever)
        assert torch.equal(loss, ref_loss) and torch.equal(C, ref_C), lever
    loss, C = one_step(fold_bn=True)
    assert torch.allclose(loss, ref_loss, rtol=2e-3) and torch.allclose(C, ref_C, rtol=1e-3, atol=1e-4)


def test_gradients_reach_every_learned_tensor(tmp_path):
    data = tiny_data()
    cfg = utils.load_config(write_config(tmp_path))
    T = torch.randn(len(data.train_x), 4, 512)
    d = main_distill.init_distilled(cfg, data, T, 6, torch.Generator().manual_seed(0))
    f = models.ConvNet([16, 32], 8, 512).eval()
    x_t, y_t = main_distill.real_batch(data, T, cfg["distillation"], d.rotations, torch.Generator().manual_seed(1))
    assert x_t.shape[0] == 4 * min(len(data.train_x), cfg["distillation"]["outer_batch_size"])  # no repeats
    X_s, Y_s = d()
    loss = models.mse(main_distill.krr_predict(f.embed(X_s), f.embed(x_t), Y_s, 1e-6), y_t)
    loss.backward()
    for name in ("C_x", "B_x", "C_y", "B_y"):
        assert getattr(d, name).grad.abs().sum() > 0, name
    for k in range(3):
        assert d.C_yk.grad[k].abs().sum() > 0, f"C_y^{k + 1}"


def test_frozen_bases_get_no_gradient_step(tmp_path):
    data = tiny_data()
    cfg = utils.load_config(write_config(tmp_path, parameterization__learn_bases=False))
    d = main_distill.init_distilled(cfg, data, torch.randn(len(data.train_x), 4, 512), 6, torch.Generator())
    groups = d.param_groups(cfg["distillation"])
    assert all(p is not d.B_x and p is not d.B_y for g in groups for p in g["params"])


def test_coefficients_and_bases_get_their_own_learning_rates(tmp_path):
    data = tiny_data()
    cfg = utils.load_config(write_config(tmp_path, distillation__lr_image=1.0, distillation__lr_image_bases=2.0,
                                         distillation__lr_repr=3.0, distillation__lr_repr_bases=4.0))
    d = main_distill.init_distilled(cfg, data, torch.randn(len(data.train_x), 4, 512), 6, torch.Generator())
    lr_of = {id(p): g["lr"] for g in d.param_groups(cfg["distillation"]) for p in g["params"]}
    assert [lr_of[id(p)] for p in (d.C_x, d.B_x, d.C_y, d.C_yk, d.B_y)] == [1.0, 2.0, 3.0, 3.0, 4.0]


def test_approximation_nets_beat_the_no_shift_baseline_where_they_can():
    """Shifts an MLP of this width can represent: the fitted nets' relative error must be far below the
    no-shift baseline's 1.0 (predicting c^{y,k} = c^y)."""
    torch.manual_seed(0)
    C_y = torch.randn(200, 16)
    teachers = [models.ApproxMLP(16, 4) for _ in range(3)]
    with torch.no_grad():
        C_yk = torch.stack([C_y + 3 * t(C_y) for t in teachers])
    nets, errors = main_distill.fit_approx_nets(C_y, C_yk, {"hidden": 4, "steps": 1500, "lr": 1e-2}, seed=0)
    assert len(nets) == 3 and all(e < 0.35 for e in errors), errors


def test_pool_resets_at_age_Z():
    mp = {"size_L": 2, "inner_loop_steps_Z": 3, "widths": [8], "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    pool = main_distill.ModelPool(mp, 8, 4, torch.device("cpu"))
    X, Y = torch.randn(5, 3, 8, 8), torch.randn(5, 4)
    first = pool.models[0]
    for _ in range(2):
        pool.inner_step(0, X, Y)
    assert pool.ages[0] == 2 and pool.models[0] is first
    pool.inner_step(0, X, Y)
    assert pool.ages[0] == 0 and pool.models[0] is not first
    pool.stagger(X, Y, random.Random(0))
    assert all(0 <= a < 3 for a in pool.ages)


def test_chunked_support_pass_equals_one_pass():
    """Stanford Dogs' full budget needs the support set in chunks: the chunked, checkpointed pass gives the
    features and the gradients of one pass (uneven chunks, the pool model in eval mode as in the outer step)."""
    torch.manual_seed(0)
    f = models.ConvNet([8, 16], 8, 4).eval().requires_grad_(False)
    X = torch.randn(23, 3, 8, 8, requires_grad=True)
    w = torch.randn(23, 64)
    grads, phis = [], []
    for chunk in (0, 5, 23, 100):
        X.grad = None
        phi = main_distill.support_features(f.embed, X, chunk, torch.device("cpu"))
        (phi * w).sum().backward()
        phis.append(phi.detach())
        grads.append(X.grad.clone())
    for phi, grad in zip(phis[1:], grads[1:]):
        torch.testing.assert_close(phi, phis[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grads[0], rtol=1e-5, atol=1e-6)


def test_chunked_outer_step_equals_one_pass(tmp_path):
    """One outer step with support_chunk 3 (16 views) moves the distilled set as the unchunked step does."""
    steps = {}
    for chunk in (0, 3):
        cfg = utils.load_config(write_config(tmp_path, distillation__support_chunk=chunk, storage__m=4))
        data = utils.load_data(cfg)
        T = torch.randn(len(data.train_x), 4, 512, generator=torch.Generator().manual_seed(0))
        state = built(cfg, data, T, 4)
        loss = main_distill.outer_step(state, data, T, cfg["distillation"])
        steps[chunk] = (loss, {k: v.detach().clone() for k, v in state.distilled.state_dict().items()})
    torch.testing.assert_close(steps[3][0], steps[0][0], rtol=1e-5, atol=1e-6)
    for k, v in steps[0][1].items():  # Adam divides by |gradient|: an element whose gradient is near 0 moves by a
        torch.testing.assert_close(steps[3][1][k], v, rtol=1e-5, atol=1e-5)  # rounding-sized amount (lr 1e-2 here)


def test_chunked_inner_step_sees_every_view_in_every_chunk():
    """The inner step in strided chunks: each forward holds at most `chunk` views and every rotation
    alike; with one chunk it is the unchunked step exactly; a few chunked steps lower the inner loss."""
    mp = {"size_L": 1, "inner_loop_steps_Z": 100, "widths": [8], "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}
    torch.manual_seed(0)
    X = main_distill.all_views(torch.randn(6, 3, 8, 8), [90, 180, 270])  # 24 views, view-major
    Y = torch.randn(24, 4)
    states = []
    for chunk in (0, 24):
        torch.manual_seed(1)
        pool = main_distill.ModelPool(mp, 8, 4, torch.device("cpu"), chunk)
        pool.inner_step(0, X, Y)
        states.append(pool.models[0].state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    pool = main_distill.ModelPool(mp, 8, 4, torch.device("cpu"), chunk=10)
    seen = []
    pool.models[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    loss = lambda: F.mse_loss(pool.models[0].eval()(X), Y).item()
    before = loss()
    seen.clear()
    for _ in range(20):
        pool.inner_step(0, X, Y)
    assert seen[:3] == [8, 8, 8] and loss() < before  # ceil(24 / 10) = 3 chunks of views 0::3, 1::3, 2::3


def test_stanford_dogs_uses_its_whole_budget():
    cfg = utils.load_config(REPO / "configs" / "stanford_dogs.yaml")
    table = main_distill.storage_accounting(cfg)
    assert table["m"] == table["m_max"] == 1993 and cfg["distillation"]["support_chunk"] > 0


# ---------------------------------------------------------------------------------- main()
def run_distill(tmp_path, *extra):
    cfg = write_config(tmp_path)
    teacher = write_teacher(tmp_path / "teacher.pth")
    out = tmp_path / "assets"
    return main_distill.main(["--config", str(cfg), "--teacher", str(teacher), "--out", str(out), "--device", "cpu",
                              *extra]), out


def test_short_run_lowers_the_outer_loss_and_writes_assets(tmp_path):
    metrics, out = run_distill(tmp_path)
    first, last = metrics["loss_curve"][0][1], metrics["loss_curve"][-1][1]
    assert metrics["loss_curve"][0][0] == 1 and metrics["steps"] == 50
    assert last < 0.8 * first, metrics["loss_curve"]
    for f in ("distilled_data.pth", "approx_net_rot_90.pth", "approx_net_rot_180.pth", "approx_net_rot_270.pth",
              "distilled_images.png", "metrics.json", "config.json", "log.jsonl", "controls.pth"):
        assert (out / f).is_file(), f
    views, targets, d = utils.load_distilled(out, torch.device("cpu"))
    assert views.shape == (64, 3, 8, 8) and targets.shape == (64, 128)  # d_y = 8 x width 16
    assert d["storage"]["stored"] <= d["storage"]["budget"] and "C_yk" not in d
    from PIL import Image
    with Image.open(out / "distilled_images.png") as grid:  # 16 images of 8 px, each drawn 64 px wide, 4 x 4
        assert grid.size == (4 * 66 + 2, 4 * 66 + 2)
    # the stored approximation nets reproduce the rotated targets up to their reported error
    rel = json.loads((out / "metrics.json").read_text())["approximation"]
    assert set(rel) == {"rot_90", "rot_180", "rot_270"}
    assert all(0 <= v["relative_error"] < 1.5 and v["no_shift_baseline"] == 1.0 for v in rel.values())
    # the controls (outside the budget): the init indices and the learned C_y^k behind distilled_exact
    controls = utils.read_controls(out)
    assert controls["init_indices"].shape == (16,) and len(set(controls["init_indices"].tolist())) == 16
    exact_views, exact_targets, _ = utils.load_distilled(out, torch.device("cpu"), exact=True)
    assert torch.equal(exact_views, views) and torch.equal(exact_targets[:16], targets[:16])
    assert not torch.allclose(exact_targets[16:], targets[16:])  # the MLPs approximate, they do not copy


def test_resume_continues_the_step_count(tmp_path):
    run_distill(tmp_path, "--distillation.steps=20")
    with pytest.raises(FileExistsError, match="--resume"):
        run_distill(tmp_path, "--distillation.steps=30")
    with pytest.raises(ValueError, match=r"another config \(distillation.steps: 20 -> 30\).*--allow-changed"):
        run_distill(tmp_path, "--distillation.steps=30", "--resume")  # a resume continues the same run
    metrics, out = run_distill(tmp_path, "--distillation.steps=30", "--resume", "--allow-changed",
                               "distillation.steps")
    assert metrics["steps"] == 30
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 10, 20, 30]


def test_resume_without_checkpoint_and_wrong_teacher_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_distill(tmp_path, "--resume")
    cfg = write_config(tmp_path)
    bad = write_teacher(tmp_path / "cifar_teacher.pth", dataset="CIFAR10", resolution=32)
    with pytest.raises(ValueError, match="teacher for CIFAR10 at 32 px"):
        main_distill.main(["--config", str(cfg), "--teacher", str(bad), "--out", str(tmp_path / "o"), "--device", "cpu"])
    torch.save({"state_dict": {}}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="not a teacher file"):
        main_distill.main(["--config", str(cfg), "--teacher", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "o2"),
                           "--device", "cpu"])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.txt could not be read as a teacher file written by pretrain\.py"):
        main_distill.main(["--config", str(cfg), "--teacher", str(tmp_path / "notes.txt"),
                           "--out", str(tmp_path / "o3"), "--device", "cpu"])


def test_a_teacher_passed_as_a_distilled_set_is_a_clear_error(tmp_path):
    write_teacher(tmp_path / "distilled_data.pth")
    with pytest.raises(ValueError, match=r"distilled_data\.pth is not a distilled set written by main_distill\.py"):
        utils.load_distilled(tmp_path, torch.device("cpu"))


def test_the_seed_makes_a_run_repeatable(tmp_path):
    """Same seed: the same distilled set, bit for bit on the CPU; another seed: another set."""
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        (tmp_path / name).mkdir()
        _, out = run_distill(tmp_path / name, "--distillation.steps=10", "--approximation.steps=20",
                             "--model_pool.inner_loop_steps_Z=5", f"--seed={seed}")
        runs[name] = utils.load_distilled(out, torch.device("cpu"))[:2]
    assert all(torch.equal(x, y) for x, y in zip(runs["a"], runs["b"]))
    assert not torch.equal(runs["a"][0], runs["c"][0])


def test_krr_st_baseline_run(tmp_path):
    metrics, out = run_distill(tmp_path, "--distillation.method=krr_st", "--distillation.steps=10")
    views, targets, d = utils.load_distilled(out, torch.device("cpu"))
    assert d["method"] == "krr_st" and views.shape == (10, 3, 8, 8) and targets.shape == (10, 128)
    assert not (out / "approx_net_rot_90.pth").exists()


def test_store_augmented_targets_ablation(tmp_path):
    metrics, out = run_distill(tmp_path, "--storage.store_augmented_targets=true", "--distillation.steps=10")
    views, targets, d = utils.load_distilled(out, torch.device("cpu"))
    assert d["C_y_aug"].shape == (3, 16, 8) and not (out / "approx_net_rot_90.pth").exists()
    assert views.shape == (64, 3, 8, 8)


def test_no_rotations_and_frozen_bases_ablation(tmp_path):
    metrics, out = run_distill(tmp_path, "--augmentations.rotate=[]", "--parameterization.learn_bases=false",
                               "--distillation.steps=10")
    views, targets, d = utils.load_distilled(out, torch.device("cpu"))
    assert views.shape == (16, 3, 8, 8) and d["rotations"] == [] and not list(out.glob("approx_net_*"))
    t = d["storage"]
    assert "approximation nets" in t["rows"] and t["rows"]["approximation nets"] == 0


def test_outer_step_updates_the_distilled_set_and_leaves_the_pool_trainable(tmp_path):
    data = tiny_data()
    cfg = utils.load_config(write_config(tmp_path))
    T = torch.randn(len(data.train_x), 4, 512)
    state = built(cfg, data, T)
    C_x0 = state.distilled.C_x.detach().clone()
    loss = main_distill.outer_step(state, data, T, cfg["distillation"])
    assert torch.isfinite(loss) and not torch.equal(state.distilled.C_x, C_x0)
    assert all(p.requires_grad for f in state.pool.models for p in f.parameters())
    assert sum(state.pool.ages) == 1  # exactly one inner step


# ---------------------------------------------------------------------------------- init_only
def test_init_only_is_the_set_at_step_zero(tmp_path):
    """The init_only folder holds the same PCA, m and starting images before any outer step, with approximation
    nets fitted to it; the distilled set beside it has moved away from it."""
    _, out = run_distill(tmp_path, "--distillation.steps=20")
    init_views, init_targets, d0 = utils.load_distilled(out / utils.INIT_ONLY, torch.device("cpu"))
    views, targets, d = utils.load_distilled(out, torch.device("cpu"))
    assert d0["steps"] == 0 and d["steps"] == 20 and d0["run_id"] == d["run_id"] and d0["m"] == d["m"]
    assert d0["storage"] == d["storage"] and torch.equal(d0["mu_x"], d["mu_x"])
    assert init_views.shape == views.shape and not torch.allclose(init_views, views)
    assert torch.equal(utils.read_controls(out / utils.INIT_ONLY)["init_indices"],
                       utils.read_controls(out)["init_indices"])
    for angle in (90, 180, 270):
        assert (out / utils.INIT_ONLY / f"approx_net_rot_{angle}.pth").is_file()
    # its coefficients are the PCA projection of the chosen real images (SPEC 2): decode them again here
    data = utils.load_data(utils.load_config(tmp_path / "digits.yaml"))
    idx = utils.read_controls(out)["init_indices"]
    low = main_distill.downsample(utils.normalize(data.train_x[idx], data.mean, data.std), 4)
    assert torch.allclose(d0["C_x"], (low - d0["mu_x"]) @ d0["B_x"].T, atol=1e-4)


def test_the_storage_table_and_the_approximation_nets_leave_the_global_random_state_alone():
    """Writing init_only fits nets before the loop; neither that nor the storage table may shift the draws of the
    pool's initialisations (checked: the DIGITS numbers of the commit before init_only are reproduced bit for bit)."""
    cfg = cifar_cfg()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    main_distill.storage_accounting(cfg)
    main_distill.fit_approx_nets(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)),
                                 torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(2)),
                                 {"hidden": 2, "steps": 3, "lr": 1e-2}, seed=5)
    assert torch.equal(torch.rand(3), expected)
