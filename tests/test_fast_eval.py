"""Issue 26, a busy evaluation: the loops rewritten without per-step host work give the numbers the loops before
them gave (tests/eval_reference.py, the code at 6b57518), bit for bit on the CPU where the arithmetic allows it,
and the CUDA-graph keys fall back to the same numbers on the CPU. Their speed: tests/bench_evaluation.py."""
import pytest
import torch

import eval_reference as before
import main_distill
import main_evaluate
import models
import utils


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: a second OpenMP thread only adds synchronisation (minutes instead of seconds on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- the linear probe
def test_cosine_lrs_are_the_schedulers_values():
    for T in (1, 7, 5000):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T)
        expected = []
        for _ in range(T):
            expected.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert utils.cosine_lrs(0.2, T) == expected


@pytest.mark.parametrize("n,batch,iterations", [(103, 10, 37), (20, 64, 5), (50, 25, 4)])
def test_batch_indices_are_the_batches_draws(n, batch, iterations):
    laid_out = utils.batch_indices(n, batch, iterations, torch.Generator().manual_seed(3))
    drawn = list(main_evaluate.batches(n, batch, iterations, torch.Generator().manual_seed(3)))
    assert laid_out.shape == (iterations, min(n, batch)) and all(torch.equal(a, b) for a, b in zip(laid_out, drawn))


@pytest.mark.parametrize("n,classes,batch,momentum,weight_decay", [
    (300, 4, 64, 0.9, 0.0),    # several epochs of batches
    (100, 3, 512, 0.9, 1e-3),  # fewer samples than a batch, weight decay
    (500, 10, 128, 0.0, 5e-4),  # no momentum
])
def test_the_probe_gives_the_autograd_probes_numbers_bit_for_bit(n, classes, batch, momentum, weight_decay):
    """nn.Linear + F.cross_entropy + autograd + SGD + CosineAnnealingLR (before) and the step written out (now):
    the same head to the last bit, so every probed number of docs/results.md stands; probe.cuda_graph on the CPU
    falls back to the same eager steps."""
    g = torch.Generator().manual_seed(n)
    centres = 2 * torch.randn(classes, 16, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, 16, generator=g)
    probe = {"iterations": 150, "batch_size": batch, "lr": 0.2, "momentum": momentum, "weight_decay": weight_decay,
             "cuda_graph": False}
    ref = before.train_linear_head(x, y, classes, probe, seed=1)
    now = utils.train_linear_head(x, y, classes, probe, seed=1)
    graph_key = utils.train_linear_head(x, y, classes, {**probe, "cuda_graph": True}, seed=1)
    assert not torch.equal(ref.weight, torch.nn.Linear(16, classes).weight)  # it trained
    assert same_tensors(ref.state_dict(), now.state_dict()) and same_tensors(now.state_dict(), graph_key.state_dict())
    assert utils.linear_probe(x, y, x, y, classes, probe, 1) == before.linear_probe(x, y, x, y, classes, probe, 1)


def test_the_probe_reads_nothing_on_the_host_while_it_trains():
    """No .item() / bool() / .cpu() in the probe's loop (each would make the host wait for a CUDA device)."""
    import gpu_check
    x, y = torch.randn(200, 8), torch.randint(0, 3, (200,))
    probe = {"iterations": 30, "batch_size": 32, "lr": 0.2, "momentum": 0.9, "weight_decay": 0.0, "cuda_graph": False}
    with gpu_check.count_host_syncs(torch.device("cpu")) as counts:
        utils.train_linear_head(x, y, 3, probe, 0)
    assert counts == {}
    with gpu_check.count_host_syncs(torch.device("cpu")) as counts:  # the counter counts: the score is one read
        utils.linear_probe(x, y, x, y, 3, probe, 0)
    assert counts == {"item": 1}


def test_a_cuda_graph_step_runs_eagerly_on_the_cpu():
    calls = []
    step = utils.CudaGraphStep(lambda a, b: calls.append((a, b)) or a + b, enabled=True)
    outs = [step(torch.tensor(float(i)), torch.tensor(1.0)) for i in range(utils.GRAPH_WARMUP + 3)]
    assert len(calls) == utils.GRAPH_WARMUP + 3 and [float(o) for o in outs] == [i + 1.0 for i in range(len(outs))]


# ---------------------------------------------------------------------------------- the approximation MLPs
def shifts(m, V, hidden, seed=0):
    """C_y and three shifted copies that an MLP of this width can represent."""
    torch.manual_seed(seed)
    C_y = torch.randn(m, V)
    with torch.no_grad():
        return C_y, torch.stack([C_y + 3 * models.ApproxMLP(V, hidden)(C_y) for _ in range(3)])


