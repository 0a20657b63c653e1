"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU): main_distill's outer step
spread over the ranks against the single-process step on the same batch, for both methods.

    torchrun --standalone --nproc_per_node=2 tests/distill_ranks.py CONFIG TEACHER OUT.json [-- MAIN ARGS ...]

Every rank builds the set and pool twice from the same seeds: once for the ranks (outer_step with ranks, pool BatchNorm
over both ranks) and once alone (outer_step, plain BatchNorm), and each takes one outer step on the same batch after
the same stagger. Rank 0 writes the loss, the distilled gradient, the updated set and pool of both; then the ranks'
step runs 19 more times and every rank's tensors are gathered (identical, bit for bit, is the claim), and the
divergence guard is shown one changed bit on rank 1. Then main_distill.main(MAIN ARGS) of each `--`-separated group
runs in the same process group (the test's resumed and uninterrupted 2-rank runs: two torchrun starts fewer; paths
without spaces).
"""
import copy
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main_distill  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402

cfg_path, teacher_file, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ranks, device = utils.init_ranks("cpu")


def rel(a, b):
    """max |a - b| over max |b|, over lists of tensors."""
    return max((x - y).abs().max().item() for x, y in zip(a, b)) / max(y.abs().max().item() for y in b)


def tensors(state):
    """The distilled tensors, their AdamW state, every pool model's weights and buffers: what the ranks must share."""
    opt = [v for s in state.opt.state.values() for v in s.values() if torch.is_tensor(v)]
    pool = [v for f in state.pool.models for v in f.state_dict().values()]
    return [p.detach().clone() for p in state.distilled.parameters()] + opt + pool


results = {"world": ranks.world}
for method in ("ours", "krr_st"):
    cfg = utils.load_config(cfg_path, {"distillation.method": method})
    dc = cfg["distillation"]
    data = utils.load_data(cfg)
    teacher, _ = utils.load_teacher(teacher_file, cfg, device, data)
    with models.rank0_first(ranks):
        T, _ = utils.teacher_targets(teacher, teacher_file, data, main_distill.rotations_of(cfg), cfg["data"],
                                     out.parent)
    m = main_distill.storage_accounting(cfg)["m"]

    def make(r):
        utils.set_seed(cfg["seed"])
        state = main_distill.build(cfg, data, T, m, device, models.make_generator(device, cfg["seed"]),
                                   random.Random(cfg["seed"]), r)
        state.pool.stagger(*state.distilled(), state.rng)  # momentum, BatchNorm statistics and ages as in a run
        return state

    two, one = make(ranks), make(models.Ranks())
    staggered = max(rel([a], [b]) for f2, f1 in zip(two.pool.models, one.pool.models)
                    for a, b in zip(f2.state_dict().values(), f1.state_dict().values()) if b.abs().max() > 0)
    # the step from the same state, the stagger's rounding aside (a copy: SGD's load_state_dict keeps the tensors)
    two.pool.load_state_dict(copy.deepcopy(one.pool.state_dict()))
    before = [p.detach().clone() for p in one.distilled.parameters()]
    loss_two = main_distill.outer_step(two, data, T, dc).item()
    loss_one = main_distill.outer_step(one, data, T, dc).item()
    grads = lambda s: [p.grad for p in s.distilled.parameters() if p.grad is not None]
    r = {"loss": loss_two, "single_loss": loss_one, "grad_rel_diff": rel(grads(two), grads(one)),
         "grad_max": max(g.abs().max().item() for g in grads(one)),
         "set_rel_diff": rel(list(two.distilled.parameters()), list(one.distilled.parameters())),
         "set_step": rel(list(one.distilled.parameters()), before),
         "pool_rel_diff": max(rel([a], [b]) for f2, f1 in zip(two.pool.models, one.pool.models)
                              for a, b in zip(f2.state_dict().values(), f1.state_dict().values()) if b.abs().max() > 0),
         "ages": [list(two.pool.ages), list(one.pool.ages)],
         "stagger_pool_rel_diff": staggered, "views": len(two.distilled()[0])}
    for _ in range(19):
        main_distill.outer_step(two, data, T, dc)
    two.step = 20
    mine = [t.cpu() for t in tensors(two)]
    every = models.gather_objects(mine, ranks)
    r["ranks_identical_after_20"] = all(len(e) == len(mine) and all(torch.equal(a, b) for a, b in zip(e, every[0]))
                                        for e in every)
    r["tensors_compared"] = len(mine)
    main_distill.check_ranks_agree(two)  # agreeing ranks pass
    p = next(two.distilled.parameters())
    if ranks.rank == 1:  # one bit of one tensor on one rank
        with torch.no_grad():
            p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))
    try:
        main_distill.check_ranks_agree(two)
        r["guard"] = None
    except utils.RunStopped as e:
        r["guard"] = str(e)
    results[method] = r

runs = " ".join(sys.argv[4:]).split(" -- ")  # main_distill.main of each run, in this process group
for argv in [a.split() for a in runs if a.strip()]:
    main_distill.main([a for a in argv if a != "--"])
if ranks.main:
    out.write_text(json.dumps(results, indent=1))