def test_the_approximation_nets_fitted_together_are_the_separate_fits():
    """One batched fit (now) and three separate autograd + Adam fits (before), each net seeded by seed + k: at the
    configs' hidden width 4 the same nets to the last bit on the CPU, saved in the same format (ApproxMLP
    state_dicts), with the same relative errors."""
    C_y, C_yk = shifts(60, 20, 4)
    ac = {"hidden": 4, "steps": 300, "lr": 1e-2}
    ref_nets, ref_errors = before.fit_approx_nets(C_y, C_yk, ac, seed=7)
    nets, errors = main_distill.fit_approx_nets(C_y, C_yk, ac, seed=7)
    assert errors == ref_errors and max(errors) < 0.5
    for ref, net in zip(ref_nets, nets):
        assert type(net) is models.ApproxMLP and not net.training
        assert same_tensors(ref.state_dict(), net.state_dict())


def test_at_other_widths_the_batched_fit_is_within_its_tolerance():
    """Where a batched matmul sums in another order than the single one (here hidden 3 on this CPU; any width on a
    GPU), rounding differs in the last bit and Adam carries it on: measured here at ~1e-7 of the shift's norm in
    the predictions and 1e-8 in the relative errors (at cifar10 sizes, hidden 5, 5,000 steps: 3.5e-4 and 1.1e-5,
    docs/design.md). The tolerance here: 1e-4 and 1e-5."""
    C_y, C_yk = shifts(17, 9, 3)
    ac = {"hidden": 3, "steps": 300, "lr": 1e-2}
    ref_nets, ref_errors = before.fit_approx_nets(C_y, C_yk, ac, seed=0)
    nets, errors = main_distill.fit_approx_nets(C_y, C_yk, ac, seed=0)
    assert errors == pytest.approx(ref_errors, abs=1e-5)
    with torch.no_grad():
        for k, (ref, net) in enumerate(zip(ref_nets, nets)):
            assert (ref(C_y) - net(C_y)).norm() <= 1e-4 * (C_yk[k] - C_y).norm()


# ---------------------------------------------------------------------------------- pre-training a student
EC = {"student": "resnet18", "batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "augment": True,
      "crop_pad": 1, "cuda_graph": False}


def tiny_set(n=20, res=8, d=6):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g), torch.randn(n, d, generator=g)


def test_pretraining_a_student_gives_the_same_network_and_evaluation_cuda_graph_falls_back():
    """12 epochs of 3 batches (the last one smaller), the loss read one log late: the same backbone to the last bit
    as the loop before; with evaluation.cuda_graph the step is utils.sgd_step with the rate read from a tensor,
    run eagerly on the CPU, and gives the same bits too."""
    images, targets = tiny_set()
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    args = (images, targets)
    ref, ref_steps = before.pretrain_on_set(*args, EC, 12, mean, std, 3, "ref", 4)
    now, steps = main_evaluate.pretrain_on_set(*args, EC, 12, mean, std, 3, "now", 4)
    graph_key, _ = main_evaluate.pretrain_on_set(*args, {**EC, "cuda_graph": True}, 12, mean, std, 3, "graph", 4)
    init = models.student("resnet18", 4, 8)[0].state_dict()
    assert not same_tensors(init, now.state_dict())  # it trained
    assert steps == ref_steps == 36
    assert same_tensors(ref.state_dict(), now.state_dict()) and same_tensors(now.state_dict(), graph_key.state_dict())


def test_the_student_loop_reads_its_loss_once_per_log_and_late():
    """12 epochs log at epochs 1, 11 and 12: each logged loss is read once (before: twice, check_finite and the
    progress bar), the first two at the next log (on CUDA: from pinned memory the device copied into long before,
    no wait) and the last at the end; the loop before counted 6 reads."""
    import gpu_check
    images, targets = tiny_set()
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    for pretrain, reads in ((before.pretrain_on_set, 6), (main_evaluate.pretrain_on_set, 3)):
        with gpu_check.count_host_syncs(torch.device("cpu")) as counts:
            pretrain(images, targets, {**EC, "augment": False}, 12, mean, std, 0, "reads", 4)
        assert sum(counts.values()) == reads, counts


def test_a_diverging_student_still_stops_naming_its_epoch():
    images, targets = tiny_set()
    with pytest.raises(utils.RunStopped, match="non-finite pre-training loss .* in diverge epoch .*evaluation.lr"):
        main_evaluate.pretrain_on_set(images, targets * 1e30, {**EC, "lr": 1e6}, 12, torch.zeros(3), torch.ones(3), 0,
                                      "diverge", 4)


def test_the_benchmark_runs_at_tiny_sizes(capsys):
    """tests/bench_evaluation.py (speed is its business, not a test's): every part runs and is reported."""
    import bench_evaluation
    rows = bench_evaluation.main(["--scale", "0.01", "--repeats", "1"])
    assert [r[0] for r in rows] == ["probe", "probe, tiny d", "approx MLPs", "one row"]
    assert all(b > 0 and a > 0 for _, b, a, _, _ in rows) and "| one row |" in capsys.readouterr().out
